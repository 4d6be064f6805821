"""The run directory's lifecycle: one train process at a time, a failed start that does not
poison the directory, a resume that holds to its saved config, out-of-range settings refused
when the config is read, a diverging run stopped, and the whole history kept over resumes.

Runs are tiny translation runs trained in-process (`conftest.cli`); a refused start fails
before any training, so most tests take well under a second.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import TINY_MODEL, cli, toy_pairs, write_lines
from seq2seq import caption, distribute
from seq2seq.config import RUN_CONFIG
from seq2seq.model import build_rnn_model
from seq2seq.run import LOCK_FILE, open_run, run_lock
from seq2seq.tasks.captioning.config import CaptionConfig
from seq2seq.tasks.translation.config import TranslationConfig
from seq2seq.text import Vocabulary
from seq2seq.training import Trainer, TrainingConfig, TrainingError
from test_training import VOCAB, reverse_batches, reverse_data


def data_flags(corpus):
    return ["--train-source", corpus / "train.en", "--train-target", corpus / "train.de"]


def train_flags(corpus, run_dir, max_steps=4, steps_per_checkpoint=2):
    return ["train", *data_flags(corpus), "--output-dir", run_dir, "--max-steps", max_steps,
            "--steps-per-checkpoint", steps_per_checkpoint, "--no-validation-bleu", *TINY_MODEL]


def last_error(capsys, code):
    """Asserts the command failed with an `error: ...` line as its last output line; returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    return lines[-1]


