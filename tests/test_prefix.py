"""Target-prefix constrained decoding in the shared searches (seq2seq.decoding `prefix`).

Driven by the fake table model of test_decoding (NumPy references and brute force), then on
real tiny RNN and Transformer models through `Seq2SeqModel.generate`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.decoding import beam_search, greedy_search, sampling_search, sequence_score
from seq2seq.factory import build_model
from seq2seq.model import build_rnn_model
from seq2seq.tasks.translation.config import ModelConfig
from test_decoding import END, FakeModel, padded

PREFIXES = [[1, 2], [], [2]]  # one per fake row: two forced tokens, none, one


def prefix_pair(prefixes):
    width = max(1, max(len(p) for p in prefixes))
    ids = np.zeros((len(prefixes), width), np.int32)
    for row, prefix in enumerate(prefixes):
        ids[row, : len(prefix)] = prefix
    return tf.constant(ids), tf.constant([len(p) for p in prefixes], tf.int32)


def forced_greedy(model, row, prefix, max_length):
    """NumPy greedy decoding whose first tokens are `prefix`."""
    prev2, prev, tokens = 0, 0, []
    while len(tokens) < max(max_length, len(prefix) + 1):
        step = len(tokens)
        token = prefix[step] if step < len(prefix) else int(np.argmax(model.token_log_probs(row, step, prev2, prev)))
        tokens.append(token)
        if token == END:
            break
        prev2, prev = prev, token
    return tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_with_a_prefix_forces_it_then_continues_greedily(seed):
    model = FakeModel.random(seed=seed)
    result = greedy_search(*model.args(7), prefix=prefix_pair(PREFIXES))
    for row, prefix in enumerate(PREFIXES):
        expected = forced_greedy(model, row, prefix, 7)
        ended = expected[-1] == END
        tokens = expected[:-1] if ended else expected
        assert result.ids[row, 0, : len(prefix)].numpy().tolist() == prefix
        assert result.ids[row, 0, : len(tokens)].numpy().tolist() == tokens
        assert int(result.lengths[row, 0]) == len(tokens)
        log_probs, _ = model.path(row, expected)
        np.testing.assert_allclose(result.log_probs[row, 0], log_probs.sum(), atol=1e-5)  # forced tokens count


@pytest.mark.parametrize("penalty", [{}, {"length_penalty": 0.6}])
def test_exhaustive_beam_with_a_prefix_returns_the_brute_force_best_that_start_with_it(penalty):
    max_length, n_best = 4, 6
    logits = 1.5 * np.random.default_rng(7).normal(size=(3, 6, 4, 4, 4))
    logits[..., END] += 0.5
    model = FakeModel(logits, seed=7)
    result = beam_search(*model.args(max_length), beam_size=128, n_best=n_best, prefix=prefix_pair(PREFIXES), **penalty)
    time = result.ids.shape[-1]
    for row, prefix in enumerate(PREFIXES):
        hypotheses = [h for h in model.enumerate(row, max_length) if h[0][: len(prefix)] == prefix]
        scores = sequence_score(
            tf.constant([h[1] for h in hypotheses], tf.float32), tf.constant([h[2] for h in hypotheses]), **penalty
        ).numpy()
        order = np.argsort(-scores, kind="stable")[:n_best]
        assert np.min(-np.diff(scores[np.argsort(-scores, kind="stable")[: n_best + 1]])) > 1e-4, "near tie"
        for rank, index in enumerate(order):
            tokens, log_prob = hypotheses[index][0], hypotheses[index][1]
            assert result.ids[row, rank].numpy().tolist() == padded(tokens, time), (row, rank)
            np.testing.assert_allclose(result.scores[row, rank], scores[index], atol=1e-5)
            np.testing.assert_allclose(result.log_probs[row, rank], log_prob, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_beam_one_with_a_prefix_equals_greedy_with_it(seed):
    model = FakeModel.random(seed=seed)
    greedy = greedy_search(*model.args(7), prefix=prefix_pair(PREFIXES))
    beam = beam_search(*model.args(7), beam_size=1, prefix=prefix_pair(PREFIXES))
    np.testing.assert_array_equal(beam.ids, greedy.ids)
    np.testing.assert_allclose(beam.scores, greedy.scores, atol=1e-5)
    np.testing.assert_allclose(beam.attention, greedy.attention, atol=1e-6)


def test_a_prefix_equal_to_the_unconstrained_output_changes_nothing():
    model = FakeModel.random(seed=5)
    for search, options in ((greedy_search, {}), (beam_search, {"beam_size": 128})):
        free = search(*model.args(5), **options)
        prefixes = [free.ids[row, 0, : int(free.lengths[row, 0])].numpy().tolist() for row in range(model.batch_size)]
        forced = search(*model.args(5), prefix=prefix_pair(prefixes), **options)
        for field in ("ids", "lengths", "scores", "log_probs", "attention"):
            np.testing.assert_allclose(getattr(forced, field), getattr(free, field), atol=1e-6, err_msg=field)


def test_a_prefix_longer_than_the_maximum_length_is_kept_whole_and_the_row_may_end_after_it():
    model = FakeModel.random(seed=1)
    prefixes = [[1, 2, 1, 2, 1], [], [2, 2]]
    for search, options in ((greedy_search, {}), (beam_search, {"beam_size": 3})):
        result = search(*model.args(3), prefix=prefix_pair(prefixes), **options)
        assert result.ids[0, 0, :5].numpy().tolist() == prefixes[0]
        assert 5 <= int(result.lengths[0, 0]) <= 6
        assert int(result.lengths[1, 0]) <= 3  # rows without a long prefix keep their limit


def test_sampling_honours_the_prefix_and_scores_the_forced_tokens():
    model = FakeModel.random(seed=2)
    result = sampling_search(*model.args(7), seed=11, prefix=prefix_pair(PREFIXES))
    for row, prefix in enumerate(PREFIXES):
        length = int(result.lengths[row, 0])
        tokens = result.ids[row, 0, :length].numpy().tolist()
        assert tokens[: len(prefix)] == prefix
        emitted = tokens + [END] if length < 7 else tokens
        np.testing.assert_allclose(result.log_probs[row, 0], model.path(row, emitted)[0].sum(), atol=1e-5)


def test_the_prefix_works_in_a_graph_with_any_prefix_width():
    model = FakeModel.random(seed=4)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)])
    def search(ids, lengths):
        return beam_search(*model.args(6), beam_size=3, prefix=(ids, lengths)).ids

    eager = beam_search(*model.args(6), beam_size=3, prefix=prefix_pair(PREFIXES)).ids
    np.testing.assert_array_equal(search(*prefix_pair(PREFIXES)), eager)
    empty = search(tf.zeros([3, 0], tf.int32), tf.zeros([3], tf.int32))  # no prefix column at all
    np.testing.assert_array_equal(empty, beam_search(*model.args(6), beam_size=3).ids)


# Real models --------------------------------------------------------------------------------


def transformer_model():
    spec = ModelConfig(encoder_type="transformer", decoder_type="transformer", units=16, encoder_layers=1,
                       decoder_layers=1, num_heads=2, ffn_dim=32)
    return build_model(spec, 16, 20)


@pytest.fixture(scope="module", params=["rnn", "transformer"])
def real_model(request):
    keras.utils.set_random_seed(0)
    if request.param == "rnn":
        model = build_rnn_model(20, 16, cell_type="lstm", units=16, bidirectional=True)
    else:
        model = transformer_model()
    sources = np.random.default_rng(0).integers(4, 20, size=(4, 6)).astype(np.int32)
    sources[1, 3:] = 0
    return model, sources


REAL_PREFIXES = [[5, 6, 7], [], [9], [4, 4]]


@pytest.mark.parametrize("search, options", [("greedy", {}), ("beam", {"beam_size": 3, "n_best": 2})])
def test_real_decoders_start_with_the_prefix_and_batch_equals_one_at_a_time(real_model, search, options):
    model, sources = real_model
    batch = model.generate(sources, search=search, max_length=10, prefix=prefix_pair(REAL_PREFIXES), **options)
    for row, prefix in enumerate(REAL_PREFIXES):
        for rank in range(batch.ids.shape[1]):
            assert batch.ids[row, rank, : len(prefix)].numpy().tolist() == prefix
        alone = model.generate(sources[row : row + 1], search=search, max_length=10, prefix=prefix_pair([prefix]),
                               **options)
        length = int(alone.lengths[0, 0])
        np.testing.assert_array_equal(batch.ids[row, 0, :length], alone.ids[0, 0, :length])
        np.testing.assert_allclose(batch.scores[row], alone.scores[0], atol=1e-4)
