"""The teacher-forced time loop of a one-layer LSTM decoder with Luong attention, with its
gradient written by hand.

TensorFlow differentiates a `tf.while_loop` step by step: every intermediate of the forward
step is pushed to a stack, the backward loop runs the gradient of each of the step's ~60 ops
and sums the gradients of everything the loop reads from outside (kernels, attention memory
and keys) once per step. On this CPU a training step's decoder loop is small, sequential
work, and that bookkeeping was most of it. Here the backward loop runs only the chain rule's
few products and element-wise terms, and every loop-invariant gradient is one large product
(or batched product) of all steps' terms after the loop, as `rnn.run_cell` does for the
encoder's recurrent kernel.

A step's products at batch 64 take about 0.3 ms; its two dozen element-wise ops and
reductions (gates, cell, attention softmax and context, and their gradients) took longer,
mostly in per-op overhead. They run as XLA-compiled clusters (`jit_compile`), one between
each pair of products, while the products stay TensorFlow's (oneDNN, bfloat16 units; XLA's
CPU products do not use them). Measured in one process, the same 60 batches interleaved six
times (bf16, config A): generic loop 4,904, this loop without XLA 5,144, with it 5,395 target
tokens/s.

The values are those of `AttentionDecoder`'s generic step loop (the same products in the same
dtypes: bfloat16 products under mixed precision, float32 cell state, attention and softmax),
except that the recurrent and input-feeding products are one product of the concatenated
operands. Gradients agree with TensorFlow's to rounding (tests/test_fused_decoder.py).
"""

import tensorflow as tf

from seq2seq.attention import masked_softmax


SOURCE_MULTIPLE = 8


def supports(decoder):
    """Whether `luong_lstm_loop` can run `decoder`'s teacher-forced loop."""
    return decoder.cell_type == "lstm" and decoder.num_layers == 1 and decoder.attention_kind == "luong"


def luong_lstm_loop(projected, cells, feed, keys, memory, memory_mask, recurrent_kernel, feed_kernel,
                    output_kernel, output_dropout=None):
    """The decoder's recurrence over all target steps.

    projected: [time, batch, 4*units] in the compute dtype (embedding projection and bias);
    cells: the (h, c) float32 initial state; feed: [batch, units] compute dtype or None (no
    input feeding); keys [batch, src, units] and memory [batch, src, mem] float32; memory_mask
    [batch, src] bool; recurrent_kernel [units, 4*units], feed_kernel [units, 4*units] or None,
    output_kernel [mem + units, units]: float32 variables' values; output_dropout: [time,
    batch, units] multipliers or None.
    Returns the attentional vectors [time, batch, units] (compute dtype, after dropout) and the
    attention weights [time, batch, src] (float32).
    """
    dtype = projected.dtype
    feeding = feed is not None
    h, c = (tf.cast(part, tf.float32) for part in cells)
    if not feeding:
        feed = tf.zeros([0], dtype)
        feed_kernel = tf.zeros([0, recurrent_kernel.shape[-1]], recurrent_kernel.dtype)
    # The step's compiled clusters are specialized to the source length: padded to a multiple
    # of SOURCE_MULTIPLE (zero weight at the padding), a run compiles them a few times, not
    # once per length.
    source_length = tf.shape(keys)[1]
    padding = [[0, 0], [0, -source_length % SOURCE_MULTIPLE]]
    keys, memory = (tf.pad(x, padding + [[0, 0]]) for x in (keys, memory))
    loop = _loop(dtype, feeding, tf.pad(tf.cast(memory_mask, tf.bool), padding), output_dropout)
    attentional, weights = loop(projected, h, c, feed, keys, memory, recurrent_kernel, feed_kernel, output_kernel)
    return attentional, weights[:, :, :source_length]


