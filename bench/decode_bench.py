"""Decoding speed of an exported translation SavedModel. Run by hand, never as a test.

    python bench/decode_bench.py saved_models/multi30k_en_de_transformer [--repeats 2] [--skip-cli] [--precision auto]
        [--cli-threads] [--no-shortlist]

For greedy and beam 5 over Multi30k test_2016_flickr (in-process, the `translate` signature,
batches of 64 sorted by length) it prints the wall time, sentences/s, generated tokens/s
(end token included) and cased sacreBLEU, then wall time and sacreBLEU with two batches
decoded at a time (`translate_lines`; with `--cli-threads`, as the translation commands decode:
one intra-op thread, one batch a core); then single-sentence latency p50/p95 through
`serving_default` (beam 5), the time of the CLI from process start to the first printed
line for one sentence, and peak RSS. To make figures from a loaded machine comparable, it
also measures in the same process the float32 rate of a 2048^3 matrix product and prints
the beam-5 time divided by the time `--reference-tflop` (default 0.77, the Transformer's
beam-5 work over the test set) would take at that rate.
"""

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_text  # noqa: E402,F401  (registers the SentencePiece ops of subword exports)

PROJECT = Path(__file__).resolve().parents[1]
DATA = PROJECT.parent / "shared" / "data" / "multi30k"
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "bench"))

from seq2seq import cli  # noqa: E402
from seq2seq.products import use_bfloat16_products  # noqa: E402
from seq2seq.tasks.translation.data import read_lines  # noqa: E402
from seq2seq.tasks.translation.inference import translate_lines  # noqa: E402
from seq2seq.tasks.translation.shortlist import use_shortlist  # noqa: E402
from seq2seq.tasks.translation.evaluation import corpus_scores  # noqa: E402
from timing import op_table  # noqa: E402  (bench/timing.py: scripts run as python bench/NAME.py)


def matmul_rate(seconds=2.0, size=2048):
    """GFLOP/s of a float32 size^3 product in this process (tf.function, repeated for `seconds`)."""
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])
    product = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    product().numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        product().numpy()
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def decode_corpus(model, sources, beam_size, batch_size):
    """(seconds, translations in input order, generated tokens incl. the end token)."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    translations = [None] * len(sources)
    tokens = 0
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        out = model.translate(
            tf.constant([sources[i] for i in rows]), tf.constant(beam_size), tf.constant(1), tf.constant(0.6)
        )
        texts = out["translations"].numpy()
        tokens += int(np.sum(out["target_tokens"].numpy() != b"")) + len(rows)
        for row, i in enumerate(rows):
            translations[i] = texts[row].decode("utf-8")
    return time.perf_counter() - start, translations, tokens


def cli_first_line(model_dir, sentence):
    """Seconds from starting `python -m seq2seq.translate translate` to its first output line."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "seq2seq.translate", "translate", "--model", str(model_dir), sentence],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    line = process.stdout.readline()
    seconds = time.perf_counter() - start
    process.wait()
    return seconds, line.decode("utf-8").strip()


