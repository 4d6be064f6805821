"""Recurrent cells with the input projection split from the recurrence.

The input-to-hidden product of every time step is computed at once
(`project_inputs` on a whole `[batch, time, dim]` tensor: one large matrix
product), and only the hidden-to-hidden product stays inside the time loop
(`step`). This is the main reason our encoders and decoders train faster than
a stack of stock Keras RNN layers on a CPU.

Under mixed precision (bfloat16 compute) the matrix products run in the compute dtype,
but the state carried from step to step is float32: an LSTM's cell state (and a GRU's
hidden state) is a running sum over time, and rounding it to bfloat16's 8 bits of
mantissa at every step (and its gradient on the way back) loses what the model learns.

In training, `run_cell` computes the recurrent kernel's gradient after the time loop, as one
large product of all steps' previous outputs with all steps' gate gradients, instead of one
small product per step summed in a float32 accumulator (with a cast of the kernel each way
at every step): on this CPU a step's kernel cast alone cost 43% of its product.
"""

import keras
import tensorflow as tf
from keras import ops

from seq2seq import products

CELL_TYPES = ("simple_rnn", "lstm", "gru")
_GATES = {"simple_rnn": 1, "lstm": 4, "gru": 3}


def check_cell_type(cell_type):
    if cell_type not in CELL_TYPES:
        raise ValueError(f"cell_type must be one of {CELL_TYPES}, got {cell_type!r}")
    return cell_type


@keras.saving.register_keras_serializable(package="seq2seq")
class RecurrentCell(keras.layers.Layer):
    """One vanilla RNN, LSTM or GRU cell (GRU with the reset gate after the product, as cuDNN).

    State is always a tuple: `(h,)` for simple_rnn and gru, `(h, c)` for lstm, every part
    float32 whatever the compute dtype; the output h of a step is in the compute dtype.
    """

    def __init__(self, cell_type, units, **kwargs):
        super().__init__(**kwargs)
        self.cell_type = check_cell_type(cell_type)
        if units <= 0:
            raise ValueError(f"units must be positive, got {units}")
        self.units = units
        self.num_gates = _GATES[cell_type]

    @property
    def state_size(self):
        return (self.units, self.units) if self.cell_type == "lstm" else (self.units,)

    def build(self, input_dim):
        # Weights are read as float32 (autocast off) and cast where they are used: the
        # recurrent kernel inside the time loop, so its gradient is summed over steps in float32.
        width = self.num_gates * self.units
        self.kernel = self.add_weight(
            name="kernel", shape=(input_dim, width), initializer="glorot_uniform", autocast=False
        )
        self.recurrent_kernel = self.add_weight(
            name="recurrent_kernel", shape=(self.units, width), initializer=_orthogonal, autocast=False
        )
        units = self.units

        def forget_gate_bias(shape, dtype=None):
            # Forget-gate bias of one (Jozefowicz et al., 2015).
            ones = ops.concatenate([ops.zeros((units,)), ops.ones((units,)), ops.zeros((2 * units,))])
            return ops.cast(ones, dtype or "float32")

        bias_init = forget_gate_bias if self.cell_type == "lstm" else "zeros"

        self.bias = self.add_weight(name="bias", shape=(width,), initializer=bias_init, autocast=False)
        if self.cell_type == "gru":
            self.recurrent_bias = self.add_weight(
                name="recurrent_bias", shape=(width,), initializer="zeros", autocast=False
            )

    def project_inputs(self, inputs):
        """inputs: [..., input_dim] -> [..., gates * units], for any number of leading axes."""
        made = products.prepared_weight(self.kernel)  # under `products.prepared` (decoding)
        if made is not None:
            return products.matmul(inputs, made) + ops.cast(self.bias, inputs.dtype)
        return ops.matmul(inputs, ops.cast(self.kernel, inputs.dtype)) + ops.cast(self.bias, inputs.dtype)

    def initial_state(self, batch_size):
        return tuple(ops.zeros((batch_size, size), dtype="float32") for size in self.state_size)

    def step(self, projected_inputs, state, recurrent_kernel=None):
        """One time step: projected_inputs [batch, gates*units] (compute dtype), state tuple
        (float32) -> (output [batch, units] in the compute dtype, new float32 state).

        recurrent_kernel: the kernel in the compute dtype, read once outside a time loop by a
        caller that computes its gradient itself (`run_cell`): no gradient flows to it from
        here. By default the layer's own kernel, cast at the step."""
        # The product in the compute dtype; the gates' element-wise work in float32 (as
        # fast on this CPU, and one cast each way per step).
        dtype = projected_inputs.dtype
        made = products.prepared_weight(self.recurrent_kernel)  # under `products.prepared` (decoding)
        if made is not None:
            recurrent = products.matmul(ops.cast(state[0], dtype), made)
        elif recurrent_kernel is None:
            recurrent = ops.matmul(ops.cast(state[0], dtype), ops.cast(self.recurrent_kernel, dtype))
        else:
            recurrent = product_without_kernel_gradient(ops.cast(state[0], dtype), recurrent_kernel)
        if self.cell_type == "simple_rnn":
            h = ops.tanh(ops.cast(projected_inputs + recurrent, "float32"))
            return ops.cast(h, dtype), (h,)
        if self.cell_type == "lstm":
            i, f, g, o = ops.split(ops.cast(projected_inputs + recurrent, "float32"), 4, axis=-1)
            c = ops.sigmoid(f) * state[1] + ops.sigmoid(i) * ops.tanh(g)
            h = ops.sigmoid(o) * ops.tanh(c)
            return ops.cast(h, dtype), (h, c)
        recurrent = ops.cast(recurrent, "float32") + self.recurrent_bias
        x_z, x_r, x_h = ops.split(ops.cast(projected_inputs, "float32"), 3, axis=-1)
        r_z, r_r, r_h = ops.split(recurrent, 3, axis=-1)
        update = ops.sigmoid(x_z + r_z)
        reset = ops.sigmoid(x_r + r_r)
        candidate = ops.tanh(x_h + reset * r_h)
        h = update * state[0] + (1.0 - update) * candidate
        return ops.cast(h, dtype), (h,)

    def get_config(self):
        return {**super().get_config(), "cell_type": self.cell_type, "units": self.units}


