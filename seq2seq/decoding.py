"""Search strategies over a step function: greedy, sampling and beam search.

Every decoder in this project offers the same step contract:

    logits, new_state, attention = step_fn(token_ids, state, context)

token_ids [batch] int32; state and context are nested structures (dicts, tuples) of tensors
whose first axis is the batch; logits [batch, vocab]; attention [batch, src_len]. The
searches know nothing else about the decoder: they tile `context` once per beam, and tile
and reorder `state` with `tf.nest`, whatever it holds (RNN states, a key/value cache).

All loops are `tf.while_loop`s, so the searches trace into a `tf.function` and export in
a SavedModel. Rows that have produced the end token are frozen: they emit the end token,
their score no longer changes, and their attention is zero.
"""

from typing import NamedTuple

import tensorflow as tf


class DecodingResult(NamedTuple):
    """What every search returns; N is the number of hypotheses a row (1 except n-best beam).

    ids:       [batch, N, time] int32; positions at and after `lengths` hold the end token.
    lengths:   [batch, N] int32, tokens before the end token.
    scores:    [batch, N] float32, the ranking score (log-probability, length-penalized in beam search).
    log_probs: [batch, N] float32, the sum of token log-probabilities, end token included.
    attention: [batch, N, time, src_len] float32, the attention of each returned token.
    """

    ids: tf.Tensor
    lengths: tf.Tensor
    scores: tf.Tensor
    log_probs: tf.Tensor
    attention: tf.Tensor


def max_length_from_source(source_lengths, ratio=2.0, offset=10):
    """Per-row maximum output length `ratio * src_len + offset`, e.g. 2 * src_len + 10."""
    lengths = tf.cast(source_lengths, tf.float32) * ratio + offset
    return tf.cast(tf.math.ceil(lengths), tf.int32)


def tile_beams(structure, beam_size):
    """Repeats every row of every tensor `beam_size` times: [batch, ...] -> [batch * beam, ...]."""
    return tf.nest.map_structure(lambda x: tf.repeat(x, beam_size, axis=0), structure)


def gather_beams(structure, indices):
    """Reorders rows of every tensor in `structure` by flat `indices` [batch * beam]."""
    return tf.nest.map_structure(lambda x: tf.gather(x, indices, axis=0), structure)


def sequence_score(log_probs, lengths, length_penalty=0.0, length_normalize=False):
    """The beam-search ranking score of hypotheses with `lengths` tokens (end token included).

    length_penalty (alpha > 0): GNMT, log_probs / ((5 + length) / 6) ** alpha (Wu et al., 2016).
    length_normalize: log_probs / length. Neither: the plain log-probability.
    """
    lengths = tf.cast(lengths, tf.float32)
    if length_normalize:
        return log_probs / tf.maximum(lengths, 1.0)
    if isinstance(length_penalty, (int, float)) and not length_penalty:
        return log_probs
    return log_probs / tf.pow((5.0 + lengths) / 6.0, tf.cast(length_penalty, tf.float32))


def _max_lengths(max_length, batch_size):
    max_length = tf.convert_to_tensor(max_length, dtype=tf.int32)
    return tf.broadcast_to(max_length, [batch_size])


def _any_shape(structure):
    """Loop shape invariants that let every axis change size across steps: the batch axis
    after a beam gather, or the time axis of a growing key/value cache in a decoder state."""

    def invariant(x):
        if isinstance(x, tf.TensorArray):
            return tf.TensorShape(None)
        return tf.TensorShape([None] * x.shape.rank)

    return tf.nest.map_structure(invariant, structure)


def _log_softmax(logits):
    return tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)


def _fill_after_end(ids, lengths, end_id):
    """ids [..., time]: positions at and after `lengths` become the end token."""
    positions = tf.range(tf.shape(ids)[-1])
    return tf.where(positions >= lengths[..., None], tf.cast(end_id, ids.dtype), ids)


