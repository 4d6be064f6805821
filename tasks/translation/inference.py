"""Translating many lines with a loaded model, without importing Keras: what the CLI needs to
answer from a SavedModel (a `Translator` in-process has the same `translate` function)."""

from concurrent.futures import ThreadPoolExecutor

import tensorflow as tf

from seq2seq.cli import log


def translate_lines(
    translate_fn, lines, beam_size=5, n_best=1, length_penalty=0.6, batch_size=64, outputs=None, concurrent_batches=2,
    first_line=1, warn=log, prefixes=None,
):
    """Translations of `lines` (one per line, always), batched and sorted by length for speed.

    `translate_fn` is a Translator or a loaded SavedModel (both have `translate`). With
    `outputs`, every raw output dict is appended to it in input order, one per line.
    `concurrent_batches` batches are decoded at a time, from as many threads: a decoding step
    is a chain of small ops that mostly keeps one core busy, so two batches side by side
    finish sooner on a machine with two cores or more (measured on 2 cores: beam 5 1.2-1.3x,
    greedy 1.3x; more with one intra-op thread, see `cli.decoding_streams`); fewer lines than
    that many batches hold are cut into smaller batches, one a thread.
    Warnings about truncated lines go to `warn` and number `lines[0]` as line `first_line`
    (a chunk of a longer input names the input's line). `prefixes`, one a line ("" for none),
    are the target-language words each translation must start with (`translate_with_prefix`).
    """
    if prefixes is not None and len(prefixes) != len(lines):
        raise ValueError(f"{len(prefixes)} prefixes for {len(lines)} lines: give one a line")
    order = sorted(range(len(lines)), key=lambda i: len(lines[i]))
    streams = max(1, concurrent_batches)
    batch_size = max(1, min(batch_size, -(-len(lines) // streams)))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def run(indices):
        texts = tf.constant([lines[i] for i in indices])
        search = (tf.constant(beam_size), tf.constant(n_best), tf.constant(length_penalty, tf.float32))
        if prefixes is None:
            return translate_fn.translate(texts, *search)
        return translate_fn.translate_with_prefix(texts, tf.constant([prefixes[i] for i in indices]), *search)

    results = [None] * len(lines)
    with ThreadPoolExecutor(streams) as pool:
        for indices, out in zip(batches, pool.map(run, batches)):
            translations = out["nbest_translations"].numpy()
            truncated = out["source_truncated"].numpy()
            for row, i in enumerate(indices):
                if truncated[row]:
                    warn(f"warning: line {first_line + i} is longer than the maximum source length and was truncated")
                hyps = [t.decode("utf-8") for t in translations[row]]
                results[i] = hyps[0] if n_best == 1 else hyps
                if outputs is not None:
                    outputs.append((i, {key: value[row] for key, value in out.items()}))
    if outputs is not None:
        outputs.sort(key=lambda pair: pair[0])
    return results
