"""Where a training step's time goes. Run by hand, never as a test.

    python bench/profile_training.py --config bench/configs/config_a.yaml [--precision bf16]
        [--batch-size 64 | --max-tokens 2048] [--steps 30] [--top 25] [--top-names 40]

Builds the run's model from a `train --config` file (fresh weights, the run's tokenization
on its training data), then:
1. times whole training steps (forward, backward, clipping, Adam), a forward+backward
   without the update, and a forward pass alone, over the same batches;
2. profiles `--steps` training steps with the TensorFlow profiler and prints the
   TensorFlow ops that took the most self time (summed over all steps), grouped by op
   type, with their share of the total. This needs the `xprof` package
   (`pip install xprof`); without it, step 2 is skipped with a note.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seq2seq.cli import prefer_onednn_products  # noqa: E402

prefer_onednn_products()  # as the train command does
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from seq2seq.losses import MaskedCrossEntropy  # noqa: E402
from seq2seq.optimizers import FusedAdam  # noqa: E402
from seq2seq.training import set_precision  # noqa: E402
from seq2seq.tasks.translation.config import TranslationConfig  # noqa: E402
from seq2seq.corpus import Corpus  # noqa: E402
from seq2seq.tasks.translation.pipeline import CORPUS_DIR, TranslationRun, corpus_training_batches  # noqa: E402
from timing import op_table  # noqa: E402  (bench/timing.py)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def load_config(path, output_dir, args):
    """The `train --config` file with its data paths taken relative to the project root."""
    import yaml

    values = yaml.safe_load(Path(path).read_text()) or {}
    values.setdefault("training", {})["output_dir"] = str(output_dir)
    if args.precision:
        values["training"]["precision"] = args.precision
    if args.batch_size or args.max_tokens:
        values["batching"] = {**values.get("batching", {}), "batch_size": args.batch_size, "max_tokens": args.max_tokens}
    return TranslationConfig.from_dict(values)


def timed(function, batches, label):
    function(*batches[0])  # traced
    function(*batches[1])  # a second shape: Keras-style reduce_retracing generalises here
    times = []
    for inputs, targets in batches[2:]:
        start = time.perf_counter()
        result = function(inputs, targets)
        float(result)
        times.append(time.perf_counter() - start)
    tokens = sum(int(tf.math.count_nonzero(t)) for _, t in batches[2:])
    print(f"{label:<34} {np.mean(times) * 1000:7.1f} ms/step  {tokens / sum(times):8,.0f} target tokens/s")
    return np.mean(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a train --config YAML")
    parser.add_argument("--precision", choices=("float32", "bf16"))
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--steps", type=int, default=30, help="profiled and timed steps")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--top-names", type=int, default=0, help="also list the N single ops that took the most")
    parser.add_argument("--no-profile", action="store_true", help="timings only")
    args = parser.parse_args()
    os.chdir(PROJECT_ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config, Path(tmp) / "run", args)
        set_precision(config.training.precision)
        run = TranslationRun.create(config)
        batches = corpus_training_batches(run, Corpus.open(run.run_dir / CORPUS_DIR))
        model = run.build_model()
        t = config.training
        model.compile(optimizer=FusedAdam(t.learning_rate, global_clipnorm=t.clip_norm or None),
                      loss=MaskedCrossEntropy(t.label_smoothing), jit_compile=t.jit_compile)
        model.optimizer.build(model.trainable_variables)
        data = [batches.make_batch(tf.constant(b)) for b in batches.plan(0)[: args.steps + 2]]
        print(f"{model.count_params():,} parameters, precision {t.precision}, "
              f"batch {config.batching.batch_size or str(config.batching.max_tokens) + ' tokens'}")
        loss_fn = model.loss

        @tf.function(reduce_retracing=True)
        def forward(inputs, targets):
            return loss_fn(targets, model(inputs, training=True))

        @tf.function(reduce_retracing=True)
        def forward_backward(inputs, targets):
            with tf.GradientTape() as tape:
                loss = loss_fn(targets, model(inputs, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            return loss + tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads if g is not None]) * 0.0

        def train_step(inputs, targets):
            return model.train_on_batch(inputs, targets)

        timed(forward, data, "forward")
        timed(forward_backward, data, "forward + backward")
        timed(train_step, data, "training step (+ clip, Adam)")
        if args.no_profile:
            return
        logdir = Path(tmp) / "profile"
        tf.profiler.experimental.start(str(logdir))
        for inputs, targets in data[2:]:
            model.train_on_batch(inputs, targets)
        tf.profiler.experimental.stop()
        op_table(logdir, args.top, args.top_names)


if __name__ == "__main__":
    main()
