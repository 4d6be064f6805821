"""Numeric precision: the dtype policies, the automatic choice, bfloat16-safe Dense and Dropout.

Mixed bfloat16 ("bf16") runs the large matrix products on the bfloat16 units of CPUs with
AMX or AVX512-BF16 and keeps variables, optimizer state, logits, softmax statistics and the
loss in float32. Anything summed over many terms must stay float32 too: see
`seq2seq.rnn` (carried cell state), `seq2seq.decoders` (loop-invariant tensors of the
decoder loop), `Dense` below (bias gradients) and `Dropout` (its noise).
"""

import contextlib
import sys

import keras
import tensorflow as tf
from keras import ops

from seq2seq import products
from seq2seq.products import bf16_flags, cpu_flags, preferred_precision

PRECISIONS = {"float32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
CHOICES = ("auto", *PRECISIONS)


def resolve_precision(precision, flags=None, verbose=True):
    """The precision to train with: `precision` itself, or for "auto" "bf16" on a CPU with
    bfloat16 matrix units (AMX or AVX512-BF16) and "float32" elsewhere; "auto" prints its
    choice on stderr (with `verbose`)."""
    if precision not in CHOICES:
        raise ValueError(f"precision must be one of {list(CHOICES)}, got {precision!r}")
    if precision != "auto":
        return precision
    flags = cpu_flags() if flags is None else set(flags)
    chosen = preferred_precision(flags)
    if verbose:
        print(f"precision: {describe_precision('auto', chosen, flags)}", file=sys.stderr, flush=True)
    return chosen


def describe_precision(requested, resolved, flags=None):
    """One phrase for the training log: the precision, and why when it was chosen automatically,
    e.g. "bf16 (automatic: the CPU has amx_bf16; --precision float32 overrides)"."""
    if requested != "auto":
        return resolved
    found = bf16_flags(cpu_flags() if flags is None else set(flags))
    reason = f"the CPU has {', '.join(found)}" if found else "the CPU has no AMX or AVX512-BF16"
    other = "float32" if resolved == "bf16" else "bf16"
    return f"{resolved} (automatic: {reason}; --precision {other} overrides)"


def set_precision(precision, verbose=True):
    """Sets the global Keras dtype policy (call it before building the model) and returns
    the precision set: "auto" is resolved by `resolve_precision`.

    "bf16" (mixed_bfloat16) suits CPUs with bfloat16 units (AMX, AVX512-BF16); "fp16"
    (mixed_float16) suits GPUs. Logits, softmax and the loss stay in float32 either way.
    """
    precision = resolve_precision(precision, verbose=verbose)
    keras.config.set_dtype_policy(PRECISIONS[precision])
    return precision


@contextlib.contextmanager
def precision_scope(precision, verbose=True):
    """`set_precision` for the duration of a `with` block (which gets the precision set),
    then the global dtype policy as it was: a training run in a notebook or a test process
    leaves no bf16 policy behind for the models built after it (exports, inference)."""
    previous = keras.config.dtype_policy()
    try:
        yield set_precision(precision, verbose=verbose)
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="seq2seq")
class Dense(keras.layers.Dense):
    """`keras.layers.Dense` whose bias gradient is summed accurately under bfloat16.

    Keras adds a bias with TensorFlow's BiasAdd, whose gradient kernel (BiasAddGrad) sums
    a bfloat16 gradient in bfloat16: over 3,600 rows of positive values it was off by 64%
    (measured). A broadcasting add instead has a Sum as its gradient, which accumulates in
    float32 (0.3%, the final rounding). Same weights and int8 quantization as Dense.

    float32_output: the product runs in the compute dtype, and is cast to float32 before the
    (float32) bias is added; for output layers whose logits feed a float32 softmax, so the
    bias and its gradient (a sum over every token of the batch) never touch bfloat16.
    """

    def __init__(self, units, float32_output=False, **kwargs):
        super().__init__(units, **kwargs)
        self.float32_output = float32_output

    def call(self, inputs, training=None):
        made = products.prepared_weight(self.kernel)  # under `products.prepared` (decoding)
        if made is not None:
            return self._finish(products.matmul(inputs, made))
        return self._finish(ops.matmul(inputs, self.kernel))

    def _finish(self, x):
        """The product x -> the layer's output: float32 (float32_output), bias, activation."""
        if self.float32_output:
            x = ops.cast(x, "float32")
        if self.bias is not None:
            x = x + ops.cast(self.bias, x.dtype)  # AddV2, not BiasAdd
        if self.activation is not None:
            x = self.activation(x)
        return x

    def quantize(self, mode=None, type_check=True, config=None):
        """Keras's Dense quantization (it refuses subclasses unless told otherwise), for
        inference only (int8 weights get no gradient)."""
        return super().quantize(mode, type_check=False, config=config)

    def _int8_call(self, inputs, training=None):
        """The int8 layer's product with its kernel dequantized (`products.weight`: once per
        decoding call under `products.prepared`, where Keras's own int8 call casts the kernel and
        rescales the product at every step)."""
        return self._finish(products.matmul(inputs, products.weight(self.kernel, self.kernel_scale)))

    def get_config(self):
        return {**super().get_config(), "float32_output": self.float32_output}


@keras.saving.register_keras_serializable(package="seq2seq")
class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` whose mask is drawn from random bits, whatever the compute dtype,
    and applied as one multiplication.

    TensorFlow's dropout draws its uniform noise in the input's dtype: in bfloat16 that is
    128 levels, so rate 0.3 keeps 69.5% of the units (scaled for 70%), and the masks differ
    from a float32 run's with the same seed. Here every unit is decided by 16 random bits
    (two units from each 32-bit draw: random-number generation was most of dropout's time),
    so the rate is exact to 1/65,536 and the same seed gives the same mask in every dtype. The
    kept units are scaled by 1 / (1 - that rate), and the gradient is one multiplication too
    (no select and zeros as `tf.where` needs).
    """

    LEVELS = 1 << 16

    def call(self, inputs, training=False):
        if not training or self.rate <= 0:
            return inputs
        shape = ops.shape(inputs)
        if self.noise_shape is not None:
            shape = [shape[i] if size is None else size for i, size in enumerate(self.noise_shape)]
        threshold = round(self.rate * self.LEVELS)
        if threshold == 0:
            return inputs
        if threshold >= self.LEVELS:
            return ops.zeros_like(inputs)
        scale = self.LEVELS / (self.LEVELS - threshold)
        mask = tf.cast(keep_mask(shape, threshold, self.seed_generator), tf.float32) * scale
        return inputs * ops.cast(mask, inputs.dtype)


def keep_mask(shape, threshold, seed_generator):
    """A bool mask of `shape`: each entry True when its 16 random bits (two entries from each
    32-bit draw of a stateless generator seeded by `seed_generator`) are at least `threshold`."""
    count = tf.reduce_prod(tf.cast(shape, tf.int32))
    seed = tf.cast(tf.math.floormod(seed_generator.next(), tf.int32.max - 1), tf.int32)
    bits = tf.random.stateless_uniform([(count + 1) // 2], seed=seed, minval=None, maxval=None, dtype=tf.uint32)
    halves = tf.reshape(tf.bitcast(bits, tf.uint16), [-1])[:count]
    return tf.reshape(halves >= tf.constant(threshold, tf.uint16), shape)
