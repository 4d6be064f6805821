"""Vocabulary shortlists: decode over the target tokens a batch's sources make likely.

A decoding step's output product and everything over its logits (log-normalizer, top-k) cover
the whole target vocabulary, a quarter of a Transformer beam step's time on 2 CPU cores. Most
of that vocabulary cannot occur in the translation of a given batch. A shortlist, as
CTranslate2's vocabulary mapping does, keeps for a batch the target tokens that any of its
source tokens co-occurs with in the training data, plus the most frequent target tokens and
the reserved ones; the search then chooses among those only (`Seq2SeqModel.generate`'s
`output_ids`), and the output product shrinks with them.

The table is built once, at export, from the training data: for each source token the
`per_token` target tokens with the highest Dice coefficient of sentence co-occurrence,
2 c(s, t) / (c(s) + c(t)), which favours translation equivalents over tokens that are merely
frequent (those are in the frequent list anyway).
"""

import numpy as np
import tensorflow as tf

from seq2seq.text import RESERVED_TOKENS, encode_all

PAIRS_CHUNK = 20000  # sentence pairs counted at a time: bounded memory on large corpora


def _merge(keys, counts, new_keys, new_counts):
    """Two sets of (key, count) merged, counts of equal keys summed."""
    if keys is None:
        return new_keys, new_counts
    merged, inverse = np.unique(np.concatenate([keys, new_keys]), return_inverse=True)
    return merged, np.bincount(inverse, weights=np.concatenate([counts, new_counts])).astype(np.int64)


def build_shortlist(pairs, source_vocab_size, target_vocab_size, per_token=32, frequent=300):
    """pairs: an iterable of (source ids, target ids) sequences, one a training sentence pair.
    Returns (table [source_vocab_size, per_token] int32, frequent ids [<= frequent] int32): row s
    of the table holds the target tokens most associated with source token s (padded with the
    reserved id 0), and `frequent` the most frequent target tokens, reserved tokens excluded
    (a batch's shortlist always holds those and the reserved tokens)."""
    if per_token < 1 or frequent < 0:
        raise ValueError(f"a shortlist needs per_token >= 1 and frequent >= 0, got {per_token} and {frequent}")
    reserved = len(RESERVED_TOKENS)
    token_counts = np.zeros(target_vocab_size, np.int64)
    source_sentences = np.zeros(source_vocab_size, np.int64)
    target_sentences = np.zeros(target_vocab_size, np.int64)
    keys = counts = None
    chunk = []

    def count(chunk, keys, counts):
        """The chunk's (source, target) keys, each a sentence pair's once, added to the counts."""
        new_keys, new_counts = np.unique(np.concatenate(chunk), return_counts=True)
        return _merge(keys, counts, new_keys, new_counts)

    for source, target in pairs:
        source = np.unique(np.asarray(source, np.int64))
        target_all = np.asarray(target, np.int64)
        np.add.at(token_counts, target_all, 1)
        target = np.unique(target_all)
        source_sentences[source] += 1
        target_sentences[target] += 1
        chunk.append((source[:, None] * target_vocab_size + target[None, :]).ravel())
        if len(chunk) == PAIRS_CHUNK:
            keys, counts = count(chunk, keys, counts)
            chunk = []
    if chunk:
        keys, counts = count(chunk, keys, counts)
    token_counts[:reserved] = -1
    by_frequency = np.argsort(-token_counts, kind="stable")
    frequent_ids = by_frequency[: min(frequent, int(np.sum(token_counts > 0)))].astype(np.int32)
    table = np.zeros((source_vocab_size, per_token), np.int32)
    if keys is None:
        return table, frequent_ids
    sources, targets = keys // target_vocab_size, keys % target_vocab_size
    keep = (sources >= reserved) & (targets >= reserved) & ~np.isin(targets, frequent_ids)
    sources, targets, together = sources[keep], targets[keep], counts[keep]
    dice = 2.0 * together / (source_sentences[sources] + target_sentences[targets])
    order = np.lexsort((-together, -dice, sources))  # by source, then best first
    sources, targets = sources[order], targets[order]
    first = np.searchsorted(sources, sources, side="left")
    rank = np.arange(len(sources)) - first
    chosen = rank < per_token
    table[sources[chosen], rank[chosen]] = targets[chosen]
    return table, frequent_ids


def training_pairs(run, source_lines, target_lines, chunk=4096):
    """(source ids, target ids) of every training pair, tokenized with the run's tokenizers
    and vocabularies in-graph, `chunk` pairs at a time (lines: iterables of sentences)."""
    sources, targets = [], []

    def encoded():
        source_ids = encode_all(run.source_tokenizer, run.source_vocab, sources).to_list()
        target_ids = encode_all(run.target_tokenizer, run.target_vocab, targets).to_list()
        return zip(source_ids, target_ids)

    for source, target in zip(source_lines, target_lines):
        sources.append(source)
        targets.append(target)
        if len(sources) == chunk:
            yield from encoded()
            sources, targets = [], []
    if sources:
        yield from encoded()


def batch_shortlist(table, frequent, source_ids, prefix_ids=None):
    """The sorted output ids [V'] of a batch (in-graph): the reserved tokens (first, at their
    own positions), the frequent tokens, every source token's row of `table` and every prefix
    token. source_ids [N, S] (padding is the reserved id 0, whose row is reserved ids only)."""
    candidates = [
        tf.range(len(RESERVED_TOKENS), dtype=tf.int32),
        tf.cast(frequent, tf.int32),
        tf.reshape(tf.gather(table, source_ids), [-1]),
    ]
    if prefix_ids is not None:
        candidates.append(tf.reshape(prefix_ids, [-1]))
    return tf.sort(tf.unique(tf.concat(candidates, 0)).y)


def use_shortlist(module, on):
    """Switches the vocabulary shortlist of a Translator, or of a SavedModel it was exported as
    (its `use_shortlist` variable), on or off; returns whether one is in use now (False for a
    model without a shortlist)."""
    switch = getattr(module, "use_shortlist", None)
    if switch is None:
        return False
    switch.assign(bool(on))
    return bool(on)
