"""RNN decoder with attention and Luong-style input feeding.

The decoder offers the step contract every search in `seq2seq.decoding` uses:

    context = decoder.prepare_context(memory, memory_mask)     # once per source batch
    state = decoder.initial_state(bridge_state, batch_size)    # a nested dict of tensors
    logits, state, attention = decoder.step(token_ids, state, context)

and a teacher-forced `call(target_in, state, context)` for training that runs the same
recurrence over a whole target sequence and gives the same logits as stepping.
"""

import keras
import tensorflow as tf
from keras import ops

from seq2seq import fused_decoder, products
from seq2seq.attention import make_attention
from seq2seq.precision import Dense, Dropout
from seq2seq.rnn import RecurrentCell, check_cell_type


def _float32_cells(cell_states):
    return tuple(tuple(ops.cast(part, "float32") for part in layer) for layer in cell_states)


def _float32_context(context):
    return {**context, "memory": ops.cast(context["memory"], "float32"), "keys": ops.cast(context["keys"], "float32")}


def tied_logits(x, embeddings, bias):
    """x [..., dim] @ embeddings^T in x's dtype, then cast to float32 and + bias (float32):
    the embedding matrix as the output projection, as `Dense(float32_output=True)` does."""
    made = products.prepared_weight(embeddings)  # under `products.prepared` (decoding)
    if made is not None:
        logits = products.matmul(x, made, transpose_b=True)
    else:
        logits = ops.matmul(x, ops.transpose(ops.cast(embeddings, x.dtype)))
    return ops.cast(logits, "float32") + ops.cast(bias, "float32")


def output_projection(decoder, ids):
    """The output projection of `decoder` (an AttentionDecoder or TransformerDecoder) kept to
    the vocabulary entries `ids` [V'] (a shortlist): (matrix, bias [V'] float32, transposed),
    the matrix [V', units] (tied embeddings, transposed) or [units, V'] (an output layer) in the
    dtype its product runs in (as `products.prepared` made it: int8 dequantized, bfloat16 for
    bfloat16 products). Made once per decoding call, before the loop: a step's product and
    everything over its logits then cover V' entries, not the whole vocabulary."""
    if decoder.tie_embeddings:
        variable, scale, bias, axis = decoder.embedding.embeddings, None, decoder.output_bias, 0
    else:
        layer = decoder.output_layer
        variable, bias, axis = layer.kernel, layer.bias, 1
        scale = layer.kernel_scale if layer.quantization_mode == "int8" else None
    bias = tf.zeros(tf.shape(ids), tf.float32) if bias is None else tf.gather(ops.cast(bias, "float32"), ids)
    matrix = products.prepared_weight(variable)
    if scale is not None:  # int8: only the shortlist's columns are dequantized
        dtype = decoder.compute_dtype if matrix is None else matrix.dtype
        return products.dequantized_columns(variable, scale, ids, dtype), bias, False
    if matrix is None:
        matrix = ops.cast(products.weight(variable, scale), decoder.compute_dtype)
    return tf.gather(matrix, ids, axis=axis), bias, axis == 0


def projected_logits(x, projection):
    """Float32 logits [..., V'] of x [..., units] through an `output_projection`."""
    matrix, bias, transposed = projection
    return ops.cast(products.matmul(x, matrix, transpose_b=transposed), "float32") + bias


def restricted_step(decoder, ids):
    """`decoder.step` over the vocabulary entries `ids` [V'] (sorted, the reserved tokens first
    at their own positions, so the start and end tokens keep their ids): the search sees
    positions in `ids` as token ids, and logits [batch, V']; map its output back with
    tf.gather(ids, ...)."""
    projection = output_projection(decoder, ids)

    def step(tokens, state, context):
        return decoder.step(tf.gather(ids, tokens), state, context, projection)

    return step


