"""The hand-written gradient of the LSTM + Luong decoder loop equals TensorFlow's."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq import fused_decoder
from tests.test_decoder import BATCH, TIME, inputs, make_decoder

CONFIGS = [
    pytest.param(dict(), id="general-feeding"),
    pytest.param(dict(dropout=0.3), id="general-feeding-dropout"),
    pytest.param(dict(input_feeding=False, dropout=0.3), id="general-no-feeding-dropout"),
    pytest.param(dict(attention_score="dot", memory_dim=8), id="dot-feeding"),
    pytest.param(dict(attention_score="scaled_dot", memory_dim=8, embedding_dim=5), id="scaled_dot-emb5"),
]


def gradients(config, fused, monkeypatch, policy="float32"):
    """Loss value and gradients (weights, initial cells, memory) of a fixed function of the
    decoder's logits and attention, with the fused loop on or off."""
    config = dict(config)
    memory_dim = config.pop("memory_dim", 12)
    calls = []
    original = fused_decoder.luong_lstm_loop
    monkeypatch.setattr(fused_decoder, "supports", lambda decoder: fused)
    monkeypatch.setattr(fused_decoder, "luong_lstm_loop", lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        keras.config.set_dtype_policy(policy)
        decoder = make_decoder(memory_dim, cell_type="lstm", attention="luong", **config)
        if policy != "float32":
            decoder.set_weights(make_decoder(memory_dim, cell_type="lstm", attention="luong", **config).get_weights())
        target_in, state, context = inputs(decoder, memory_dim)
        rng = np.random.default_rng(1)
        logit_weights = tf.constant(rng.normal(size=(BATCH, TIME, decoder.vocab_size)), tf.float32)
        memory = context["memory"]
        with tf.GradientTape() as tape:
            tape.watch([state["cells"], memory])
            context = decoder.prepare_context(memory, context["memory_mask"])  # the keys' gradient too
            logits, attention = decoder(target_in, state, context, training=True)
            loss = tf.reduce_sum(logits * logit_weights) + 3.0 * tf.reduce_sum(attention[:, :, :2])
        grads = tape.gradient(loss, [decoder.trainable_variables, state["cells"], memory])
    finally:
        keras.config.set_dtype_policy("float32")
    assert len(calls) == (1 if fused else 0)
    flat = [tf.convert_to_tensor(g) for g in tf.nest.flatten(grads)]
    names = [v.path for v in decoder.trainable_variables]
    return float(loss), flat, names


@pytest.mark.parametrize("config", CONFIGS)
def test_fused_loop_gradients_equal_tensorflows(config, monkeypatch):
    loss, grads, names = gradients(config, True, monkeypatch)
    ref_loss, ref_grads, _ = gradients(config, False, monkeypatch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        name = names[i] if i < len(names) else f"input {i - len(names)}"
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=name)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads[len(names):])


def test_fused_loop_gradients_under_mixed_bfloat16(monkeypatch):
    config = dict(dropout=0.3)
    loss, grads, names = gradients(config, True, monkeypatch, "mixed_bfloat16")
    ref_loss, ref_grads, _ = gradients(config, False, monkeypatch, "mixed_bfloat16")
    f32_loss, f32_grads, _ = gradients(config, True, monkeypatch)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, g, r, f in zip(names + ["h", "c", "memory"], grads, ref_grads, f32_grads):
        # Both bf16 gradients are as close to the float32 gradient as each other (within bf16 noise).
        scale = float(tf.reduce_max(tf.abs(f))) + 1e-6
        assert float(tf.reduce_max(tf.abs(g - f))) / scale < 0.05, name
        assert float(tf.reduce_max(tf.abs(r - f))) / scale < 0.05, name
