"""Training: a model learns to reverse sequences, exact resumption after kill -9, NaN
detection, mixed precision, XLA, .keras round trip, the loss and the schedule."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.batching import plan_batches
from seq2seq.losses import MaskedCrossEntropy, WarmupDecay
from seq2seq.model import build_rnn_model
from seq2seq.training import (
    Trainer,
    TrainingConfig,
    TrainingError,
    average_checkpoints,
    restore_model_weights,
    sequence_batches,
    set_precision,
)

VOCAB = 12  # 0 pad, 1 unused, 2 start, 3 end, 4..11 symbols


def reverse_data(count, seed, max_length=7):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_length + 1, size=count)
    return [rng.integers(4, VOCAB, size=n).tolist() for n in lengths]


def reverse_batches(sources, batch_size=64, seed=1, pad_to_multiple=1):
    lengths = np.array([len(s) for s in sources])
    return sequence_batches(
        tf.ragged.constant(sources, dtype=tf.int32),
        tf.ragged.constant([s[::-1] for s in sources], dtype=tf.int32),
        lambda epoch: plan_batches(lengths, batch_size=batch_size, seed=seed, epoch=epoch),
        pad_to_multiple=pad_to_multiple,
    )


def pad(sequences):
    return tf.ragged.constant(sequences, dtype=tf.int32).to_tensor(0)


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), label_smoothing=0.0, tensorboard=False, verbose=0)
    values.update(overrides)
    return TrainingConfig(**values)


def exact_match(result, targets):
    ids, lengths = result.ids.numpy()[:, 0], result.lengths.numpy()[:, 0]
    return np.mean([ids[i, : lengths[i]].tolist() == t for i, t in enumerate(targets)])


# Learning a task ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reverse_model(tmp_path_factory):
    keras.utils.set_random_seed(0)
    train = reverse_data(3000, seed=0)
    model = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=48, bidirectional=True)
    trainer = Trainer(
        model,
        config(
            tmp_path_factory.mktemp("reverse"), max_steps=500, steps_per_checkpoint=100, learning_rate=1e-2,
            warmup_steps=30, decay="cosine",
        ),
    )
    history = trainer.fit(reverse_batches(train))
    seen = {tuple(s) for s in train}
    held_out = [s for s in reverse_data(400, seed=99) if tuple(s) not in seen or len(s) < 3][:200]
    return model, trainer, history, held_out


def test_model_learns_to_reverse_sequences(reverse_model):
    model, trainer, history, held_out = reverse_model
    assert trainer.step == 500
    losses = history.history["loss"]
    assert losses[-1] < 0.1 * losses[0]
    result = model.generate(pad(held_out), max_length=10)
    accuracy = exact_match(result, [s[::-1] for s in held_out])
    assert accuracy >= 0.99, accuracy
    # Beam search agrees on a model this sure of itself.
    beam = model.generate(pad(held_out[:50]), search="beam", beam_size=3, max_length=10)
    assert exact_match(beam, [s[::-1] for s in held_out[:50]]) >= 0.98


def test_keras_file_round_trip_gives_identical_outputs(reverse_model, tmp_path):
    model, _, _, held_out = reverse_model
    path = tmp_path / "reverse.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, type(model))
    sources = pad(held_out[:32])
    target_in = tf.concat([tf.fill([32, 1], 2), sources[:, ::-1]], axis=1)
    inputs = {"source": sources, "target_in": target_in}
    np.testing.assert_array_equal(loaded(inputs), model(inputs))
    for search, options in (("greedy", {}), ("beam", {"beam_size": 4, "n_best": 2, "length_penalty": 0.6})):
        a = model.generate(sources, search=search, max_length=10, **options)
        b = loaded.generate(sources, search=search, max_length=10, **options)
        for field, x, y in zip(a._fields, a, b):
            np.testing.assert_array_equal(x, y, err_msg=field)


# Exact resumption --------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import keras
    import numpy as np
    import tensorflow as tf
    from seq2seq.batching import plan_batches
    from seq2seq.model import build_rnn_model
    from seq2seq.training import Trainer, TrainingConfig, sequence_batches

    output_dir, dropout = sys.argv[1], float(sys.argv[2])
    kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 8, size=200)  # 7 batches of 32 per epoch: the run crosses epochs
    sources = [rng.integers(4, 12, size=n).tolist() for n in lengths]
    batches = sequence_batches(
        tf.ragged.constant(sources, dtype=tf.int32),
        tf.ragged.constant([s[::-1] for s in sources], dtype=tf.int32),
        lambda epoch: plan_batches(lengths, batch_size=32, seed=3, epoch=epoch),
    )
    model = build_rnn_model(12, 12, cell_type="lstm", units=16, dropout=dropout)
    trained = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            trained.append(step)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(model, TrainingConfig(
        output_dir, max_steps=20, steps_per_checkpoint=5, learning_rate=5e-3, warmup_steps=4,
        decay="cosine", tensorboard=False, verbose=1))
    trainer.fit(batches, callbacks=[Probe()])
    np.savez(os.path.join(output_dir, "final.npz"), trained=np.array(trained),
             **{f"w{i}": w.numpy() for i, w in enumerate(model.weights)})
    """
)


