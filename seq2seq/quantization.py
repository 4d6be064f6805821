"""Int8 weights at inference: dequantized once per decoding call, not at every step.

`model.quantize_weights` stores Dense and EinsumDense kernels as int8 with one float scale per
output channel. Keras's int8 layers cast the whole int8 kernel to float and rescale the product
at every call, so inside a decoding loop a step paid for a kernel-sized cast and an extra
division per layer. Within `dequantized_once(model)` every int8 kernel is dequantized once, where
the scope is entered (before the loop), and the layers' products read that float matrix: the
steps then run plain float products. Outside the scope the same matrix is computed at the call.
"""

import contextlib

import tensorflow as tf

_DEQUANTIZED = {}  # id(int8 kernel variable) -> its dequantized [inputs, outputs] matrix


def _dequantize(kernel, scale, dtype):
    """kernel (int8, output channels on the trailing axes) and its per-output-channel scale ->
    the float matrix [inputs, outputs] that Keras's int8 product stands for (q / scale)."""
    scale = tf.reshape(tf.cast(scale, dtype), [-1])
    return tf.reshape(tf.cast(kernel, dtype), [-1, scale.shape[0]]) / scale


def int8_matrix(kernel, scale, dtype):
    """The float [inputs, outputs] matrix of an int8 `kernel` variable and its `scale`, in
    `dtype`: the one `dequantized_once` computed, if it is active, else computed here."""
    hoisted = _DEQUANTIZED.get(id(kernel))
    if hoisted is not None and hoisted.dtype == dtype:
        return hoisted
    return _dequantize(kernel, scale, dtype)


@contextlib.contextmanager
def dequantized_once(model, dtype=tf.float32):
    """Within: the int8 kernels of `model` (variables with a `<path>_scale` beside them; int8
    embeddings are looked up row by row and stay as they are) are read as float matrices
    dequantized here, once. Wrap a whole decoding call (encoder and search loop) in it. (A
    step-contract stand-in without `variables` has nothing to dequantize.)"""
    by_path = {variable.path: variable for variable in getattr(model, "variables", ())}
    entered = []
    for path, variable in by_path.items():
        scale = by_path.get(path + "_scale")
        if variable.dtype == "int8" and scale is not None and not path.endswith("embeddings"):
            if id(variable) not in _DEQUANTIZED:
                _DEQUANTIZED[id(variable)] = _dequantize(variable, scale, dtype)
                entered.append(id(variable))
    try:
        yield
    finally:
        for key in entered:
            del _DEQUANTIZED[key]
