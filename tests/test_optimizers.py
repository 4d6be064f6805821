"""FusedAdam: the same updates, config and checkpoints as keras.optimizers.Adam, from one fused kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.optimizers import FusedAdam

SHAPES = [(40, 16), (16,), (7, 3, 5)]


def run_steps(optimizer_class, steps=5, **kwargs):
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=shape).astype(np.float32)) for shape in SHAPES]
    optimizer = optimizer_class(**kwargs)
    optimizer.build(variables)

    @tf.function
    def apply(gradients):
        optimizer.apply(gradients, variables)

    for _ in range(steps):
        apply([tf.constant(rng.normal(size=shape).astype(np.float32)) for shape in SHAPES])
    return optimizer, [v.numpy() for v in variables]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 1e-2},
        {"learning_rate": 3e-3, "beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-6, "global_clipnorm": 1.0},
        {"learning_rate": keras.optimizers.schedules.ExponentialDecay(1e-2, 2, 0.5)},
    ],
)
def test_fused_adam_matches_keras_adam(kwargs):
    keras_optimizer, expected = run_steps(keras.optimizers.Adam, **kwargs)
    fused_optimizer, got = run_steps(FusedAdam, **kwargs)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    for e, g in zip(keras_optimizer.variables, fused_optimizer.variables):  # iterations and both slots
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-7)
    assert not np.allclose(got[0], run_steps(FusedAdam, steps=0, **kwargs)[1][0])  # it did train


def test_fused_adam_config_round_trip_and_amsgrad_fallback():
    optimizer = FusedAdam(learning_rate=2e-3, beta_2=0.98, global_clipnorm=5.0, amsgrad=True)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is FusedAdam
    assert restored.get_config() == optimizer.get_config()
    _, expected = run_steps(keras.optimizers.Adam, amsgrad=True)
    _, got = run_steps(FusedAdam, amsgrad=True)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_fused_adam_checkpoint_restores_into_keras_adam(tmp_path):
    """Same slot variables as Keras's Adam: checkpoints of either load into the other."""
    optimizer, _ = run_steps(FusedAdam)
    path = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "ckpt"))
    variables = [keras.Variable(np.zeros(shape, np.float32)) for shape in SHAPES]
    other = keras.optimizers.Adam()
    other.build(variables)
    tf.train.Checkpoint(optimizer=other).restore(path).assert_existing_objects_matched()
    for e, g in zip(optimizer.variables, other.variables):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