def _sequential_search(step_fn, initial_state, context, batch_size, start_id, end_id, max_length, choose):
    """The loop shared by greedy search and sampling; `choose(log_probs, step)` picks the tokens."""
    max_lengths = _max_lengths(max_length, batch_size)
    limit = tf.reduce_max(max_lengths)
    tokens = tf.fill([batch_size], tf.cast(start_id, tf.int32))
    finished = max_lengths <= 0
    log_probs = tf.zeros([batch_size], tf.float32)
    lengths = tf.zeros([batch_size], tf.int32)
    ended = tf.zeros([batch_size], tf.bool)
    ids = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
    attention = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[None, None])

    def body(t, tokens, state, finished, log_probs, lengths, ended, ids, attention):
        logits, state, step_attention = step_fn(tokens, state, context)
        token_log_probs = _log_softmax(logits)  # [batch, vocab]
        tokens = tf.where(finished, end_id, tf.cast(choose(token_log_probs, t), tf.int32))
        chosen = tf.gather(token_log_probs, tokens, batch_dims=1)  # [batch]
        log_probs += tf.where(finished, 0.0, chosen)
        lengths += tf.cast(~finished, tf.int32)
        step_attention = tf.where(finished[:, None], 0.0, tf.cast(step_attention, tf.float32))
        ended |= ~finished & tf.equal(tokens, end_id)
        finished |= tf.equal(tokens, end_id) | (lengths >= max_lengths)
        return t + 1, tokens, state, finished, log_probs, lengths, ended, ids.write(t, tokens), attention.write(t, step_attention)

    loop_vars = (tf.constant(0), tokens, initial_state, finished, log_probs, lengths, ended, ids, attention)
    _, _, _, _, log_probs, lengths, ended, ids, attention = tf.while_loop(
        lambda t, tokens, state, finished, *_: (t < limit) & ~tf.reduce_all(finished),
        body,
        loop_vars,
        shape_invariants=_any_shape(loop_vars),
    )
    ids = tf.transpose(ids.stack(), [1, 0])  # [batch, time]
    attention = tf.transpose(attention.stack(), [1, 0, 2])  # [batch, time, src_len]
    lengths -= tf.cast(ended, tf.int32)
    return DecodingResult(
        ids=_fill_after_end(ids, lengths, end_id)[:, None],
        lengths=lengths[:, None],
        scores=log_probs[:, None],
        log_probs=log_probs[:, None],
        attention=attention[:, None],
    )


def greedy_search(step_fn, initial_state, context, batch_size, start_id, end_id, max_length):
    """Picks the most likely token at every step."""
    return _sequential_search(
        step_fn, initial_state, context, batch_size, start_id, end_id, max_length,
        choose=lambda log_probs, step: tf.argmax(log_probs, axis=-1, output_type=tf.int32),
    )


