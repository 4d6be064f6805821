"""Search strategies over a step function: greedy, sampling and beam search.

Every decoder in this project offers the same step contract:

    logits, new_state, attention = step_fn(token_ids, state, context)

token_ids [batch] int32; state and context are nested structures (dicts, tuples) of tensors
whose first axis is the batch; logits [batch, vocab]; attention [batch, src_len]. The
searches know nothing else about the decoder: they tile `context` once per beam, and tile,
reorder and drop rows of `state` and `context` with `tf.nest`, whatever they hold (RNN
states, a key/value cache); the batch a step sees may therefore shrink from step to step.

All loops are `tf.while_loop`s, so the searches trace into a `tf.function` and export in
a SavedModel. Rows that have produced the end token are frozen: they emit the end token,
their score no longer changes, and their attention is zero. Sentences whose hypotheses
have all finished leave the batch (`_leaving`), so no step computes them; the outputs
are the same as if they had stayed.

Every search takes an optional target `prefix`, a pair (ids [batch, P] int32, lengths [batch]
int32): row b's first lengths[b] tokens are forced to ids[b, :lengths[b]], and the search
continues freely after them (interactive translation, terminology). The forced tokens'
log-probabilities count in the scores, and a row's maximum length grows to hold its prefix and
one more token.
"""

import math
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


_TOP_K_BLOCK = 128  # vocabulary entries a block in `top_k_rows`