@tf.custom_gradient
def product_without_kernel_gradient(x, kernel):
    """x @ kernel whose gradient reaches x only, for a kernel whose gradient the caller
    computes after a time loop. Inside the loop body (a stop_gradient outside it is not
    seen by the loop's gradient, which would still compute and sum a product per step)."""

    def gradient(upstream):
        return tf.matmul(upstream, kernel, transpose_b=True), None

    return tf.matmul(x, kernel), gradient


def _orthogonal(shape, dtype=None):
    """Keras's orthogonal initializer drawn in float32 (its QR decomposition has no bfloat16
    kernel, and a bfloat16 copy of a model for inference is built with bfloat16 weights)."""
    return ops.cast(keras.initializers.Orthogonal()(shape, dtype="float32"), dtype or "float32")


def run_cell(cell, projected, mask, initial_state, reverse=False, training=False):
    """Runs `cell` over time.

    projected: [batch, time, gates*units] (from `cell.project_inputs`); mask: [batch, time] bool.
    Padded steps leave the state unchanged and output zeros, so padding never changes any
    output. With `reverse`, each sequence is read backwards from its own last real token.
    With `training`, the recurrent kernel's gradient is computed after the loop (see the
    module docstring); the values and every gradient are the same either way.
    Returns outputs [batch, time, units] and the final state tuple.
    """
    lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    if reverse:
        projected = tf.reverse_sequence(projected, lengths, seq_axis=1, batch_axis=0)
    num_steps = tf.shape(projected)[1]
    step_mask = tf.transpose(tf.sequence_mask(lengths, num_steps), [1, 0])  # [time, batch]
    projected = tf.transpose(projected, [1, 0, 2])  # [time, batch, gates*units]
    initial_state = tuple(initial_state)
    if training and cell.cell_type != "gru":
        outputs, final_state = _deferred_kernel_gradient_loop(cell, projected, step_mask, initial_state)
    else:
        outputs, _, final_state = _time_loop(cell, projected, step_mask, initial_state)
    outputs = tf.transpose(outputs, [1, 0, 2])  # [batch, time, units]
    outputs = tf.ensure_shape(outputs, [None, None, cell.units])
    if reverse:
        outputs = tf.reverse_sequence(outputs, lengths, seq_axis=1, batch_axis=0)
    return outputs, final_state


