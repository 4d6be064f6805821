"""Bahdanau and Luong attention: scores against NumPy, exact zeros on padding, empty rows."""

import math

import keras
import numpy as np
import pytest

from seq2seq.attention import BahdanauAttention, LuongAttention, make_attention

BATCH, SRC, DIM, UNITS = 4, 6, 8, 8
LENGTHS = [6, 3, 1, 0]  # the last row is all padding (an empty source)


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(BATCH, UNITS)).astype(np.float32)
    memory = rng.normal(size=(BATCH, SRC, DIM)).astype(np.float32)
    mask = np.arange(SRC)[None] < np.array(LENGTHS)[:, None]
    return query, memory, mask


def attend(layer, query, memory, mask):
    """Builds the layer (before `prepare_keys`, which needs its weights), then attends."""
    if not layer.built:
        layer.build(query.shape, memory.shape)
    return layer(query, layer.prepare_keys(memory), memory, mask)


def reference_scores(layer, query, memory):
    """Unmasked scores [batch, src] in NumPy from the layer's weights."""
    if isinstance(layer, BahdanauAttention):
        keys = memory @ layer.memory_layer.kernel.numpy()
        hidden = keys + (query @ layer.query_layer.kernel.numpy())[:, None]
        v = layer.attention_v.numpy()
        if layer.normalize:
            v = layer.attention_g.numpy() * v / np.linalg.norm(v)
            hidden = hidden + layer.attention_b.numpy()
        return np.tanh(hidden) @ v
    if layer.score == "general":
        return np.einsum("bd,bsd->bs", query, memory @ layer.memory_layer.kernel.numpy())
    scores = np.einsum("bd,bsd->bs", query, memory)
    return scores / math.sqrt(memory.shape[-1]) if layer.score == "scaled_dot" else scores


LAYERS = [
    pytest.param(lambda: BahdanauAttention(UNITS), id="bahdanau"),
    pytest.param(lambda: BahdanauAttention(UNITS, normalize=True), id="bahdanau-normalized"),
    pytest.param(lambda: LuongAttention(UNITS, score="dot"), id="luong-dot"),
    pytest.param(lambda: LuongAttention(UNITS, score="general"), id="luong-general"),
    pytest.param(lambda: LuongAttention(UNITS, score="scaled_dot"), id="luong-scaled_dot"),
]


@pytest.mark.parametrize("make", LAYERS)
def test_weights_context_and_masking(make, data):
    query, memory, mask = data
    keras.utils.set_random_seed(0)
    layer = make()
    layer.build(query.shape, memory.shape)
    if isinstance(layer, BahdanauAttention) and layer.normalize:
        # Non-trivial g and b, so the weight normalization is really checked.
        layer.attention_g.assign(1.7)
        layer.attention_b.assign(np.linspace(-1, 1, UNITS).astype(np.float32))
    keys = layer.prepare_keys(memory)
    context, weights = layer(query, keys, memory, mask)
    weights = weights.numpy()
    assert weights.dtype == np.float32
    assert weights.shape == (BATCH, SRC) and tuple(context.shape) == (BATCH, DIM)
    assert not np.any(np.isnan(weights)) and not np.any(np.isnan(context.numpy()))

    # Masked positions get exactly zero weight; real positions sum to one.
    assert np.all(weights[~mask] == 0.0)
    np.testing.assert_allclose(weights[:3].sum(-1), 1.0, rtol=1e-6)
    assert np.all(weights[mask] > 0)
    # A row with no real position gets all-zero weights and a zero context.
    assert np.all(weights[3] == 0.0) and np.all(context.numpy()[3] == 0.0)

    # The context is the weighted sum of the memory.
    np.testing.assert_allclose(context, np.einsum("bs,bsd->bd", weights, memory), atol=1e-5)

    # The weights match a NumPy softmax over the real positions of the reference scores.
    scores = reference_scores(layer, query, memory)
    for row, length in enumerate(LENGTHS[:3]):
        np.testing.assert_allclose(weights[row, :length], softmax(scores[row, :length]), atol=1e-5)


def test_scaled_dot_is_dot_over_sqrt_d(data):
    query, memory, mask = data
    dot, scaled = LuongAttention(UNITS, score="dot"), LuongAttention(UNITS, score="scaled_dot")
    _, dot_weights = attend(dot, query, memory, mask)
    _, scaled_weights = attend(scaled, query, memory, mask)
    scores = np.einsum("bd,bsd->bs", query, memory)
    for row, length in enumerate(LENGTHS[:3]):
        np.testing.assert_allclose(scaled_weights[row, :length], softmax(scores[row, :length] / math.sqrt(DIM)), atol=1e-6)
        np.testing.assert_allclose(dot_weights[row, :length], softmax(scores[row, :length]), atol=1e-6)
    # Scaling flattens the distribution (it is a real change, not a no-op).
    assert scaled_weights.numpy()[0].max() < dot_weights.numpy()[0].max()


def test_padding_content_does_not_matter(data):
    query, memory, mask = data
    layer = LuongAttention(UNITS, score="general")
    noisy = np.where(mask[..., None], memory, 1e4).astype(np.float32)
    a_context, a_weights = attend(layer, query, memory, mask)
    b_context, b_weights = attend(layer, query, noisy, mask)
    np.testing.assert_array_equal(a_weights, b_weights)
    np.testing.assert_allclose(a_context, b_context, atol=1e-6)


@pytest.mark.parametrize("score", ["dot", "scaled_dot"])
def test_dot_scores_need_matching_sizes(score, data):
    query, memory, mask = data
    layer = LuongAttention(UNITS, score=score)
    with pytest.raises(ValueError, match="needs equal query and memory sizes, got 8 and 16"):
        layer.build((None, 8), (None, None, 16))
    # Through a call, too (Keras builds from the call arguments).
    wide = np.concatenate([memory, memory], axis=-1)
    with pytest.raises(ValueError, match="equal query and memory sizes"):
        LuongAttention(UNITS, score=score)(query, wide, wide, mask)
    # "general" maps between any sizes.
    general = LuongAttention(UNITS, score="general")
    context, _ = attend(general, query, wide, mask)
    assert tuple(context.shape) == (BATCH, 2 * DIM)


def test_unknown_scores_and_kinds_are_refused():
    with pytest.raises(ValueError, match="Luong score must be one of"):
        LuongAttention(UNITS, score="cosine")
    with pytest.raises(ValueError, match="attention must be 'bahdanau' or 'luong'"):
        make_attention("multihead", UNITS)


@pytest.mark.parametrize("make", LAYERS)
def test_config_round_trip(make, data):
    query, memory, mask = data
    layer = make()
    context, weights = attend(layer, query, memory, mask)
    clone = layer.__class__.from_config(layer.get_config())
    clone.build(query.shape, memory.shape)
    clone.set_weights(layer.get_weights())
    clone_context, clone_weights = clone(query, clone.prepare_keys(memory), memory, mask)
    np.testing.assert_allclose(clone_weights, weights, atol=1e-7)
    np.testing.assert_allclose(clone_context, context, atol=1e-6)