def top_k_rows(values, k):
    """tf.math.top_k over the last axis of [rows, vocab] values, exactly (same values, same
    indices, ties to the lower index), plus each row's maximum: (values [rows, k], indices
    [rows, k] int32, row_max [rows]).

    Two stages, because TopK over the whole vocabulary is slow on CPU for a small k: the
    maximum of every block of 128 entries (one vectorized pass), the k best blocks, then
    top-k among their entries. The k best entries always lie in the k blocks with the best
    maxima."""
    rows, vocab = tf.shape(values)[0], tf.shape(values)[1]
    blocks = (vocab + _TOP_K_BLOCK - 1) // _TOP_K_BLOCK
    padded = tf.pad(values, [[0, 0], [0, blocks * _TOP_K_BLOCK - vocab]], constant_values=-float("inf"))
    grouped = tf.reshape(padded, [rows, blocks, _TOP_K_BLOCK])
    block_max = tf.reduce_max(grouped, axis=-1)  # [rows, blocks]
    _, best_blocks = tf.math.top_k(block_max, k=tf.minimum(k, blocks))
    best_blocks = tf.sort(best_blocks, axis=-1)  # in index order, so that ties go to the lower index
    candidates = tf.reshape(tf.gather(grouped, best_blocks, batch_dims=1), [rows, -1])
    top_values, position = tf.math.top_k(candidates, k=k)
    block = tf.gather(best_blocks, position // _TOP_K_BLOCK, batch_dims=1)
    return top_values, block * _TOP_K_BLOCK + position % _TOP_K_BLOCK, tf.reduce_max(block_max, axis=-1)


def log_probs_of(logits, chosen_logits, row_max):
    """Log-probabilities of `chosen_logits` [rows, n] taken from `logits` [rows, vocab],
    computed as the log-softmax kernel does, (x - max) - log(sum(exp(logits - max))),
    without the log-softmax of the whole vocabulary."""
    log_sum = tf.math.log(tf.reduce_sum(tf.exp(logits - row_max[:, None]), axis=-1))
    return (chosen_logits - row_max[:, None]) - log_sum[:, None]


def _fill_after_end(ids, lengths, end_id):
    """ids [..., time]: positions at and after `lengths` become the end token."""
    positions = tf.range(tf.shape(ids)[-1])
    return tf.where(positions >= lengths[..., None], tf.cast(end_id, ids.dtype), ids)


def _beam_rows(keep, beam_size):
    """The flat [rows * beam] indices of sentences `keep`: their beams' rows in the state."""
    return tf.reshape(keep[:, None] * beam_size + tf.range(beam_size)[None], [-1])


def _leaving(done):
    """Which sentences leave the batch this step: the `done` ones [rows], once they are at least
    an eighth of the rows, so that the state and context are not gathered at every step
    (1/4, 1/8 and 1/16 measured alike on the shipped Transformer)."""
    count = tf.reduce_sum(tf.cast(done, tf.int32))
    return done & (count * 8 >= tf.size(done))


def prefix_from_ragged(ids):
    """The `prefix` pair the searches take, (ids [N, P] padded with 0, lengths [N] int32), from
    ragged prefix ids [N, None] (a row without tokens: no prefix)."""
    return ids.to_tensor(0), tf.cast(ids.row_lengths(), tf.int32)


def one_prefix_each(prefixes, count, what):
    """`prefixes` [N], checked to have `count` entries before anything reads them: otherwise the
    graph stops with "`what` needs one prefix each" (not with a gather error further on)."""
    check = tf.debugging.assert_equal(
        tf.size(prefixes), tf.cast(count, tf.int32), message=f"{what} needs one prefix each"
    )
    with tf.control_dependencies([check]):
        return tf.identity(prefixes)


def _prefix_inputs(prefix, max_lengths):
    """The prefix pair as int32 tensors (ids with at least one column), and the per-row maximum
    lengths [batch] grown to hold each prefix and one more token."""
    ids, lengths = prefix
    ids = tf.convert_to_tensor(ids, tf.int32)
    lengths = tf.convert_to_tensor(lengths, tf.int32)
    ids = tf.pad(ids, [[0, 0], [0, tf.maximum(1 - tf.shape(ids)[1], 0)]])
    grown = tf.where(lengths > 0, tf.maximum(max_lengths, lengths + 1), max_lengths)
    return (ids, lengths), grown


def _forced_tokens(prefix, alive, step):
    """At `step`, the prefix token of each `alive` sentence [rows] and whether it is forced [rows]."""
    ids, lengths = prefix
    column = tf.minimum(step, tf.shape(ids)[1] - 1)
    return tf.gather(ids[:, column], alive), step < tf.gather(lengths, alive)


def _scatter_rows(full, alive, values):
    """`full` [batch, ...] with the rows `alive` [A] replaced by `values` [A, ...]."""
    return tf.tensor_scatter_nd_update(full, alive[:, None], values)


def _sequential_search(step_fn, initial_state, context, batch_size, start_id, end_id, max_length, choose, prefix=None):
    """The loop shared by greedy search and sampling; `choose(logits, step)` picks the tokens
    from float32 logits [batch, vocab], except where the `prefix` forces them.

    Sentences that have finished leave the batch (their state and context rows are dropped),
    so the steps only compute rows that are still decoding; what they emit afterwards (the
    end token, zero attention) fills the full-size outputs."""
    max_lengths = _max_lengths(max_length, batch_size)
    if prefix is not None:
        prefix, max_lengths = _prefix_inputs(prefix, max_lengths)
    limit = tf.reduce_max(max_lengths)
    alive = tf.range(batch_size)
    tokens = tf.fill([batch_size], tf.cast(start_id, tf.int32))
    finished = max_lengths <= 0
    zeros = tf.zeros([batch_size], tf.float32), tf.zeros([batch_size], tf.int32), tf.zeros([batch_size], tf.bool)
    ids = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
    attention = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[None, None])
    retired_tokens = tf.fill([batch_size], tf.cast(end_id, tf.int32))  # what a sentence that has left emits

    def body(t, alive, tokens, state, context, finished, row_max_lengths, row_totals, totals, ids, attention):
        row_log_probs, row_lengths, row_ended = row_totals
        logits, state, step_attention = step_fn(tokens, state, context)
        logits = tf.cast(logits, tf.float32)
        choice = tf.cast(choose(logits, t), tf.int32)
        if prefix is not None:
            forced_tokens, forced = _forced_tokens(prefix, alive, t)
            choice = tf.where(forced, forced_tokens, choice)
        tokens = tf.where(finished, end_id, choice)
        chosen_logits = tf.gather(logits, tokens, batch_dims=1)[:, None]
        chosen = log_probs_of(logits, chosen_logits, tf.reduce_max(logits, axis=-1))[:, 0]  # [alive]
        row_log_probs += tf.where(finished, 0.0, chosen)
        row_lengths += tf.cast(~finished, tf.int32)
        step_attention = tf.where(finished[:, None], 0.0, tf.cast(step_attention, tf.float32))
        row_ended |= ~finished & tf.equal(tokens, end_id)
        finished |= tf.equal(tokens, end_id) | (row_lengths >= row_max_lengths)
        row_totals = (row_log_probs, row_lengths, row_ended)
        totals = tuple(_scatter_rows(full, alive, row) for full, row in zip(totals, row_totals))
        ids = ids.write(t, _scatter_rows(retired_tokens, alive, tokens))
        full_attention = tf.zeros([batch_size, tf.shape(step_attention)[-1]], tf.float32)
        attention = attention.write(t, _scatter_rows(full_attention, alive, step_attention))
        leaving = _leaving(finished)
        keep = tf.cast(tf.reshape(tf.where(~leaving), [-1]), tf.int32)
        alive, tokens, finished, row_max_lengths, row_totals = gather_beams(
            (alive, tokens, finished, row_max_lengths, row_totals), keep
        )
        state, context = tf.cond(
            tf.reduce_any(leaving), lambda: gather_beams((state, context), keep), lambda: (state, context)
        )
        return t + 1, alive, tokens, state, context, finished, row_max_lengths, row_totals, totals, ids, attention

    loop_vars = (tf.constant(0), alive, tokens, initial_state, context, finished, max_lengths, zeros, zeros, ids, attention)
    _, _, _, _, _, _, _, _, totals, ids, attention = tf.while_loop(
        lambda t, alive, *_: (t < limit) & (tf.size(alive) > 0),
        body,
        loop_vars,
        shape_invariants=_any_shape(loop_vars),
    )
    return _single_hypotheses(totals, ids, attention, batch_size, end_id)