def _loop(dtype, feeding, mask, output_dropout):
    """The recurrence with its hand-written gradient: (projected, h, c, feed, keys, memory,
    kernels) -> (attentional [time, batch, units], weights [time, batch, src])."""
    dropout = output_dropout is not None

    @tf.custom_gradient
    def loop(projected, h0, c0, feed, keys, memory, recurrent_kernel, feed_kernel, output_kernel):
        units = recurrent_kernel.shape[0]
        num_steps = tf.shape(projected)[0]
        state_kernel = tf.cast(
            tf.concat([recurrent_kernel, feed_kernel], 0) if feeding else recurrent_kernel, dtype
        )
        attention_kernel = tf.cast(output_kernel, dtype)
        inputs = tf.TensorArray(dtype, size=num_steps).unstack(projected)

        def array(array_dtype):
            return tf.TensorArray(array_dtype, size=num_steps, infer_shape=False, clear_after_read=False)

        names = ("outputs", "weights", "operands", "cells", "attention_in", "activations")
        dtypes = (dtype, tf.float32, dtype, tf.float32, dtype, tf.float32)

        @tf.function(jit_compile=True)
        def cell_and_attention(projected, recurrent, c, keys, memory, mask):
            z = tf.cast(projected + recurrent, tf.float32)
            i, f, g, o = tf.split(z, 4, axis=-1)
            i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
            new_c = f * c + i * g
            tanh_c = tf.tanh(new_c)
            new_h = o * tanh_c
            query = tf.cast(tf.cast(new_h, dtype), tf.float32)
            weights = masked_softmax(tf.reduce_sum(query[:, None, :] * keys, -1), mask)
            context = tf.reduce_sum(weights[:, :, None] * memory, 1)
            attention_in = tf.concat([tf.cast(context, dtype), tf.cast(new_h, dtype)], -1)
            return new_h, new_c, weights, attention_in, tf.concat([i, f, g, o, c, tanh_c, query], -1)

        def body(t, h, c, feed, saved):
            operand = tf.concat([tf.cast(h, dtype), feed], -1) if feeding else tf.cast(h, dtype)
            new_h, new_c, weights, attention_in, cells = cell_and_attention(
                inputs.read(t), tf.matmul(operand, state_kernel), c, keys, memory, mask
            )
            activation = tf.tanh(tf.matmul(attention_in, attention_kernel))
            attentional = activation * output_dropout[t] if dropout else activation
            values = (attentional, weights, operand, cells, attention_in, tf.cast(activation, tf.float32))
            saved = {name: saved[name].write(t, value) for name, value in zip(names, values)}
            new_feed = attentional if feeding else feed
            return t + 1, new_h, new_c, new_feed, saved

        saved = {name: array(d) for name, d in zip(names, dtypes)}
        _, _, _, _, saved = tf.while_loop(
            lambda t, *_: t < num_steps, body, (tf.constant(0), h0, c0, feed, saved), maximum_iterations=num_steps
        )
        stacked = {name: saved[name].stack() for name in ("outputs", "weights")}

        def gradient(d_outputs, d_weights):
            with tf.name_scope("decoder_gradient"):
                return backward(d_outputs, d_weights)

        def backward(d_outputs, d_weights):
            d_outputs = tf.zeros_like(stacked["outputs"]) if d_outputs is None else d_outputs
            d_weights = tf.zeros_like(stacked["weights"]) if d_weights is None else d_weights
            zeros = tf.zeros_like(h0)
            d_outputs = tf.TensorArray(d_outputs.dtype, size=num_steps).unstack(d_outputs)
            d_weights = tf.TensorArray(tf.float32, size=num_steps).unstack(tf.cast(d_weights, tf.float32))
            state_kernel_t = tf.transpose(state_kernel)
            attention_kernel_t = tf.transpose(attention_kernel)
            mem = memory.shape[-1]
            grads = ("d_gates", "d_attention", "d_scores", "d_contexts")
            grad_dtypes = (dtype, dtype, tf.float32, tf.float32)

            @tf.function(jit_compile=True)
            def output_gradient(d_output, d_feed, keep, activation):
                d_attentional = tf.cast(d_output, tf.float32) + d_feed
                if dropout:
                    d_attentional = d_attentional * tf.cast(keep, tf.float32)
                return tf.cast(d_attentional * (1.0 - tf.square(activation)), dtype)

            @tf.function(jit_compile=True)
            def cell_and_attention_gradient(d_in, dh, dc, weights, d_weights, cells, keys, memory):
                d_in = tf.cast(d_in, tf.float32)
                d_context, dh_output = d_in[:, :mem], d_in[:, mem:]
                d_w = tf.reduce_sum(memory * d_context[:, None, :], -1) + d_weights
                d_scores = weights * (d_w - tf.reduce_sum(weights * d_w, -1, keepdims=True))
                dh = dh + dh_output + tf.reduce_sum(keys * d_scores[:, :, None], 1)
                i, f, g, o, c, tanh_c, _ = tf.split(cells, 7, axis=-1)
                dc = dc + dh * o * (1.0 - tf.square(tanh_c))
                d_gates = tf.concat(
                    [dc * g * i * (1.0 - i), dc * c * f * (1.0 - f), dc * i * (1.0 - tf.square(g)),
                     dh * tanh_c * o * (1.0 - o)], -1
                )
                return tf.cast(d_gates, dtype), d_scores, d_context, dc * f

            def back(s, dh, dc, d_feed, arrays):
                t = num_steps - 1 - s
                keep = output_dropout[t] if dropout else tf.zeros([0], dtype)
                d_pre = output_gradient(d_outputs.read(t), d_feed, keep, saved["activations"].read(t))
                d_gates, d_scores, d_context, dc = cell_and_attention_gradient(
                    tf.matmul(d_pre, attention_kernel_t), dh, dc, saved["weights"].read(t), d_weights.read(t),
                    saved["cells"].read(t), keys, memory,
                )
                d_operand = tf.cast(tf.matmul(d_gates, state_kernel_t), tf.float32)
                values = (d_gates, d_pre, d_scores, d_context)
                arrays = {name: arrays[name].write(t, value) for name, value in zip(grads, values)}
                d_feed = d_operand[:, units:] if feeding else d_feed
                carried = (d_operand[:, :units], dc, d_feed)
                return (s + 1, *(tf.ensure_shape(part, h0.shape) for part in carried), arrays)

            arrays = {name: array(d) for name, d in zip(grads, grad_dtypes)}
            _, dh0, dc0, d_feed0, arrays = tf.while_loop(
                lambda s, *_: s < num_steps, back, (tf.constant(0), zeros, zeros, zeros, arrays),
                maximum_iterations=num_steps,
            )
            d_gates = arrays["d_gates"].stack()  # [time, batch, 4*units]

            def flat(tensor):
                return tf.reshape(tensor, [-1, tf.shape(tensor)[-1]])

            d_state_kernel = tf.matmul(flat(saved["operands"].stack()), flat(d_gates), transpose_a=True)
            d_state_kernel = tf.cast(d_state_kernel, tf.float32)
            d_output_kernel = tf.matmul(
                flat(saved["attention_in"].stack()), flat(arrays["d_attention"].stack()), transpose_a=True
            )
            # Batch-major batched products over time: [batch, src, time] @ [batch, time, dim].
            d_scores = tf.transpose(arrays["d_scores"].stack(), [1, 2, 0])
            queries = tf.split(saved["cells"].stack(), 7, axis=-1)[-1]
            d_keys = tf.matmul(d_scores, tf.transpose(queries, [1, 0, 2]))
            weights = tf.transpose(stacked["weights"], [1, 2, 0])
            d_memory = tf.matmul(weights, tf.transpose(arrays["d_contexts"].stack(), [1, 0, 2]))
            grads = [
                d_gates,
                dh0,
                dc0,
                tf.cast(d_feed0, dtype) if feeding else tf.zeros_like(feed),
                d_keys,
                d_memory,
                d_state_kernel[:units],
                d_state_kernel[units:] if feeding else tf.zeros_like(feed_kernel),
                tf.cast(d_output_kernel, tf.float32),
            ]
            sources = (projected, h0, c0, feed, keys, memory, recurrent_kernel, feed_kernel, output_kernel)
            return [tf.ensure_shape(grad, source.shape) for grad, source in zip(grads, sources)]

        return (stacked["outputs"], stacked["weights"]), gradient

    return loop
