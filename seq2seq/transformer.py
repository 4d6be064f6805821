"""Pre-norm Transformer encoder and decoder (Vaswani et al., 2017) with the project's contracts.

`TransformerEncoder` returns what `RNNEncoder` returns:

    {"memory": [batch, src_len, units], "memory_mask": [batch, src_len] bool,
     "final_states": [[(mean of memory over real positions,)]]}

so a `Bridge(kind="dense")` can start an RNN `AttentionDecoder` from it.

`TransformerDecoder` offers the step contract of `AttentionDecoder`:

    context = decoder.prepare_context(memory, memory_mask)  # cross-attention keys/values, once
    state = decoder.initial_state(bridge_state, batch_size)  # bridge_state is ignored
    logits, state, attention = decoder.step(token_ids, state, context)

The state is {"step": int32 [batch], "cache": one {"key", "value"} per layer, each
[batch, heads, steps_so_far, head_dim]}: the self-attention key/value cache grows by one
position per step, and every tensor has the batch first, so the searches in
`seq2seq.decoding` tile and reorder it like any other state. The position of each row's
next token is `state["step"]`. Stepping and the teacher-forced `call` run the same code
(`_forward` over a block of tokens after the cached prefix), so they agree.

The Transformer decoder needs no initial state from the encoder: pair it with
`zero_bridge(units)` (a `Bridge(kind="zero")` whose output is ignored); see `bridge_for`.
Wang et al. (2019) and Xiong et al. (2020) for pre-norm: LayerNorm before each sublayer,
one final LayerNorm after the stack.
"""

import math

import keras
import tensorflow as tf
from keras import ops

from seq2seq.decoders import projected_logits, tied_logits
from seq2seq.encoders import Bridge
from seq2seq import products
from seq2seq.keras_compat import replace_sublayer
from seq2seq.precision import Dense, Dropout

POSITION_KINDS = ("sinusoidal", "learned")
_MASKED = -1e9  # added to masked attention scores (float32): exp underflows to exactly zero


def sinusoidal_encoding(positions, dim):
    """positions [...] int -> [..., dim] float32: sin on the first half, cos on the second
    (tensor2tensor layout), wavelengths from 2 pi to 10000 * 2 pi."""
    half = dim // 2
    inverse_frequencies = ops.exp(ops.arange(half, dtype="float32") * (-math.log(10000.0) / max(half - 1, 1)))
    angles = ops.cast(positions, "float32")[..., None] * inverse_frequencies  # [..., half]
    return ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)