def _single_hypotheses(totals, ids, attention, batch_size, end_id):
    """The DecodingResult of a search with one hypothesis a row, from the per-step outputs."""
    log_probs, lengths, ended = totals
    ids = tf.reshape(ids.stack(), [-1, batch_size])
    ids = tf.transpose(ids, [1, 0])  # [batch, time]
    attention = attention.stack()
    attention = tf.transpose(tf.reshape(attention, [-1, batch_size, tf.shape(attention)[-1]]), [1, 0, 2])
    lengths -= tf.cast(ended, tf.int32)
    return DecodingResult(
        ids=_fill_after_end(ids, lengths, end_id)[:, None],
        lengths=lengths[:, None],
        scores=log_probs[:, None],
        log_probs=log_probs[:, None],
        attention=attention[:, None],
    )


def greedy_search(step_fn, initial_state, context, batch_size, start_id, end_id, max_length, prefix=None):
    """Picks the most likely token at every step (after the forced `prefix`, if any)."""
    return _sequential_search(
        step_fn, initial_state, context, batch_size, start_id, end_id, max_length,
        choose=lambda logits, step: tf.argmax(logits, axis=-1, output_type=tf.int32), prefix=prefix,
    )


def sampling_search(
    step_fn, initial_state, context, batch_size, start_id, end_id, max_length,
    temperature=1.0, top_k=0, seed=None, prefix=None,
):
    """Samples each token from softmax(logits / temperature), optionally among the top_k only
    (after the forced `prefix`, if any).

    With an integer `seed` the samples are a deterministic function of (seed, step). The
    returned log-probabilities are those of the model (temperature 1, no top-k cut).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def choose(logits, step):
        scaled = _log_softmax(logits) / temperature
        if top_k:
            kth_best = tf.math.top_k(scaled, k=top_k).values[:, -1:]  # [batch, 1]
            scaled = tf.where(scaled < kth_best, tf.constant(-float("inf")), scaled)
        if seed is None:
            return tf.random.categorical(scaled, 1, dtype=tf.int32)[:, 0]
        return tf.random.stateless_categorical(scaled, 1, seed=[seed, step], dtype=tf.int32)[:, 0]

    return _sequential_search(step_fn, initial_state, context, batch_size, start_id, end_id, max_length, choose, prefix)


def initial_beams(initial_state, context, batch_size, start_id, max_length, beam_size):
    """What a beam search starts from: max_lengths [batch, beam], the state and context tiled
    per beam, the start tokens [batch * beam] and log-probabilities [batch, beam] (only the
    first beam of each row is live; the others are copies at -inf)."""
    max_lengths = tf.repeat(_max_lengths(max_length, batch_size)[:, None], beam_size, axis=1)
    tokens = tf.fill([batch_size * beam_size], tf.cast(start_id, tf.int32))
    first = tf.concat([[0.0], tf.fill([beam_size - 1], -float("inf"))], 0)
    log_probs = tf.tile(first[None], [batch_size, 1])
    return max_lengths, tile_beams(initial_state, beam_size), tile_beams(context, beam_size), tokens, log_probs


def beam_search(
    step_fn, initial_state, context, batch_size, start_id, end_id, max_length,
    beam_size=4, length_penalty=0.0, length_normalize=False, n_best=1, prefix=None,
):
    """Batched beam search with finished hypotheses kept and frozen.

    At each step the `beam_size` best continuations of every row are kept among all
    beam * vocab candidates, ranked by `sequence_score`. A hypothesis that emits the end
    token stays in the beam with a frozen score, so the search ends when every beam of
    every row has finished or reached its maximum length. Returns the `n_best` hypotheses
    of each row, best first. beam_size, n_best and length_penalty may be scalar tensors, so
    one exported graph serves any beam size.

    Only the per-step work that must see the whole vocabulary does: each beam's own
    `beam_size` best tokens (`top_k_rows`; the length penalty is the same for all tokens of a
    beam, so the best continuations are among them) and its log-normalizer. The chosen
    tokens, their parent beams and their attention go into fixed-shape TensorArrays, and
    the hypotheses are read back through the parents once at the end.

    While a row's `prefix` forces its tokens, every beam's only candidate is the forced token,
    so the row keeps the single hypothesis it starts with, and the search proper starts from
    the prefix as it would from the start token.
    """
    _check_beam_arguments(beam_size, n_best, length_penalty, length_normalize)
    k = beam_size
    if prefix is not None:
        prefix, max_length = _prefix_inputs(prefix, _max_lengths(max_length, batch_size))
    max_lengths, state, context, tokens, log_probs = initial_beams(
        initial_state, context, batch_size, start_id, max_length, k
    )
    limit = tf.reduce_max(max_lengths)
    alive = tf.range(batch_size)
    finished = max_lengths <= 0
    row_totals = (log_probs, tf.zeros([batch_size, k], tf.int32), tf.zeros([batch_size, k], tf.bool))
    chosen = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None, None])  # [batch, beam] a step
    parents = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None, None])
    attention = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[None, None, None])
    # What a sentence that has left the batch emits: the end token from the same beam, no attention.
    retired_tokens = tf.fill([batch_size, k], tf.cast(end_id, tf.int32))
    retired_parents = tf.tile(tf.range(k)[None], [batch_size, 1])

    def body(t, alive, tokens, state, context, finished, row_max_lengths, row_totals, totals, chosen, parents, attention):
        rows = tf.shape(alive)[0]
        logits, state, step_attention = step_fn(tokens, state, context)
        forced = None if prefix is None else _forced_tokens(prefix, alive, t)
        beams, tokens, finished, row_totals, step_attention = _beam_step(
            logits, step_attention, finished, row_totals, row_max_lengths, k, end_id, length_penalty, length_normalize,
            forced,
        )
        totals = tuple(_scatter_rows(full, alive, row) for full, row in zip(totals, row_totals))
        chosen = chosen.write(t, _scatter_rows(retired_tokens, alive, tokens))
        parents = parents.write(t, _scatter_rows(retired_parents, alive, beams))
        full_attention = tf.zeros([batch_size, k, tf.shape(step_attention)[-1]], tf.float32)
        attention = attention.write(t, _scatter_rows(full_attention, alive, step_attention))
        # Sentences whose beams have all finished leave the batch; the others' beams are reordered.
        leaving = _leaving(tf.reduce_all(finished, axis=1))
        keep = tf.cast(tf.reshape(tf.where(~leaving), [-1]), tf.int32)
        state = gather_beams(state, tf.reshape(tf.gather(beams + tf.range(rows)[:, None] * k, keep), [-1]))
        context = tf.cond(
            tf.reduce_any(leaving), lambda: gather_beams(context, _beam_rows(keep, k)), lambda: context
        )
        alive, tokens, finished, row_max_lengths, row_totals = gather_beams(
            (alive, tf.reshape(tokens, [rows, k]), finished, row_max_lengths, row_totals), keep
        )
        return (
            t + 1, alive, tf.reshape(tokens, [-1]), state, context, finished, row_max_lengths, row_totals, totals,
            chosen, parents, attention,
        )

    loop_vars = (
        tf.constant(0), alive, tokens, state, context, finished, max_lengths, row_totals, row_totals,
        chosen, parents, attention,
    )
    _, _, _, _, _, _, _, _, totals, chosen, parents, attention = tf.while_loop(
        lambda t, alive, *_: (t < limit) & (tf.size(alive) > 0),
        body,
        loop_vars,
        shape_invariants=_any_shape(loop_vars),
    )
    return _n_best_hypotheses(totals, chosen, parents, attention, n_best, end_id, length_penalty, length_normalize)


SEARCHES = ("greedy", "beam", "sample")


def run_search(
    step_fn, initial_state, context, batch_size, start_id, end_id, max_length, search="greedy", beam_size=4,
    length_penalty=0.0, length_normalize=False, n_best=1, temperature=1.0, top_k=0, seed=None, prefix=None,
):
    """One of SEARCHES by name, with the options that search reads (the others are ignored):
    what a model's `generate` calls, whatever its step function is."""
    common = (step_fn, initial_state, context, batch_size, start_id, end_id, max_length)
    if search == "greedy":
        return greedy_search(*common, prefix=prefix)
    if search == "beam":
        return beam_search(
            *common, beam_size=beam_size, length_penalty=length_penalty, length_normalize=length_normalize,
            n_best=n_best, prefix=prefix,
        )
    if search == "sample":
        return sampling_search(*common, temperature=temperature, top_k=top_k, seed=seed, prefix=prefix)
    raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")


