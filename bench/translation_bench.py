"""Translation speed on this machine, for the reference config. Run by hand, never as a test.

    python bench/translation_bench.py [--run-dir RUN] [--precision bf16] [--jit] [--steps 80]

Prints steady-state training throughput (target tokens per second, first traced steps
excluded), decoding speed over Multi30k test_2016_flickr (greedy and beam 5, batch 64),
single-sentence latency p50/p95 through the exported SavedModel, and peak RSS.
Reference config: 1-layer bidirectional LSTM encoder (256 a direction), 1-layer LSTM decoder
(256) with Luong attention and input feeding, ~8k-word vocabularies, batch 64.
With --run-dir, training speed is measured on a fresh model of that run's architecture,
tokenization and batch size, and decoding uses the run's trained weights (decoding speed
depends on output lengths, so an untrained model is not representative).
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from seq2seq.losses import MaskedCrossEntropy  # noqa: E402
from seq2seq.optimizers import FusedAdam  # noqa: E402
from seq2seq.training import TrainingConfig  # noqa: E402
from timing import StepTimer  # noqa: E402  (bench/timing.py: scripts run as python bench/NAME.py)
from seq2seq.tasks.translation.config import BatchConfig, DataConfig, ModelConfig, TokenizationConfig, TranslationConfig  # noqa: E402
from seq2seq.corpus import Corpus  # noqa: E402
from seq2seq.tasks.translation.pipeline import (  # noqa: E402
    CORPUS_DIR, TranslationRun, corpus_training_batches, encode_training_data, export, make_batches, read_pairs,
    translate_lines,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def reference_config(output_dir, precision, jit, pad_to_multiple):
    return TranslationConfig(
        data=DataConfig(
            train_source=str(DATA / "train.en.gz"), train_target=str(DATA / "train.de.gz"),
            valid_source=str(DATA / "val.en.gz"), valid_target=str(DATA / "val.de.gz"),
        ),
        tokenization=TokenizationConfig(scheme="word", source_vocab_size=8000, target_vocab_size=8000),
        model=ModelConfig(cell_type="lstm", units=256, bidirectional=True, attention="luong", dropout=0.0),
        batching=BatchConfig(batch_size=64, pad_to_multiple=pad_to_multiple),
        training=TrainingConfig(output_dir=str(output_dir), precision=precision, jit_compile=jit, tensorboard=False, verbose=0),
    )


def bench_training(args, workdir):
    from seq2seq.training import set_precision

    set_precision(args.precision)
    if args.run_dir:
        # The run's architecture, tokenization and batching, freshly initialised; its training
        # data encoded into the work directory (the run directory is left as it is).
        run = TranslationRun.load(args.run_dir)
        run.config.batching.pad_to_multiple = args.pad_to_multiple
        encode_training_data(workdir, run.config, run)
        corpus_dir = workdir / CORPUS_DIR
    else:
        config = reference_config(workdir / "train", args.precision, args.jit, args.pad_to_multiple)
        run = TranslationRun.create(config)
        corpus_dir = run.run_dir / CORPUS_DIR
    if args.in_memory:
        batches = make_batches(run, *read_pairs(run.config, "train"), shuffle=True, report_name="train")
    else:
        batches = corpus_training_batches(run, Corpus.open(corpus_dir))
    model = run.build_model()
    model.compile(
        optimizer=FusedAdam(1e-3, global_clipnorm=5.0),
        loss=MaskedCrossEntropy(0.1),
        jit_compile=args.jit,
    )
    timer = StepTimer()
    model.fit(batches.stream(0), steps_per_epoch=args.steps, epochs=1, callbacks=[timer], verbose=0, shuffle=False)
    plan = batches.plan(0)[: args.steps]
    target_lengths = []
    for batch in plan:
        _, target_out = batches.make_batch(tf.constant(batch))
        target_lengths.append(int(tf.math.count_nonzero(target_out)))
    warmup = args.warmup
    seconds = sum(timer.times[warmup:])
    tokens = sum(target_lengths[warmup:])
    print(f"parameters: {model.count_params():,}")
    source = "in memory" if args.in_memory else "from the encoded corpus on disk"
    print(f"training ({args.precision}, jit={args.jit}, batches {source}): {tokens / seconds:,.0f} target tokens/s "
          f"over {len(timer.times) - warmup} steps after {warmup} warm-up steps "
          f"({seconds / (len(timer.times) - warmup) * 1000:.0f} ms/step)")
    keras.config.set_dtype_policy("float32")
    return run, model


def bench_decoding(run, model, workdir):
    test_sources = [line for line in read_lines(DATA / "test_2016_flickr.en.gz")]
    translator = run.translator(model)
    for beam_size, name in ((1, "greedy"), (5, "beam 5")):
        translate_lines(translator, test_sources[:64], beam_size=beam_size, batch_size=64)
        start = time.perf_counter()
        translate_lines(translator, test_sources, beam_size=beam_size, batch_size=64)
        seconds = time.perf_counter() - start
        print(f"decoding {name}: {len(test_sources) / seconds:,.0f} sentences/s ({seconds:.2f} s for {len(test_sources)}, batch 64)")
    export_dir = export(run, model, workdir / "export" / "1")
    loaded = tf.saved_model.load(str(export_dir))
    serve = loaded.signatures["serving_default"]
    serve(texts=tf.constant(test_sources[:1]))
    latencies = []
    for sentence in test_sources[:200]:
        start = time.perf_counter()
        serve(texts=tf.constant([sentence]))
        latencies.append(time.perf_counter() - start)
    p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
    print(f"SavedModel single-sentence latency (beam 5): p50 {p50:.1f} ms, p95 {p95:.1f} ms over {len(latencies)} sentences")


def read_lines(path):
    from seq2seq.tasks.translation.data import read_lines as read

    return read(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a trained run to measure (default: the reference config, untrained)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bf16"))
    parser.add_argument("--jit", action="store_true", help="XLA-compile the train step")
    parser.add_argument("--pad-to-multiple", type=int, default=1)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--in-memory", action="store_true",
                        help="train on batches of the corpus encoded in memory, not the shards on disk `train` uses")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-decoding", action="store_true")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} not found (Multi30k is expected at ../shared/data/multi30k)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run = model = None
        if not args.skip_training:
            run, model = bench_training(args, workdir)
        if args.run_dir:
            run = TranslationRun.load(args.run_dir)
            model = run.load_model()
            print(f"{args.run_dir}: {model.count_params():,} parameters "
                  f"({run.config.model.encoder_type} encoder, {run.config.model.decoder_type} decoder)")
        if run is None:
            sys.exit("error: --skip-training needs --run-dir")
        if not args.skip_decoding:
            bench_decoding(run, model, workdir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
