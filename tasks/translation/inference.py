"""Translating many lines with a loaded model, without importing Keras: what the CLI needs to
answer from a SavedModel (a `Translator` in-process has the same `translate` function)."""

import sys

import tensorflow as tf


def log(message):
    print(message, file=sys.stderr, flush=True)


def translate_lines(translate_fn, lines, beam_size=5, n_best=1, length_penalty=0.6, batch_size=64, outputs=None):
    """Translations of `lines` (one per line, always), batched and sorted by length for speed.

    `translate_fn` is a Translator or a loaded SavedModel (both have `translate`). With
    `outputs`, every raw output dict is appended to it in input order, one per line.
    """
    order = sorted(range(len(lines)), key=lambda i: len(lines[i]))
    results = [None] * len(lines)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        out = translate_fn.translate(
            tf.constant([lines[i] for i in indices]),
            tf.constant(beam_size),
            tf.constant(n_best),
            tf.constant(length_penalty, tf.float32),
        )
        translations = out["nbest_translations"].numpy()
        truncated = out["source_truncated"].numpy()
        for row, i in enumerate(indices):
            if truncated[row]:
                log(f"warning: line {i + 1} is longer than the maximum source length and was truncated")
            hyps = [t.decode("utf-8") for t in translations[row]]
            results[i] = hyps[0] if n_best == 1 else hyps
            if outputs is not None:
                outputs.append((i, {key: value[row] for key, value in out.items()}))
    if outputs is not None:
        outputs.sort(key=lambda pair: pair[0])
    return results