def _check_beam_arguments(beam_size, n_best, length_penalty, length_normalize):
    """Refuses impossible Python-number arguments before any graph is built."""
    if isinstance(beam_size, int) and beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if isinstance(beam_size, int) and isinstance(n_best, int) and not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
    if isinstance(length_penalty, (int, float)) and not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")
    if length_normalize and not (isinstance(length_penalty, (int, float)) and length_penalty == 0):
        raise ValueError("use either length_penalty or length_normalize, not both")


def _beam_step(
    logits, attention, finished, row_totals, row_max_lengths, k, end_id, length_penalty, length_normalize, forced=None
):
    """One beam step's choice: the k best continuations of each row [rows, beam] among each
    beam's own k best tokens. A finished beam may only continue with the end token, at no
    cost: its score is frozen. `forced`, a pair (tokens [rows], is_forced [rows]), makes the
    given token every beam's only candidate in the rows it forces. Returns the parent beams, tokens, finished flags, running
    (log-probs, lengths, ended) and attention [rows, k, src_len] of the chosen continuations."""
    row_log_probs, row_lengths, row_ended = row_totals
    rows = tf.shape(finished)[0]
    logits = tf.cast(logits, tf.float32)
    per_beam = tf.minimum(k, tf.shape(logits)[-1])  # candidates a beam
    top_logits, top_tokens, row_max = top_k_rows(logits, per_beam)  # [rows * beam, per_beam]
    candidates = tf.reshape(log_probs_of(logits, top_logits, row_max), [rows, k, per_beam])
    top_tokens = tf.reshape(top_tokens, [rows, k, per_beam])
    only_first = tf.range(per_beam) == 0
    if forced is not None:
        forced_tokens, is_forced = forced
        beam_tokens = tf.repeat(forced_tokens, k)[:, None]  # [rows * beam, 1]
        forced_log_probs = log_probs_of(logits, tf.gather(logits, beam_tokens, batch_dims=1), row_max)
        forced_candidates = tf.where(only_first, tf.reshape(forced_log_probs, [rows, k, 1]), -float("inf"))
        candidates = tf.where(is_forced[:, None, None], forced_candidates, candidates)
        top_tokens = tf.where(is_forced[:, None, None], forced_tokens[:, None, None], top_tokens)
    frozen = tf.where(only_first, 0.0, -float("inf"))
    candidates = tf.where(finished[:, :, None], frozen, candidates)
    top_tokens = tf.where(finished[:, :, None], end_id, top_tokens)
    totals_now = row_log_probs[:, :, None] + candidates  # [rows, beam, per_beam]
    new_lengths = row_lengths + tf.cast(~finished, tf.int32)
    scores = sequence_score(totals_now, new_lengths[:, :, None], length_penalty, length_normalize)
    _, best = tf.math.top_k(tf.reshape(scores, [rows, k * per_beam]), k=k)  # [rows, beam]
    beams = best // per_beam
    tokens = tf.gather(tf.reshape(top_tokens, [rows, k * per_beam]), best, batch_dims=1)
    row_log_probs = tf.gather(tf.reshape(totals_now, [rows, k * per_beam]), best, batch_dims=1)
    row_lengths = tf.gather(new_lengths, beams, batch_dims=1)
    was_finished = tf.gather(finished, beams, batch_dims=1)
    row_ended = tf.gather(row_ended, beams, batch_dims=1) | (~was_finished & tf.equal(tokens, end_id))
    finished = was_finished | tf.equal(tokens, end_id) | (row_lengths >= row_max_lengths)
    attention = tf.reshape(tf.cast(attention, tf.float32), [rows, k, -1])
    attention = tf.where(was_finished[:, :, None], 0.0, tf.gather(attention, beams, batch_dims=1))
    return beams, tokens, finished, (row_log_probs, row_lengths, row_ended), attention