def sampling_search(
    step_fn, initial_state, context, batch_size, start_id, end_id, max_length,
    temperature=1.0, top_k=0, seed=None,
):
    """Samples each token from softmax(logits / temperature), optionally among the top_k only.

    With an integer `seed` the samples are a deterministic function of (seed, step). The
    returned log-probabilities are those of the model (temperature 1, no top-k cut).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def choose(log_probs, step):
        scaled = log_probs / temperature
        if top_k:
            kth_best = tf.math.top_k(scaled, k=top_k).values[:, -1:]  # [batch, 1]
            scaled = tf.where(scaled < kth_best, tf.constant(-float("inf")), scaled)
        if seed is None:
            return tf.random.categorical(scaled, 1, dtype=tf.int32)[:, 0]
        return tf.random.stateless_categorical(scaled, 1, seed=[seed, step], dtype=tf.int32)[:, 0]

    return _sequential_search(step_fn, initial_state, context, batch_size, start_id, end_id, max_length, choose)


def beam_search(
    step_fn, initial_state, context, batch_size, start_id, end_id, max_length,
    beam_size=4, length_penalty=0.0, length_normalize=False, n_best=1,
):
    """Batched beam search with finished hypotheses kept and frozen.

    At each step the `beam_size` best continuations of every row are kept among all
    beam * vocab candidates, ranked by `sequence_score`. A hypothesis that emits the end
    token stays in the beam with a frozen score, so the search ends when every beam of
    every row has finished or reached its maximum length. Returns the `n_best` hypotheses
    of each row, best first. beam_size, n_best and length_penalty may be scalar tensors, so
    one exported graph serves any beam size.
    """
    if isinstance(beam_size, int) and beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if isinstance(beam_size, int) and isinstance(n_best, int) and not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
    if length_normalize and not (isinstance(length_penalty, (int, float)) and length_penalty == 0):
        raise ValueError("use either length_penalty or length_normalize, not both")
    k = beam_size
    max_lengths = tf.repeat(_max_lengths(max_length, batch_size)[:, None], k, axis=1)  # [batch, beam]
    limit = tf.reduce_max(max_lengths)
    state = tile_beams(initial_state, k)
    context = tile_beams(context, k)
    tokens = tf.fill([batch_size * k], tf.cast(start_id, tf.int32))
    # Only the first beam of each row is live at the start; the others are copies at -inf.
    log_probs = tf.tile(tf.concat([[0.0], tf.fill([k - 1], -float("inf"))], 0)[None], [batch_size, 1])
    finished = max_lengths <= 0
    lengths = tf.zeros([batch_size, k], tf.int32)
    ended = tf.zeros([batch_size, k], tf.bool)
    ids = tf.zeros([batch_size, k, 0], tf.int32)
    attention = tf.zeros([batch_size, k, 0, 0], tf.float32)
    row_offsets = tf.range(batch_size)[:, None] * k  # [batch, 1]

    def body(t, tokens, state, log_probs, finished, lengths, ended, ids, attention):
        logits, state, step_attention = step_fn(tokens, state, context)
        vocab_size = tf.shape(logits)[-1]
        token_log_probs = tf.reshape(_log_softmax(logits), [batch_size, k, vocab_size])
        # A finished beam may only continue with the end token, at no cost: its score is frozen.
        frozen = tf.where(tf.equal(tf.range(vocab_size), end_id), 0.0, -float("inf"))
        token_log_probs = tf.where(finished[:, :, None], frozen, token_log_probs)
        totals = log_probs[:, :, None] + token_log_probs  # [batch, beam, vocab]
        new_lengths = lengths + tf.cast(~finished, tf.int32)
        scores = sequence_score(totals, new_lengths[:, :, None], length_penalty, length_normalize)
        _, best = tf.math.top_k(tf.reshape(scores, [batch_size, k * vocab_size]), k=k)  # [batch, beam]
        beams = best // vocab_size
        tokens = best % vocab_size
        log_probs = tf.gather(tf.reshape(totals, [batch_size, -1]), best, batch_dims=1)
        was_finished = tf.gather(finished, beams, batch_dims=1)
        lengths = tf.gather(new_lengths, beams, batch_dims=1)
        ended = tf.gather(ended, beams, batch_dims=1) | (~was_finished & tf.equal(tokens, end_id))
        finished = was_finished | tf.equal(tokens, end_id) | (lengths >= max_lengths)
        ids = tf.concat([tf.gather(ids, beams, batch_dims=1), tokens[:, :, None]], axis=2)
        step_attention = tf.reshape(tf.cast(step_attention, tf.float32), [batch_size, k, -1])
        step_attention = tf.where(was_finished[:, :, None], 0.0, tf.gather(step_attention, beams, batch_dims=1))
        previous = tf.gather(attention, beams, batch_dims=1)
        previous = tf.pad(previous, [[0, 0], [0, 0], [0, 0], [0, tf.shape(step_attention)[-1] - tf.shape(previous)[-1]]])
        attention = tf.concat([previous, step_attention[:, :, None, :]], axis=2)
        state = gather_beams(state, tf.reshape(beams + row_offsets, [-1]))
        return t + 1, tf.reshape(tokens, [-1]), state, log_probs, finished, lengths, ended, ids, attention

    loop_vars = (tf.constant(0), tokens, state, log_probs, finished, lengths, ended, ids, attention)
    _, _, _, log_probs, _, lengths, ended, ids, attention = tf.while_loop(
        lambda t, tokens, state, log_probs, finished, *_: (t < limit) & ~tf.reduce_all(finished),
        body,
        loop_vars,
        shape_invariants=_any_shape(loop_vars),
    )
    scores = sequence_score(log_probs, lengths, length_penalty, length_normalize)
    scores, order = tf.math.top_k(scores, k=n_best)  # best first
    lengths = tf.gather(lengths - tf.cast(ended, tf.int32), order, batch_dims=1)
    return DecodingResult(
        ids=_fill_after_end(tf.gather(ids, order, batch_dims=1), lengths, end_id),
        lengths=lengths,
        scores=scores,
        log_probs=tf.gather(log_probs, order, batch_dims=1),
        attention=tf.gather(attention, order, batch_dims=1),
    )
