"""How a captioning SavedModel holds up on the images users send. Run by hand, never as a test.

    python bench/caption_robustness.py [--model saved_models/shapes_captioner] [--images 1000]
                                       [--seed 1000] [--beam-size 3] [--json FILE]

Renders the same synthetic test scenes (`shapes.make_splits(0, 0, N, seed)`, a seed never used
in training) in several forms, feeds each as encoded bytes to the SavedModel's
`caption_with_attention` signature (decoding and resizing happen in the serving graph, as for
TF Serving) and prints BLEU-1..4 and attention localisation for each: lossless PNG at the
model's size, JPEG copies at qualities 90, 75 and 50, and PNG scenes rendered at other sizes
and aspect ratios (96x96, 64x96, 96x64, width x height), which the graph fits to its square input
(padding or squashing, as the model was trained).
"""

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from seq2seq import cli  # noqa: E402
from seq2seq.caption import model_info  # noqa: E402
from seq2seq.tasks.captioning import shapes  # noqa: E402
from seq2seq.tasks.captioning.evaluation import attention_localisation, corpus_bleu_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH = 50


def variants(image_size):
    """(name, (width, height), format, JPEG quality) of every form the scenes are sent in."""
    square = (image_size, image_size)
    return [
        (f"PNG {image_size}x{image_size}", square, "PNG", None),
        (f"JPEG q90 {image_size}x{image_size}", square, "JPEG", 90),
        (f"JPEG q75 {image_size}x{image_size}", square, "JPEG", 75),
        (f"JPEG q50 {image_size}x{image_size}", square, "JPEG", 50),
        ("PNG 96x96", (96, 96), "PNG", None),
        ("PNG 64x96", (64, 96), "PNG", None),
        ("PNG 96x64", (96, 64), "PNG", None),
        ("JPEG q75 96x64", (96, 64), "JPEG", 75),
    ]


def encode(pixels, image_format, quality):
    buffer = io.BytesIO()
    options = {"quality": quality} if quality else {}
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def evaluate(signature, scenes, image_format, quality, beam_size, image_size, fit):
    images = [encode(scene.image, image_format, quality) for scene in scenes]
    captions, tokens, attention = [], [], []
    for start in range(0, len(images), BATCH):
        out = signature(images=tf.constant(images[start:start + BATCH]), beam_size=tf.constant(beam_size))
        errors = [error.decode() for error in out["errors"].numpy() if error]
        if errors:
            raise SystemExit(f"the model refused images: {errors[:3]}")
        captions += [caption.decode("utf-8") for caption in out["captions"].numpy()]
        tokens += list(out["tokens"].numpy())
        attention += list(out["attention"].numpy())
        grid = (int(out["grid_height"]), int(out["grid_width"]))
    scores = corpus_bleu_scores(captions, [scene.captions for scene in scenes])
    scores.update(attention_localisation(scenes, tokens, attention, grid, image_size, fit))
    scores["example"] = captions[0]
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "saved_models" / "shapes_captioner"),
                        help="captioning SavedModel, or a TF Serving model dir (highest version)")
    parser.add_argument("--images", type=int, default=1000, help="test scenes per form")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the test scenes (never a training seed)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    model = cli.load_saved_model(cli.model_path(args.model, "captioning"))
    info = model_info(model)
    image_size, fit = info["image_size"], info["image_fit"]
    signature = model.signatures["caption_with_attention"]
    results = {}
    print(f"{args.model}: {args.images} scenes of seed {args.seed}, beam {args.beam_size}, bytes through "
          f"caption_with_attention, other shapes fitted by {fit}", file=sys.stderr)
    print("| images | BLEU-1 | BLEU-4 | attention localisation |")
    print("| --- | --- | --- | --- |")
    for name, size, image_format, quality in variants(image_size):
        started = time.monotonic()
        scenes = shapes.make_splits(0, 0, args.images, args.seed, size)["test"]
        scores = evaluate(signature, scenes, image_format, quality, args.beam_size, image_size, fit)
        results[name] = scores
        print(f"| {name} | {scores['bleu_1']:.4f} | {scores['bleu_4']:.4f} | {scores['localisation']:.1%} "
              f"({scores['hits']}/{scores['words']}) |", flush=True)
        print(f"  {name}: {time.monotonic() - started:.0f} s, e.g. {scores['example']!r}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
