"""RNNEncoder (cells, directions, layers, masking) and Bridge."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.encoders import Bridge, RNNEncoder
from seq2seq.rnn import RecurrentCell

VOCAB, UNITS = 20, 8
LENGTHS = [5, 2, 7, 1]


def padded_ids(lengths=LENGTHS, extra=0, seed=0):
    """Token ids [batch, max(lengths) + extra], ids 1..VOCAB-1 then padding 0."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths) + extra), np.int32)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, VOCAB, size=length)
    return ids


def encoder(cell_type="gru", bidirectional=False, num_layers=1, merge_mode="concat", vocab_size=VOCAB, seed=0):
    keras.utils.set_random_seed(seed)
    layer = RNNEncoder(
        cell_type=cell_type, units=UNITS, num_layers=num_layers, bidirectional=bidirectional,
        merge_mode=merge_mode, vocab_size=vocab_size, embedding_dim=6,
    )
    layer.build((None, None) if vocab_size else (None, None, 6))
    return layer


CONFIGS = [
    pytest.param(cell, bidirectional, merge, layers, id=f"{cell}-{'bi-' + merge if bidirectional else 'uni'}-{layers}l")
    for cell in ("simple_rnn", "lstm", "gru")
    for bidirectional, merge in ((False, "concat"), (True, "concat"), (True, "sum"), (True, "average"))
    for layers in (1, 2)
]


def check_states(final_states, num_layers, directions, parts, batch):
    assert len(final_states) == num_layers
    for layer in final_states:
        assert len(layer) == directions
        for state in layer:
            assert len(state) == parts
            for part in state:
                assert tuple(part.shape) == (batch, UNITS)


@pytest.mark.parametrize("cell_type, bidirectional, merge_mode, num_layers", CONFIGS)
def test_shapes_and_padding_invariance(cell_type, bidirectional, merge_mode, num_layers):
    layer = encoder(cell_type, bidirectional, num_layers, merge_mode)
    ids = padded_ids()
    out = layer(ids)
    width = 2 * UNITS if bidirectional and merge_mode == "concat" else UNITS
    assert layer.output_size == width
    assert tuple(out["memory"].shape) == (4, 7, width)
    np.testing.assert_array_equal(out["memory_mask"], ids != 0)
    check_states(out["final_states"], num_layers, 2 if bidirectional else 1, 2 if cell_type == "lstm" else 1, 4)

    # Padded positions are exactly zero in the memory.
    memory = out["memory"].numpy()
    assert np.all(memory[ids == 0] == 0.0)
    assert np.all(np.abs(memory[ids != 0]).sum(-1) > 0)

    # Appending more padding changes neither the memory at real positions nor the final states.
    more = layer(padded_ids(extra=4))
    np.testing.assert_allclose(more["memory"][:, :7], memory, atol=1e-6)
    assert np.all(more["memory"][:, 7:].numpy() == 0.0)
    for a, b in zip(tf.nest.flatten(out["final_states"]), tf.nest.flatten(more["final_states"])):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # Each row encoded alone, without padding, gives the same memory and final states
    # (this checks the backward direction starts at each row's own last token).
    for row, length in enumerate(LENGTHS):
        alone = layer(ids[row : row + 1, :length])
        np.testing.assert_allclose(alone["memory"][0], memory[row, :length], atol=1e-5)
        for a, b in zip(tf.nest.flatten(alone["final_states"]), tf.nest.flatten(out["final_states"])):
            np.testing.assert_allclose(a[0], b[row], atol=1e-5)


@pytest.mark.parametrize("cell_type", ["simple_rnn", "lstm", "gru"])
def test_merge_modes_combine_the_same_directions(cell_type):
    ids = padded_ids()
    concat = encoder(cell_type, True, merge_mode="concat")(ids)["memory"].numpy()
    forward, backward = concat[..., :UNITS], concat[..., UNITS:]
    summed = encoder(cell_type, True, merge_mode="sum")(ids)["memory"].numpy()  # same seed, same weights
    average = encoder(cell_type, True, merge_mode="average")(ids)["memory"].numpy()
    np.testing.assert_allclose(summed, forward + backward, atol=1e-6)
    np.testing.assert_allclose(average, (forward + backward) / 2, atol=1e-6)


