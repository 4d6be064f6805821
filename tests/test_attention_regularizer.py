"""Show, Attend and Tell's doubly stochastic attention regularizer: its value, its padding mask,
and that the model adds it to the loss in training only."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.model import Seq2SeqModel, build_rnn_model, doubly_stochastic_penalty


def test_penalty_is_zero_when_every_cell_gets_total_attention_one():
    attention = tf.constant(np.eye(4, dtype=np.float32)[[2, 0, 3, 1]][None])  # 4 steps, 4 cells
    target_in = tf.constant([[2, 5, 6, 7]])
    assert float(doubly_stochastic_penalty(attention, target_in)) == pytest.approx(0.0)


def test_penalty_known_value_and_batch_mean():
    uniform = np.full((2, 4), 0.25, np.float32)  # 2 steps: every cell covered 0.5 -> 4 * 0.25 = 1
    one_cell = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], np.float32)  # cell 0 covered 2 -> 1 + 3 = 4
    attention = tf.constant(np.stack([uniform, one_cell]))
    target_in = tf.constant([[2, 5], [2, 6]])
    assert float(doubly_stochastic_penalty(attention, target_in)) == pytest.approx((1.0 + 4.0) / 2)


def test_padding_steps_do_not_count():
    rng = np.random.default_rng(0)
    real = rng.dirichlet(np.ones(5), size=(1, 3)).astype(np.float32)
    padded = np.concatenate([real, rng.dirichlet(np.ones(5), size=(1, 4)).astype(np.float32)], axis=1)
    short = doubly_stochastic_penalty(tf.constant(real), tf.constant([[2, 7, 8]]))
    long = doubly_stochastic_penalty(tf.constant(padded), tf.constant([[2, 7, 8, 0, 0, 0, 0]]))
    assert float(long) == pytest.approx(float(short), rel=1e-6)
    assert float(short) > 0


def regularized_model(weight):
    keras.utils.set_random_seed(0)
    base = build_rnn_model(11, 13, units=8, attention="bahdanau")
    model = Seq2SeqModel(base.encoder, base.decoder, base.bridge, attention_regularizer=weight)
    model.build()
    return model


def test_model_adds_weighted_penalty_in_training_only():
    model = regularized_model(0.5)
    inputs = {"source": tf.constant([[4, 5, 6, 0], [7, 8, 9, 10]]), "target_in": tf.constant([[2, 4, 5], [2, 6, 0]])}
    context, state = model.encode(inputs["source"])
    _, attention = model.decoder(inputs["target_in"], state, context)
    expected = 0.5 * float(doubly_stochastic_penalty(attention, inputs["target_in"]))

    model(inputs, training=True)
    assert [float(loss) for loss in model.losses] == pytest.approx([expected], rel=1e-5)
    model(inputs, training=False)
    assert model.losses == []
    assert regularized_model(0.0).get_config()["attention_regularizer"] == 0.0
