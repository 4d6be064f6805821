"""Several encoder-decoder models decoded as one: an ensemble's step averages its members'
next-token distributions, and its state and context are the tuples of theirs.

The decoding module needs nothing new: the searches reorder, tile and drop rows of the
tuples with `tf.nest` like any other state. Members may differ in architecture (an RNN and a
Transformer) and in their source side; they must share the target vocabulary and its
start and end ids.
"""

import contextlib
import math

import tensorflow as tf

from seq2seq import decoding
from seq2seq.model import shortlisted_search
from seq2seq.products import prepared

COMBINATIONS = ("probabilities", "log_probabilities")


class Ensemble:
    """Decodes with the average of `models`' per-step distributions.

    combine: "probabilities" (log of the mean of the probabilities, the usual choice) or
    "log_probabilities" (mean of the log-probabilities, a product of experts, which the
    searches renormalize as they do any logits). The attention a
    search reports is the first member's (the members' sources may be tokenized differently).
    """

    def __init__(self, models, combine="probabilities"):
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one model")
        if combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {COMBINATIONS}, got {combine!r}")
        first = models[0]
        for index, model in enumerate(models[1:], start=1):
            mine = (model.decoder.vocab_size, model.start_id, model.end_id)
            theirs = (first.decoder.vocab_size, first.start_id, first.end_id)
            if mine != theirs:
                raise ValueError(
                    f"ensemble members must share the target vocabulary: model 0 has {theirs[0]} target tokens "
                    f"(start id {theirs[1]}, end id {theirs[2]}), model {index} has {mine[0]} ({mine[1]}, {mine[2]})"
                )
        self.models = models
        self.combine = combine
        self.start_id, self.end_id = first.start_id, first.end_id

    def encode(self, sources):
        """One source batch a member (each in its own tokenization) -> (contexts, states) tuples."""
        if len(sources) != len(self.models):
            raise ValueError(f"{len(sources)} source batches for {len(self.models)} ensemble members: give one each")
        encoded = [model.encode(source, training=False) for model, source in zip(self.models, sources)]
        return tuple(context for context, _ in encoded), tuple(state for _, state in encoded)

    def combined_step(self, member_steps):
        """The step contract over the members' step functions (their decoders' steps, or a
        shortlist's restricted steps): float32 log-probabilities of the combination (logits up
        to a constant per row, which no search depends on), the members' new states, and the
        first member's attention."""
        return lambda tokens, states, contexts: self._combine(
            [step(tokens, state, context) for step, state, context in zip(member_steps, states, contexts)]
        )

    def _combine(self, steps):
        log_probs = [tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1) for logits, _, _ in steps]
        if len(log_probs) == 1:
            combined = log_probs[0]
        elif self.combine == "log_probabilities":
            combined = tf.add_n(log_probs) / len(log_probs)
        else:
            combined = tf.reduce_logsumexp(tf.stack(log_probs), axis=0) - math.log(len(log_probs))
        return combined, tuple(state for _, state, _ in steps), steps[0][2]

    def generate(self, sources, search="greedy", max_length=100, prefix=None, output_ids=None, **options):
        """`Seq2SeqModel.generate` for the ensemble: `sources` holds one batch a member (the same
        sentences in each member's source ids); `output_ids` a shortlist as there; the options are
        the searches' (see `decoding.run_search`). Returns a `decoding.DecodingResult`."""
        with contextlib.ExitStack() as scopes:
            for model in self.models:
                scopes.enter_context(prepared(model))
            contexts, states = self.encode(sources)
            batch_size = tf.shape(contexts[0]["memory"])[0]
            return shortlisted_search(
                lambda steps, prefix: decoding.run_search(
                    self.combined_step(steps), states, contexts, batch_size, self.start_id, self.end_id, max_length,
                    search=search, prefix=prefix, **options,
                ),
                [model.decoder for model in self.models], prefix, output_ids,
            )