def summary(run_dir):
    return json.loads((run_dir / "training_summary.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, toy_corpus):
    """A tiny translation run of 4 steps with a checkpoint every 2 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli(*train_flags(toy_corpus, run_dir)) == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


# One train process a run directory ------------------------------------------------------------


def test_a_second_train_process_on_a_run_dir_is_refused_naming_the_first(capsys, tmp_path, toy_corpus):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        line = last_error(capsys, cli(*train_flags(toy_corpus, run_dir)))
    assert line == (
        f"error: run directory {run_dir} is in use by another train process (pid {os.getpid()} on host "
        f"{socket.gethostname()}); wait for it to end or choose another --output-dir"
    )
    assert not (run_dir / RUN_CONFIG).exists()  # the refused process wrote nothing
    with run_lock(run_dir):  # and the first one's lock was released at the end of its block
        pass


def test_the_lock_of_a_killed_process_blocks_no_one(tmp_path):
    """flock goes with its process: after kill -9 the lock file is left, but locking succeeds."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, json, os, socket, sys, time
        file = open({str(run_dir / LOCK_FILE)!r}, "w")
        fcntl.flock(file, fcntl.LOCK_EX)
        file.write(json.dumps({{"pid": os.getpid(), "host": socket.gethostname()}}))
        file.flush()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=rf"in use by another train process \(pid {holder.pid} on host "):
            with run_lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / LOCK_FILE).is_file()
    with run_lock(run_dir):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_only_the_chief_locks_the_run_dir(monkeypatch, tmp_path, toy_corpus):
    """Under multi-worker training the chief holds the lock; another worker reads the run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = TranslationConfig.from_dict({
        "data": {"train_source": str(toy_corpus / "train.en"), "train_target": str(toy_corpus / "train.de")},
        "training": {"output_dir": str(run_dir)},
    })
    config.save(run_dir / RUN_CONFIG)
    monkeypatch.setattr(distribute, "is_chief", lambda strategy: False)
    monkeypatch.setattr(distribute, "barrier", lambda strategy: None)

    class Loaded:
        config = None

    with run_lock(run_dir):  # the chief's
        with open_run(config, None, lambda directory: Loaded(), create=None) as run:
            assert run.config == config


# A failed start, and a resume that holds to its config -------------------------------------------


def test_a_failed_first_start_does_not_poison_the_run_dir(capsys, tmp_path, toy_corpus):
    run_dir = tmp_path / "run"
    write_lines(tmp_path / "empty.en", [])
    write_lines(tmp_path / "empty.de", [])
    flags = train_flags(toy_corpus, run_dir, max_steps=2)
    empty = ["--train-source", tmp_path / "empty.en", "--train-target", tmp_path / "empty.de"]
    line = last_error(capsys, cli(*flags, *empty))
    assert "no sentence pairs left to train on" in line
    assert (run_dir / RUN_CONFIG).is_file() and len(Vocabulary.load(run_dir / "target.vocab")) == 4

    assert cli(*flags) == 0
    err = capsys.readouterr().err
    assert f"{run_dir} holds a start that never reached its first checkpoint" in err
    assert "continuing" not in err
    assert len(Vocabulary.load(run_dir / "target.vocab")) > 20
    assert TranslationConfig.load(run_dir / RUN_CONFIG).data.train_source == str(toy_corpus / "train.en")
    assert summary(run_dir)["step"] == 2


def test_a_resume_with_other_model_or_data_settings_is_refused_naming_them(capsys, run_copy, toy_corpus, tmp_path):
    before = sorted(os.listdir(run_copy / "checkpoints"))
    write_lines(tmp_path / "other.en", toy_pairs(50, seed=7)[0])
    flags = train_flags(toy_corpus, run_copy, max_steps=8)
    flags[flags.index("--train-source") + 1] = tmp_path / "other.en"
    line = last_error(capsys, cli(*flags, "--units", 32, "--cell-type", "gru", "--seed", 5))
    assert line.startswith(f"error: {run_copy} holds a run trained with other settings, which a resumed run keeps: ")
    for change in (f"data.train_source {str(toy_corpus / 'train.en')!r} (now {str(tmp_path / 'other.en')!r})",
                   "model.cell_type 'lstm' (now 'gru')", "model.units 16 (now 32)", "training.seed 1234 (now 5)"):
        assert change in line
    assert line.endswith("or choose another --output-dir for a new run")
    assert sorted(os.listdir(run_copy / "checkpoints")) == before
    assert TranslationConfig.load(run_copy / RUN_CONFIG).training.max_steps == 4


def test_a_resume_applies_the_settings_that_may_change_and_keeps_the_whole_history(capsys, run_copy, toy_corpus):
    """max_steps and steps_per_checkpoint change on resume: the run goes on from step 4 to 8 in
    one interval, its config.yaml says so, and training_summary.json holds all three checkpoints."""
    first = summary(run_copy)
    assert first["history"]["step"] == [2, 4]
    # The same data, spelled from another folder, is the same data.
    relative = [os.path.relpath(path) for path in data_flags(toy_corpus)[1::2]]
    flags = train_flags(toy_corpus, run_copy, max_steps=8, steps_per_checkpoint=4)
    flags[flags.index("--train-source") + 1], flags[flags.index("--train-target") + 1] = relative
    assert cli(*flags, "--verbose", 2) == 0
    err = capsys.readouterr().err
    assert "holds a run: continuing it with its saved config and vocabularies; changed: " in err
    assert "training.max_steps 4 -> 8" in err and "training.steps_per_checkpoint 2 -> 4" in err
    saved = TranslationConfig.load(run_copy / RUN_CONFIG)
    assert (saved.training.max_steps, saved.training.steps_per_checkpoint) == (8, 4)
    assert saved.data.train_source == relative[0]
    resumed = summary(run_copy)
    assert resumed["step"] == 8
    assert resumed["history"]["step"] == [2, 4, 8]
    assert resumed["history"]["loss"][:2] == first["history"]["loss"]
    assert len(resumed["history"]["loss"]) == 3


def test_a_resumed_trainer_drops_history_entries_after_its_checkpoint(tmp_path):
    """A run killed between writing the summary and the checkpoint resumes from the checkpoint
    before: the summary's entry for the lost interval is replaced by the one trained again."""
    batches = reverse_batches(reverse_data(64, seed=0), batch_size=16)

    def trainer(max_steps):
        keras.utils.set_random_seed(0)
        model = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8)
        config = TrainingConfig(output_dir=str(tmp_path), max_steps=max_steps, steps_per_checkpoint=2,
                                tensorboard=False, verbose=0)
        return Trainer(model, config)

    trainer(4).fit(batches)
    path = tmp_path / "training_summary.json"
    written = json.loads(path.read_text())
    written["history"]["step"].append(6)
    written["history"]["loss"].append(123.0)
    path.write_text(json.dumps(written))
    trainer(6).fit(batches)
    history = json.loads(path.read_text())["history"]
    assert history["step"] == [2, 4, 6]
    assert history["loss"][:2] == written["history"]["loss"][:2] and history["loss"][2] != 123.0


# Settings checked when the config is read ----------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--learning-rate", "-1"], "learning_rate must be positive, got -1.0"),
    (["--learning-rate", "nan"], "learning_rate must be a finite number, got nan"),
    (["--learning-rate", "inf"], "learning_rate must be a finite number, got inf"),
    (["--label-smoothing", "1"], "label_smoothing must be in [0, 1), got 1.0"),
    (["--clip-norm", "-5"], "clip_norm must be at least 0, got -5.0"),
    (["--warmup-steps", "-1"], "warmup_steps must be at least 0, got -1"),
    (["--max-steps", "0"], "max_steps must be at least 1, got 0"),
    (["--batch-size", "0"], "batching batch_size must be at least 1, got 0"),
    (["--target-vocab-size", "4"], "tokenization target_vocab_size must be at least 5, got 4"),
    (["--max-source-length", "0"], "data max_source_length must be at least 1, got 0"),
])
def test_out_of_range_training_settings_are_one_error_line(capsys, tmp_path, toy_corpus, flags, message):
    run_dir = tmp_path / "run"
    line = last_error(capsys, cli(*train_flags(toy_corpus, run_dir), *flags))
    assert line == f"error: {message}"
    assert not run_dir.exists()