def keras_reference(cell_type, cell, go_backwards=False):
    """A stock Keras RNN layer with the weights of our `cell` (same gate orders)."""
    if cell_type == "simple_rnn":
        layer = keras.layers.SimpleRNN(UNITS, return_sequences=True, return_state=True, go_backwards=go_backwards)
    elif cell_type == "lstm":
        layer = keras.layers.LSTM(UNITS, return_sequences=True, return_state=True, go_backwards=go_backwards)
    else:
        layer = keras.layers.GRU(
            UNITS, return_sequences=True, return_state=True, reset_after=True, go_backwards=go_backwards
        )
    layer.build((None, None, cell.kernel.shape[0]))
    weights = [cell.kernel.numpy(), cell.recurrent_kernel.numpy(), cell.bias.numpy()]
    if cell_type == "gru":
        weights[2] = np.stack([cell.bias.numpy(), cell.recurrent_bias.numpy()])
    layer.set_weights(weights)
    return layer


@pytest.mark.parametrize("cell_type", ["simple_rnn", "lstm", "gru"])
def test_cells_agree_with_stock_keras_layers(cell_type):
    """Vector inputs with an explicit mask; forward and backward directions against Keras RNNs
    run on each row without its padding."""
    layer = encoder(cell_type, bidirectional=True, vocab_size=None)
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(4, 7, 6)).astype(np.float32)
    mask = np.arange(7)[None] < np.array(LENGTHS)[:, None]
    out = layer(inputs, mask=mask)
    memory = out["memory"].numpy()
    forward_cell, backward_cell = layer.cells[0]
    forward_ref = keras_reference(cell_type, forward_cell)
    backward_ref = keras_reference(cell_type, backward_cell, go_backwards=True)
    for row, length in enumerate(LENGTHS):
        x = inputs[row : row + 1, :length]
        seq, *states = forward_ref(x)
        np.testing.assert_allclose(memory[row, :length, :UNITS], seq[0], atol=1e-5)
        for ours, ref in zip(out["final_states"][0][0], states):
            np.testing.assert_allclose(ours[row], ref[0], atol=1e-5)
        seq, *states = backward_ref(x)  # Keras returns the backward outputs in reading order
        np.testing.assert_allclose(memory[row, :length, UNITS:], seq[0, ::-1], atol=1e-5)
        for ours, ref in zip(out["final_states"][0][1], states):
            np.testing.assert_allclose(ours[row], ref[0], atol=1e-5)


def test_vector_inputs_with_mask_ignore_what_is_under_the_padding():
    layer = encoder("lstm", bidirectional=True, num_layers=2, vocab_size=None)
    rng = np.random.default_rng(2)
    inputs = rng.normal(size=(4, 7, 6)).astype(np.float32)
    mask = np.arange(7)[None] < np.array(LENGTHS)[:, None]
    noisy = np.where(mask[..., None], inputs, 100 * rng.normal(size=inputs.shape)).astype(np.float32)
    longer = np.concatenate([noisy, rng.normal(size=(4, 3, 6)).astype(np.float32)], axis=1)
    longer_mask = np.concatenate([mask, np.zeros((4, 3), bool)], axis=1)
    clean = layer(inputs, mask=mask)
    for other_inputs, other_mask in ((noisy, mask), (longer, longer_mask)):
        other = layer(other_inputs, mask=other_mask)
        np.testing.assert_allclose(other["memory"][:, :7], clean["memory"], atol=1e-6)
        assert np.all(other["memory"].numpy()[~other_mask] == 0.0)
        for a, b in zip(tf.nest.flatten(clean["final_states"]), tf.nest.flatten(other["final_states"])):
            np.testing.assert_allclose(a, b, atol=1e-6)
    # Without a mask every position is real.
    full = layer(inputs)
    assert np.all(full["memory_mask"].numpy())
    assert tuple(full["memory"].shape) == (4, 7, 2 * UNITS)


def test_ids_with_explicit_mask_match_the_implicit_padding_mask():
    layer = encoder("gru", bidirectional=True)
    ids = padded_ids()
    implicit = layer(ids)
    explicit = layer(ids, mask=ids != 0)
    for a, b in zip(tf.nest.flatten(implicit), tf.nest.flatten(explicit)):
        np.testing.assert_array_equal(a, b)


# Bridge -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bidirectional_gru_states():
    layer = encoder("gru", bidirectional=True, num_layers=2)
    return layer, layer(padded_ids())["final_states"]