def run_script(script, output_dir, dropout, kill_at=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    if kill_at:
        env["KILL_AT_STEP"] = str(kill_at)
    return subprocess.Popen(
        [sys.executable, str(script), str(output_dir), str(dropout)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_training_killed_with_sigkill_resumes_to_identical_weights(tmp_path):
    """A run killed between checkpoints resumes to the weights of an uninterrupted run."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # Both runs at once (two cores); the second kills itself at step 13, between the
    # checkpoints at steps 10 and 15.
    runs = [run_script(script, whole, 0.0), run_script(script, resumed, 0.0, kill_at=13)]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert runs[0].returncode == 0, outputs[0]
    assert runs[1].returncode == -9, outputs[1]
    assert not (resumed / "final.npz").exists()
    assert (resumed / "checkpoints" / "ckpt-10.index").exists()
    assert not (resumed / "checkpoints" / "ckpt-15.index").exists()

    rerun = run_script(script, resumed, 0.0)
    output = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == 0, output
    assert "resuming from" in output and "step 10" in output, output

    expected, actual = np.load(whole / "final.npz"), np.load(resumed / "final.npz")
    np.testing.assert_array_equal(expected["trained"], np.arange(1, 21))
    # The resumed process trained steps 11-20 only: it did not start over from scratch.
    np.testing.assert_array_equal(actual["trained"], np.arange(11, 21))
    weights = sorted(key for key in expected.files if key.startswith("w"))
    assert len(weights) > 10
    for key in weights:
        np.testing.assert_allclose(actual[key], expected[key], atol=1e-6, rtol=0, err_msg=key)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A GRU with dropout trained for max_steps=7 with a checkpoint every 2 steps, and the
    trainable weights at the end of every checkpoint interval."""
    keras.utils.set_random_seed(0)
    model = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8, dropout=0.3)
    snapshots = []
    snapshot = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: snapshots.append([v.numpy().copy() for v in model.trainable_weights])
    )
    trainer = Trainer(model, config(tmp_path_factory.mktemp("short"), max_steps=7, steps_per_checkpoint=2))
    batches = reverse_batches(reverse_data(64, seed=0), batch_size=16)
    history = trainer.fit(batches, callbacks=[snapshot])
    return model, trainer, batches, history, snapshots


def test_finished_run_does_not_train_again(short_run):
    model, trainer, batches, history, snapshots = short_run
    step = trainer.step
    assert len(trainer.manager.checkpoints) == len(snapshots) == len(history.history["loss"])
    assert trainer.fit(batches) is None
    assert trainer.step == step
    for v, value in zip(model.trainable_weights, snapshots[-1]):
        np.testing.assert_array_equal(v.numpy(), value)


def test_max_steps_is_respected_when_not_a_multiple_of_the_interval(short_run):
    """max_steps 7 with checkpoints every 2 steps: intervals of 2, 2, 2 and a last one of 1."""
    _, trainer, _, history, _ = short_run
    assert trainer.step == 7
    assert int(trainer.manager.latest_checkpoint.rsplit("-", 1)[1]) == 7
    assert len(history.history["loss"]) == 4


def test_checkpoint_restores_dropout_random_state(short_run):
    """The checkpoint holds every model variable, so a resumed run draws the same dropout
    masks as an uninterrupted one."""
    model, trainer, *_ = short_run
    seeds = [v for v in model.variables if "seed_generator" in v.path]
    assert len(seeds) == 3  # encoder dropout, decoder embedding dropout, decoder masks
    saved = [v.numpy().copy() for v in seeds]
    for v in seeds:
        v.assign(np.zeros_like(v.numpy()))
    trainer.restore()
    try:
        for v, value in zip(seeds, saved):
            np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)
    finally:
        for v, value in zip(seeds, saved):
            v.assign(value)