def test_a_config_file_number_is_checked_like_a_flag(capsys, tmp_path, toy_corpus):
    """PyYAML reads 1e-3 (no dot) as text: the error says how to write it."""
    config = tmp_path / "config.yaml"
    config.write_text("training:\n  clip_norm: 5e-1\n")
    line = last_error(capsys, cli(*train_flags(toy_corpus, tmp_path / "run"), "--config", config))
    assert line == "error: clip_norm must be a number, got '5e-1' (YAML reads 5e-1 as text: write 5.0e-1)"
    config.write_text(yaml.safe_dump({"training": {"keep_checkpoints": 2.5}}))
    line = last_error(capsys, cli(*train_flags(toy_corpus, tmp_path / "run"), "--config", config))
    assert line == "error: keep_checkpoints must be an integer, got 2.5"


@pytest.mark.parametrize("flags, message", [
    (["--encoder-dropout", "1"], "model encoder_dropout must be in [0, 1), got 1.0"),
    (["--attention-regularizer", "-0.1"], "model attention_regularizer must be at least 0, got -0.1"),
    (["--batch-size", "0"], "batching batch_size must be at least 1, got 0"),
    (["--shapes-train", "0"], "shapes_train must be at least 1, got 0"),
    (["--vocab-size", "2"], "vocab_size must be at least 5, got 2"),
])
def test_out_of_range_captioning_settings_are_one_error_line(capsys, tmp_path, flags, message):
    code = caption.main(["train", "--shapes-train", "8", "--output-dir", str(tmp_path / "run"), *flags])
    assert last_error(capsys, code) == f"error: {message}"


def test_unset_optional_numbers_pass_and_defaults_are_in_range(tmp_path):
    TranslationConfig.from_dict({"data": {"train_tsv": "x.tsv"}, "batching": {"max_tokens": 100},
                                 "training": {"output_dir": str(tmp_path)}})
    CaptionConfig.from_dict({"data": {"shapes_train": 4}, "training": {"output_dir": str(tmp_path)}})


# A diverging run ------------------------------------------------------------------------------------


def test_a_diverging_run_stops_with_the_likely_cause(capsys, tmp_path, toy_corpus):
    run_dir = tmp_path / "run"
    line = last_error(capsys, cli(*train_flags(toy_corpus, run_dir, max_steps=8), "--learning-rate", 1000))
    assert line.startswith("error: training diverged: loss ")
    assert " at step 4 is above " in line and "for 2 checkpoints in a row (first checkpoint loss " in line
    assert line.endswith("lower --learning-rate (now 1000) and start a new run with another --output-dir")
    history = summary(run_dir)["history"]
    assert history["step"] == [2, 4]  # stopped at its second diverged checkpoint, not at step 8
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")).endswith("ckpt-2")
    assert not (run_dir / "best.weights.h5").exists()  # no diverged weights became the best


def test_divergence_after_good_checkpoints_keeps_the_last_good_weights_as_best(tmp_path):
    """Weights blown up after two good checkpoints: the run stops at the second bad checkpoint,
    and best.weights.h5 still holds the second good checkpoint's weights."""
    keras.utils.set_random_seed(0)
    model = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8)
    good = []

    class BlowUp(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                good.extend(v.numpy().copy() for v in model.trainable_weights)
                for variable in model.trainable_weights:
                    variable.assign(variable * 300.0)

    config = TrainingConfig(output_dir=str(tmp_path), max_steps=12, steps_per_checkpoint=2, learning_rate=1e-2,
                            label_smoothing=0.0, tensorboard=False, verbose=0, early_stopping_metric="loss")
    trainer = Trainer(model, config)
    with pytest.raises(TrainingError, match=r"training diverged: loss \S+ at step 8 is above"):
        trainer.fit(reverse_batches(reverse_data(64, seed=0), batch_size=16), callbacks=[BlowUp()])
    losses = json.loads((tmp_path / "training_summary.json").read_text())["history"]["loss"]
    assert len(losses) == 4 and losses[1] < losses[0] < np.log(VOCAB) < 2 * np.log(VOCAB) < min(losses[2:])
    best = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8)
    best.load_weights(tmp_path / "best.weights.h5")
    for variable, value in zip(best.trainable_weights, good):
        np.testing.assert_array_equal(variable.numpy(), value)


@pytest.mark.parametrize("flags, message", [
    (["--dropout", "1"], "model dropout must be in [0, 1), got 1.0"),
    (["--units", "0"], "model units must be at least 1, got 0"),
    (["--decoder-layers", "0"], "model decoder_layers must be at least 1, got 0"),
])
def test_out_of_range_model_settings_are_one_error_line(capsys, tmp_path, toy_corpus, flags, message):
    assert last_error(capsys, cli(*train_flags(toy_corpus, tmp_path / "run"), *flags)) == f"error: {message}"
    code = caption.main(["train", "--shapes-train", "8", "--output-dir", str(tmp_path / "caption"), *flags])
    assert last_error(capsys, code) == f"error: {message}"
