"""Strings in, strings out: tokenization, the model and beam search in one TF graph.

`Translator` is a `tf.Module` whose `translate` function is what the CLI calls in-process
and what `export` writes into the SavedModel, so both run the very same graph.
"""

import tensorflow as tf

from seq2seq import products
from seq2seq.decoding import max_length_from_source, one_prefix_each, prefix_from_ragged
from seq2seq.ensemble import Ensemble
from seq2seq.model import ExportedModel
from seq2seq.tasks.translation.shortlist import batch_shortlist
from seq2seq.text import PAD_ID, UNK

TEXT_SPEC = tf.TensorSpec([None], tf.string, name="texts")
PREFIX_SPEC = tf.TensorSpec([None], tf.string, name="prefixes")
SEARCH_SPECS = [
    tf.TensorSpec([], tf.int32, name="beam_size"),
    tf.TensorSpec([], tf.int32, name="n_best"),
    tf.TensorSpec([], tf.float32, name="length_penalty"),
]


class Translator(tf.Module):
    """Translates a batch of raw sentences with a trained Seq2SeqModel.

    Sources longer than `max_source_length` tokens are truncated (the output says which).
    Empty or whitespace-only sources give an empty translation with score 0. With
    `replace_unknown`, every unknown output token becomes the source token with the
    highest attention weight at that step (Luong et al., 2015, "Addressing the Rare Word
    Problem in Neural Machine Translation").

    `Translator.ensemble` makes one Translator of several: each member tokenizes the source its
    own way, and the search decodes with the average of their distributions.
    """

    def __init__(
        self,
        model,
        source_tokenizer,
        target_tokenizer,
        source_vocab,
        target_vocab,
        max_source_length=100,
        length_ratio=2.0,
        length_offset=10,
        replace_unknown=False,
        shortlist=None,
        name=None,
    ):
        super().__init__(name=name)
        self._members([ExportedModel(model)], [(source_tokenizer, source_vocab, max_source_length)])
        self.target_tokenizer = target_tokenizer
        self.target_vocab = target_vocab
        self.length_ratio = length_ratio
        self.length_offset = length_offset
        self.replace_unknown = replace_unknown
        self.combine = "probabilities"
        # Matrix products in bfloat16 (weights made bfloat16 once per call, see seq2seq.products):
        # about 1.3x faster decoding on CPUs with AMX or AVX512-BF16, slower elsewhere. Off in a
        # SavedModel as written (right on every CPU); `use_bfloat16_products` turns it on.
        self.bf16_products = tf.Variable(False, trainable=False, name="bf16_products")
        # A vocabulary shortlist (`shortlist.build_shortlist`: table, frequent ids): the searches
        # choose among the target tokens the batch's sources make likely. On as written;
        # `use_shortlist` switches it off (the whole vocabulary, as without one).
        self.shortlist = None
        if shortlist is not None:
            table, frequent = shortlist
            self.shortlist = (
                tf.Variable(table, trainable=False, dtype=tf.int32, name="shortlist_table"),
                tf.Variable(frequent, trainable=False, dtype=tf.int32, name="shortlist_frequent"),
            )
            self.use_shortlist = tf.Variable(True, trainable=False, name="use_shortlist")

    def _members(self, exported, sides):
        """The models and their source sides ((tokenizer, vocabulary, max_source_length) each): the
        first member's in the attributes a single model has always had (a SavedModel's object graph
        unchanged), the others' in lists."""
        source_tokenizers, source_vocabs, max_source_lengths = (list(column) for column in zip(*sides))
        self._exported = exported
        self.model_variables = [variable for member in exported for variable in member.variables]
        self.source_tokenizer, self.source_vocab = source_tokenizers[0], source_vocabs[0]
        self.max_source_length = max_source_lengths[0]
        if len(exported) > 1:
            self.other_source_tokenizers = source_tokenizers[1:]
            self.other_source_vocabs = source_vocabs[1:]
            self.other_max_source_lengths = max_source_lengths[1:]

    @property
    def source_sides(self):
        """(tokenizer, vocabulary, max_source_length) of every member, the first first."""
        sides = [(self.source_tokenizer, self.source_vocab, self.max_source_length)]
        if len(self._exported) > 1:
            sides += zip(self.other_source_tokenizers, self.other_source_vocabs, self.other_max_source_lengths)
        return sides

    @classmethod
    def ensemble(cls, translators, combine="probabilities", name=None):
        """One Translator over the models of `translators` (Translators of single models over one
        target vocabulary; their source sides may differ), decoding with `Ensemble(combine)`.
        Its source tokens, attention and replace_unknown are the first member's."""
        translators = list(translators)
        first = translators[0]
        for index, other in enumerate(translators[1:], start=1):
            if other.target_vocab.tokens != first.target_vocab.tokens:
                raise ValueError(
                    f"ensemble members must share the target vocabulary: member 0 has {len(first.target_vocab)} "
                    f"target tokens, member {index} {len(other.target_vocab)}"
                    + (" (the same number, different tokens)" if len(other.target_vocab) == len(first.target_vocab) else "")
                )
        Ensemble([t.model for t in translators], combine)  # checks the models and `combine` now
        ensemble = cls(first.model, first.source_tokenizer, first.target_tokenizer, first.source_vocab,
                       first.target_vocab, first.max_source_length, first.length_ratio, first.length_offset,
                       first.replace_unknown, name=name)
        ensemble._members(
            [member for t in translators for member in t._exported], [side for t in translators for side in t.source_sides]
        )
        ensemble.combine = combine
        return ensemble

    @property
    def model(self):
        """The (first) model."""
        return self._exported[0].model

    @property
    def models(self):
        return [member.model for member in self._exported]

    @tf.function(input_signature=[TEXT_SPEC, *SEARCH_SPECS])
    def translate(self, texts, beam_size, n_best, length_penalty):
        """texts [N] -> dict of translations [N], scores [N], nbest_translations [N, n_best],
        nbest_scores [N, n_best], source_tokens [N, S], target_tokens [N, T],
        attention [N, T, S] (of the best hypothesis) and source_truncated [N] bool.
        beam_size 1 runs greedy search. It is `translate_with_prefix` without prefixes (the same
        outputs), so a SavedModel holds the decoding graph once: half the graph to load."""
        return self.translate_with_prefix(texts, tf.fill(tf.shape(texts), ""), beam_size, n_best, length_penalty)

    @tf.function(input_signature=[TEXT_SPEC, PREFIX_SPEC, *SEARCH_SPECS])
    def translate_with_prefix(self, texts, prefixes, beam_size, n_best, length_penalty):
        """`translate` whose every hypothesis starts with the tokens of its target-language
        prefix (prefixes [N], one a text; "" for none); the search continues freely after
        them, and their log-probabilities count in the scores. Empty sources still give "".
        """
        prefixes = one_prefix_each(prefixes, tf.size(texts), "translate_with_prefix (one a text)")
        prefix = prefix_from_ragged(self.target_vocab.lookup_ids(self.target_tokenizer.tokenize(prefixes)))
        return self._translate(texts, beam_size, n_best, length_penalty, prefix)

    def _translate(self, texts, beam_size, n_best, length_penalty, prefix=None):
        sides = [self._source_ids(texts, tokenizer, vocab, limit) for tokenizer, vocab, limit in self.source_sides]
        source_ids, dense_tokens, source_lengths, truncated = sides[0]
        max_length = max_length_from_source(source_lengths, self.length_ratio, self.length_offset)
        for _, _, lengths, cut in sides[1:]:
            max_length = tf.maximum(max_length, max_length_from_source(lengths, self.length_ratio, self.length_offset))
            truncated |= cut
        if len(sides) == 1:
            searcher, sources = self.model, source_ids
        else:
            searcher, sources = Ensemble(self.models, self.combine), [side[0] for side in sides]

        output_ids = self._output_ids(source_ids, prefix)

        def greedy():
            return tuple(
                searcher.generate(sources, search="greedy", max_length=max_length, prefix=prefix, output_ids=output_ids)
            )

        def beam():
            return tuple(
                searcher.generate(
                    sources, search="beam", max_length=max_length, beam_size=beam_size,
                    n_best=n_best, length_penalty=length_penalty, prefix=prefix, output_ids=output_ids,
                )
            )

        def search(dtype):
            def run():
                with products.product_dtype(dtype):
                    return tf.cond(beam_size > 1, beam, greedy)
            return run

        ids, lengths, scores, _, attention = tf.cond(self.bf16_products, search(tf.bfloat16), search(tf.float32))
        batch_size = tf.shape(ids)[0]
        hypotheses = tf.shape(ids)[1]
        flat_ids = tf.reshape(ids, [batch_size * hypotheses, -1])  # [N*H, T]
        flat_lengths = tf.reshape(lengths, [-1])
        target_tokens = self.target_vocab.lookup_tokens(flat_ids)  # [N*H, T]
        if self.replace_unknown:
            flat_attention = tf.reshape(attention, [batch_size * hypotheses, tf.shape(ids)[2], -1])
            aligned = tf.argmax(flat_attention, axis=-1, output_type=tf.int32)  # [N*H, T]
            dense_source = tf.repeat(dense_tokens, hypotheses, axis=0)  # [N*H, S]
            aligned_tokens = tf.gather(dense_source, aligned, batch_dims=1)
            target_tokens = tf.where(tf.equal(target_tokens, UNK), aligned_tokens, target_tokens)
        ragged = tf.RaggedTensor.from_tensor(target_tokens, lengths=flat_lengths)
        nbest = tf.reshape(self.target_tokenizer.detokenize(ragged), [batch_size, hypotheses])
        empty = tf.equal(source_lengths, 0)[:, None]  # [N, 1]
        nbest = tf.where(empty, "", nbest)
        scores = tf.where(empty, 0.0, scores)
        best_length = lengths[:, 0]
        best_tokens = tf.reshape(target_tokens, [batch_size, hypotheses, -1])[:, 0]
        position = tf.range(tf.shape(best_tokens)[1])[None]
        return {
            "translations": nbest[:, 0],
            "scores": scores[:, 0],
            "nbest_translations": nbest,
            "nbest_scores": scores,
            "source_tokens": dense_tokens,
            "target_tokens": tf.where(position < best_length[:, None], best_tokens, ""),
            "attention": attention[:, 0],
            "source_truncated": truncated,
        }

    def _output_ids(self, source_ids, prefix):
        """The batch's shortlist of target ids (`shortlist.batch_shortlist`), or the whole
        vocabulary when `use_shortlist` is off; None for a Translator without a shortlist."""
        if self.shortlist is None:
            return None
        table, frequent = self.shortlist
        prefix_ids = None if prefix is None else prefix[0]
        return tf.cond(
            self.use_shortlist,
            lambda: batch_shortlist(table, frequent, source_ids, prefix_ids),
            lambda: tf.range(len(self.target_vocab), dtype=tf.int32),
        )

    @staticmethod
    def _source_ids(texts, tokenizer, vocab, max_source_length):
        """texts [N] -> (ids [N, S] padded, tokens [N, S] padded with "", lengths [N], truncated [N])
        in one member's source tokenization, cut at its `max_source_length`."""
        source_tokens = tokenizer.tokenize(texts)  # ragged [N, None]
        truncated = source_tokens.row_lengths() > max_source_length
        source_tokens = source_tokens[:, :max_source_length]
        source_ids = vocab.lookup_ids(source_tokens).to_tensor(PAD_ID)  # [N, S]
        dense_tokens = source_tokens.to_tensor("")  # [N, S]
        # S >= 1 even when every text is empty (the encoder cannot run zero time steps); empty
        # rows are then all padding, as they are next to non-empty rows.
        missing = [[0, 0], [0, tf.maximum(1 - tf.shape(source_ids)[1], 0)]]
        source_ids = tf.pad(source_ids, missing, constant_values=PAD_ID)
        dense_tokens = tf.pad(dense_tokens, missing, constant_values="")
        return source_ids, dense_tokens, tf.cast(source_tokens.row_lengths(), tf.int32), truncated

    def serving_function(self, beam_size=5, length_penalty=0.6):
        """The `serving_default` signature: texts [N] -> translations [N] and scores [N]."""

        @tf.function(input_signature=[TEXT_SPEC])
        def serve(texts):
            outputs = self.translate(texts, tf.constant(beam_size), tf.constant(1), tf.constant(length_penalty))
            return {"translations": outputs["translations"], "scores": outputs["scores"]}

        return serve
