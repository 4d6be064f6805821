"""Distributed training (seq2seq.distribute): each worker's slices of the global batches, two
workers on localhost that reach the single-worker loss curve, a killed worker and a resumed
job, and `mirrored` on one CPU through the same code path.

The two-worker runs start real processes (`python -m seq2seq.translate train --distribution
multi_worker` behind a wrapper that also saves each worker's final weights) with their own
TF_CONFIG on free 127.0.0.1 ports. The models are tiny (GRU, 8 units, vocabularies of ~30
words); the time goes into starting TensorFlow and tracing the step.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import PROJECT_ROOT, cli, toy_pairs, write_lines
from seq2seq import distribute
from seq2seq.training import PlannedBatches, Trainer, TrainingConfig

MAX_STEPS = 30
STEPS_PER_CHECKPOINT = 5
TIMEOUT = 240  # seconds for a whole multi-process run on a busy machine

# The CLI, with each worker's final weights saved to $WEIGHTS_OUT.
WRAPPER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from seq2seq.tasks.translation import pipeline
    from seq2seq import translate

    train = pipeline.train

    def train_and_save_weights(config, **kwargs):
        run, model = train(config, **kwargs)
        np.savez(os.environ["WEIGHTS_OUT"], *[w.numpy() for w in model.weights])
        return run, model

    pipeline.train = train_and_save_weights
    sys.exit(translate.main(sys.argv[1:]))
    """
)


