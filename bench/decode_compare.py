"""Several translation SavedModels (or one at both product precisions) timed side by side in one
process. Run by hand, never as a test.

    python bench/decode_compare.py OLD_EXPORT NEW_EXPORT@float32 NEW_EXPORT@bf16 [--rounds 2]

For beam 5 and greedy over Multi30k test_2016_flickr (the `translate` signature, batches of 64
sorted by length, length penalty 0.6 as in `decode_bench.py`), the models take turns, in
reversed order every other round, so that the machine's drift falls on all of them alike. A
model given as PATH@bf16 or PATH@float32 decodes with those matrix products (its
`bf16_products` switch; exports made before the switch have float32 products). Prints each
model's times, sacreBLEU, and how many translations equal the first model's.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf  # noqa: E402
import tensorflow_text  # noqa: E402,F401  (registers the SentencePiece ops of subword exports)

from decode_bench import DATA, decode_corpus  # noqa: E402  (bench/decode_bench.py)
from seq2seq import cli  # noqa: E402
from seq2seq.products import use_bfloat16_products  # noqa: E402
from seq2seq.tasks.translation.data import read_lines  # noqa: E402
from seq2seq.tasks.translation.evaluation import corpus_scores  # noqa: E402


def load(spec):
    """PATH[@bf16|@float32] -> the loaded SavedModel with its products set (default: float32)."""
    path, _, precision = spec.partition("@")
    model = tf.saved_model.load(str(cli.model_path(path)))
    use_bfloat16_products(model, precision or "float32")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="SavedModel or TF Serving model dirs, each optionally @bf16 or @float32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--beam-sizes", default="5,1", help="comma-separated (default: 5,1)")
    args = parser.parse_args()
    sources = read_lines(DATA / "test_2016_flickr.en.gz")
    references = read_lines(DATA / "test_2016_flickr.de.gz")
    models = [load(spec) for spec in args.models]
    for model in models:
        for beam_size in (5, 1):
            decode_corpus(model, sources[:64], beam_size, 64)  # traces
    for beam_size in (int(b) for b in args.beam_sizes.split(",")):
        times = {spec: [] for spec in args.models}
        outputs = {}
        for round_ in range(args.rounds):
            order = list(zip(args.models, models))
            for spec, model in order if round_ % 2 == 0 else order[::-1]:
                seconds, translations, _ = decode_corpus(model, sources, beam_size, 64)
                times[spec].append(seconds)
                outputs[spec] = translations
        first = outputs[args.models[0]]
        for spec in args.models:
            same = sum(a == b for a, b in zip(first, outputs[spec]))
            bleu = corpus_scores(outputs[spec], references)["bleu"]
            runs = " ".join(f"{t:.2f}" for t in times[spec])
            print(f"beam {beam_size}, {spec}: {runs} s (best {min(times[spec]):.2f}), sacreBLEU {bleu}, "
                  f"{same}/{len(first)} translations as the first model's")


if __name__ == "__main__":
    main()
