"""Attention over an encoder memory: Bahdanau (additive) and Luong (multiplicative).

Both layers split the work in two: `prepare_keys(memory)` runs once per source batch
(the keys do not change while decoding), and `call(query, keys, memory, mask)` runs at
every decoder step. Masked memory positions get exactly zero weight. The per-step work
runs in the dtype of the keys (float32 from `AttentionDecoder.prepare_context`, whose
docstring says why); the query is cast to it.
"""

import math

import keras
from keras import ops

from seq2seq.precision import Dense


def masked_softmax(scores, mask):
    """scores: [batch, src_len]; mask: [batch, src_len] bool -> weights with exact zeros at padding.

    A row whose mask is all false (an empty source) gets all-zero weights.
    """
    scores = ops.cast(scores, "float32")
    scores = ops.where(mask, scores, ops.full_like(scores, -1e9))
    # As exp and sums: oneDNN's softmax kernel costs 4x these at a decoding step's size.
    exp = ops.exp(scores - ops.max(scores, axis=-1, keepdims=True))
    weights = exp / ops.sum(exp, axis=-1, keepdims=True)
    return weights * ops.cast(mask, weights.dtype)


def _scores(query, keys):
    """query [batch, dim] . keys [batch, src_len, dim] -> [batch, src_len], as a broadcast
    multiply-and-sum: faster than a batched product or einsum at a decoding step's few rows
    (measured with the softmax and context: 44 against 158 and 173 us at 5 rows) and not
    slower than einsum at training and batch-decoding sizes."""
    return ops.sum(ops.cast(query, keys.dtype)[:, None, :] * keys, axis=-1)


def _context(weights, memory):
    """weights [batch, src_len] float32, memory [batch, src_len, dim] -> context [batch, dim]."""
    return ops.sum(ops.cast(weights, memory.dtype)[:, :, None] * memory, axis=1)


@keras.saving.register_keras_serializable(package="seq2seq")
class BahdanauAttention(keras.layers.Layer):
    """Additive attention, score(q, m) = v . tanh(W_m m + W_q q + b).

    Bahdanau, Cho and Bengio (2015), "Neural Machine Translation by Jointly Learning to
    Align and Translate". With `normalize`, v is weight-normalized (Salimans and Kingma, 2016):
    v = g * v / ||v||, as in tensorflow-addons' normalized Bahdanau attention.
    """

    def __init__(self, units, normalize=False, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.normalize = normalize
        self.memory_layer = Dense(units, use_bias=False, name="memory_layer")
        self.query_layer = Dense(units, use_bias=False, name="query_layer")

    def build(self, query_shape, memory_shape):
        self.query_layer.build(query_shape)
        self.memory_layer.build(memory_shape)
        self.attention_v = self.add_weight(name="attention_v", shape=(self.units,), initializer="glorot_uniform")
        if self.normalize:
            self.attention_g = self.add_weight(
                name="attention_g", shape=(), initializer=keras.initializers.Constant(math.sqrt(1.0 / self.units))
            )
            self.attention_b = self.add_weight(name="attention_b", shape=(self.units,), initializer="zeros")

    def prepare_keys(self, memory):
        """memory [batch, src_len, dim] -> keys [batch, src_len, units]."""
        if not self.built:
            self.build((None, self.units), memory.shape)
        return self.memory_layer(memory)

    def call(self, query, keys, memory, mask):
        """query [batch, qdim] -> (context [batch, mem_dim], weights [batch, src_len] float32)."""
        processed_query = ops.cast(self.query_layer(query), keys.dtype)[:, None, :]  # [batch, 1, units]
        v = ops.cast(self.attention_v, keys.dtype)
        hidden = keys + processed_query
        if self.normalize:
            v = ops.cast(self.attention_g, keys.dtype) * v / ops.sqrt(ops.sum(ops.square(v)))
            hidden = hidden + ops.cast(self.attention_b, keys.dtype)
        scores = ops.sum(v * ops.tanh(hidden), axis=-1)  # [batch, src_len]
        weights = masked_softmax(scores, mask)
        return _context(weights, memory), weights

    def get_config(self):
        return {**super().get_config(), "units": self.units, "normalize": self.normalize}


@keras.saving.register_keras_serializable(package="seq2seq")
class LuongAttention(keras.layers.Layer):
    """Multiplicative attention: score = q . m ("dot"), q . W m ("general"), q . m / sqrt(d) ("scaled_dot").

    Luong, Pham and Manning (2015), "Effective Approaches to Attention-based Neural Machine
    Translation"; scaled dot as in Vaswani et al. (2017). "dot" and "scaled_dot" need the query
    and memory sizes to match; "general" maps between any sizes.
    """

    SCORES = ("dot", "general", "scaled_dot")

    def __init__(self, units, score="general", **kwargs):
        super().__init__(**kwargs)
        if score not in self.SCORES:
            raise ValueError(f"Luong score must be one of {self.SCORES}, got {score!r}")
        self.units = units
        self.score = score
        if score == "general":
            self.memory_layer = Dense(units, use_bias=False, name="memory_layer")

    def build(self, query_shape, memory_shape):
        if self.score == "general":
            self.memory_layer.build(memory_shape)
        elif memory_shape[-1] != query_shape[-1]:
            raise ValueError(
                f"Luong {self.score!r} attention needs equal query and memory sizes, got "
                f"{query_shape[-1]} and {memory_shape[-1]}; use score='general' instead"
            )

    def prepare_keys(self, memory):
        if self.score == "general":
            return self.memory_layer(memory)
        if self.score == "scaled_dot":
            return memory / math.sqrt(memory.shape[-1])
        return memory

    def call(self, query, keys, memory, mask):
        scores = _scores(query, keys)  # [batch, src_len]
        weights = masked_softmax(scores, mask)
        return _context(weights, memory), weights

    def get_config(self):
        return {**super().get_config(), "units": self.units, "score": self.score}


ATTENTION_KINDS = ("luong", "bahdanau")  # what make_attention builds


def make_attention(kind, units, score="general", normalize=False):
    """Builds an attention layer by name: "bahdanau" (uses `normalize`) or "luong" (uses `score`)."""
    if kind == "bahdanau":
        return BahdanauAttention(units, normalize=normalize, name="attention")
    if kind == "luong":
        return LuongAttention(units, score=score, name="attention")
    raise ValueError(f"attention must be 'bahdanau' or 'luong', got {kind!r}")
