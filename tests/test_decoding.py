"""Greedy, beam and sampling search (seq2seq.decoding).

Most tests drive the searches with `FakeModel`, a step function whose next-token
probabilities come from a fixed table indexed by (row, step, token before last, last token),
so every expected output can be computed in NumPy. The token before last lives in the
decoder *state*, so a beam search that forgets to reorder the state gives wrong scores.
The last tests run the searches on a real tiny RNN model.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.decoding import (
    beam_search,
    greedy_search,
    max_length_from_source,
    sampling_search,
    sequence_score,
)
from seq2seq.model import build_rnn_model

START, END = 0, 3  # the fake vocabulary is {0, 1, 2, 3}; 3 is the end token
SRC_LEN = 5


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class FakeModel:
    """Step function over a fixed table.

    logits: [rows, steps, vocab (token before last), vocab (last token), vocab].
    state:  {"prev": [batch] the token before last, "t": [batch] the step}.
    context: {"row": [batch] the table row}, tiled per beam by the search.
    attention at each step: a fixed random distribution over SRC_LEN positions, also
    indexed by (row, step, token before last, last token).
    """

    def __init__(self, logits, seed=0):
        self.logits = np.asarray(logits, np.float32)
        rows, self.steps, vocab, _, _ = self.logits.shape
        self.vocab = vocab
        rng = np.random.default_rng(seed)
        attention = rng.random((rows, self.steps, vocab, vocab, SRC_LEN)).astype(np.float32)
        self.attention = attention / attention.sum(-1, keepdims=True)
        self._logits = tf.constant(self.logits)
        self._attention = tf.constant(self.attention)
        self.calls = 0

    @classmethod
    def random(cls, rows=3, steps=8, vocab=4, scale=1.5, seed=0):
        rng = np.random.default_rng(seed)
        return cls(scale * rng.normal(size=(rows, steps, vocab, vocab, vocab)), seed=seed)

    @property
    def batch_size(self):
        return self.logits.shape[0]

    def step(self, tokens, state, context):
        self.calls += 1
        t = tf.minimum(state["t"], self.steps - 1)
        index = tf.stack([context["row"], t, state["prev"], tokens], axis=1)
        logits = tf.gather_nd(self._logits, index)
        attention = tf.gather_nd(self._attention, index)
        return logits, {"prev": tokens, "t": state["t"] + 1}, attention

    def args(self, max_length):
        b = self.batch_size
        state = {"prev": tf.fill([b], START), "t": tf.zeros([b], tf.int32)}
        return self.step, state, {"row": tf.range(b)}, b, START, END, max_length

    # NumPy references -----------------------------------------------------------------

    def token_log_probs(self, row, step, prev2, prev):
        return log_softmax(self.logits[row, min(step, self.steps - 1), prev2, prev])

    def path(self, row, tokens):
        """Per-token log-probs and attention of emitting `tokens` (end token included if there)."""
        prev2, prev, log_probs, attention = START, START, [], []
        for step, token in enumerate(tokens):
            log_probs.append(self.token_log_probs(row, step, prev2, prev)[token])
            attention.append(self.attention[row, min(step, self.steps - 1), prev2, prev])
            prev2, prev = prev, token
        return np.array(log_probs), np.array(attention)

    def greedy(self, row, max_length):
        prev2, prev, tokens = START, START, []
        while len(tokens) < max_length:
            token = int(np.argmax(self.token_log_probs(row, len(tokens), prev2, prev)))
            tokens.append(token)
            if token == END:
                break
            prev2, prev = prev, token
        return tokens

    def enumerate(self, row, max_length):
        """Every hypothesis a search can return: (tokens without end, log-prob, scored length, ended)."""
        hypotheses = []

        def extend(prefix, total, prev2, prev):
            log_probs = self.token_log_probs(row, len(prefix), prev2, prev)
            for token in range(self.vocab):
                score = total + log_probs[token]
                if token == END:
                    hypotheses.append((prefix, score, len(prefix) + 1, True))
                elif len(prefix) + 1 == max_length:
                    hypotheses.append((prefix + [token], score, max_length, False))
                else:
                    extend(prefix + [token], score, prev, token)

        extend([], 0.0, START, START)
        return hypotheses


def table_from_probs(probs_fn, rows=1, steps=6, vocab=4):
    """A logits table from probs_fn(row, step, prev2, prev) -> probabilities (or None for random)."""
    rng = np.random.default_rng(42)
    logits = rng.normal(size=(rows, steps, vocab, vocab, vocab))
    for index in np.ndindex(rows, steps, vocab, vocab):
        probs = probs_fn(*index)
        if probs is not None:
            logits[index] = np.log(np.asarray(probs, np.float64))
    return logits


def ranked(model, row, max_length, length_penalty=0.0, length_normalize=False):
    """All hypotheses of `row`, best first, with their scores from `sequence_score`."""
    hypotheses = model.enumerate(row, max_length)
    scores = sequence_score(
        tf.constant([h[1] for h in hypotheses], tf.float32),
        tf.constant([h[2] for h in hypotheses]),
        length_penalty,
        length_normalize,
    ).numpy()
    order = np.argsort(-scores, kind="stable")
    return [hypotheses[i] for i in order], scores[order]


def padded(tokens, length):
    return list(tokens) + [END] * (length - len(tokens))


# Greedy ------------------------------------------------------------------------------


def test_greedy_spells_the_expected_sequence_with_exact_log_probs():
    word = [1, 2, 1, 2, END]

    def probs(row, step, prev2, prev):
        # The next token of `word` always has probability 0.7, the others 0.1.
        p = np.full(4, 0.1)
        p[word[min(step, len(word) - 1)]] = 0.7
        return p

    model = FakeModel(table_from_probs(probs, steps=8))
    result = greedy_search(*model.args(max_length=10))
    assert result.ids.shape == (1, 1, 5)
    assert result.ids.numpy().tolist() == [[word]]
    assert result.lengths.numpy().tolist() == [[4]]
    np.testing.assert_allclose(result.log_probs.numpy(), [[5 * math.log(0.7)]], rtol=1e-6)
    np.testing.assert_allclose(result.scores.numpy(), result.log_probs.numpy())
    # One step call per emitted token, end token included, then the loop stops.
    assert model.calls == 5


def test_greedy_matches_numpy_reference_on_random_tables():
    model = FakeModel.random(rows=6, steps=10, scale=2.0, seed=3)
    max_length = 8
    result = greedy_search(*model.args(max_length))
    time = result.ids.shape[-1]
    for row in range(model.batch_size):
        tokens = model.greedy(row, max_length)
        ended = tokens[-1] == END
        length = len(tokens) - ended
        log_probs, attention = model.path(row, tokens)
        assert result.ids[row, 0].numpy().tolist() == padded(tokens, time)
        assert result.lengths[row, 0] == length
        np.testing.assert_allclose(result.log_probs[row, 0], log_probs.sum(), atol=1e-5)
        np.testing.assert_allclose(result.attention[row, 0, : len(tokens)], attention, atol=1e-6)
        assert np.all(result.attention[row, 0, len(tokens) :].numpy() == 0.0)
    # The rows end at different steps, so the frozen-row logic is exercised.
    assert len(set(result.lengths.numpy()[:, 0].tolist())) > 1


# Beam search against brute force ------------------------------------------------------

PENALTIES = [
    pytest.param({}, id="plain"),
    pytest.param({"length_penalty": 0.6}, id="gnmt0.6"),
    pytest.param({"length_penalty": 1.0}, id="gnmt1.0"),
    pytest.param({"length_normalize": True}, id="normalize"),
]


@pytest.mark.parametrize("penalty", PENALTIES)
def test_exhaustive_beam_returns_brute_force_n_best_in_order(penalty):
    max_length, n_best = 4, 12
    # End-token logits raised so that short and long hypotheses both compete.
    logits = 1.5 * np.random.default_rng(7).normal(size=(3, 6, 4, 4, 4))
    logits[..., END] += 0.5
    model = FakeModel(logits, seed=7)
    # 121 hypotheses per row (1 + 3 + 9 + 27 ending, 81 at max length) all fit in the beam.
    result = beam_search(*model.args(max_length), beam_size=128, n_best=n_best, **penalty)
    assert result.ids.shape[:2] == (3, n_best)
    time = result.ids.shape[-1]
    assert time == max_length
    lengths_seen = set()
    for row in range(3):
        hypotheses, scores = ranked(model, row, max_length, **penalty)
        assert len(hypotheses) == 121
        assert np.min(scores[:n_best] - scores[1 : n_best + 1]) > 1e-4, "near tie: pick another seed"
        for rank, ((tokens, log_prob, _, ended), score) in enumerate(zip(hypotheses[:n_best], scores)):
            assert result.ids[row, rank].numpy().tolist() == padded(tokens, time), (row, rank)
            assert result.lengths[row, rank] == len(tokens)
            np.testing.assert_allclose(result.scores[row, rank], score, atol=1e-5)
            np.testing.assert_allclose(result.log_probs[row, rank], log_prob, atol=1e-5)
            emitted = tokens + [END] if ended else tokens
            _, attention = model.path(row, emitted)
            np.testing.assert_allclose(result.attention[row, rank, : len(emitted)], attention, atol=1e-6)
            assert np.all(result.attention[row, rank, len(emitted) :].numpy() == 0.0)
            lengths_seen.add(len(tokens))
    assert len(lengths_seen) >= 3  # the n-best lists mix lengths, so the penalties matter


def test_length_penalties_change_the_winner():
    """The brute-force optimum differs between scorings on this table, so the test above
    would catch a search that ignores the penalty."""
    logits = 1.5 * np.random.default_rng(7).normal(size=(3, 6, 4, 4, 4))
    logits[..., END] += 0.5
    model = FakeModel(logits, seed=7)
    winners = set()
    for penalty in ({}, {"length_penalty": 1.0}, {"length_normalize": True}):
        for row in range(3):
            winners.add((row, tuple(ranked(model, row, 4, **penalty)[0][0][0])))
    assert len(winners) > 3


def greedy_trap():
    """Step 0: token 1 (p=.5) beats token 2 (p=.4); but after 1 nothing is likely (best .3),
    while after 2 the end token has p=.9. Greedy gets <= .5*.3, beam finds [2, END] = .36."""

    def probs(row, step, prev2, prev):
        if step == 0:
            return [0.03, 0.5, 0.4, 0.07]
        if step == 1 and prev == 1:
            return [0.3, 0.28, 0.22, 0.2]
        if step == 1 and prev == 2:
            return [0.04, 0.03, 0.03, 0.9]
        return [0.2, 0.2, 0.1, 0.5]

    return FakeModel(table_from_probs(probs))


def test_beam_finds_optimum_where_greedy_does_not():
    model = greedy_trap()
    greedy = greedy_search(*model.args(max_length=4))
    assert greedy.ids[0, 0, 0] == 1
    beam = beam_search(*model.args(max_length=4), beam_size=2)
    assert beam.ids[0, 0].numpy().tolist() == padded([2, END], beam.ids.shape[-1])
    assert beam.lengths.numpy().tolist() == [[1]]
    np.testing.assert_allclose(beam.log_probs[0, 0], math.log(0.4 * 0.9), rtol=1e-5)
    assert beam.log_probs[0, 0] > greedy.log_probs[0, 0] + 0.5
    hypotheses, _ = ranked(model, 0, 4)
    assert hypotheses[0][0] == [2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_equals_greedy_on_fake_model(seed):
    model = FakeModel.random(rows=5, steps=10, scale=2.0, seed=seed)
    greedy = greedy_search(*model.args(7))
    beam = beam_search(*model.args(7), beam_size=1)
    np.testing.assert_array_equal(beam.ids, greedy.ids)
    np.testing.assert_array_equal(beam.lengths, greedy.lengths)
    np.testing.assert_allclose(beam.scores, greedy.scores, atol=1e-6)
    np.testing.assert_allclose(beam.log_probs, greedy.log_probs, atol=1e-6)
    np.testing.assert_allclose(beam.attention, greedy.attention, atol=1e-7)


# End and max-length handling ----------------------------------------------------------


def test_finished_hypotheses_are_kept_frozen_and_padded_with_end():
    # Ending at once has p=.45; every other continuation is unlikely, so the one-token
    # hypothesis [END] stays best while the other beams run to max_length.
    def probs(row, step, prev2, prev):
        if step == 0:
            return [0.2, 0.2, 0.15, 0.45]
        return [0.3, 0.3, 0.3, 0.1]

    model = FakeModel(table_from_probs(probs, steps=8))
    result = beam_search(*model.args(max_length=6), beam_size=3, n_best=3)
    assert result.ids.shape == (1, 3, 6)
    assert result.ids[0, 0].numpy().tolist() == [END] * 6
    assert result.lengths[0, 0] == 0
    # Its score stayed log(.45) while the other beams kept going for five more steps.
    np.testing.assert_allclose(result.scores[0, 0], math.log(0.45), rtol=1e-6)
    np.testing.assert_allclose(result.log_probs[0, 0], math.log(0.45), rtol=1e-6)
    assert np.all(result.attention[0, 0, 1:].numpy() == 0.0)
    assert np.all(result.attention[0, 0, 0].numpy() > 0.0)
    # The others: 6 tokens from {0, 1, 2} (no end token has a chance: .1 < .3).
    for rank in (1, 2):
        assert result.lengths[0, rank] == 6
        assert END not in result.ids[0, rank].numpy().tolist()
    assert np.all(np.diff(result.scores[0].numpy()) <= 0)


def never_ends(rows=3, steps=12):
    logits = np.random.default_rng(5).normal(size=(rows, steps, 4, 4, 4))
    logits[..., END] = -1e4
    return FakeModel(logits)


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_model_that_never_ends_stops_at_max_length(search):
    model = never_ends()
    run = {
        "greedy": lambda max_length: greedy_search(*model.args(max_length)),
        "beam": lambda max_length: beam_search(*model.args(max_length), beam_size=3, n_best=2),
        "sample": lambda max_length: sampling_search(*model.args(max_length), seed=3),
    }[search]
    result = run(5)
    n = result.ids.shape[1]
    assert result.ids.shape[::2] == (3, 5)
    assert result.attention.shape == (3, n, 5, SRC_LEN)
    assert np.all(result.lengths.numpy() == 5)
    assert END not in result.ids.numpy()

    # Per-row maximum lengths from the source lengths: ceil(1.5 * [1, 2, 4] + 1) = [3, 4, 7].
    max_lengths = max_length_from_source(tf.constant([1, 2, 4]), ratio=1.5, offset=1)
    assert max_lengths.numpy().tolist() == [3, 4, 7]
    result = run(max_lengths)
    assert result.ids.shape[-1] == 7
    np.testing.assert_array_equal(result.lengths, np.repeat([[3], [4], [7]], n, axis=1))
    for row, limit in enumerate([3, 4, 7]):
        assert np.all(result.ids[row, :, limit:].numpy() == END)
        assert END not in result.ids[row, :, :limit].numpy()
        assert np.all(result.attention[row, :, limit:].numpy() == 0.0)
        np.testing.assert_allclose(result.attention[row, :, :limit].numpy().sum(-1), 1.0, rtol=1e-5)


def test_end_token_at_the_last_allowed_step_counts_as_ended():
    # [1, 1, END] exactly fills max_length 3; its length is 2, not 3.
    def probs(row, step, prev2, prev):
        return [0.1, 0.6, 0.1, 0.2] if step < 2 else [0.1, 0.1, 0.1, 0.7]

    model = FakeModel(table_from_probs(probs))
    for result in (greedy_search(*model.args(3)), beam_search(*model.args(3), beam_size=2)):
        assert result.ids[0, 0].numpy().tolist() == [1, 1, END]
        assert result.lengths[0, 0] == 2
        np.testing.assert_allclose(result.log_probs[0, 0], math.log(0.6 * 0.6 * 0.7), rtol=1e-5)


# Sampling -----------------------------------------------------------------------------


def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds():
    model = FakeModel.random(rows=8, steps=10, scale=0.5, seed=1)
    first = sampling_search(*model.args(8), seed=11)
    again = sampling_search(*model.args(8), seed=11)
    other = sampling_search(*model.args(8), seed=12)
    np.testing.assert_array_equal(first.ids, again.ids)
    np.testing.assert_array_equal(first.log_probs, again.log_probs)
    assert not np.array_equal(first.ids.numpy(), other.ids.numpy())


def test_sampling_log_probs_are_the_models_whatever_the_temperature():
    model = FakeModel.random(rows=6, steps=10, scale=1.0, seed=2)
    result = sampling_search(*model.args(6), seed=5, temperature=3.0, top_k=2)
    for row in range(6):
        length = int(result.lengths[row, 0])
        tokens = result.ids[row, 0, : length + 1].numpy().tolist()[: 6]
        log_probs, _ = model.path(row, tokens)
        np.testing.assert_allclose(result.log_probs[row, 0], log_probs.sum(), atol=1e-5)


def test_top_k_one_equals_greedy():
    model = FakeModel.random(rows=6, steps=10, scale=1.0, seed=4)
    greedy = greedy_search(*model.args(8))
    for seed in (None, 0, 1):
        sampled = sampling_search(*model.args(8), top_k=1, seed=seed, temperature=2.0)
        np.testing.assert_array_equal(sampled.ids, greedy.ids)
        np.testing.assert_array_equal(sampled.lengths, greedy.lengths)
        np.testing.assert_allclose(sampled.log_probs, greedy.log_probs, atol=1e-6)


def test_samples_never_leave_the_top_k():
    model = FakeModel.random(rows=64, steps=10, vocab=4, scale=0.3, seed=6)  # flat: every token likely
    result = sampling_search(*model.args(6), top_k=2, seed=9)
    outside_top1 = 0
    for row in range(64):
        tokens = result.ids[row, 0].numpy().tolist()
        prev2, prev = START, START
        for step in range(int(result.lengths[row, 0]) + 1):
            if step >= 6:
                break
            top = np.argsort(-model.token_log_probs(row, step, prev2, prev))[:2]
            assert tokens[step] in top, (row, step)
            outside_top1 += tokens[step] != top[0]
            prev2, prev = prev, tokens[step]
    assert outside_top1 > 20  # the second-best token is sampled too


def test_sampling_frequencies_follow_softmax_of_logits_over_temperature():
    rows, temperature = 4000, 2.0
    logits = np.zeros((rows, 2, 4, 4, 4))
    logits[:, 0, START, START] = [1.0, 0.0, -1.0, 0.5]
    model = FakeModel(logits)
    result = sampling_search(*model.args(1), temperature=temperature, seed=21)
    counts = np.bincount(result.ids.numpy()[:, 0, 0], minlength=4) / rows
    expected = np.exp(log_softmax(np.array([1.0, 0.0, -1.0, 0.5]) / temperature))
    np.testing.assert_allclose(counts, expected, atol=0.03)


# Graph mode and validation ------------------------------------------------------------


def test_all_searches_run_in_tf_function_and_match_eager():
    model = FakeModel.random(rows=4, steps=10, scale=2.0, seed=8)
    max_lengths = tf.constant([3, 6, 6, 2])
    searches = {
        "greedy": lambda m: greedy_search(*model.args(m)),
        "beam": lambda m: beam_search(*model.args(m), beam_size=3, n_best=2, length_penalty=0.6),
        "sample": lambda m: sampling_search(*model.args(m), seed=4, top_k=3),
    }
    for name, search in searches.items():
        eager = search(max_lengths)
        graph = tf.function(search)(max_lengths)
        for field, a, b in zip(eager._fields, eager, graph):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=f"{name}.{field}")


def test_beam_size_and_n_best_as_tensors_in_one_exported_graph():
    model = FakeModel.random(rows=3, steps=10, scale=2.0, seed=9)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
    def search(beam_size, n_best):
        return beam_search(*model.args(5), beam_size=beam_size, n_best=n_best)

    for beam_size, n_best in ((1, 1), (4, 2), (6, 3)):
        graph = search(tf.constant(beam_size), tf.constant(n_best))
        eager = beam_search(*model.args(5), beam_size=beam_size, n_best=n_best)
        np.testing.assert_array_equal(graph.ids, eager.ids)
        np.testing.assert_allclose(graph.scores, eager.scores, atol=1e-6)
        assert graph.ids.shape[1] == n_best


def test_length_penalty_as_tensor_in_a_graph():
    """The docstring promises a tensor length_penalty works in an exported graph."""
    model = FakeModel.random(rows=3, steps=10, scale=2.0, seed=9)

    @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
    def search(alpha):
        return beam_search(*model.args(4), beam_size=4, length_penalty=alpha)

    for alpha in (0.0, 0.6, 1.0):
        graph = search(tf.constant(alpha))
        eager = beam_search(*model.args(4), beam_size=4, length_penalty=alpha)
        np.testing.assert_array_equal(graph.ids, eager.ids)
        np.testing.assert_allclose(graph.scores, eager.scores, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beam_size": 0}, "beam_size must be at least 1"),
        ({"beam_size": 2, "n_best": 3}, "n_best must be between 1 and beam_size"),
        ({"beam_size": 2, "n_best": 0}, "n_best must be between 1 and beam_size"),
        ({"length_penalty": 0.6, "length_normalize": True}, "either length_penalty or length_normalize"),
    ],
)
def test_beam_search_validates_its_arguments(kwargs, message):
    model = FakeModel.random(rows=1)
    with pytest.raises(ValueError, match=message):
        beam_search(*model.args(3), **kwargs)


def test_sampling_rejects_non_positive_temperature():
    model = FakeModel.random(rows=1)
    with pytest.raises(ValueError, match="temperature must be positive"):
        sampling_search(*model.args(3), temperature=0.0)


def test_sequence_score_formulas():
    log_probs = tf.constant([-2.0, -2.0, -6.0])
    lengths = tf.constant([1, 3, 7])
    np.testing.assert_allclose(sequence_score(log_probs, lengths), [-2.0, -2.0, -6.0])
    np.testing.assert_allclose(sequence_score(log_probs, lengths, length_normalize=True), [-2.0, -2 / 3, -6 / 7], rtol=1e-6)
    gnmt = [lp / ((5 + n) / 6) ** 0.6 for lp, n in zip([-2.0, -2.0, -6.0], [1, 3, 7])]
    np.testing.assert_allclose(sequence_score(log_probs, lengths, 0.6), gnmt, rtol=1e-6)


# A real tiny RNN model ----------------------------------------------------------------

SOURCE_LENGTHS = [3, 7, 1, 5, 6]


@pytest.fixture(scope="module")
def rnn_model():
    keras.utils.set_random_seed(0)
    model = build_rnn_model(20, 16, cell_type="gru", units=16, bidirectional=True, encoder_layers=2)
    # With these weights some hypotheses end early and others run to max_length.
    rng = np.random.default_rng(0)
    sources = np.zeros((len(SOURCE_LENGTHS), max(SOURCE_LENGTHS) + 2), np.int32)  # extra padding too
    for row, length in enumerate(SOURCE_LENGTHS):
        sources[row, :length] = rng.integers(4, 20, size=length)
    return model, sources


def test_rnn_model_beam_size_one_equals_greedy(rnn_model):
    model, sources = rnn_model
    greedy = model.generate(sources, search="greedy", max_length=12)
    beam = model.generate(sources, search="beam", beam_size=1, max_length=12)
    np.testing.assert_array_equal(beam.ids, greedy.ids)
    np.testing.assert_array_equal(beam.lengths, greedy.lengths)
    np.testing.assert_allclose(beam.scores, greedy.scores, atol=1e-5)
    np.testing.assert_allclose(beam.attention, greedy.attention, atol=1e-5)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_rnn_model_batch_equals_one_at_a_time(rnn_model, search):
    model, sources = rnn_model
    options = {"beam_size": 3, "n_best": 2, "length_penalty": 0.6} if search == "beam" else {}
    batch = model.generate(sources, search=search, max_length=12, **options)
    n = batch.ids.shape[1]
    assert batch.attention.shape[:2] == (len(SOURCE_LENGTHS), n)
    assert batch.attention.shape[-1] == sources.shape[1]
    lengths = set()
    for row, src_len in enumerate(SOURCE_LENGTHS):
        single = model.generate(sources[row : row + 1, :src_len], search=search, max_length=12, **options)
        time = single.ids.shape[-1]
        np.testing.assert_array_equal(batch.ids[row, :, :time], single.ids[0])
        assert np.all(batch.ids[row, :, time:].numpy() == model.end_id)
        np.testing.assert_array_equal(batch.lengths[row], single.lengths[0])
        np.testing.assert_allclose(batch.scores[row], single.scores[0], atol=1e-5)
        np.testing.assert_allclose(batch.log_probs[row], single.log_probs[0], atol=1e-5)
        np.testing.assert_allclose(batch.attention[row, :, :time, :src_len], single.attention[0], atol=1e-5)
        # No attention on the padding, and none after the end.
        assert np.all(batch.attention[row, :, :, src_len:].numpy() == 0.0)
        for hyp in range(n):
            emitted = int(single.lengths[0, hyp]) + 1
            assert np.all(batch.attention[row, hyp, emitted:].numpy() == 0.0)
        lengths.update(single.lengths.numpy().ravel().tolist())
    assert len(lengths) >= 2, f"hypotheses should end at different lengths, got {lengths}"


def test_rnn_model_generate_in_tf_function_matches_eager(rnn_model):
    model, sources = rnn_model
    max_lengths = max_length_from_source(tf.constant(SOURCE_LENGTHS), ratio=1.0, offset=2)
    for search, options in (("greedy", {}), ("beam", {"beam_size": 3}), ("sample", {"seed": 3})):
        eager = model.generate(sources, search=search, max_length=max_lengths, **options)
        graph = tf.function(lambda s: model.generate(s, search=search, max_length=max_lengths, **options))(
            tf.constant(sources)
        )
        np.testing.assert_array_equal(graph.ids, eager.ids)
        np.testing.assert_allclose(graph.scores, eager.scores, atol=1e-5)
        assert np.all(eager.lengths.numpy() <= max_lengths.numpy()[:, None])


def test_rnn_model_rejects_unknown_search(rnn_model):
    model, sources = rnn_model
    with pytest.raises(ValueError, match="search must be one of"):
        model.generate(sources, search="nucleus")


# The fixed-shape beam search against the implementation it replaced ----------------------------


@pytest.mark.parametrize("beam_size", [1, 2, 3, 4, 5])
def test_beam_search_returns_the_ids_and_scores_of_the_previous_implementation(rnn_model, beam_size):
    from beam_reference import reference_beam_search
    from seq2seq.transformer import build_transformer_model

    keras.utils.set_random_seed(1)
    transformer = build_transformer_model(20, 16, num_layers=2, units=16, num_heads=2, ffn_dim=32, dropout=0.0)
    rnn, sources = rnn_model
    options = {"beam_size": beam_size, "n_best": beam_size, "length_penalty": 0.6}
    lengths = []
    for model in (rnn, transformer):
        context, state = model.encode(sources)
        args = (model.decoder.step, state, context, len(sources), model.start_id, model.end_id, 12)
        new, old = beam_search(*args, **options), reference_beam_search(*args, **options)
        np.testing.assert_array_equal(new.ids, old.ids)
        np.testing.assert_array_equal(new.lengths, old.lengths)
        np.testing.assert_allclose(new.scores, old.scores, rtol=0, atol=1e-6)
        np.testing.assert_allclose(new.log_probs, old.log_probs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(new.attention, old.attention, rtol=0, atol=1e-7)
        lengths.extend(new.lengths.numpy().ravel())
    # Some hypotheses ended before max_length and some did not, so both paths were taken.
    assert min(lengths) < 12 and max(lengths) == 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_equals_previous_implementation_on_fake_tables(seed):
    from beam_reference import reference_beam_search

    model = FakeModel.random(rows=3, steps=8, vocab=4, seed=seed)
    for beam_size in (1, 2, 3, 4):
        options = {"beam_size": beam_size, "n_best": min(2, beam_size), "length_penalty": 0.6}
        new = beam_search(*model.args(max_length=8), **options)
        old = reference_beam_search(*model.args(max_length=8), **options)
        np.testing.assert_array_equal(new.ids, old.ids)
        np.testing.assert_allclose(new.scores, old.scores, rtol=0, atol=1e-6)


def test_top_k_rows_is_exact_with_ties_and_any_vocabulary_size():
    from seq2seq.decoding import top_k_rows

    rng = np.random.default_rng(0)
    for vocab in (3, 127, 128, 129, 1000, 8001):
        # Few distinct values, so that ties are everywhere, also across the 128-entry blocks.
        values = tf.constant(rng.integers(0, 7, size=(6, vocab)).astype(np.float32))
        for k in sorted({1, 2, min(5, vocab)}):
            top, indices, row_max = top_k_rows(values, k)
            expected = tf.math.top_k(values, k=k)
            np.testing.assert_array_equal(top, expected.values)
            np.testing.assert_array_equal(indices, expected.indices)
            np.testing.assert_array_equal(row_max, tf.reduce_max(values, axis=-1))


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_finished_sentences_leave_the_batch_without_changing_results(search):
    """A sentence whose hypotheses have all ended is no longer computed: the step function sees
    fewer rows, and the outputs stay those of the same search on that sentence alone."""
    logits = np.random.default_rng(5).normal(size=(3, 12, 4, 4, 4))
    logits[..., END] = -1e4
    logits[1, :, :, :, END] = 1e4  # row 1 ends at once; rows 0 and 2 never end
    model = FakeModel(logits)
    rows_seen = []

    def step(tokens, state, context):
        rows_seen.append(int(tf.shape(tokens)[0]))
        return model.step(tokens, state, context)

    options = {"beam_size": 2, "n_best": 2} if search == "beam" else {}
    run = beam_search if search == "beam" else greedy_search
    _, state, context, batch, start, end, _ = model.args(6)
    result = run(step, state, context, batch, start, end, 6, **options)
    if search == "greedy":
        assert rows_seen == [3] + [2] * 5
    else:  # row 1's second hypothesis (not the end token at step 0) ends at step 1
        assert rows_seen == [6, 6] + [4] * 4
    assert result.ids.shape[:2] == (3, options.get("n_best", 1))
    # Row 1's best hypothesis is the end token at once; nothing after that step.
    assert result.lengths[1][0] == 0
    np.testing.assert_array_equal(result.ids[1][0], END)
    np.testing.assert_array_equal(result.attention[1][0][1:], 0.0)
    for row in (0, 2):
        alone = FakeModel(logits[row : row + 1])
        reference = run(*alone.args(6), **options)
        np.testing.assert_array_equal(result.ids[row], reference.ids[0])
        np.testing.assert_allclose(result.scores[row], reference.scores[0], atol=1e-6)
