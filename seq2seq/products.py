"""Matrix products at inference: weights prepared once per decoding call, products in float32
or bfloat16.

Inside a decoding loop a step should run bare products. Two things got in the way:
- int8 weights (`model.quantize_weights`: one float scale per output channel): Keras's int8
  layers cast the whole kernel and rescale the product at every call, so at every step;
- bfloat16 products, about twice as fast as float32 on CPUs with AMX or AVX512-BF16 units
  (and slower elsewhere, where oneDNN emulates them): they need bfloat16 weights.
Within `prepared(model)` every product weight of `model` (int8 kernels dequantized, and, for
bfloat16 products, float kernels and tied embedding matrices cast) is made once, where the scope
is entered (before the loop), in the product dtype that `product_dtype(...)` set; the product
sites (`Dense`, the Transformer's attention projections, tied output layers, the RNN cells)
read it through `weight` or `prepared_weight` and multiply with `matmul`. Activations,
normalization, softmax, recurrent states and logits stay float32. Outside the scope (training,
a teacher-forced pass) the sites compute as before.
"""

import contextlib
from pathlib import Path

import tensorflow as tf

# CPU flags (as /proc/cpuinfo spells them) of bfloat16 matrix units.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
PRODUCT_PRECISIONS = ("auto", "float32", "bf16")

_PREPARED = {}  # id(variable) -> the weight in the variable's shape, in the product dtype
_DTYPE = [tf.float32]  # the product dtype of what is being traced (a stack)


@contextlib.contextmanager
def product_dtype(dtype):
    """Within: `prepared` makes its weights in `dtype` (tf.float32 or tf.bfloat16)."""
    _DTYPE.append(tf.as_dtype(dtype))
    try:
        yield
    finally:
        _DTYPE.pop()


def _dequantize(kernel, scale, dtype):
    """An int8 kernel (output channels on its trailing axes) and its per-output-channel scale ->
    the float kernel Keras's int8 product stands for (q / scale, within a rounding), in the
    kernel's shape. Multiplied by the scale's reciprocal: TensorFlow's broadcasting division took
    twice as long, and a call made of one short sentence spent an eighth of its time here."""
    inverse = 1.0 / tf.reshape(tf.cast(scale, tf.float32), [-1])
    matrix = tf.reshape(tf.cast(kernel, tf.float32), [-1, inverse.shape[0]]) * inverse
    return tf.cast(tf.reshape(matrix, kernel.shape), dtype)


def dequantized_columns(kernel, scale, columns, dtype):
    """The columns `columns` [C] of a 2-D int8 kernel [inputs, outputs] (one scale per output
    channel) dequantized in `dtype`: the same values as gathering them from `_dequantize`'s
    matrix, but only C columns are cast and rescaled. A shortlist's output layer: dequantizing
    the shipped RNN's whole [384, 8000] kernel and gathering from it was 3.8 of the 9.7 ms of op
    time outside the search loop for one sentence, and a quarter of a greedy pass over a test
    set with one intra-op thread (measured 2026-12-07)."""
    inverse = 1.0 / tf.gather(tf.reshape(tf.cast(scale, tf.float32), [-1]), columns)
    return tf.cast(tf.cast(tf.gather(kernel, columns, axis=1), tf.float32) * inverse, dtype)


def prepared_weight(variable):
    """The weight `prepared` made of `variable` (within its scope), else None."""
    return _PREPARED.get(id(variable))


def weight(variable, scale=None):
    """The weight to multiply by: the one `prepared` made, when its scope is active, else
    `variable` dequantized (int8 with its `scale`) or `variable` itself."""
    made = prepared_weight(variable)
    if made is not None:
        return made
    if scale is not None and variable.dtype == tf.int8:
        return _dequantize(variable, scale, tf.float32)
    return variable


def matmul(x, matrix, transpose_b=False):
    """x [..., inputs] @ matrix as one 2-D product (a batched product of a 3-D x is slower) in the
    matrix's dtype, the result in x's dtype (bfloat16 products of float32 activations: x is cast
    down, the product back up)."""
    outputs = matrix.shape[0] if transpose_b else matrix.shape[1]
    if outputs is None:  # a shortlist's rows (`decoders.output_projection`)
        outputs = tf.shape(matrix)[0 if transpose_b else 1]
    rows = tf.reshape(x, [-1, x.shape[-1]]) if x.shape.rank != 2 else x
    if matrix.dtype == x.dtype:
        y = tf.matmul(rows, matrix, transpose_b=transpose_b)
    else:
        y = tf.cast(tf.matmul(tf.cast(rows, matrix.dtype), matrix, transpose_b=transpose_b), x.dtype)
    if x.shape.rank == 2:
        return y
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [outputs]], 0))


@contextlib.contextmanager
def prepared(model):
    """Within: the product weights of `model` are made here, once, in the current product dtype:
    int8 kernels (variables with a `<path>_scale` beside them) dequantized; for bfloat16
    products also the float kernels and embedding matrices (a tied output layer's). Wrap a whole
    decoding call (encoder and search loop) in it. (A step-contract stand-in without
    `variables` has nothing to prepare.)"""
    dtype = _DTYPE[-1]
    by_path = {variable.path: variable for variable in getattr(model, "variables", ())}
    made = []
    for path, variable in by_path.items():
        if id(variable) in _PREPARED:
            continue
        scale = by_path.get(path + "_scale")
        if variable.dtype == "int8" and scale is not None and not path.endswith("embeddings"):
            _PREPARED[id(variable)] = _dequantize(variable, scale, dtype)
        elif dtype != tf.float32 and variable.dtype == "float32" and path.endswith(("kernel", "embeddings")):
            _PREPARED[id(variable)] = tf.cast(variable, dtype)
        else:
            continue
        made.append(id(variable))
    try:
        yield
    finally:
        for key in made:
            del _PREPARED[key]


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The set of CPU feature flags of the first processor in /proc/cpuinfo (empty if unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_flags(flags):
    """The flags of bfloat16 matrix units among `flags`."""
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def preferred_precision(flags):
    """What "auto" means, for training and for decoding: "bf16" on a CPU whose `flags` include
    bfloat16 matrix units (AMX or AVX512-BF16), else "float32"."""
    return "bf16" if bf16_flags(flags) else "float32"


def use_bfloat16_products(module, precision="auto", flags=None):
    """Sets the product precision of a Translator, or of a SavedModel it was exported as (its
    `bf16_products` switch): "bf16", "float32", or "auto": bf16 on a CPU with bfloat16 units
    (AMX or AVX512-BF16). Returns the precision set; a SavedModel exported before the switch
    existed has float32 products."""
    if precision not in PRODUCT_PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRODUCT_PRECISIONS)}, got {precision!r}")
    switch = getattr(module, "bf16_products", None)
    if switch is None:
        return "float32"
    if precision == "auto":
        precision = preferred_precision(cpu_flags() if flags is None else set(flags))
    switch.assign(precision == "bf16")
    return precision