def _n_best_hypotheses(totals, chosen, parents, attention, n_best, end_id, length_penalty, length_normalize):
    """The DecodingResult of the n_best final beams of each row, best first."""
    log_probs, lengths, ended = totals
    scores = sequence_score(log_probs, lengths, length_penalty, length_normalize)
    scores, order = tf.math.top_k(scores, k=n_best)  # best first
    ids, attention = _backtrack(chosen, parents, attention, order)
    lengths = tf.gather(lengths - tf.cast(ended, tf.int32), order, batch_dims=1)
    return DecodingResult(
        ids=_fill_after_end(ids, lengths, end_id),
        lengths=lengths,
        scores=scores,
        log_probs=tf.gather(log_probs, order, batch_dims=1),
        attention=attention,
    )


def _backtrack(chosen, parents, attention, final_beams):
    """The hypotheses ending in `final_beams` [batch, N] (beam indices after the last step):
    ids [batch, N, time] and attention [batch, N, time, src_len], read from the per-step
    TensorArrays of chosen tokens, parent beams and attention, last step first."""
    steps = chosen.size()
    batch_size, hypotheses = tf.shape(final_beams)[0], tf.shape(final_beams)[1]
    ids = tf.TensorArray(tf.int32, size=steps, element_shape=[None, None])
    weights = tf.TensorArray(tf.float32, size=steps, element_shape=[None, None, None])

    def body(t, beams, ids, weights):
        ids = ids.write(t, tf.gather(chosen.read(t), beams, batch_dims=1))
        weights = weights.write(t, tf.gather(attention.read(t), beams, batch_dims=1))
        return t - 1, tf.gather(parents.read(t), beams, batch_dims=1), ids, weights

    _, _, ids, weights = tf.while_loop(lambda t, *_: t >= 0, body, (steps - 1, final_beams, ids, weights))
    ids = tf.reshape(ids.stack(), [steps, batch_size, hypotheses])
    weights = weights.stack()  # [time, batch, N, src_len]
    weights = tf.reshape(weights, [steps, batch_size, hypotheses, tf.shape(weights)[-1]])
    return tf.transpose(ids, [1, 2, 0]), tf.transpose(weights, [1, 2, 0, 3])
