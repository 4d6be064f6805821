"""Transformer encoder and decoder (seq2seq.transformer) on tiny models.

The key checks: stepping with the key/value cache gives the teacher-forced logits; beam
search over `decoder.step` equals beam search over a reference step function that keeps
only the token history and recomputes the whole prefix (so the cache must be reordered
with the beams); padding never changes real outputs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq import decoding
from seq2seq.batching import plan_batches
from seq2seq.decoders import AttentionDecoder
from seq2seq.encoders import Bridge, RNNEncoder
from seq2seq.losses import MaskedCrossEntropy
from seq2seq.model import Seq2SeqModel
from seq2seq.training import Trainer, TrainingConfig, sequence_batches
from seq2seq.transformer import (
    PositionEmbedding,
    TransformerDecoder,
    TransformerEncoder,
    bridge_for,
    build_transformer_model,
)

VOCAB = 20
START, END = 2, 3
SOURCE_LENGTHS = [3, 7, 1, 5, 6]
TINY = dict(num_layers=2, units=16, num_heads=2, ffn_dim=32, dropout=0.0)


def tiny_model(positions="sinusoidal", seed=0, **options):
    keras.utils.set_random_seed(seed)
    return build_transformer_model(VOCAB, VOCAB, **{**TINY, "positions": positions, **options})


def random_sources(lengths=SOURCE_LENGTHS, extra_padding=2, seed=0):
    rng = np.random.default_rng(seed)
    sources = np.zeros((len(lengths), max(lengths) + extra_padding), np.int32)
    for row, length in enumerate(lengths):
        sources[row, :length] = rng.integers(4, VOCAB, size=length)
    return sources


@pytest.fixture(scope="module")
def random_model():
    model = tiny_model(seed=1)  # with these weights some hypotheses end early, others run to max_length
    return model, random_sources()


# Cached stepping ----------------------------------------------------------------------


@pytest.mark.parametrize("positions, tie", [("sinusoidal", False), ("learned", True)])
def test_cached_steps_equal_teacher_forcing(positions, tie):
    model = tiny_model(positions, tie_embeddings=tie)
    sources = random_sources()
    targets = np.random.default_rng(1).integers(4, VOCAB, size=(len(SOURCE_LENGTHS), 6)).astype(np.int32)
    targets[:, 0] = START
    targets[0, 4:] = 0  # target padding at the end changes nothing before it
    context, state = model.encode(sources)
    logits, attention = model.decoder(targets, state, context)
    step_logits, step_attention = [], []
    for t in range(targets.shape[1]):
        out, state, weights = model.decoder.step(tf.constant(targets[:, t]), state, context)
        step_logits.append(out)
        step_attention.append(weights)
    assert logits.dtype == tf.float32 and logits.shape == (len(SOURCE_LENGTHS), 6, VOCAB)
    np.testing.assert_allclose(np.stack(step_logits, 1), logits, atol=1e-5)
    np.testing.assert_allclose(np.stack(step_attention, 1), attention, atol=1e-5)
    # The cache grew by one position per step, batch first, heads before time; the step counter is per row.
    for layer in state["cache"]:
        assert layer["key"].shape == (len(SOURCE_LENGTHS), 2, 6, 8) == layer["value"].shape
    np.testing.assert_array_equal(state["step"], [6] * len(SOURCE_LENGTHS))


def test_teacher_forcing_continues_a_cached_prefix():
    """call() after a cached prefix equals the tail of one call over the whole sequence."""
    model = tiny_model("learned")
    sources = random_sources()
    targets = np.random.default_rng(2).integers(4, VOCAB, size=(len(SOURCE_LENGTHS), 5)).astype(np.int32)
    context, state = model.encode(sources)
    full, _ = model.decoder(targets, state, context)
    for t in range(2):
        _, state, _ = model.decoder.step(tf.constant(targets[:, t]), state, context)
    tail, _ = model.decoder(targets[:, 2:], state, context)
    np.testing.assert_allclose(tail, full[:, 2:], atol=1e-5)


# Searches -----------------------------------------------------------------------------


def reference_search_args(model, sources, max_length):
    """A step function without a cache: its state is the token history [batch, t], and every
    step recomputes the whole prefix with the teacher-forced call."""
    decoder = model.decoder
    context, _ = model.encode(sources)

    def step(tokens, state, context):
        history = tf.concat([state["history"], tokens[:, None]], axis=1)
        logits, attention = decoder(history, decoder.initial_state(None, tf.shape(tokens)[0]), context)
        return logits[:, -1], {"history": history}, attention[:, -1]

    batch = len(sources)
    return step, {"history": tf.zeros([batch, 0], tf.int32)}, context, batch, START, END, max_length


def cached_search_args(model, sources, max_length):
    context, state = model.encode(sources)
    return model.decoder.step, state, context, len(sources), START, END, max_length


def assert_same_result(actual, expected):
    np.testing.assert_array_equal(actual.ids, expected.ids)
    np.testing.assert_array_equal(actual.lengths, expected.lengths)
    np.testing.assert_allclose(actual.scores, expected.scores, atol=1e-5)
    np.testing.assert_allclose(actual.log_probs, expected.log_probs, atol=1e-5)
    np.testing.assert_allclose(actual.attention, expected.attention, atol=1e-5)


@pytest.mark.parametrize("beam_size, n_best", [(1, 1), (3, 1), (3, 2)])
def test_beam_search_with_cache_equals_no_cache_reference(random_model, beam_size, n_best):
    model, sources = random_model
    options = dict(beam_size=beam_size, n_best=n_best, length_penalty=0.6)
    cached = decoding.beam_search(*cached_search_args(model, sources, 8), **options)
    reference = decoding.beam_search(*reference_search_args(model, sources, 8), **options)
    assert_same_result(cached, reference)
    lengths = cached.lengths.numpy()
    assert lengths.min() < 8 and lengths.max() == 8  # some hypotheses end, others run to max_length


def test_greedy_with_cache_equals_no_cache_reference_and_beam_one(random_model):
    model, sources = random_model
    greedy = decoding.greedy_search(*cached_search_args(model, sources, 8))
    assert_same_result(greedy, decoding.greedy_search(*reference_search_args(model, sources, 8)))
    beam = decoding.beam_search(*cached_search_args(model, sources, 8), beam_size=1)
    np.testing.assert_array_equal(beam.ids, greedy.ids)
    np.testing.assert_allclose(beam.log_probs, greedy.log_probs, atol=1e-5)


def test_reference_comparison_catches_a_cache_left_in_old_beam_order(random_model, monkeypatch):
    """The beam test has teeth: reordering all state but the cache gives other results."""
    model, sources = random_model
    reference = decoding.beam_search(*reference_search_args(model, sources, 8), beam_size=3)
    gather = decoding.gather_beams

    def gather_all_but_cache(structure, indices):
        # (The context is gathered as usual, and so is the cache when finished sentences leave the batch.)
        if not (isinstance(structure, dict) and "cache" in structure) or len(indices) != len(structure["step"]):
            return gather(structure, indices)
        return {"step": gather(structure["step"], indices), "cache": structure["cache"]}

    monkeypatch.setattr(decoding, "gather_beams", gather_all_but_cache)
    broken = decoding.beam_search(*cached_search_args(model, sources, 8), beam_size=3)
    assert not np.allclose(broken.scores, reference.scores, atol=1e-3)


def test_searches_run_in_tf_function_and_match_eager(random_model):
    model, sources = random_model
    searches = {
        "greedy": dict(search="greedy"),
        "beam": dict(search="beam", beam_size=3, n_best=2, length_penalty=0.6),
        "sample": dict(search="sample", seed=5, top_k=4),
    }
    max_lengths = decoding.max_length_from_source(np.count_nonzero(sources, axis=1), ratio=1.0, offset=2)
    for name, options in searches.items():
        graph = tf.function(lambda x, m: model.generate(x, max_length=m, **options))(sources, max_lengths)
        eager = model.generate(sources, max_length=max_lengths, **options)
        np.testing.assert_array_equal(graph.ids, eager.ids, err_msg=name)
        np.testing.assert_allclose(graph.scores, eager.scores, atol=1e-5, err_msg=name)
        assert np.all(graph.lengths.numpy() <= max_lengths.numpy()[:, None])


# Masking and attention ----------------------------------------------------------------


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_encoder_padding_changes_no_real_output(positions):
    model = tiny_model(positions)
    short = random_sources(extra_padding=0)
    long = np.pad(short, [[0, 0], [0, 4]])
    a, b = model.encoder(short), model.encoder(long)
    width = short.shape[1]
    np.testing.assert_allclose(b["memory"][:, :width], a["memory"], atol=1e-5)
    np.testing.assert_array_equal(b["memory"][:, width:], 0.0)
    np.testing.assert_allclose(b["final_states"][0][0][0], a["final_states"][0][0][0], atol=1e-5)


def test_vector_encoder_ignores_masked_vectors_and_honours_the_contract():
    keras.utils.set_random_seed(0)
    encoder = TransformerEncoder(units=16, num_layers=2, num_heads=2, ffn_dim=32, dropout=0.0)
    encoder.build((None, None, 6))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 5, 6)).astype(np.float32)
    mask = np.arange(5)[None] < np.array([[5], [2], [4]])
    noisy = np.where(mask[..., None], features, 100 * rng.normal(size=features.shape)).astype(np.float32)
    a, b = encoder(features, mask=mask), encoder(noisy, mask=mask)
    real = mask[..., None]
    np.testing.assert_allclose(np.where(real, b["memory"], 0), np.where(real, a["memory"], 0), atol=1e-5)
    memory = a["memory"].numpy()
    np.testing.assert_array_equal(memory[~mask], 0.0)
    mean = memory.sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(a["final_states"][0][0][0], mean, atol=1e-6)
    assert a["memory_mask"].dtype == tf.bool and encoder.output_size == encoder.final_state_size == 16
    np.testing.assert_array_equal(encoder(features)["memory_mask"], np.ones((3, 5), bool))  # no mask: all real


@pytest.mark.parametrize("alignment_layer", [-1, 0])
def test_attention_sums_to_one_over_real_positions_and_is_zero_on_padding(alignment_layer):
    model = tiny_model(alignment_layer=alignment_layer)
    sources = random_sources()
    padding = sources == 0
    targets = np.full((len(SOURCE_LENGTHS), 4), 5, np.int32)
    context, state = model.encode(sources)
    _, attention = model.decoder(targets, state, context)  # [batch, time, src_len]
    assert attention.dtype == tf.float32
    np.testing.assert_allclose(attention.numpy().sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(attention.numpy()[np.broadcast_to(padding[:, None], attention.shape)], 0.0)
    result = model.generate(sources, search="beam", beam_size=2, max_length=4)
    searched = result.attention.numpy()  # [batch, 1, time, src_len]; zero after a row ends
    live = np.arange(searched.shape[2])[None, None] <= result.lengths.numpy()[..., None]
    live &= np.arange(searched.shape[2])[None, None] < 4
    np.testing.assert_allclose(searched.sum(-1)[live], 1.0, atol=1e-5)
    np.testing.assert_array_equal(searched[np.broadcast_to(padding[:, None, None], searched.shape)], 0.0)


def test_alignment_layer_chooses_the_returned_cross_attention():
    first, last = tiny_model(alignment_layer=0), tiny_model(alignment_layer=-1)
    sources = random_sources()
    targets = np.full((len(SOURCE_LENGTHS), 3), 5, np.int32)
    outputs = []
    for model in (first, last):  # the same weights (the same seed)
        context, state = model.encode(sources)
        outputs.append(model.decoder(targets, state, context))
    a, b = outputs
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert not np.allclose(a[1], b[1], atol=1e-4)


# Serialization and configuration -------------------------------------------------------


def test_keras_file_round_trip_gives_identical_logits_and_decoding(tmp_path):
    model = tiny_model("learned", tie_embeddings=True, alignment_layer=0)
    sources = random_sources()
    inputs = {"source": sources, "target_in": np.full((len(SOURCE_LENGTHS), 4), 5, np.int32)}
    path = tmp_path / "transformer.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.decoder, TransformerDecoder) and isinstance(loaded.encoder, TransformerEncoder)
    np.testing.assert_array_equal(loaded(inputs), model(inputs))
    np.testing.assert_array_equal(
        loaded.generate(sources, search="beam", beam_size=2, max_length=5).ids,
        model.generate(sources, search="beam", beam_size=2, max_length=5).ids,
    )


@pytest.mark.parametrize(
    "layer",
    [
        TransformerEncoder(units=16, num_layers=1, num_heads=4, positions="learned", max_length=9, vocab_size=11),
        TransformerDecoder(11, units=16, num_layers=3, num_heads=4, ffn_dim=20, tie_embeddings=True, alignment_layer=1),
        PositionEmbedding(8, "learned", 7),
    ],
)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TransformerEncoder(units=10, num_heads=3), "multiple of num_heads"),
        (lambda: TransformerEncoder(units=16, num_layers=0), "num_layers"),
        (lambda: TransformerEncoder(units=16, dropout=1.0), "dropout"),
        (lambda: TransformerDecoder(10, units=16, positions="rotary"), "positions must be one of"),
        (lambda: TransformerDecoder(10, units=16, num_layers=2, alignment_layer=2), "alignment_layer"),
        (lambda: build_transformer_model(None, 10), "source_dim"),
        (lambda: build_transformer_model(10, 10, decoder_type="cnn"), "decoder_type"),
    ],
)
def test_bad_options_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# Training -------------------------------------------------------------------------------


def copy_batches(num_examples, seed):
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(4, VOCAB, size=rng.integers(2, 7)).tolist() for _ in range(num_examples)]
    lengths = np.array([len(s) for s in sequences])
    ragged = tf.ragged.constant(sequences, dtype=tf.int32)

    def plan(epoch):
        return plan_batches(lengths, batch_size=32, seed=seed, epoch=epoch)

    return sequences, sequence_batches(ragged, ragged, plan)  # target = source


def train(model, batches, tmp_path, steps, learning_rate=3e-3):
    config = TrainingConfig(
        output_dir=str(tmp_path), max_steps=steps, steps_per_checkpoint=steps, learning_rate=learning_rate,
        warmup_steps=steps // 10, label_smoothing=0.0, tensorboard=False, verbose=0,
    )
    return Trainer(model, config).fit(batches)


def test_tiny_transformer_learns_to_copy(tmp_path):
    model = tiny_model(units=32, ffn_dim=64)
    _, batches = copy_batches(2000, seed=0)
    train(model, batches, tmp_path, steps=300)
    test, _ = copy_batches(200, seed=1)
    result = model.generate(tf.ragged.constant(test, dtype=tf.int32).to_tensor(), max_length=10)
    ids = result.ids.numpy()[:, 0]
    accuracy = np.mean(np.concatenate([ids[i, : len(t)] == t for i, t in enumerate(test)]))
    assert accuracy >= 0.9


@pytest.mark.parametrize("encoder_type, decoder_type", [("rnn", "transformer"), ("transformer", "rnn")])
def test_mixed_models_train_and_decode(encoder_type, decoder_type):
    keras.utils.set_random_seed(0)
    model = build_transformer_model(
        VOCAB, VOCAB, **TINY, encoder_type=encoder_type, decoder_type=decoder_type, cell_type="gru", rnn_units=12
    )
    _, batches = copy_batches(32, seed=0)
    inputs, target_out = next(iter(batches.epoch_dataset(0)))
    loss_fn = MaskedCrossEntropy()
    optimizer = keras.optimizers.Adam(1e-2)
    losses = []
    for _ in range(5):  # a few eager steps on one batch: the loss must go down
        with tf.GradientTape() as tape:
            loss = loss_fn(target_out, model(inputs, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        assert all(g is not None for g in gradients)  # every weight (both halves, the bridge) is trained
        optimizer.apply(gradients, model.trainable_variables)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    sources = random_sources()
    for options in (dict(search="greedy"), dict(search="beam", beam_size=2, n_best=2)):
        result = model.generate(sources, max_length=5, **options)
        assert result.ids.shape[:2] == (len(SOURCE_LENGTHS), options.get("n_best", 1))
        assert result.attention.shape[-1] == sources.shape[1]


def test_bridge_for_pairs_each_decoder_with_a_fitting_bridge():
    """A Seq2SeqModel assembled by hand: Transformer encoder, RNN decoder, dense bridge."""
    keras.utils.set_random_seed(0)
    encoder = TransformerEncoder(units=16, num_layers=1, num_heads=2, vocab_size=VOCAB)
    decoder = AttentionDecoder(VOCAB, cell_type="lstm", units=12, num_layers=2)
    bridge = bridge_for(decoder)
    assert isinstance(bridge, Bridge) and bridge.kind == "dense" and bridge.num_layers == 2
    model = Seq2SeqModel(encoder, decoder, bridge)
    model.build()
    _, state = model.encode(random_sources())
    assert state["cells"][1][1].shape == (len(SOURCE_LENGTHS), 12)  # c of layer 2 from the mean memory
    assert bridge_for(TransformerDecoder(VOCAB, units=16, num_heads=2)).kind == "zero"
    rnn = RNNEncoder(cell_type="gru", units=8, vocab_size=VOCAB)
    transformer_decoder = TransformerDecoder(VOCAB, units=16, num_layers=1, num_heads=2)
    model = Seq2SeqModel(rnn, transformer_decoder, bridge_for(transformer_decoder))
    model.build()
    assert model.generate(random_sources(), max_length=3).ids.shape[:2] == (len(SOURCE_LENGTHS), 1)