def test_average_checkpoints_into_a_new_model(short_run):
    """As in a separate averaging run: a freshly built model gets all the checkpoints'
    weights, including the RNN cells and bridge projections held in (nested) lists."""
    _, trainer, _, _, snapshots = short_run
    expected = [(a + b) / 2 for a, b in zip(*snapshots[-2:])]
    fresh = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8, dropout=0.3)
    averaged = average_checkpoints(fresh, trainer.manager.checkpoints[-2:])
    for v, value in zip(averaged.trainable_weights, expected):
        np.testing.assert_allclose(v.numpy(), value, atol=1e-6, err_msg=v.path)



def test_restore_weights_from_a_checkpoint_of_model_and_optimizer_only(short_run, tmp_path):
    """Checkpoints written before the full variable list was added hold the weights in the
    model's object graph and the optimizer's list (here with a schedule, so no learning-rate
    variable); a fresh model gets every trainable weight back."""
    model, trainer, *_ = short_run
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "old"))
    fresh = restore_model_weights(build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8, dropout=0.3), path)
    for v, expected in zip(fresh.trainable_weights, model.trainable_weights):
        np.testing.assert_array_equal(v.numpy(), expected.numpy(), err_msg=v.path)
    with pytest.raises(TrainingError, match="does not (fit this model|hold weights for)"):
        restore_model_weights(build_rnn_model(VOCAB, VOCAB, cell_type="lstm", units=8), path)


def test_trainer_resumes_from_a_checkpoint_without_the_full_variable_list(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    model = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8)
    trainer = Trainer(model, config(tmp_path, max_steps=4, steps_per_checkpoint=2))
    trainer.fit(reverse_batches(reverse_data(64, seed=0), batch_size=16))
    legacy = tf.train.Checkpoint(
        model=model, optimizer=model.optimizer, chunk=trainer.chunk, best=trainer.best, bad_chunks=trainer.bad_chunks
    )
    tf.train.CheckpointManager(legacy, str(tmp_path / "checkpoints"), max_to_keep=1).save()
    weights = [v.numpy().copy() for v in model.trainable_weights]

    fresh = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8)
    resumed = Trainer(fresh, config(tmp_path, max_steps=4, steps_per_checkpoint=2))
    assert resumed.restore() is not None and resumed.step == 4
    assert "predates full-variable checkpoints" in capsys.readouterr().err
    for v, expected in zip(fresh.trainable_weights, weights):
        np.testing.assert_array_equal(v.numpy(), expected, err_msg=v.path)

# Failures and speed-ups ----------------------------------------------------------------


def test_nan_loss_stops_training_with_a_clear_error(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8)
    bias = model.decoder.output_layer.bias
    bias.assign(np.full(bias.shape, np.nan, np.float32))
    trainer = Trainer(model, config(tmp_path, max_steps=6, steps_per_checkpoint=3))
    with pytest.raises(TrainingError, match=r"loss became nan at step 1;.*lower the learning rate"):
        trainer.fit(reverse_batches(reverse_data(64, seed=0), batch_size=16))
    assert trainer.step == 1
    assert trainer.manager.latest_checkpoint is None  # nothing NaN was saved