def _time_loop(cell, projected, step_mask, initial_state, recurrent_kernel=None):
    """The recurrence over time-major `projected` [time, batch, gates*units].

    Returns the outputs [time, batch, units], with a `recurrent_kernel` (see `RecurrentCell.step`)
    each step's previous output h (that kernel's left operand, in the compute dtype) [time,
    batch, units] or else None, and the final state."""
    num_steps = tf.shape(projected)[0]
    dtype = projected.dtype
    keep_previous = recurrent_kernel is not None
    # A TensorArray (not `tensor[t]`) so that the gradient of each step's read is that step's
    # slice only, rather than a full [time, batch, gates*units] tensor per step.
    inputs = tf.TensorArray(dtype, size=num_steps).unstack(projected)

    def new_array():
        return tf.TensorArray(dtype, size=num_steps, element_shape=tf.TensorShape([None, cell.units]))

    def body(t, state, outputs, previous):
        if keep_previous:
            previous = previous.write(t, tf.cast(state[0], dtype))
        output, new_state = cell.step(inputs.read(t), state, recurrent_kernel)
        keep = step_mask[t][:, None]  # [batch, 1]
        new_state = tuple(tf.where(keep, n, s) for n, s in zip(new_state, state))
        return t + 1, new_state, outputs.write(t, tf.where(keep, output, tf.zeros_like(output))), previous

    _, final_state, outputs, previous = tf.while_loop(
        lambda t, *_: t < num_steps, body, (tf.constant(0), initial_state, new_array(), new_array()),
        maximum_iterations=num_steps,
    )
    return outputs.stack(), previous.stack() if keep_previous else None, final_state


def _deferred_kernel_gradient_loop(cell, projected, step_mask, initial_state):
    """`_time_loop` whose recurrent kernel is cast once and gets its gradient from one product.

    An LSTM's or vanilla RNN's pre-activation is projected[t] + h[t-1] @ kernel, so the gradient
    reaching projected[t] is the pre-activation's gradient at step t, and the kernel's gradient
    is the sum over steps of h[t-1]^T @ that: one [units, time*batch] @ [time*batch, gates*units]
    product. Padded steps get a zero gradient (their new state is discarded). Not for the GRU,
    whose reset gate scales the recurrent part of one gate."""
    dtype = projected.dtype

    @tf.custom_gradient
    def recurrence(projected, kernel, *state):
        with tf.GradientTape() as tape:
            tape.watch([projected, *state])
            outputs, previous, final_state = _time_loop(
                cell, projected, step_mask, state, tf.cast(kernel, dtype)
            )

        def gradient(d_outputs, *d_final):
            sources = [projected, *state]
            grads = tape.gradient(
                [outputs, *final_state], sources, output_gradients=[d_outputs, *d_final],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            d_projected = grads[0]
            d_kernel = tf.matmul(
                tf.reshape(previous, [-1, cell.units]), tf.reshape(d_projected, [-1, kernel.shape[-1]]),
                transpose_a=True,
            )
            return [d_projected, tf.cast(d_kernel, kernel.dtype), *grads[1:]]

        return (outputs, *final_state), gradient

    outputs, *final_state = recurrence(projected, cell.recurrent_kernel.value, *initial_state)
    return outputs, tuple(final_state)
