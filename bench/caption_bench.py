"""Captioning speed on this machine. Run by hand, never as a test.

    python bench/caption_bench.py [--model saved_models/shapes_captioner] [--steps 40] [--images 256]

Prints steady-state training throughput (image-caption pairs per second, first traced steps
excluded) for the shipped model's configuration (small_cnn on 64x64 synthetic shapes, LSTM 256
with Bahdanau attention, batch 64), captioning speed of the shipped SavedModel on synthetic
test images (greedy and beam 3, batch 32, pixels in), single-image latency p50/p95 through
its `serving_default` signature (PNG bytes in, beam search inside), and peak RSS.
"""

import argparse
import io
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from seq2seq import cli  # noqa: E402
from seq2seq.losses import MaskedCrossEntropy  # noqa: E402
from seq2seq.optimizers import FusedAdam  # noqa: E402
from seq2seq.training import TrainingConfig  # noqa: E402
from timing import StepTimer  # noqa: E402  (bench/timing.py: scripts run as python bench/NAME.py)
from seq2seq.tasks.captioning.config import BatchConfig, CaptionConfig, DataConfig, ModelConfig  # noqa: E402
from seq2seq.tasks.captioning.data import read_split, shapes_test_set  # noqa: E402
from seq2seq.tasks.captioning.inference import caption_images  # noqa: E402
from seq2seq.tasks.captioning.pipeline import CaptionRun, make_batches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bench_training(args, workdir):
    config = CaptionConfig(
        data=DataConfig(shapes_train=1000, shapes_val=0, shapes_seed=1),
        model=ModelConfig(backbone="small_cnn", image_size=64, cell_type="lstm", units=256, attention="bahdanau"),
        batching=BatchConfig(batch_size=64),
        training=TrainingConfig(output_dir=str(workdir / "train"), tensorboard=False, verbose=0),
    )
    train_set = read_split(config, "train")
    run = CaptionRun.create(config, train_set)
    batches = make_batches(run, train_set, train_set.images, shuffle=True, report_name="train")
    model = run.build_model()
    model.compile(optimizer=FusedAdam(1e-3, global_clipnorm=5.0), loss=MaskedCrossEntropy(0.1))
    timer = StepTimer()
    model.fit(batches.stream(0), steps_per_epoch=args.steps, epochs=1, callbacks=[timer], verbose=0, shuffle=False)
    warmup = args.warmup
    seconds = sum(timer.times[warmup:])
    steps = len(timer.times) - warmup
    print(f"parameters: {model.count_params():,}")
    print(f"training: {steps * 64 / seconds:,.0f} image-caption pairs/s ({seconds / steps * 1000:.0f} ms/step, batch 64, "
          f"{steps} steps after {warmup} warm-up steps)")


def bench_captioning(args):
    export_dir = cli.model_path(args.model)
    model = tf.saved_model.load(str(export_dir))
    image_size = int(model.info()["image_size"])
    test = shapes_test_set(args.images, 4242, image_size)
    for beam_size, name in ((1, "greedy"), (3, "beam 3")):
        caption_images(model, test.images[:32], beam_size=beam_size, batch_size=32)  # trace
        start = time.perf_counter()
        caption_images(model, test.images, beam_size=beam_size, batch_size=32)
        seconds = time.perf_counter() - start
        print(f"captioning {name}: {len(test) / seconds:,.0f} images/s ({seconds:.2f} s for {len(test)} images, batch 32)")
    serve = model.signatures["serving_default"]
    encoded = []
    for pixels in test.images[:100]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    serve(images=tf.constant(encoded[:1]))
    latencies = []
    for data in encoded:
        start = time.perf_counter()
        serve(images=tf.constant([data]))
        latencies.append(time.perf_counter() - start)
    p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
    print(f"SavedModel single-image latency (serving_default, PNG in, beam 3): p50 {p50:.1f} ms, p95 {p95:.1f} ms "
          f"over {len(latencies)} images ({export_dir})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "saved_models" / "shapes_captioner"), help="SavedModel or TF Serving model dir")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=256, help="synthetic test images to caption")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            bench_training(args, Path(tmp))
    bench_captioning(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
