"""The beam search as it was before the fixed-shape rewrite (full-vocabulary top-k, ids and
attention history rebuilt by concatenation every step): the reference that the faster
`seq2seq.decoding.beam_search` must match exactly."""

import tensorflow as tf

from seq2seq.decoding import (
    DecodingResult, _any_shape, _fill_after_end, _log_softmax, gather_beams, initial_beams, sequence_score,
)


def reference_beam_search(
    step_fn, initial_state, context, batch_size, start_id, end_id, max_length,
    beam_size=4, length_penalty=0.0, length_normalize=False, n_best=1,
):
    """The previous beam search (arguments are assumed valid)."""
    k = beam_size
    max_lengths, state, context, tokens, log_probs = initial_beams(
        initial_state, context, batch_size, start_id, max_length, k
    )
    limit = tf.reduce_max(max_lengths)
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