def profile(model, sources, args):
    """Beam 5 over the first `args.profile` length-sorted batches under the TF profiler."""
    import tempfile

    ordered = sorted(sources, key=len)[: args.profile * args.batch_size]
    decode_corpus(model, ordered[: args.batch_size], 5, args.batch_size)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        seconds, _, tokens = decode_corpus(model, ordered, 5, args.batch_size)
        tf.profiler.experimental.stop()
        print(f"beam 5 over {len(ordered)} sentences: {seconds:.2f} s (under the profiler), {tokens} tokens")
        op_table(logdir, 30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a SavedModel directory or a TF Serving model directory (highest version)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the test set per search (best kept)")
    parser.add_argument("--latency-sentences", type=int, default=200)
    parser.add_argument("--reference-tflop", type=float, default=0.77)
    parser.add_argument("--skip-cli", action="store_true", help="do not time the CLI start-up")
    parser.add_argument("--precision", choices=("auto", "float32", "bf16"), default="auto",
                        help="matrix products of the searches, as `translate --precision` (default: auto, bf16 "
                             "where the CPU has bfloat16 units; exports made before the switch: float32)")
    parser.add_argument("--profile", type=int, metavar="BATCHES",
                        help="only profile beam 5 over this many batches and print the per-op table (needs xprof)")
    parser.add_argument("--cli-threads", action="store_true",
                        help="decode as the translation commands do in their own process: one intra-op thread and "
                             "one batch a core at a time (`cli.decoding_streams`); every figure then runs so")
    parser.add_argument("--no-shortlist", action="store_true",
                        help="decode over the whole vocabulary even if the export has a shortlist (export --shortlist), "
                             "as `translate --no-shortlist`; the CLI line then times the shortlist still")
    args = parser.parse_args()
    streams = cli.decoding_streams(own_process=True) if args.cli_threads else 2
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} not found (Multi30k is expected at ../shared/data/multi30k)")
    model_dir = cli.model_path(args.model)
    sources = read_lines(DATA / "test_2016_flickr.en.gz")
    references = read_lines(DATA / "test_2016_flickr.de.gz")
    start = time.perf_counter()
    model = tf.saved_model.load(str(model_dir))
    shortlisted = use_shortlist(model, not args.no_shortlist)
    print(f"{model_dir}: loaded in {time.perf_counter() - start:.1f} s; "
          f"products {use_bfloat16_products(model, args.precision)}; "
          f"vocabulary shortlist {'on' if shortlisted else 'off'}")
    if args.profile:
        return profile(model, sources, args)
    rate = matmul_rate()
    print(f"float32 2048^3 product in this process: {rate:.0f} GFLOP/s")
    beam_seconds = None
    for beam_size, name in ((1, "greedy"), (5, "beam 5")):
        decode_corpus(model, sources[:args.batch_size], beam_size, args.batch_size)  # traces
        runs = [decode_corpus(model, sources, beam_size, args.batch_size) for _ in range(args.repeats)]
        seconds, translations, tokens = min(runs, key=lambda run: run[0])
        bleu = corpus_scores(translations, references)["bleu"]
        times = ", ".join(f"{run[0]:.2f}" for run in runs)
        print(f"{name}: {seconds:.2f} s (runs: {times}), {len(sources) / seconds:,.0f} sentences/s, "
              f"{tokens / seconds:,.0f} generated tokens/s ({tokens} tokens), sacreBLEU {bleu}")
        if beam_size == 5:
            beam_seconds = seconds
    for beam_size, name in ((1, "greedy"), (5, "beam 5")):
        start = time.perf_counter()
        translations = translate_lines(model, sources, beam_size=beam_size, batch_size=args.batch_size,
                                       concurrent_batches=streams)
        seconds = time.perf_counter() - start
        bleu = corpus_scores(translations, references)["bleu"]
        print(f"{name}, {streams} batches at a time: {seconds:.2f} s, sacreBLEU {bleu}")
    reference_seconds = args.reference_tflop * 1e3 / rate
    if args.cli_threads:  # the 2048^3 rate above is one thread's: no ratio comparable to the default run's
        print("beam 5 time / 0.77 TFLOP at the 2048^3 rate: not computed with --cli-threads (run without it)")
    else:
        print(f"beam 5 time / time of {args.reference_tflop} TFLOP at the 2048^3 rate: {beam_seconds / reference_seconds:.1f}")
    serve = model.signatures["serving_default"]
    serve(texts=tf.constant(sources[:1]))
    latencies = []
    for sentence in sources[: args.latency_sentences]:
        start = time.perf_counter()
        serve(texts=tf.constant([sentence]))
        latencies.append(time.perf_counter() - start)
    p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
    print(f"single sentence, serving_default (beam 5): p50 {p50:.1f} ms, p95 {p95:.1f} ms over {len(latencies)}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    if not args.skip_cli:
        seconds, line = cli_first_line(model_dir, sources[0])
        print(f"CLI, one sentence, process start to printed line: {seconds:.2f} s ({line!r})")


if __name__ == "__main__":
    main()