def train_a_little(tmp_path, **overrides):
    keras.utils.set_random_seed(0)
    model = build_rnn_model(VOCAB, VOCAB, cell_type="lstm", units=16)
    trainer = Trainer(model, config(tmp_path, max_steps=30, steps_per_checkpoint=10, learning_rate=1e-2, **overrides))
    # Equal batch sizes and lengths padded to 8: a single input shape, so XLA compiles once.
    history = trainer.fit(reverse_batches(reverse_data(320, seed=0), batch_size=32, pad_to_multiple=8))
    return model, history.history["loss"]


def test_mixed_bfloat16_trains(tmp_path):
    try:
        set_precision("bf16")
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        model, losses = train_a_little(tmp_path, precision="bf16")
        assert model.decoder.compute_dtype == "bfloat16"
        assert all(v.dtype == "float32" for v in model.trainable_weights)
        logits = model({"source": pad([[4, 5, 6]]), "target_in": pad([[2, 6, 5]])})
        assert logits.dtype == tf.float32
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_jit_compile_trains(tmp_path):
    model, losses = train_a_little(tmp_path, jit_compile=True)
    assert model.jit_compile
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_config_rejects_unknown_precision(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainingConfig(output_dir=str(tmp_path), precision="int8")


# Loss and schedule ---------------------------------------------------------------------


def test_masked_cross_entropy_ignores_padding():
    rng = np.random.default_rng(0)
    y_true = np.array([[5, 6, 7, 0, 0], [4, 0, 0, 0, 0]], np.int32)
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
    loss = MaskedCrossEntropy()
    base = float(loss(y_true, logits))
    changed = logits.copy()
    changed[y_true == 0] = 100 * rng.normal(size=(int((y_true == 0).sum()), 9))
    assert float(loss(y_true, changed)) == pytest.approx(base, abs=1e-6)
    longer_true = np.pad(y_true, [[0, 0], [0, 3]])
    longer_logits = np.concatenate([logits, rng.normal(size=(2, 3, 9)).astype(np.float32)], axis=1)
    assert float(loss(longer_true, longer_logits)) == pytest.approx(base, abs=1e-6)
    # A batch of only padding gives zero, not NaN.
    assert float(loss(np.zeros((2, 5), np.int32), logits)) == 0.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_cross_entropy_equals_keras_cross_entropy_over_real_tokens(smoothing):
    rng = np.random.default_rng(1)
    y_true = np.array([[5, 6, 7, 0], [4, 8, 0, 0], [1, 2, 3, 4]], np.int32)
    logits = rng.normal(size=(3, 4, 9)).astype(np.float32)
    real = y_true != 0
    if smoothing:
        reference = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing, reduction=None)
        per_token = reference(np.eye(9)[y_true], logits).numpy()
    else:
        per_token = keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True).numpy()
    expected = per_token[real].mean()
    assert float(MaskedCrossEntropy(label_smoothing=smoothing)(y_true, logits)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        MaskedCrossEntropy(label_smoothing=1.0)


def test_masked_cross_entropy_gradient_is_smoothed_softmax_minus_target_on_real_tokens_only():
    rng = np.random.default_rng(2)
    y_true = np.array([[5, 6, 0], [4, 0, 0]], np.int32)
    logits = tf.constant(rng.normal(size=(2, 3, 9)).astype(np.float32))
    smoothing = 0.1
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = MaskedCrossEntropy(label_smoothing=smoothing)(y_true, logits)
    gradient = tape.gradient(loss, logits).numpy()
    real = y_true != 0
    target = np.eye(9)[y_true] * (1 - smoothing) + smoothing / 9
    expected = (tf.nn.softmax(logits).numpy() - target) / real.sum()
    np.testing.assert_allclose(gradient[real], expected[real], atol=1e-6)
    assert not gradient[~real].any()


def test_warmup_decay_values():
    def at(schedule, steps):
        return [float(schedule(step)) for step in steps]

    # The schedule is called with the 0-based optimizer iteration; step i uses (i + 1).
    constant = WarmupDecay(1.0, warmup_steps=4, decay="constant")
    np.testing.assert_allclose(at(constant, [0, 1, 3, 100]), [0.25, 0.5, 1.0, 1.0], rtol=1e-6)
    inverse_sqrt = WarmupDecay(2.0, warmup_steps=4, decay="inverse_sqrt")
    np.testing.assert_allclose(at(inverse_sqrt, [0, 3, 15, 99]), [0.5, 2.0, 1.0, 0.4], rtol=1e-6)
    cosine = WarmupDecay(1.0, warmup_steps=4, decay="cosine", total_steps=10, final_fraction=0.1)
    np.testing.assert_allclose(at(cosine, [1, 3, 6, 9, 50]), [0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    no_warmup = WarmupDecay(1.0, decay="inverse_sqrt")
    np.testing.assert_allclose(at(no_warmup, [0, 3]), [1.0, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="decay must be one of"):
        WarmupDecay(1.0, decay="linear")
    with pytest.raises(ValueError, match="cosine decay needs total_steps"):
        WarmupDecay(1.0, decay="cosine")
    clone = WarmupDecay.from_config(cosine.get_config())
    np.testing.assert_allclose(at(clone, [1, 6]), [0.5, 0.55], rtol=1e-6)


# Throughput in the training log ---------------------------------------------------------


def test_target_tokens_counts_the_planned_batches():
    sources = reverse_data(300, seed=4)
    batches = reverse_batches(sources, batch_size=32)
    per_step = []
    for epoch in range(2):
        for indices in batches.plan(epoch):
            _, target_out = batches.make_batch(tf.constant(indices))
            per_step.append(int(tf.math.count_nonzero(target_out)))  # </s> included, padding not
    steps_per_epoch = len(batches.plan(0))
    assert batches.target_tokens(0, len(per_step)) == sum(per_step)
    # Across the epoch boundary, from a resumed position.
    start, end = steps_per_epoch - 3, steps_per_epoch + 4
    assert batches.target_tokens(start, end) == sum(per_step[start:end])


def test_training_reports_target_tokens_per_second(tmp_path, capsys, monkeypatch):
    """On a terminal (next to Keras's progress bar) a line of its own a checkpoint; in a log
    file the checkpoint line carries it (tests/test_translation_cli.py)."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    keras.utils.set_random_seed(0)
    model = build_rnn_model(VOCAB, VOCAB, cell_type="gru", units=8)
    trainer = Trainer(model, config(tmp_path, max_steps=24, steps_per_checkpoint=8, verbose=1))
    history = trainer.fit(reverse_batches(reverse_data(640, seed=0), batch_size=32))
    rates = history.history["target_tokens_per_second"]
    assert len(rates) == 3 and all(rate > 0 for rate in rates)
    lines = [line for line in capsys.readouterr().err.splitlines() if "target tokens/s: " in line]
    assert len(lines) == 3 and lines[0].startswith("step 8: target tokens/s: ")
    # The first interval leaves out the steps that traced the train function.
    assert "in 5 steps" in lines[0] and "in 8 steps" in lines[1]
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["history"]["target_tokens_per_second"] == pytest.approx(rates)
    assert summary["target_tokens_per_second"] == pytest.approx(np.mean(rates))


def test_every_private_keras_hook_exists_and_a_missing_one_is_one_clear_error(monkeypatch):
    """seq2seq.keras_compat gathers the private Keras/TF hooks; all exist in the installed
    versions (Adam's slot lists included), and a Keras without one fails with one line."""
    from seq2seq import keras_compat
    from seq2seq.optimizers import FusedAdam

    assert keras_compat.missing() == []
    variable = keras.Variable(np.zeros((2, 3), np.float32))
    optimizer = FusedAdam(1e-3)
    optimizer.build([variable])
    momentum, velocity = keras_compat.adam_slots(optimizer, variable)
    assert tuple(momentum.shape) == tuple(velocity.shape) == (2, 3) and momentum is not velocity
    for base in keras.Model.__mro__:  # a Keras without it (restored after the test)
        if "_maybe_symbolic_build" in vars(base):
            monkeypatch.delattr(base, "_maybe_symbolic_build")
    with pytest.raises(TrainingError, match=r"lacks what seq2seq needs \(keras.Model._maybe_symbolic_build\)"):
        keras_compat.check(TrainingError)