@keras.saving.register_keras_serializable(package="seq2seq")
class PositionEmbedding(keras.layers.Layer):
    """positions [...] int -> [..., dim]: fixed sinusoids or a learned table.

    A learned table has `max_length` rows; positions beyond it reuse the last row (inside a
    search loop an error is worse than a slightly wrong position, so choose max_length
    at least the longest source and the longest decoding).
    """

    def __init__(self, dim, kind="sinusoidal", max_length=512, **kwargs):
        super().__init__(**kwargs)
        if kind not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS}, got {kind!r}")
        if kind == "sinusoidal" and dim % 2:
            raise ValueError(f"sinusoidal positions need an even size, got {dim}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.dim = dim
        self.kind = kind
        self.max_length = max_length
        if kind == "learned":
            self.table = keras.layers.Embedding(max_length, dim, name="table")

    def build(self, input_shape=None):
        if self.kind == "learned":
            self.table.build((None,))

    def call(self, positions):
        if self.kind == "learned":
            return self.table(ops.minimum(positions, self.max_length - 1))
        return ops.cast(sinusoidal_encoding(positions, self.dim), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "kind": self.kind, "max_length": self.max_length}


def _check_sizes(units, num_heads, num_layers, **rates):
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if num_heads < 1 or units % num_heads:
        raise ValueError(f"units ({units}) must be a positive multiple of num_heads ({num_heads})")
    for name, rate in rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")


def _dropout_rate(rate, dropout):
    """An attention or activation dropout rate: left None, it is `dropout`."""
    return dropout if rate is None else rate


def _dropout_layers(dropout, attention_dropout, activation_dropout):
    """The Dropout layers of a Transformer part: of the embeddings and sublayer outputs, of the
    attention probabilities, and after the feed-forward ReLU. A rate equal to `dropout` reuses
    its layer, so that such a model has the variables, and draws the masks, it had before the
    three rates could differ (its checkpoints still load)."""
    layer = Dropout(dropout)
    return (
        layer,
        layer if attention_dropout == dropout else Dropout(attention_dropout),
        layer if activation_dropout == dropout else Dropout(activation_dropout),
    )


def _norm(name):
    return keras.layers.LayerNormalization(epsilon=1e-6, name=name)


def _as_matrix_product(dense, x, kernel_shape):
    """x [rows, inputs] through an EinsumDense of a `keras.layers.MultiHeadAttention` as one
    2-D matrix product with its kernel reshaped to `kernel_shape` [inputs, outputs], plus its
    bias. An int8 kernel (weight-only, per output channel) is read dequantized, and under
    `products.prepared` the kernel is the one made once per decoding call (bfloat16 for
    bfloat16 products). At a decoding step's size (a few rows) oneDNN's einsum costs six times
    a MatMul of the same product (measured: 84 against 14 us at 5 rows)."""
    if dense.quantization_mode not in (None, "int8"):
        raise ValueError(f"{dense.name}: quantization mode {dense.quantization_mode!r} is not supported (int8 is)")
    kernel = products.weight(dense.kernel, dense.kernel_scale if dense.quantization_mode == "int8" else None)
    if kernel is dense.kernel:
        kernel = tf.cast(kernel, x.dtype)
    y = products.matmul(x, tf.reshape(kernel, kernel_shape))
    if dense.bias is not None:
        y = y + tf.reshape(tf.cast(dense.bias, y.dtype), [-1])
    return y


def heads_first(dense, x):
    """x [batch, time, units] -> [batch, heads, time, head_dim]: the query, key or value
    projection of a MultiHeadAttention (its EinsumDense `dense`), heads first."""
    units, heads, head_dim = dense.kernel.shape
    projected = _as_matrix_product(dense, tf.reshape(x, [-1, units]), [units, heads * head_dim])
    if x.shape[1] == 1:  # one decoding step: the transpose is a reshape
        return tf.reshape(projected, [-1, heads, 1, head_dim])
    return tf.transpose(tf.reshape(projected, [-1, tf.shape(x)[1], heads, head_dim]), [0, 2, 1, 3])


def heads_merged(dense, x):
    """x [batch, heads, time, head_dim] -> [batch, time, units]: a MultiHeadAttention's
    output projection (its EinsumDense `dense`)."""
    heads, head_dim, units = dense.kernel.shape
    if x.shape[2] == 1:  # one decoding step: no transpose needed
        time = 1
    else:
        time = tf.shape(x)[2]
        x = tf.transpose(x, [0, 2, 1, 3])
    projected = _as_matrix_product(dense, tf.reshape(x, [-1, heads * head_dim]), [heads * head_dim, units])
    return tf.reshape(projected, [-1, time, units])


def _softmax(scores):
    """Softmax over the last axis. For one query position, as exp and sums: oneDNN's softmax
    builds a new primitive for every new key length (measured: 94 against 19 us a step)."""
    if scores.shape[-2] != 1:
        return tf.nn.softmax(scores, axis=-1)
    exp = tf.exp(scores - tf.reduce_max(scores, axis=-1, keepdims=True))
    return exp / tf.reduce_sum(exp, axis=-1, keepdims=True)


def attend(attention, x, key, value, mask, dropout, training):
    """Scaled dot-product attention with the projections of a `keras.layers.MultiHeadAttention`.

    x [batch, time, units]; key, value [batch, heads, keys, head_dim] (`heads_first` of the
    layer's `key_dense` / `value_dense`: the layout the batched products read without a
    transpose, and the layout of the decoder's key/value cache);
    mask broadcastable to [batch, time, keys]; dropout: a Dropout layer for the attention
    weights. Scores, softmax and the weights' dropout run in float32 (under bfloat16,
    Keras's own attention would take its softmax in bfloat16). Returns the output
    [batch, time, units] and the weights [batch, heads, time, keys] in float32 (exactly
    zero where masked). The encoder and the decoder both attend with it.
    """
    query = heads_first(attention.query_dense, x)  # [batch, heads, time, head_dim]
    query = query * ops.cast(1.0 / math.sqrt(query.shape[-1]), x.dtype)
    key, value = tf.cast(key, query.dtype), tf.cast(value, x.dtype)
    # One query position (a decoding step): products as broadcast multiply-and-sum. The
    # batched matrix product would build a new oneDNN primitive at every step, because the
    # key/value cache has a new length each time (measured: 16% of a single sentence's time).
    one_position = query.shape[2] == 1
    if one_position:
        scores = tf.reduce_sum(query * key, axis=-1)[:, :, None, :]
    else:
        scores = tf.matmul(query, key, transpose_b=True)
    scores = tf.where(mask[:, None], tf.cast(scores, tf.float32), _MASKED)  # [batch, heads, time, keys]
    weights = _softmax(scores)
    dropped = tf.cast(dropout(weights, training=training), x.dtype)
    if one_position:
        output = tf.reduce_sum(dropped[:, :, 0, :, None] * value, axis=2)[:, :, None, :]
    else:
        output = tf.matmul(dropped, value)  # [batch, heads, time, head_dim]
    return heads_merged(attention.output_dense, output), weights


@keras.saving.register_keras_serializable(package="seq2seq")
class TransformerEncoder(keras.layers.Layer):
    """Pre-norm Transformer encoder for token ids or pre-computed vectors.

    With `vocab_size`, inputs are token ids [batch, time] (id 0 is padding, and masked);
    without it, inputs are vectors [batch, time, dim] (e.g. image features), projected to
    `units`, with an optional boolean mask [batch, time] (all true by default).
    Returns the dict of `RNNEncoder`; memory vectors at padded positions are zero, and
    padded positions change no output at real positions (they are masked as attention keys;
    the attention is `attend`, as in the decoder).
    final_states is [[(mean of memory over real positions,)]]: one layer, one direction.
    Dropout rates as in `TransformerDecoder`.
    """

    def __init__(
        self,
        units=256,
        num_layers=6,
        num_heads=8,
        ffn_dim=None,
        dropout=0.1,
        positions="sinusoidal",
        max_length=512,
        vocab_size=None,
        attention_dropout=None,
        activation_dropout=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.attention_dropout = _dropout_rate(attention_dropout, dropout)
        self.activation_dropout = _dropout_rate(activation_dropout, dropout)
        _check_sizes(
            units, num_heads, num_layers, dropout=dropout, attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
        )
        self.units = units
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ffn_dim = ffn_dim or 4 * units
        self.dropout = dropout
        self.positions = positions
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.supports_masking = True
        if vocab_size:
            self.embedding = keras.layers.Embedding(vocab_size, units, name="embedding")
        else:
            self.input_projection = Dense(units, name="input_projection")
        self.position_embedding = PositionEmbedding(units, positions, max_length, name="positions")
        self.attention_norms = [_norm(f"layer{i}_attention_norm") for i in range(num_layers)]
        self.attentions = [
            keras.layers.MultiHeadAttention(num_heads, units // num_heads, name=f"layer{i}_attention")
            for i in range(num_layers)
        ]
        self.ffn_norms = [_norm(f"layer{i}_ffn_norm") for i in range(num_layers)]
        self.ffn_inner = [
            Dense(self.ffn_dim, activation="relu", name=f"layer{i}_ffn_inner") for i in range(num_layers)
        ]
        self.ffn_outer = [Dense(units, name=f"layer{i}_ffn_outer") for i in range(num_layers)]
        self.final_norm = _norm("final_norm")
        self.dropout_layer, self.attention_dropout_layer, self.activation_dropout_layer = _dropout_layers(
            dropout, self.attention_dropout, self.activation_dropout
        )

    @property
    def model_dim(self):
        return self.units

    @property
    def output_size(self):
        return self.units

    @property
    def final_state_size(self):
        """Size of the one final state part (the mean memory vector), for a Bridge."""
        return self.units

    def build(self, input_shape):
        d = self.units
        if self.vocab_size:
            self.embedding.build(input_shape)
        else:
            self.input_projection.build((None, None, input_shape[-1]))
        self.position_embedding.build()
        for i in range(self.num_layers):
            self.attention_norms[i].build((None, None, d))
            self.attentions[i].build((None, None, d), (None, None, d))
            self.ffn_norms[i].build((None, None, d))
            self.ffn_inner[i].build((None, None, d))
            self.ffn_outer[i].build((None, None, self.ffn_dim))
        self.final_norm.build((None, None, d))

    def call(self, inputs, mask=None, training=False):
        if self.vocab_size:
            if mask is None:
                mask = ops.not_equal(inputs, 0)
            x = ops.cast(self.embedding(inputs), self.compute_dtype) * ops.cast(math.sqrt(self.units), self.compute_dtype)
        else:
            x = self.input_projection(inputs)
            if mask is None:
                mask = ops.ones(ops.shape(x)[:2], dtype="bool")
        mask = ops.cast(mask, "bool")  # [batch, src_len]
        length = ops.shape(x)[1]
        x = x + self.position_embedding(ops.arange(length))[None]
        x = self.dropout_layer(x, training=training)
        attention_mask = mask[:, None, :]  # every query sees the real keys only: [batch, 1, src_len]
        for i in range(self.num_layers):
            h = self.attention_norms[i](x)
            attention = self.attentions[i]
            key, value = heads_first(attention.key_dense, h), heads_first(attention.value_dense, h)
            h, _ = attend(attention, h, key, value, attention_mask, self.attention_dropout_layer, training)
            x = x + self.dropout_layer(h, training=training)
            h = self.ffn_inner[i](self.ffn_norms[i](x))
            h = self.ffn_outer[i](self.activation_dropout_layer(h, training=training))
            x = x + self.dropout_layer(h, training=training)
        real = ops.cast(mask, x.dtype)[:, :, None]  # [batch, src_len, 1]
        memory = self.final_norm(x) * real
        mean = ops.sum(memory, axis=1) / ops.maximum(ops.sum(real, axis=1), 1.0)  # [batch, units]
        return {"memory": memory, "memory_mask": mask, "final_states": [[(mean,)]]}

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "ffn_dim": self.ffn_dim,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "activation_dropout": self.activation_dropout,
            "positions": self.positions,
            "max_length": self.max_length,
            "vocab_size": self.vocab_size,
        }


@keras.saving.register_keras_serializable(package="seq2seq")
class TransformerDecoder(keras.layers.Layer):
    """Pre-norm Transformer decoder: causal self-attention, cross-attention, feed-forward.

    The step state carries a growing self-attention key/value cache (see the module
    docstring). The returned attention is the cross-attention of layer `alignment_layer`
    (a Python index, -1 = the last layer), averaged over heads: float32 [batch, src_len]
    per step, zero on masked memory positions. `tie_embeddings` reuses the (unscaled)
    embedding matrix as the output projection (Press and Wolf, 2017); `share_embedding`
    makes the source side's embedding this decoder's too. Logits are float32. Dropout:
    `dropout` on the embeddings and sublayer outputs, `attention_dropout` on the attention
    probabilities, `activation_dropout` after the feed-forward ReLU (None: `dropout`), all
    in training only, so stepping and teacher forcing agree at inference.

    The attention sublayers are `keras.layers.MultiHeadAttention`, used for their
    projections (`query_dense`, `key_dense`, `value_dense`, `output_dense`) so that keys
    and values can be cached; the scores are computed by `attend`.
    """

    def __init__(
        self,
        vocab_size,
        units=256,
        num_layers=6,
        num_heads=8,
        ffn_dim=None,
        dropout=0.1,
        positions="sinusoidal",
        max_length=512,
        tie_embeddings=False,
        alignment_layer=-1,
        attention_dropout=None,
        activation_dropout=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.attention_dropout = _dropout_rate(attention_dropout, dropout)
        self.activation_dropout = _dropout_rate(activation_dropout, dropout)
        _check_sizes(
            units, num_heads, num_layers, dropout=dropout, attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
        )
        if not -num_layers <= alignment_layer < num_layers:
            raise ValueError(f"alignment_layer must index one of the {num_layers} layers, got {alignment_layer}")
        self.vocab_size = vocab_size
        self.units = units
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = units // num_heads
        self.ffn_dim = ffn_dim or 4 * units
        self.dropout = dropout
        self.positions = positions
        self.max_length = max_length
        self.tie_embeddings = tie_embeddings
        self.alignment_layer = alignment_layer
        self.embedding = keras.layers.Embedding(vocab_size, units, name="embedding")
        self.position_embedding = PositionEmbedding(units, positions, max_length, name="positions")
        n, h, k = num_layers, num_heads, self.head_dim
        self.self_attention_norms = [_norm(f"layer{i}_self_attention_norm") for i in range(n)]
        self.self_attentions = [keras.layers.MultiHeadAttention(h, k, name=f"layer{i}_self_attention") for i in range(n)]
        self.cross_attention_norms = [_norm(f"layer{i}_cross_attention_norm") for i in range(n)]
        self.cross_attentions = [keras.layers.MultiHeadAttention(h, k, name=f"layer{i}_cross_attention") for i in range(n)]
        self.ffn_norms = [_norm(f"layer{i}_ffn_norm") for i in range(n)]
        self.ffn_inner = [Dense(self.ffn_dim, activation="relu", name=f"layer{i}_ffn_inner") for i in range(n)]
        self.ffn_outer = [Dense(units, name=f"layer{i}_ffn_outer") for i in range(n)]
        self.final_norm = _norm("final_norm")
        if not tie_embeddings:
            self.output_layer = Dense(vocab_size, name="output_layer", float32_output=True)
        self.dropout_layer, self.attention_dropout_layer, self.activation_dropout_layer = _dropout_layers(
            dropout, self.attention_dropout, self.activation_dropout
        )

    @property
    def model_dim(self):
        return self.units

    def build(self, memory_dim):
        """memory_dim: the size of the encoder memory vectors (any size: cross-attention projects it)."""
        d = self.units
        if not self.embedding.built:  # a shared embedding may be built by the encoder already
            self.embedding.build((None, None))
        self.position_embedding.build()
        for i in range(self.num_layers):
            self.self_attention_norms[i].build((None, None, d))
            self.self_attentions[i].build((None, None, d), (None, None, d))
            self.cross_attention_norms[i].build((None, None, d))
            self.cross_attentions[i].build((None, None, d), (None, None, memory_dim))
            self.ffn_norms[i].build((None, None, d))
            self.ffn_inner[i].build((None, None, d))
            self.ffn_outer[i].build((None, None, self.ffn_dim))
        self.final_norm.build((None, None, d))
        if self.tie_embeddings:
            self.output_bias = self.add_weight(
                name="output_bias", shape=(self.vocab_size,), initializer="zeros", autocast=False
            )
        else:
            self.output_layer.build((None, None, d))

    def share_embedding(self, embedding):
        """Makes `embedding` (the source side's Embedding layer, e.g. a TransformerEncoder's) this
        decoder's embedding: one variable for both sides and, with tie_embeddings, the output
        projection (three-way tying, Press and Wolf, 2017). Call it before training or loading
        weights: the decoder's own embedding (built or not: Keras builds a deserialized layer at
        once) is dropped."""
        shape = (getattr(embedding, "input_dim", None), getattr(embedding, "output_dim", None))
        if not isinstance(embedding, keras.layers.Embedding) or shape != (self.vocab_size, self.units):
            raise ValueError(
                f"{self.name}: a shared embedding must be an Embedding of {self.vocab_size} tokens by {self.units} "
                f"(the target vocabulary by units), got {type(embedding).__name__} {shape}"
            )
        replace_sublayer(self, self.embedding, embedding)
        self.embedding = embedding

    def prepare_context(self, memory, memory_mask):
        """Memory, its mask and every layer's cross-attention keys and values
        ([batch, heads, src_len, head_dim]), computed once per source batch."""
        return {
            "memory": memory,
            "memory_mask": ops.cast(memory_mask, "bool"),
            "cross": tuple(
                {"key": heads_first(attention.key_dense, memory), "value": heads_first(attention.value_dense, memory)}
                for attention in self.cross_attentions
            ),
        }

    def initial_state(self, cell_states, batch_size, dtype=None):
        """An empty cache at step 0. cell_states (from a Bridge) are accepted and ignored."""
        dtype = dtype or self.compute_dtype
        empty = ops.zeros((batch_size, self.num_heads, 0, self.head_dim), dtype=dtype)
        return {
            "step": ops.zeros((batch_size,), dtype="int32"),
            "cache": tuple({"key": empty, "value": empty} for _ in range(self.num_layers)),
        }

    def step(self, token_ids, state, context, projection=None):
        """token_ids [batch] -> (logits [batch, vocab] float32, new state, attention [batch, src_len]);
        with `projection` (`decoders.output_projection`) the logits cover its entries only."""
        logits, state, attention = self._forward(token_ids[:, None], state, context, training=False, projection=projection)
        return logits[:, 0], state, attention[:, 0]

    def call(self, target_in, state, context, training=False):
        """Teacher forcing: target_in [batch, time] -> (logits [batch, time, vocab] float32,
        attention [batch, time, src_len] float32). `state` is usually `initial_state(...)`;
        a state with a cached prefix continues after it."""
        logits, _, attention = self._forward(target_in, state, context, training=training)
        return logits, attention

    def _forward(self, tokens, state, context, training, projection=None):
        """tokens [batch, time] after the cached prefix -> logits, new state, attention."""
        time = tf.shape(tokens)[1]
        past = tf.shape(state["cache"][0]["key"])[2]
        positions = state["step"][:, None] + tf.range(time)[None, :]  # [batch, time]
        x = ops.cast(self.embedding(tokens), self.compute_dtype) * ops.cast(math.sqrt(self.units), self.compute_dtype)
        x = self.dropout_layer(x + self.position_embedding(positions), training=training)
        # Query i (absolute position past + i) sees keys 0 .. past + i: [1, time, past + time].
        causal = (tf.range(past + time)[None, :] <= past + tf.range(time)[:, None])[None]
        memory_mask = context["memory_mask"][:, None, :]  # [batch, 1, src_len]
        new_cache = []
        alignment = None
        for i in range(self.num_layers):
            self_attention = self.self_attentions[i]
            h = self.self_attention_norms[i](x)
            cache = state["cache"][i]
            key = tf.concat([tf.cast(cache["key"], h.dtype), heads_first(self_attention.key_dense, h)], axis=2)
            value = tf.concat([tf.cast(cache["value"], h.dtype), heads_first(self_attention.value_dense, h)], axis=2)
            new_cache.append({"key": key, "value": value})
            h, _ = attend(self_attention, h, key, value, causal, self.attention_dropout_layer, training)
            x = x + self.dropout_layer(h, training=training)

            cross = context["cross"][i]
            h = self.cross_attention_norms[i](x)
            h, weights = attend(
                self.cross_attentions[i], h, cross["key"], cross["value"], memory_mask, self.attention_dropout_layer,
                training,
            )
            if i == self.alignment_layer % self.num_layers:
                alignment = ops.mean(weights, axis=1)  # [batch, time, src_len]
            x = x + self.dropout_layer(h, training=training)

            h = self.ffn_inner[i](self.ffn_norms[i](x))
            h = self.ffn_outer[i](self.activation_dropout_layer(h, training=training))
            x = x + self.dropout_layer(h, training=training)
        new_state = {"step": state["step"] + time, "cache": tuple(new_cache)}
        return self._logits(self.final_norm(x), projection), new_state, alignment

    def _logits(self, x, projection=None):
        """Float32 logits (as in AttentionDecoder); over a shortlist with `projection`."""
        if projection is not None:
            return projected_logits(x, projection)
        if self.tie_embeddings:
            return tied_logits(x, self.embedding.embeddings, self.output_bias)
        return self.output_layer(x)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "units": self.units,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "ffn_dim": self.ffn_dim,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "activation_dropout": self.activation_dropout,
            "positions": self.positions,
            "max_length": self.max_length,
            "tie_embeddings": self.tie_embeddings,
            "alignment_layer": self.alignment_layer,
        }


def zero_bridge(units, name="bridge"):
    """The Bridge for a TransformerDecoder: it ignores the bridge state, so any zero state does
    (one GRU-shaped zero tensor; no weights)."""
    return Bridge("gru", units, 1, kind="zero", name=name)


def bridge_for(decoder, kind="dense", name="bridge"):
    """A Bridge that fits `decoder`: `zero_bridge` for a TransformerDecoder, otherwise
    Bridge(decoder.cell_type, decoder.units, decoder.num_layers, kind)."""
    if isinstance(decoder, TransformerDecoder):
        return zero_bridge(decoder.units, name=name)
    return Bridge(decoder.cell_type, decoder.units, decoder.num_layers, kind=kind, name=name)


def build_transformer_model(
    source_vocab_size,
    target_vocab_size,
    num_layers=6,
    encoder_layers=None,
    decoder_layers=None,
    units=512,
    num_heads=8,
    ffn_dim=None,
    dropout=0.1,
    positions="sinusoidal",
    max_length=512,
    tie_embeddings=False,
    alignment_layer=-1,
    source_dim=None,
    encoder_type="transformer",
    decoder_type="transformer",
    cell_type="lstm",
    rnn_units=None,
    bidirectional=True,
    attention="luong",
    bridge="dense",
    start_id=2,
    end_id=3,
):
    """A built Seq2SeqModel with a Transformer encoder and/or decoder.

    source_vocab_size: token-id sources; or None with `source_dim` for vector sources
    [batch, time, source_dim] (all positions real). encoder_layers / decoder_layers default
    to num_layers. encoder_type="rnn" puts an RNNEncoder (cell_type, rnn_units or units,
    bidirectional) before a Transformer decoder; decoder_type="rnn" puts an AttentionDecoder
    (cell_type, rnn_units or units, `attention`) after a Transformer encoder, started from
    the mean memory vector through Bridge(kind=bridge). A Transformer decoder gets `zero_bridge`.
    """
    from seq2seq.factory import ModelSpec, build_model

    rnn_units = rnn_units or units
    transformer = {"num_heads": num_heads, "ffn_dim": ffn_dim, "positions": positions, "max_positions": max_length}
    rnn = {"cell_type": cell_type}
    fields = {"dropout": dropout, "units": units}
    if encoder_type == "transformer":
        fields.update(transformer)
    else:
        fields.update(rnn, encoder_units=rnn_units, bidirectional=bidirectional)
    if decoder_type == "transformer":
        fields.update(transformer, alignment_layer=alignment_layer, tie_embeddings=tie_embeddings)
    else:
        fields.update(rnn, units=rnn_units, encoder_units=units if encoder_type == "transformer" else rnn_units,
                      attention=attention, bridge=bridge, tie_embeddings=tie_embeddings)
    spec = ModelSpec(
        encoder_type=encoder_type, decoder_type=decoder_type, encoder_layers=encoder_layers or num_layers,
        decoder_layers=decoder_layers or num_layers, **fields,
    )
    return build_model(
        spec, target_vocab_size, source_vocab_size, source_dim=source_dim, start_id=start_id, end_id=end_id,
    )