@pytest.mark.parametrize("decoder_layers", [1, 3])
def test_dense_bridge_from_bidirectional_gru_to_lstm(bidirectional_gru_states, decoder_layers):
    layer, states = bidirectional_gru_states
    bridge = Bridge("lstm", 12, decoder_layers, kind="dense")
    bridge.build(layer.final_state_size)
    assert layer.final_state_size == 2 * UNITS
    out = bridge(states)
    assert len(out) == decoder_layers
    for layer_state in out:
        assert len(layer_state) == 2  # (h, c) for the LSTM decoder
        for part in layer_state:
            assert tuple(part.shape) == (4, 12)
    # The top decoder layer starts from the top encoder layer: h = tanh(W [h_fw; h_bw] + b),
    # and c, which a GRU does not have, is a linear map of the same h.
    top = np.concatenate([states[-1][0][0].numpy(), states[-1][1][0].numpy()], axis=-1)
    h_kernel, h_bias = (w.numpy() for w in bridge.projections[-1][0].weights)
    c_kernel, c_bias = (w.numpy() for w in bridge.projections[-1][1].weights)
    np.testing.assert_allclose(out[-1][0], np.tanh(top @ h_kernel + h_bias), atol=1e-5)
    np.testing.assert_allclose(out[-1][1], top @ c_kernel + c_bias, atol=1e-5)
    assert np.all(np.abs(out[-1][0].numpy()) <= 1.0)
    assert np.any(np.abs(out[-1][1].numpy()) > 0)


def test_zero_bridge_gives_zeros(bidirectional_gru_states):
    _, states = bidirectional_gru_states
    bridge = Bridge("lstm", 12, 3, kind="zero")
    out = bridge(states)
    assert len(out) == 3
    for layer_state in out:
        assert len(layer_state) == 2
        for part in layer_state:
            assert tuple(part.shape) == (4, 12)
            assert np.all(part.numpy() == 0.0)
    gru = Bridge("gru", 5, 1, kind="zero")(states, batch_size=4)
    assert len(gru) == 1 and len(gru[0]) == 1 and tuple(gru[0][0].shape) == (4, 5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RNNEncoder(cell_type="transformer"), "cell_type must be one of"),
        (lambda: RNNEncoder(cell_type="gru", bidirectional=True, merge_mode="max"), "merge_mode must be one of"),
        (lambda: RNNEncoder(num_layers=0), "num_layers must be at least 1"),
        (lambda: RNNEncoder(dropout=1.0), "dropout must be in"),
        (lambda: RecurrentCell("gru", 0), "units must be positive"),
        (lambda: Bridge("lstm", 8, 1, kind="mean"), "bridge kind must be one of"),
        (lambda: Bridge("rnn", 8, 1), "cell_type must be one of"),
    ],
)
def test_bad_config_raises_clear_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_encoder_config_round_trip():
    layer = encoder("lstm", bidirectional=True, num_layers=2, merge_mode="sum")
    clone = RNNEncoder.from_config(layer.get_config())
    clone.build((None, None))
    clone.set_weights(layer.get_weights())
    ids = padded_ids()
    np.testing.assert_allclose(clone(ids)["memory"], layer(ids)["memory"], atol=1e-6)


@pytest.mark.parametrize("cell_type", ["simple_rnn", "lstm", "gru"])
def test_training_gives_the_same_outputs_and_gradients_as_inference(cell_type):
    """In training the recurrent kernel's gradient is one product after the time loop (see
    seq2seq.rnn); outputs, final states and every weight's gradient must equal the plain
    per-step gradient of the inference path, with padding, both directions and two layers."""
    layer = encoder(cell_type, bidirectional=True, num_layers=2)
    ids = tf.constant(padded_ids(extra=2))

    @tf.function
    def run(training):
        with tf.GradientTape() as tape:
            result = layer(ids, training=training)
            weights = tf.reshape(tf.range(tf.size(result["memory"]), dtype=tf.float32) % 7.0, tf.shape(result["memory"]))
            loss = tf.reduce_sum(result["memory"] * weights) + sum(
                tf.reduce_sum(part**2) for layer_states in result["final_states"] for state in layer_states for part in state
            )
        return result["memory"], loss, tape.gradient(loss, layer.trainable_variables)

    memory, loss, grads = run(False)
    trained_memory, trained_loss, trained_grads = run(True)
    np.testing.assert_allclose(trained_memory, memory, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(trained_loss, loss, rtol=1e-6)
    assert len(grads) == len(trained_grads) == len(layer.trainable_variables)
    for variable, expected, got in zip(layer.trainable_variables, grads, trained_grads):
        expected, got = tf.convert_to_tensor(expected), tf.convert_to_tensor(got)
        assert float(tf.reduce_max(tf.abs(expected))) > 0, variable.path
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(tf.reduce_max(tf.abs(expected))), err_msg=variable.path)
