"""Mixed bfloat16 learns like float32; the automatic precision choice; the bf16-safe Dense."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.batching import plan_batches
from seq2seq.model import build_rnn_model
from seq2seq.precision import Dense, cpu_flags, describe_precision, precision_scope, resolve_precision, set_precision
from seq2seq.training import Trainer, TrainingConfig, sequence_batches

VOCAB = 12  # 0 pad, 1 unused, 2 start, 3 end, 4..11 symbols


@pytest.fixture
def bf16_policy():
    set_precision("bf16")
    yield
    keras.config.set_dtype_policy("float32")


# oneDNN in training processes ----------------------------------------------------------

@pytest.mark.parametrize("command", ["translate", "caption"])
@pytest.mark.parametrize("user_setting, enabled", [(None, "True"), ("0", "False")])
def test_train_runs_onednn_products_unless_the_user_turned_them_off(command, user_setting, enabled):
    """TensorFlow turns oneDNN on by itself only on CPUs with AVX512-VNNI or newer; the train
    commands turn it on everywhere (faster on AVX2), and TF_ENABLE_ONEDNN_OPTS=0 still wins.
    The command's train handler is replaced by one that reports what TensorFlow runs."""
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if user_setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user_setting
    code = (f"from seq2seq import {command} as command\n"
            "def report(args):\n"
            "    from tensorflow.python.util import _pywrap_util_port as port\n"
            "    print(port.IsMklEnabled())\n"
            "command.command_train = report\n"
            "command.main(['train'])\n")
    result = subprocess.run([sys.executable, "-c", code], env=dict(env, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip().splitlines()[-1:] == [enabled], result.stderr[-2000:]


# Automatic choice ----------------------------------------------------------------------


@pytest.mark.parametrize("flags", [{"fpu", "avx2", "amx_bf16", "amx_tile"}, {"avx512f", "avx512_bf16"}])
def test_auto_chooses_bf16_on_cpus_with_bfloat16_units(flags, capsys):
    assert resolve_precision("auto", flags=flags) == "bf16"
    message = capsys.readouterr().err
    assert message.startswith("precision: bf16 (automatic: the CPU has ") and "--precision float32 overrides" in message


def test_auto_chooses_float32_elsewhere(capsys):
    assert resolve_precision("auto", flags={"fpu", "avx2", "avx512f"}) == "float32"
    assert "precision: float32 (automatic: the CPU has no AMX or AVX512-BF16; --precision bf16 overrides)" in capsys.readouterr().err


def test_explicit_precision_overrides_the_cpu(capsys):
    assert resolve_precision("float32", flags={"amx_bf16"}) == "float32"
    assert resolve_precision("bf16", flags=set()) == "bf16"
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8")


def test_training_log_names_the_precision_and_why_when_automatic():
    assert TrainingConfig(output_dir="unused").precision == "auto"
    assert describe_precision("auto", "bf16", flags={"amx_bf16"}) == (
        "bf16 (automatic: the CPU has amx_bf16; --precision float32 overrides)"
    )
    assert describe_precision("auto", "float32", flags=set()) == (
        "float32 (automatic: the CPU has no AMX or AVX512-BF16; --precision bf16 overrides)"
    )
    assert describe_precision("bf16", "bf16", flags=set()) == "bf16"


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 amx_bf16 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "amx_bf16", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_set_precision_resolves_auto(monkeypatch):
    monkeypatch.setattr("seq2seq.precision.cpu_flags", lambda: {"avx512_bf16"})
    try:
        assert set_precision("auto", verbose=False) == "bf16"
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")


# Where bf16 must not round ----------------------------------------------------------------


def test_dense_bias_gradient_is_accurate_under_bf16(bf16_policy):
    """TF's BiasAddGrad sums bf16 in bf16 (64% off over 3,600 positive rows); Dense's is a
    float32-accumulated Sum, off only by the final bf16 rounding."""
    layer = Dense(8)
    layer.build((None, 4))
    rows = np.random.default_rng(0).uniform(0.001, 0.011, size=(3600, 8)).astype(np.float32)
    upstream = tf.cast(rows, tf.bfloat16)
    with tf.GradientTape() as tape:
        outputs = layer(tf.zeros((3600, 4)))
    (gradient,) = tape.gradient(outputs, [layer.bias], output_gradients=upstream)
    exact = tf.cast(upstream, tf.float64).numpy().sum(axis=0)
    np.testing.assert_allclose(tf.cast(gradient, tf.float64).numpy(), exact, rtol=0.01)


def test_float32_output_dense_returns_float32_logits(bf16_policy):
    layer = Dense(5, float32_output=True)
    layer.build((None, 3))
    assert layer(tf.ones((2, 3))).dtype == tf.float32
    assert Dense.from_config(layer.get_config()).float32_output


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
def test_rnn_states_stay_float32_under_bf16(bf16_policy, cell_type):
    model = build_rnn_model(VOCAB, VOCAB, cell_type=cell_type, units=16, bidirectional=True)
    encoded = model.encoder(tf.constant([[4, 5, 6, 0]]))
    assert encoded["memory"].dtype == tf.bfloat16
    assert all(part.dtype == tf.float32 for layer in encoded["final_states"] for d in layer for part in d)


# Learning like float32 ---------------------------------------------------------------------


def reverse_pairs(count, seed):
    rng = np.random.default_rng(seed)
    sources = [rng.integers(4, VOCAB, size=n).tolist() for n in rng.integers(3, 16, size=count)]
    return sources, [s[::-1] for s in sources]


def batches(pairs, shuffle):
    sources, targets = pairs
    lengths = np.array([len(s) + 1 for s in sources])
    return sequence_batches(
        tf.ragged.constant(sources, dtype=tf.int32),
        tf.ragged.constant(targets, dtype=tf.int32),
        lambda epoch: plan_batches(lengths, batch_size=64, seed=3, epoch=epoch, shuffle=shuffle),
    )


def validation_curve(tmp_path, precision):
    keras.utils.set_random_seed(0)
    set_precision(precision)
    try:
        model = build_rnn_model(VOCAB, VOCAB, cell_type="lstm", units=32, bidirectional=True, dropout=0.1)
        config = TrainingConfig(
            output_dir=str(tmp_path / precision), max_steps=240, steps_per_checkpoint=40, learning_rate=1e-3,
            precision=precision, tensorboard=False, verbose=0,
        )
        history = Trainer(model, config).fit(batches(reverse_pairs(4000, 0), True), batches(reverse_pairs(300, 1), False))
    finally:
        keras.config.set_dtype_policy("float32")
    return np.array(history.history["val_loss"])


def test_bf16_validation_loss_follows_float32(tmp_path):
    """Same seed, same data, same dropout masks: the bf16 validation loss stays within 0.5%
    of float32's at every checkpoint (measured: 0.15% at most). With dropout noise drawn in
    bf16, as TensorFlow's dropout does, the curves drifted 0.6% apart by the last checkpoint."""
    float32 = validation_curve(tmp_path, "float32")
    bf16 = validation_curve(tmp_path, "bf16")
    assert float32[-1] < 0.7 * float32[0], float32  # it learns
    np.testing.assert_allclose(bf16, float32, rtol=0.005)


def test_precision_scope_restores_the_global_policy(monkeypatch):
    monkeypatch.setattr("seq2seq.precision.cpu_flags", lambda: {"amx_bf16"})
    with precision_scope("auto", verbose=False) as precision:
        assert precision == "bf16" and keras.config.dtype_policy().name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(RuntimeError), precision_scope("bf16"):
        raise RuntimeError("training failed")
    assert keras.config.dtype_policy().name == "float32"  # models built next (exports) are float32


def test_dropout_keeps_the_rate_exactly_on_average_and_masks_alike_in_every_dtype():
    """16 random bits a unit: rate 0.3 keeps 70% of a million units (within 4 standard
    deviations), the output's mean is the input's (kept units scaled by 1 / 0.7), and one seed
    gives one mask whether the inputs are float32 or bfloat16."""
    from seq2seq.precision import Dropout

    ones = tf.ones([1001, 999])  # an odd number of units: the last 32-bit draw is half used
    masks = {}
    for dtype in ("float32", "bfloat16"):
        layer = Dropout(0.3, seed=5)
        masks[dtype] = layer(tf.cast(ones, dtype), training=True).numpy().astype(np.float32)
    np.testing.assert_array_equal(masks["float32"] > 0, masks["bfloat16"] > 0)
    kept = float(np.mean(masks["float32"] > 0))
    assert abs(kept - 0.7) < 4 * np.sqrt(0.7 * 0.3 / ones.shape.num_elements()), kept
    assert set(np.unique(masks["float32"])) == {0.0, np.float32(65536 / (65536 - round(0.3 * 65536)))}
    assert abs(float(np.mean(masks["float32"])) - 1.0) < 0.005
    assert Dropout(0.3)(ones, training=False) is ones


def test_dropout_gradient_is_the_mask_and_noise_shape_broadcasts():
    from seq2seq.precision import Dropout

    inputs = tf.random.normal([4, 6, 8])
    layer = Dropout(0.5, noise_shape=(None, 1, 8), seed=3)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(inputs, training=True)
        total = tf.reduce_sum(outputs)
    gradient = tape.gradient(total, inputs).numpy()
    np.testing.assert_allclose(outputs.numpy(), inputs.numpy() * gradient, rtol=1e-6)
    assert np.all(gradient == gradient[:, :1, :])  # one mask for every time step
    assert set(np.unique(gradient)) == {0.0, 2.0}