@keras.saving.register_keras_serializable(package="seq2seq")
class AttentionDecoder(keras.layers.Layer):
    """Embedding -> stacked RNN -> attention -> tanh(W [context; h]) -> vocabulary logits.

    Luong, Pham and Manning (2015): with `input_feeding` the previous attentional vector is
    concatenated to the next input embedding. `tie_embeddings` reuses the embedding matrix
    as the output projection (Press and Wolf, 2017) and needs embedding_dim == units.

    Under mixed precision the per-step products run in the compute dtype, while what a
    step carries or reads from outside the time loop is float32: the cell states, the
    attention memory and keys, and the input-feeding kernel. A loop-invariant tensor's
    gradient is summed over all time steps in that tensor's dtype, and a sum of dozens of
    bfloat16 terms loses most of its precision. The output product runs in the compute
    dtype; logits (and the output bias) are float32 whatever the dtype policy.
    """

    def __init__(
        self,
        vocab_size,
        cell_type="lstm",
        units=256,
        num_layers=1,
        attention="luong",
        attention_score="general",
        attention_normalize=False,
        embedding_dim=None,
        input_feeding=True,
        tie_embeddings=False,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.cell_type = check_cell_type(cell_type)
        self.units = units
        self.num_layers = num_layers
        self.attention_kind = attention
        self.attention_score = attention_score
        self.attention_normalize = attention_normalize
        self.embedding_dim = embedding_dim or units
        self.input_feeding = input_feeding
        self.tie_embeddings = tie_embeddings
        self.dropout = dropout
        if tie_embeddings and self.embedding_dim != units:
            raise ValueError(
                f"tie_embeddings needs embedding_dim == units, got {self.embedding_dim} and {units}"
            )
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.embedding = keras.layers.Embedding(vocab_size, self.embedding_dim, name="embedding")
        self.cells = [RecurrentCell(cell_type, units, name=f"layer{i}") for i in range(num_layers)]
        self.attention = make_attention(attention, units, score=attention_score, normalize=attention_normalize)
        self.attention_output = Dense(units, activation="tanh", use_bias=False, name="attention_output")
        if not tie_embeddings:
            self.output_layer = Dense(vocab_size, name="output_layer", float32_output=True)
        self.embedding_dropout = Dropout(dropout)
        self.seed_generator = keras.random.SeedGenerator(0)

    def build(self, memory_dim):
        """memory_dim: the size of the encoder memory vectors."""
        self.embedding.build((None, None))
        input_dim = self.embedding_dim + (self.units if self.input_feeding else 0)
        for cell in self.cells:
            cell.build(input_dim)
            input_dim = self.units
        self.attention.build((None, self.units), (None, None, memory_dim))
        self.attention_output.build((None, memory_dim + self.units))
        if self.tie_embeddings:
            self.output_bias = self.add_weight(
                name="output_bias", shape=(self.vocab_size,), initializer="zeros", autocast=False
            )
        else:
            self.output_layer.build((None, self.units))

    def prepare_context(self, memory, memory_mask):
        """Everything the steps need from the source, computed once: memory, mask, attention
        keys (memory and keys float32, see the class docstring)."""
        return _float32_context(
            {"memory": memory, "memory_mask": ops.cast(memory_mask, "bool"), "keys": self.attention.prepare_keys(memory)}
        )

    def initial_state(self, cell_states, batch_size, dtype=None):
        """cell_states: per-layer state tuples (from a Bridge). Returns the decoder state dict:
        float32 cell states, and the input-feeding vector in `dtype` (the compute dtype)."""
        state = {"cells": _float32_cells(cell_states)}
        if self.input_feeding:
            dtype = dtype or self.compute_dtype
            state["feed"] = ops.zeros((batch_size, self.units), dtype=dtype)
        return state

    def _first_layer_inputs(self, embedded):
        """embedded [..., embedding_dim] -> the embedding part of layer 0's input projection."""
        cell = self.cells[0]
        made = products.prepared_weight(cell.kernel)  # under `products.prepared` (decoding)
        if made is not None:
            return products.matmul(embedded, made[: self.embedding_dim]) + ops.cast(cell.bias, embedded.dtype)
        kernel = ops.cast(cell.kernel[: self.embedding_dim], embedded.dtype)
        return ops.matmul(embedded, kernel) + ops.cast(cell.bias, embedded.dtype)

    def _feed_kernel(self):
        """The input-feeding rows of layer 0's input kernel [units, gates*units] (float32, or as
        `products.prepared` made it), or None."""
        if not self.input_feeding:
            return None
        made = products.prepared_weight(self.cells[0].kernel)  # under `products.prepared`: its dtype
        return (self.cells[0].kernel if made is None else made)[self.embedding_dim :]

    def _recurrence(self, projected_embedding, state, context, feed_kernel, layer_dropout=None, output_dropout=None):
        """One decoder step after the embedding projection.

        projected_embedding: [batch, gates*units]; feed_kernel: `_feed_kernel()`, sliced once
        outside the time loop (inside it, the slice's gradient is a full-size kernel every step)
        and cast to the compute dtype inside it (so its gradient sums over steps in float32).
        Returns the attentional vector [batch, units], the new state and the attention weights
        [batch, src_len] (float32).
        """
        x = projected_embedding
        if self.input_feeding and products.prepared_weight(self.cells[0].kernel) is not None:
            x = x + products.matmul(state["feed"], feed_kernel)
        elif self.input_feeding:
            x = x + ops.matmul(state["feed"], ops.cast(feed_kernel, x.dtype))
        new_cells = []
        h = None
        for i, cell in enumerate(self.cells):
            if i > 0:
                if layer_dropout is not None:
                    h = h * layer_dropout[i - 1]
                x = cell.project_inputs(h)
            h, cell_state = cell.step(x, state["cells"][i])
            new_cells.append(cell_state)
        context_vector, weights = self.attention(h, context["keys"], context["memory"], context["memory_mask"])
        attentional = self.attention_output(ops.concatenate([ops.cast(context_vector, h.dtype), h], axis=-1))
        if output_dropout is not None:
            attentional = attentional * output_dropout
        new_state = {"cells": tuple(new_cells)}
        if self.input_feeding:
            new_state["feed"] = attentional
        return attentional, new_state, weights

    def _logits(self, attentional, projection=None):
        """Float32 logits (see the class docstring); over a shortlist with `projection`."""
        if projection is not None:
            return projected_logits(attentional, projection)
        if self.tie_embeddings:
            return tied_logits(attentional, self.embedding.embeddings, self.output_bias)
        return self.output_layer(attentional)

    def step(self, token_ids, state, context, projection=None):
        """token_ids [batch] -> (logits [batch, vocab] float32, new state, attention [batch, src_len]);
        with `projection` (`output_projection`) the logits cover its entries only."""
        embedded = self.embedding(token_ids)
        projected = self._first_layer_inputs(embedded)
        attentional, state, weights = self._recurrence(projected, state, context, self._feed_kernel())
        return self._logits(attentional, projection), state, weights

    def call(self, target_in, state, context, training=False):
        """Teacher forcing: target_in [batch, time] -> (logits [batch, time, vocab] float32,
        attention [batch, time, src_len]). Runs the step recurrence in one graph loop; the
        output projection of all steps is one matrix product."""
        # Keras casts a mixed-precision layer's float inputs to its compute dtype: back to float32.
        state = {**state, "cells": _float32_cells(state["cells"])}
        context = _float32_context(context)
        embedded = self.embedding_dropout(self.embedding(target_in), training=training)
        projected = ops.transpose(self._first_layer_inputs(embedded), [1, 0, 2])  # [time, batch, G]
        num_steps = tf.shape(projected)[0]
        batch_size = tf.shape(projected)[1]
        feed_kernel = self._feed_kernel()
        layer_dropout = output_dropout = None
        if training and self.dropout > 0:
            dtype = projected.dtype
            shape = (num_steps, batch_size, self.units)
            output_dropout = self._dropout_mask(shape, dtype)
            if self.num_layers > 1:
                layer_dropout = self._dropout_mask((num_steps, self.num_layers - 1, batch_size, self.units), dtype)
        if fused_decoder.supports(self) and products.prepared_weight(self.cells[0].kernel) is None:
            attentional, weights = fused_decoder.luong_lstm_loop(
                projected, state["cells"][0], state.get("feed"), context["keys"], context["memory"],
                context["memory_mask"], self.cells[0].recurrent_kernel.value, feed_kernel,
                self.attention_output.kernel.value, output_dropout,
            )
            attentional = tf.transpose(attentional, [1, 0, 2])  # [batch, time, units]
            return self._logits(attentional), tf.transpose(weights, [1, 0, 2])
        # Per-step inputs are read from a TensorArray: its gradient is one slice per step,
        # where indexing the whole tensor would send back a full-size gradient every step.
        projected = tf.TensorArray(projected.dtype, size=num_steps).unstack(projected)
        attentionals = tf.TensorArray(projected.dtype, size=num_steps, element_shape=tf.TensorShape([None, self.units]))
        all_weights = tf.TensorArray(tf.float32, size=num_steps, element_shape=tf.TensorShape([None, None]))

        def body(t, state, attentionals, all_weights):
            attentional, state, weights = self._recurrence(
                projected.read(t),
                state,
                context,
                feed_kernel,
                layer_dropout=None if layer_dropout is None else layer_dropout[t],
                output_dropout=None if output_dropout is None else output_dropout[t],
            )
            return t + 1, state, attentionals.write(t, attentional), all_weights.write(t, weights)

        _, _, attentionals, all_weights = tf.while_loop(
            lambda t, *_: t < num_steps,
            body,
            (tf.constant(0), state, attentionals, all_weights),
            maximum_iterations=num_steps,
        )
        attentional = tf.transpose(attentionals.stack(), [1, 0, 2])  # [batch, time, units]
        weights = tf.transpose(all_weights.stack(), [1, 0, 2])  # [batch, time, src_len]
        return self._logits(attentional), weights

    def _dropout_mask(self, shape, dtype):
        """Inverted-dropout multipliers, drawn once for all steps (outside the time loop)."""
        keep = keras.random.uniform(shape, seed=self.seed_generator) >= self.dropout
        return ops.cast(keep, dtype) / (1.0 - self.dropout)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "cell_type": self.cell_type,
            "units": self.units,
            "num_layers": self.num_layers,
            "attention": self.attention_kind,
            "attention_score": self.attention_score,
            "attention_normalize": self.attention_normalize,
            "embedding_dim": self.embedding_dim,
            "input_feeding": self.input_feeding,
            "tie_embeddings": self.tie_embeddings,
            "dropout": self.dropout,
        }
