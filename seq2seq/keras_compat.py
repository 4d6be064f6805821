"""The private Keras and TensorFlow hooks this project uses, in one place.

Each serves where no public API does (the caller says why). `missing()` names the hooks the
installed Keras or TensorFlow lacks and `check()` turns that into one error that says what
to install, so an upgrade that removes one fails at the start of training, not deep inside
it; the test suite checks them all.
"""

import keras
import tensorflow as tf

from seq2seq import TESTED_WITH

# Methods of Keras's TensorFlow optimizer that `distribute.AllReduceThenClipAdam` overrides.
OPTIMIZER_OVERRIDES = ("_clip_gradients", "_all_reduce_sum_gradients")


def in_multi_worker_mode(strategy):
    """Whether a tf.distribute strategy spans several workers (no public accessor)."""
    return strategy.extended._in_multi_worker_mode()


def symbolic_build(model, data_batch):
    """Builds a Keras model's metrics and optimizer from one batch, as `fit` does first."""
    model._symbolic_build(data_batch=data_batch)


def replace_symbolic_build(model, function):
    """Makes `fit` build `model` with `function(iterator=None, data_batch=None)` instead of
    its own (which reduces per-replica values in a way that fails under multi-worker)."""
    model._maybe_symbolic_build = function


def adam_slots(optimizer, variable):
    """(momentum, velocity) of a built Keras Adam for one of its variables."""
    index = optimizer._get_variable_index(variable)
    return optimizer._momentums[index], optimizer._velocities[index]


def optimizer_checkpoint_stub(variables):
    """A tf.Module with the one attribute through which a Keras optimizer's checkpoint lists
    the weights it trains, to read those weights from a checkpoint without its slots."""
    stub = tf.Module()
    stub._trainable_variables = list(variables)
    return stub


def replace_sublayer(layer, old, new):
    """Makes Keras track the sublayer `new` instead of `old` in `layer` (its weights, saving,
    loading): assigning an attribute only adds the new one, and the old one's variables would
    stay in `layer`'s weights."""
    layer._tracker.replace_tracked_value("layers", old, new)


def missing():
    """Descriptions of the hooks the installed versions lack ([] when all are there)."""
    hooks = {
        "tf.distribute StrategyExtended._in_multi_worker_mode": hasattr(
            tf.distribute.StrategyExtended, "_in_multi_worker_mode"
        ),
        "keras.Model._symbolic_build": hasattr(keras.Model, "_symbolic_build"),
        "keras.Model._maybe_symbolic_build": hasattr(keras.Model, "_maybe_symbolic_build"),
        "keras.optimizers.Adam._get_variable_index": hasattr(keras.optimizers.Adam, "_get_variable_index"),
        "keras.layers.Layer._tracker.replace_tracked_value": hasattr(
            getattr(keras.layers.Layer(), "_tracker", None), "replace_tracked_value"
        ),
    }
    hooks.update({f"keras.optimizers.Adam.{name}": hasattr(keras.optimizers.Adam, name) for name in OPTIMIZER_OVERRIDES})
    # Used directly by `serving_check`'s child process, which must not import this project.
    try:
        from tensorflow.python.framework import op_def_registry

        hooks["tensorflow.python.framework.op_def_registry.get"] = hasattr(op_def_registry, "get")
    except ImportError:
        hooks["tensorflow.python.framework.op_def_registry"] = False
    return [name for name, present in hooks.items() if not present]


def check(error=RuntimeError):
    """Raises `error` (one line) naming every missing hook."""
    absent = missing()
    if absent:
        raise error(
            f"this Keras {keras.__version__} / TensorFlow {tf.__version__} lacks what seq2seq needs "
            f"({', '.join(absent)}); install the versions in setup.cfg (tested with {TESTED_WITH})"
        )
