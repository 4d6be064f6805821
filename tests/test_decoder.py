"""AttentionDecoder: teacher forcing agrees with stepping; tied embeddings; mixed precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.decoders import AttentionDecoder

VOCAB, UNITS, BATCH, SRC, TIME = 13, 8, 3, 5, 6
SRC_LENGTHS = [5, 2, 3]


def make_decoder(memory_dim=12, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    decoder = AttentionDecoder(VOCAB, units=UNITS, **kwargs)
    decoder.build(memory_dim)
    return decoder


def inputs(decoder, memory_dim=12, dtype="float32", seed=0):
    """(target_in, initial state, context) with random memory, a padding mask and random cell states."""
    rng = np.random.default_rng(seed)
    memory = tf.constant(rng.normal(size=(BATCH, SRC, memory_dim)), dtype)
    mask = np.arange(SRC)[None] < np.array(SRC_LENGTHS)[:, None]
    memory = memory * tf.cast(mask[..., None], dtype)
    parts = 2 if decoder.cell_type == "lstm" else 1
    cells = tuple(
        tuple(tf.constant(rng.uniform(-1, 1, size=(BATCH, UNITS)), dtype) for _ in range(parts))
        for _ in range(decoder.num_layers)
    )
    target_in = rng.integers(1, VOCAB, size=(BATCH, TIME)).astype(np.int32)
    target_in[1, 4:] = 0  # padding at the end of one target
    state = decoder.initial_state(cells, BATCH)
    return target_in, state, decoder.prepare_context(memory, mask)


CONFIGS = [
    pytest.param(dict(cell_type=c, attention=a), id=f"{c}-{a}")
    for c in ("simple_rnn", "lstm", "gru")
    for a in ("luong", "bahdanau")
] + [
    pytest.param(dict(cell_type="gru", attention="luong", input_feeding=False), id="gru-luong-no-feeding"),
    pytest.param(dict(cell_type="lstm", attention="bahdanau", input_feeding=False, num_layers=2), id="lstm-bahdanau-no-feeding-2l"),
    pytest.param(
        dict(cell_type="lstm", attention="bahdanau", attention_normalize=True, num_layers=2, tie_embeddings=True),
        id="lstm-bahdanau-normalized-2l-tied",
    ),
    pytest.param(
        dict(cell_type="simple_rnn", attention="luong", attention_score="dot", tie_embeddings=True, memory_dim=UNITS),
        id="simple_rnn-luong-dot-tied",
    ),
    pytest.param(
        dict(cell_type="gru", attention="luong", attention_score="scaled_dot", num_layers=2, memory_dim=UNITS,
             embedding_dim=5),
        id="gru-luong-scaled_dot-2l-emb5",
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_teacher_forcing_equals_stepping(config):
    config = dict(config)
    memory_dim = config.pop("memory_dim", 12)
    decoder = make_decoder(memory_dim, **config)
    target_in, state, context = inputs(decoder, memory_dim)
    logits, attention = decoder(target_in, state, context)
    assert logits.dtype == tf.float32 and attention.dtype == tf.float32
    assert tuple(logits.shape) == (BATCH, TIME, VOCAB)
    assert tuple(attention.shape) == (BATCH, TIME, SRC)

    step_logits, step_attention = [], []
    for t in range(TIME):
        logits_t, state, attention_t = decoder.step(target_in[:, t], state, context)
        step_logits.append(logits_t)
        step_attention.append(attention_t)
    np.testing.assert_allclose(logits, tf.stack(step_logits, axis=1), atol=1e-5)
    np.testing.assert_allclose(attention, tf.stack(step_attention, axis=1), atol=1e-6)

    # Attention respects the source padding at every step.
    mask = np.arange(SRC)[None, None] < np.array(SRC_LENGTHS)[:, None, None]
    assert np.all(attention.numpy()[np.broadcast_to(~mask, attention.shape)] == 0.0)
    np.testing.assert_allclose(attention.numpy().sum(-1), 1.0, rtol=1e-5)
    # The logits depend on the previous tokens (the recurrence is not a no-op).
    assert not np.allclose(logits[:, 0], logits[:, 1])


def test_input_feeding_state_and_tied_output_matrix():
    decoder = make_decoder(tie_embeddings=True, cell_type="gru")
    assert not hasattr(decoder, "output_layer")
    names = [w.path for w in decoder.weights]
    assert not any("output_layer" in name for name in names)
    # Layer 0 reads [embedding; previous attentional vector].
    assert tuple(decoder.cells[0].kernel.shape) == (UNITS + UNITS, 3 * UNITS)
    target_in, state, context = inputs(decoder)
    assert set(state) == {"cells", "feed"} and np.all(state["feed"].numpy() == 0.0)
    logits, state, _ = decoder.step(target_in[:, 0], state, context)
    # With tied embeddings, logits = feed @ E^T + b where feed is the attentional vector.
    expected = state["feed"].numpy() @ decoder.embedding.embeddings.numpy().T + decoder.output_bias.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)

    no_feed = make_decoder(input_feeding=False)
    assert tuple(no_feed.cells[0].kernel.shape) == (UNITS, 4 * UNITS)
    assert "feed" not in inputs(no_feed)[1]


def test_tie_embeddings_needs_equal_sizes():
    with pytest.raises(ValueError, match="tie_embeddings needs embedding_dim == units, got 6 and 8"):
        AttentionDecoder(VOCAB, units=UNITS, embedding_dim=6, tie_embeddings=True)
    with pytest.raises(ValueError, match="num_layers must be at least 1"):
        AttentionDecoder(VOCAB, units=UNITS, num_layers=0)
    with pytest.raises(ValueError, match="attention must be 'bahdanau' or 'luong'"):
        AttentionDecoder(VOCAB, units=UNITS, attention="dot")


def test_dropout_only_in_training():
    decoder = make_decoder(dropout=0.5, num_layers=2, cell_type="lstm")
    target_in, state, context = inputs(decoder)
    inference, _ = decoder(target_in, state, context, training=False)
    again, _ = decoder(target_in, state, context, training=False)
    np.testing.assert_array_equal(inference, again)
    train_a, _ = decoder(target_in, state, context, training=True)
    train_b, _ = decoder(target_in, state, context, training=True)
    assert not np.allclose(train_a, inference, atol=1e-3)
    assert not np.allclose(train_a, train_b, atol=1e-3)  # fresh masks on every call
    # Inference still equals stepping.
    steps = []
    for t in range(TIME):
        logits_t, state, _ = decoder.step(target_in[:, t], state, context)
        steps.append(logits_t)
    np.testing.assert_allclose(inference, tf.stack(steps, 1), atol=1e-5)


@pytest.mark.parametrize("config", [dict(cell_type="lstm", attention="luong"), dict(cell_type="gru", attention="bahdanau", num_layers=2, tie_embeddings=True)])
def test_logits_are_float32_under_mixed_bfloat16(config):
    reference = make_decoder(**config)
    try:
        keras.config.set_dtype_policy("mixed_bfloat16")
        decoder = make_decoder(**config)
        assert decoder.compute_dtype == "bfloat16"
        decoder.set_weights(reference.get_weights())
        target_in, state, context = inputs(decoder, dtype="bfloat16")
        # What the time loop carries or reads from outside it is float32 (its gradient is a
        # sum over steps); the input-feeding vector, recomputed at every step, is bfloat16.
        assert context["memory"].dtype == tf.float32 and context["keys"].dtype == tf.float32
        assert all(part.dtype == tf.float32 for layer in state["cells"] for part in layer)
        assert state["feed"].dtype == tf.bfloat16
        logits, attention = decoder(target_in, state, context)
        step_logits, step_state, step_attention = decoder.step(target_in[:, 0], state, context)
        assert all(part.dtype == tf.float32 for layer in step_state["cells"] for part in layer)
    finally:
        keras.config.set_dtype_policy("float32")
    assert logits.dtype == tf.float32 and step_logits.dtype == tf.float32
    assert attention.dtype == tf.float32 and step_attention.dtype == tf.float32
    assert all(w.dtype == "float32" for w in decoder.weights)
    # Same weights in float32 give nearly the same logits (bfloat16 keeps ~3 digits).
    ref_logits, _ = reference(*inputs(reference))
    np.testing.assert_allclose(logits, ref_logits, atol=0.1)
    np.testing.assert_allclose(step_logits, ref_logits[:, 0], atol=0.1)
    assert keras.config.dtype_policy().name == "float32"


def test_config_round_trip():
    decoder = make_decoder(cell_type="gru", attention="bahdanau", num_layers=2, dropout=0.1, input_feeding=False)
    clone = AttentionDecoder.from_config(decoder.get_config())
    clone.build(12)
    clone.set_weights(decoder.get_weights())
    target_in, state, context = inputs(decoder)
    np.testing.assert_allclose(clone(target_in, state, context)[0], decoder(target_in, state, context)[0], atol=1e-6)