def free_ports(count):
    """Ports nothing listens on: bound to port 0 on 127.0.0.1 together, then released."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def train_flags(corpus, run_dir, distribution):
    # float32: the curves are compared to 1e-4, finer than bfloat16 rounding (which `auto` picks on AMX CPUs).
    return [
        "train", "--train-source", corpus / "train.en", "--train-target", corpus / "train.de",
        "--output-dir", run_dir, "--distribution", distribution, "--max-steps", MAX_STEPS,
        "--steps-per-checkpoint", STEPS_PER_CHECKPOINT, "--cell-type", "gru", "--units", 8, "--no-bidirectional",
        "--dropout", 0, "--label-smoothing", 0, "--learning-rate", 0.02, "--batch-size", 32, "--verbose", 0,
        "--no-tensorboard", "--no-validation-bleu", "--precision", "float32",
    ]


class Job:
    """Processes of one training job, with their logs in files (no pipe can fill up)."""

    def __init__(self, tmp_path, name):
        self.tmp_path = tmp_path
        self.name = name
        self.processes = []
        self.logs = []

    def start(self, args, tf_config=None, weights_out=None):
        wrapper = self.tmp_path / "train_wrapper.py"
        wrapper.write_text(WRAPPER)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(PROJECT_ROOT))
        env.pop("TF_CONFIG", None)
        if tf_config:
            env["TF_CONFIG"] = json.dumps(tf_config)
        env["WEIGHTS_OUT"] = str(weights_out or self.tmp_path / f"{self.name}-{len(self.processes)}.npz")
        log = self.tmp_path / f"{self.name}-{len(self.processes)}.log"
        with open(log, "w") as stream:
            process = subprocess.Popen(
                [sys.executable, str(wrapper), *map(str, args)], stdout=stream, stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT, env=env,
            )
        self.processes.append(process)
        self.logs.append(log)
        return process

    def start_workers(self, args, count=2):
        ports = free_ports(count)
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        for index in range(count):
            self.start(args, {"cluster": cluster, "task": {"type": "worker", "index": index}},
                       weights_out=self.tmp_path / f"{self.name}-worker{index}.npz")

    def wait(self, deadline):
        for process in self.processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [process.returncode for process in self.processes]

    def output(self, index):
        return self.logs[index].read_text()

    def kill(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def summary(run_dir):
    return json.loads((Path(run_dir) / "training_summary.json").read_text())


def weights(path):
    with np.load(path) as saved:
        return [saved[key] for key in sorted(saved.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("distribute_corpus")
    sources, targets = toy_pairs(256, seed=1)  # 8 global batches of 32 a pass
    write_lines(directory / "train.en", sources)
    write_lines(directory / "train.de", targets)
    return directory


def restored_weights(run_dir):
    """The weights of a run's last checkpoint, restored by a Trainer without a strategy (so a
    checkpoint written under a strategy must be in the format of one written without)."""
    from seq2seq.tasks.translation.pipeline import TranslationRun

    run = TranslationRun.load(run_dir)
    trainer = Trainer(run.build_model(), dataclasses.replace(run.config.training, distribution="none"))
    assert trainer.restore()
    return trainer.step, [w.numpy() for w in trainer.model.weights]


def kill_worker_after_first_checkpoint(job, run_dir, deadline, record):
    """Kills worker 1 of `job` with SIGKILL as soon as the chief has written a checkpoint."""
    while time.monotonic() < deadline and all(p.poll() is None for p in job.processes):
        if list((run_dir / "checkpoints").glob("ckpt-*.index")):
            job.processes[1].send_signal(signal.SIGKILL)
            record["killed"] = True
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, corpus):
    """Started together, to share the slow start of TensorFlow: a two-worker multi_worker job,
    a two-worker job whose worker 1 is killed after the first checkpoint, and (in this
    process) a run without a strategy of the same config."""
    tmp_path = tmp_path_factory.mktemp("jobs")
    multi, killed = Job(tmp_path, "multi"), Job(tmp_path, "killed")
    record = {}
    try:
        start = time.monotonic()
        multi.start_workers(train_flags(corpus, tmp_path / "multi_run", "multi_worker"))
        killed.start_workers(train_flags(corpus, tmp_path / "killed_run", "multi_worker"))
        watcher = threading.Thread(
            target=kill_worker_after_first_checkpoint,
            args=(killed, tmp_path / "killed_run", start + TIMEOUT, record), daemon=True,
        )
        watcher.start()
        single_code = cli(*train_flags(corpus, tmp_path / "single_run", "none"))
        codes = multi.wait(start + TIMEOUT)
        wall_time = time.monotonic() - start
        killed_codes = killed.wait(start + TIMEOUT)
        watcher.join(timeout=5)
    finally:
        multi.kill()
        killed.kill()
    return dict(
        tmp_path=tmp_path, multi=multi, killed=killed, codes=codes, killed_codes=killed_codes,
        single_code=single_code, wall_time=wall_time, killed_worker=record.get("killed", False),
        multi_run=tmp_path / "multi_run", killed_run=tmp_path / "killed_run", single_run=tmp_path / "single_run",
    )


# Each worker's share of a global batch -----------------------------------------------------


def input_context(pipelines, pipeline_id, replicas):
    return tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline_id,
                                      num_replicas_in_sync=replicas)


@pytest.mark.parametrize("size", [32, 7, 3])
def test_replica_slices_partition_each_global_batch_in_order(size):
    batch = np.arange(100, 100 + size)
    slices = [s for p in range(2) for s in distribute.replica_slices(batch, input_context(2, p, 4))]
    assert len(slices) == 4
    np.testing.assert_array_equal(np.concatenate(slices), batch)
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1  # 3 examples on 4 replicas: one replica gets none
    np.testing.assert_array_equal(distribute.replica_slices(batch)[0], batch)


def test_stream_gives_each_worker_its_slices_of_every_global_batch():
    """Sharding is by hand, at the batch level (auto-shard OFF): worker p makes its replicas'
    slices of every global batch, so two workers see together what one worker sees."""
    plan = lambda epoch: [np.arange(epoch * 10 + i * 5, epoch * 10 + i * 5 + 5) for i in range(2)]  # noqa: E731
    batches = PlannedBatches(plan, lambda indices: ({"source": indices}, indices))
    single = [y.numpy() for _, y in batches.stream(1).take(3)]
    workers = [[y.numpy() for _, y in batches.stream(1, input_context(2, p, 2)).take(3)] for p in range(2)]
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate([workers[0][step], workers[1][step]]), single[step])
    assert [len(y) for y in workers[0]] == [3, 3, 3] and [len(y) for y in workers[1]] == [2, 2, 2]
    policy = batches.stream(0, input_context(2, 0, 2)).options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.OFF


def test_a_replica_without_examples_gets_a_masked_stand_in():
    """A global batch of one example on two replicas: replica 1 computes on a copy of it whose
    targets are all padding, so it adds nothing to the loss (no replica gets an empty batch)."""
    batches = PlannedBatches(lambda epoch: [np.array([7])], lambda i: ({"source": i[:, None] + 1}, i[:, None] + 1))
    first, second = (next(iter(batches.stream(0, input_context(2, p, 2)))) for p in range(2))
    assert first[0]["source"].numpy().tolist() == second[0]["source"].numpy().tolist() == [[8]]
    assert first[1].numpy().tolist() == [[8]] and second[1].numpy().tolist() == [[0]]
    validation = list(batches.epoch_dataset(0, input_context(2, 1, 2)))
    assert len(validation) == 1 and validation[0][1].numpy().tolist() == [[0]]


def test_config_and_strategy_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="distribution must be one of"):
        TrainingConfig(output_dir=str(tmp_path), distribution="horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="reads the cluster from the TF_CONFIG environment variable"):
        distribute.make_strategy("multi_worker")
    assert distribute.make_strategy("none") is None
    from seq2seq.model import build_rnn_model

    strategy = distribute.make_strategy("mirrored")
    outside = build_rnn_model(12, 12, cell_type="gru", units=8)
    with pytest.raises(ValueError, match="build the model under the strategy's scope"):
        Trainer(outside, TrainingConfig(output_dir=str(tmp_path), distribution="mirrored"), strategy)


# Two workers on localhost ------------------------------------------------------------------


def test_two_workers_train_like_one_worker_with_the_same_global_batch(jobs):
    for index, code in enumerate(jobs["codes"]):
        assert code == 0, jobs["multi"].output(index)
    assert jobs["single_code"] == 0
    multi, single = summary(jobs["multi_run"]), summary(jobs["single_run"])
    assert multi["step"] == single["step"] == MAX_STEPS
    losses = multi["history"]["loss"]
    assert len(losses) == MAX_STEPS // STEPS_PER_CHECKPOINT
    assert losses[-1] < 0.7 * losses[0], losses
    # The same loss curve as one process with the same global batch.
    np.testing.assert_allclose(losses, single["history"]["loss"], rtol=0, atol=1e-4)
    difference = max(abs(a - b) for a, b in zip(losses, single["history"]["loss"]))
    print(f"\ntwo-worker wall time {jobs['wall_time']:.1f}s; final loss {losses[-1]:.7f}, single-worker "
          f"{single['history']['loss'][-1]:.7f}; largest difference over the curve {difference:.1e}")
    # Identical weights on both workers, and (within float tolerance) those of the single run.
    tmp_path = jobs["tmp_path"]
    chief, other = weights(tmp_path / "multi-worker0.npz"), weights(tmp_path / "multi-worker1.npz")
    step, reference = restored_weights(jobs["single_run"])
    assert step == MAX_STEPS
    assert len(chief) == len(other) == len(reference) > 5
    for a, b, c in zip(chief, other, reference):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-4)
    # Only the chief wrote the run dir (the last 5 checkpoints are kept), in the format of a
    # run without a strategy.
    steps = range(STEPS_PER_CHECKPOINT, MAX_STEPS + 1, STEPS_PER_CHECKPOINT)
    assert sorted(p.name for p in (jobs["multi_run"] / "checkpoints").glob("*.index")) == sorted(
        f"ckpt-{step}.index" for step in list(steps)[-5:]
    )
    assert (jobs["multi_run"] / "best.weights.h5").is_file()
    step, restored = restored_weights(jobs["multi_run"])
    assert step == MAX_STEPS
    for a, b in zip(restored, chief):
        np.testing.assert_array_equal(a, b)


def test_cluster_error_message_names_the_dead_worker_when_the_error_does():
    heartbeat = tf.errors.UnavailableError(
        None, None, "Collective ops is aborted by: The following tasks are unhealthy (stopped sending "
        "heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed."
    )
    message = distribute.cluster_error_message(heartbeat, ("worker", 0), 7, "/run/checkpoints/ckpt-5")
    assert message.startswith("worker 0 lost contact with the cluster at step 7: worker 1 stopped (no heartbeats).")
    assert message.endswith("training resumes from the last checkpoint, /run/checkpoints/ckpt-5")

    reset = tf.errors.UnavailableError(None, None, "{{function_node __inference_step_1}} Collective ops is aborted by: recvmsg:Connection reset by peer\nmore")
    message = distribute.cluster_error_message(reset, ("chief", 0), 3, None)
    assert "chief 0 lost contact with the cluster at step 3: another worker stopped or is unreachable (UnavailableError: Collective ops is aborted by: recvmsg:Connection reset by peer)" in message
    assert "function_node" not in message
    assert message.endswith("no checkpoint was written yet, so training starts again from the beginning")


def test_killed_worker_stops_the_job_and_a_restart_resumes_from_the_last_checkpoint(tmp_path, corpus, jobs):
    assert jobs["killed_worker"], jobs["killed"].output(0)
    codes, run_dir = jobs["killed_codes"], jobs["killed_run"]
    assert codes[1] == -signal.SIGKILL
    # The other worker stops with a clear message instead of hanging.
    message = jobs["killed"].output(0)
    assert codes[0] == 2, message
    # Which error reaches the survivor first is a race: the coordination service's heartbeat
    # report (names the dead worker) or the collective's broken connection (cannot name it).
    assert "lost contact with the cluster" in message, message
    assert "worker 1 stopped" in message or "another worker stopped or is unreachable" in message, message
    assert "Restart every worker with the same command and TF_CONFIG" in message
    resume_from = int(tf.train.latest_checkpoint(str(run_dir / "checkpoints")).rsplit("-", 1)[1])
    assert STEPS_PER_CHECKPOINT <= resume_from < MAX_STEPS
    assert f"ckpt-{resume_from}" in message
    before = summary(run_dir)["history"]  # written at every checkpoint, so a kill leaves it
    assert before["step"][-1] in (resume_from, resume_from + STEPS_PER_CHECKPOINT)

    restarted = Job(tmp_path, "restarted")
    try:
        restarted.start_workers(train_flags(corpus, run_dir, "multi_worker"))
        codes = restarted.wait(time.monotonic() + TIMEOUT)
    finally:
        restarted.kill()
    assert codes == [0, 0], restarted.output(0) + restarted.output(1)
    result = summary(run_dir)
    assert result["step"] == MAX_STEPS
    assert "holds a run: continuing it" in restarted.output(0)
    # The summary holds the whole run, once each checkpoint; the part before the kill unchanged.
    assert result["history"]["step"] == list(range(STEPS_PER_CHECKPOINT, MAX_STEPS + 1, STEPS_PER_CHECKPOINT))
    kept = before["step"].index(resume_from) + 1
    assert result["history"]["loss"][:kept] == before["loss"][:kept]
    # And the job ends where the uninterrupted two-worker job ended.
    uninterrupted = weights(jobs["tmp_path"] / "multi-worker0.npz")
    for a, b, c in zip(weights(tmp_path / "restarted-worker0.npz"), weights(tmp_path / "restarted-worker1.npz"), uninterrupted):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)


# One machine: mirrored ---------------------------------------------------------------------


def test_mirrored_on_one_cpu_runs_the_distributed_code_path(tmp_path, corpus, jobs):
    run_dir = tmp_path / "mirrored_run"
    assert cli(*train_flags(corpus, run_dir, "mirrored")) == 0
    result = summary(run_dir)
    assert result["step"] == MAX_STEPS
    single = summary(jobs["single_run"])
    np.testing.assert_allclose(result["history"]["loss"], single["history"]["loss"], rtol=0, atol=1e-4)
    _, restored = restored_weights(run_dir)
    _, reference = restored_weights(jobs["single_run"])
    for a, b in zip(restored, reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
