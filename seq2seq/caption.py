"""python -m seq2seq.caption {train,caption,evaluate,export}: image captioning from the terminal."""

import glob
import itertools
import json
import os
import sys
from pathlib import Path

from seq2seq import cli, streaming
from seq2seq.config import is_run_dir

SHIPPED_MODEL = cli.shipped_model("shapes_captioner")
IMAGES_PER_CHUNK = 256  # read, captioned and written at a time: memory stays flat for any number of images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")  # what a directory argument stands for


def resolve_model(path, weights="best"):
    """A captioner (with `caption` and `info`) from a SavedModel dir, a TF Serving model dir (highest
    version) or a run dir."""
    path = cli.model_path(path, "captioning")
    if weights != "best" and not is_run_dir(path):
        raise cli.CommandError("--weights needs --model to be a run directory")
    if (path / "saved_model.pb").is_file():
        model = cli.load_saved_model(path)
        if not hasattr(model, "caption") or not hasattr(model, "info"):
            raise cli.CommandError(f"{path}: not a captioning SavedModel (no caption function)")
        return model
    if is_run_dir(path):
        from seq2seq.tasks.captioning.pipeline import CaptionRun

        run = CaptionRun.load(path)
        return run.captioner(run.load_model(weights=weights))
    raise cli.CommandError(f"{path}: neither a SavedModel nor a run directory")


def model_info(model):
    """The model's `info()` as Python values; "image_fit" is "squash" for a model exported before it existed."""
    info = {key: value.numpy() for key, value in model.info().items()}
    info = {key: value.decode() if isinstance(value, bytes) else int(value) for key, value in info.items()}
    info.setdefault("image_fit", "squash")
    return info


def command_train(args):
    from seq2seq.tasks.captioning.pipeline import train

    config = cli.train_config(train_config_class(), args)
    train(config, validation_bleu=not args.no_validation_bleu)
    print(f"trained: {config.training.output_dir}")


def command_caption(args):
    paths = image_paths(args)
    leading = []  # the paths up to the first non-blank one
    for path in paths:
        leading.append(path)
        if path:
            break
    if not any(leading):
        raise cli.CommandError("no images given (pass image files as arguments, --input FILE, or paths on stdin)")
    cli.start_runtime(args, args.model, "captioning")
    model = resolve_model(args.model, args.weights)
    cli.choose_length_penalty(args, cli.model_path(args.model, "captioning"))
    try:
        caption_in_chunks(args, model, itertools.chain(leading, paths))
    except BrokenPipeError:
        return streaming.output_closed()


def image_paths(args):
    """The image paths to caption, lazily: arguments (a directory or a glob pattern stands for
    the images it holds or matches, sorted), or the lines of --input FILE or stdin, stripped
    (a blank line is an empty path: it gets an empty output line, so that output line N is
    input line N's). An argument that gives no image is an error now, before the model is loaded."""
    if not args.images:
        return (line.strip() for line in streaming.input_lines(args.input))
    for argument in args.images:
        check_image_argument(argument)
    return itertools.chain.from_iterable(expand_image_argument(argument) for argument in args.images)


def is_glob_pattern(argument):
    return not os.path.exists(argument) and any(char in argument for char in "*?[")


def is_image_file(entry):
    return entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)


def check_image_argument(argument):
    if os.path.isdir(argument):
        with os.scandir(argument) as entries:
            if not any(is_image_file(entry) for entry in entries):
                extensions = ", ".join(extension[1:] for extension in IMAGE_EXTENSIONS)
                raise cli.CommandError(f"{argument}: directory holds no image files ({extensions})")
    elif is_glob_pattern(argument) and next(glob.iglob(argument), None) is None:
        raise cli.CommandError(f"{argument}: no files match this pattern")


def expand_image_argument(argument):
    """A directory's image files sorted by name, a glob pattern's matches sorted, or the path itself."""
    if os.path.isdir(argument):
        with os.scandir(argument) as entries:
            names = sorted(entry.name for entry in entries if is_image_file(entry))
        return [os.path.join(argument, name) for name in names]
    if is_glob_pattern(argument):
        return sorted(glob.glob(argument))
    return [argument]


def load_images_of_chunk(paths, image_size, fit, on_error, warn):
    """Pixels [K, S, S, 3] of the readable images (None if there is none) and their positions in
    `paths`; a bad file is a warning or, with on_error "raise", an error naming it. Empty paths
    (blank input lines) are left out without a word."""
    import numpy as np

    from seq2seq.tasks.captioning.images import ImageError, load_image

    arrays, positions = [], []
    for position, path in enumerate(paths):
        if not path:
            continue
        try:
            arrays.append(load_image(path, size=(image_size, image_size), fit=fit))
            positions.append(position)
        except ImageError as error:
            if on_error == "raise":
                raise cli.CommandError(f"{error} (use --on-error skip to skip unreadable images)") from None
            warn(f"warning: skipping image: {error}")
    return (np.stack(arrays) if arrays else None), positions


def caption_in_chunks(args, model, paths):
    """Captions `paths` (any iterable) IMAGES_PER_CHUNK at a time and writes each chunk's lines in
    input order as soon as it is done; an unreadable image, or an empty path (a blank input
    line), gets an empty line. Until some image could be read those empty lines are held back,
    so that input with no readable image at all is an error with nothing on stdout."""
    from seq2seq.tasks.captioning.inference import caption_images

    info = model_info(model)
    images = skipped = blank = held_blank_lines = 0
    plot_pending = bool(args.plot_attention)
    with streaming.Progress("images") as progress:
        for chunk in streaming.chunks(paths, IMAGES_PER_CHUNK):
            pixels, positions = load_images_of_chunk(
                chunk, info["image_size"], info["image_fit"], args.on_error, progress.write
            )
            chunk_blank = chunk.count("")
            blank += chunk_blank
            images += len(chunk) - chunk_blank
            skipped += len(chunk) - chunk_blank - len(positions)
            if not positions:
                held_blank_lines += len(chunk)
                progress.update(len(chunk))
                continue
            out = caption_images(model, pixels, beam_size=args.beam_size, length_penalty=args.length_penalty,
                                 batch_size=args.batch_size)
            lines = [""] * len(chunk)
            for row, position in enumerate(positions):
                lines[position] = out["captions"][row].decode("utf-8")
            streaming.write_lines([""] * held_blank_lines + lines)
            held_blank_lines = 0
            progress.update(len(chunk))
            if plot_pending:
                plot_first_attention(pixels[0], out, info, lines[positions[0]], args.plot_attention, progress.write)
                plot_pending = False
    if blank:
        cli.log(f"blank input lines: {blank} (their output lines are empty)")
    if skipped:
        cli.log(f"skipped {skipped} of {images} images (their output lines are empty)")
    if skipped == images:
        raise cli.CommandError(f"none of the {images} images could be read")
    streaming.write_lines([""] * held_blank_lines)


def plot_first_attention(pixels, out, info, caption, path, note):
    """The attention of every word of the first row of `out` (the first readable image) written to a PNG."""
    from seq2seq.tasks.captioning.evaluation import plot_caption_attention

    length = int(out["lengths"][0])
    plot_caption_attention(pixels, out["tokens"][0][:length], out["attention"][0][:length],
                           (info["grid_height"], info["grid_width"]), path, title=caption)
    note(f"attention of the first image written to {path}")


def evaluation_set(args, image_size, fit):
    from seq2seq.tasks.captioning import data
    from seq2seq.tasks.captioning.data import examples_set, shapes_test_set

    chosen = [args.shapes_test is not None, bool(args.karpathy_json), bool(args.tsv), bool(args.tfds_split)]
    if sum(chosen) != 1:
        raise cli.CommandError(
            "give the evaluation data one way: --shapes-test N, --karpathy-json FILE with --image-folder DIR, "
            "--tsv FILE, or --tfds-split SPLIT"
        )
    warn = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if args.shapes_test is not None:
        if args.shapes_test < 1:
            raise cli.CommandError(f"--shapes-test must be at least 1, got {args.shapes_test}")
        return shapes_test_set(args.shapes_test, args.shapes_seed, image_size)
    if args.karpathy_json:
        if not args.image_folder:
            raise cli.CommandError("--karpathy-json needs --image-folder")
        examples = data.read_karpathy_json(args.karpathy_json, args.image_folder, args.split, on_missing=args.on_missing, warn=warn)
        return examples_set(examples, image_size, args.on_error, args.karpathy_json, fit)
    if args.tsv:
        examples = data.read_caption_tsv(args.tsv, args.image_folder, on_missing=args.on_missing, warn=warn)
        return examples_set(examples, image_size, args.on_error, args.tsv, fit)
    examples = list(data.load_tfds_coco(args.tfds_split, args.tfds_data_dir, max_examples=args.tfds_max_examples, warn=warn))
    return examples_set(examples, image_size, args.on_error, f"coco_captions[{args.tfds_split}]", fit)


def command_evaluate(args):
    from seq2seq.tasks.captioning.evaluation import attention_localisation, cider_d, corpus_bleu_scores
    from seq2seq.tasks.captioning.inference import caption_images

    model = resolve_model(args.model, args.weights)
    cli.choose_length_penalty(args, cli.model_path(args.model, "captioning"))
    info = model_info(model)
    test_set = evaluation_set(args, info["image_size"], info["image_fit"])
    searches = [("greedy", 1)] + ([(f"beam {args.beam_size}", args.beam_size)] if args.beam_size > 1 else [])
    results = {"images": len(test_set), "searches": {}}
    for name, beam_size in searches:
        out = caption_images(model, test_set.images, beam_size=beam_size, length_penalty=args.length_penalty, batch_size=args.batch_size)
        hypotheses = [c.decode("utf-8") for c in out["captions"]]
        scores = corpus_bleu_scores(hypotheses, test_set.captions)
        scores["cider_d"] = cider_d(hypotheses, test_set.captions)
        line = f"{name:>8}: " + "  ".join(f"BLEU-{n} {scores[f'bleu_{n}']:.4f}" for n in range(1, 5))
        if scores["cider_d"] is not None:
            line += f"  CIDEr-D {scores['cider_d']:.3f}"
        if test_set.scenes is not None:
            grid = (info["grid_height"], info["grid_width"])
            localisation = attention_localisation(
                test_set.scenes, out["tokens"], out["attention"], grid, info["image_size"], info["image_fit"]
            )
            scores.update(localisation)
            if localisation["localisation"] is not None:
                line += f"  attention localisation {localisation['localisation']:.1%} ({localisation['hits']}/{localisation['words']} words)"
        results["searches"][name] = scores
        if args.captions:
            results["searches"][name]["captions"] = hypotheses
        print(line)
    print(f"  ({len(test_set)} images; corpus BLEU with all references, nltk corpus_bleu, lowercased, punctuation removed)")
    if results["searches"][name]["cider_d"] is None:
        print("  (CIDEr-D not computed: pip install pycocoevalcap, or seq2seq[coco])")
    else:
        print("  (CIDEr-D by pycocoevalcap on the same words; METEOR and SPICE need Java and are not run)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def command_export(args):
    from seq2seq.tasks.captioning.pipeline import CaptionRun, export, load_export

    if bool(args.run_dir) == bool(args.from_model):
        raise cli.CommandError("give either --run-dir (a training run) or --from-model (a SavedModel to export again)")
    if args.from_model:
        if args.weights != "best":
            raise cli.CommandError("--from-model keeps the export's weights as they are: drop --weights")
        path = cli.model_path(args.from_model, "captioning")
        run, model = load_export(path)
        cli.choose_length_penalty(args, path)
    else:
        cli.choose_length_penalty(args, None)
        cli.check_model_task(args.run_dir, "captioning")
        run = CaptionRun.load(args.run_dir)
        model = run.load_model(weights=args.weights)
    cli.write_export(
        lambda path: export(run, model, path, args.beam_size, args.length_penalty, max_pixels=args.max_pixels),
        args.output, args.version,
    )


def add_model_flags(parser):
    cli.add_search_flags(parser, SHIPPED_MODEL, "shapes captioner", beam_size=3, length_penalty=0.0, batch_size=32,
                         items="images")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                        help="unreadable image files: skip them with a warning and a count, or stop with an error (default: skip)")


def train_config_class():
    from seq2seq.tasks.captioning.config import CaptionConfig

    return CaptionConfig


def build_parser():
    parser, commands = cli.command_parser("python -m seq2seq.caption", __doc__)
    cli.add_train_command(
        commands, train_config_class, "Train a captioning model from a YAML config and/or flags. Data: the built-in synthetic "
        "shapes (--shapes-train N), a Karpathy split JSON with --image-folder, TSV files (image<TAB>caption) or TFDS "
        "coco_captions.", command_train, "BLEU-4",
    )

    caption = commands.add_parser("caption", help="caption image files given as arguments, a file of paths, or stdin",
                                  description="Caption images: file paths as arguments, --input FILE (one path a line) or "
                                  "paths on stdin; one caption a line on stdout, in input order. An image that cannot be "
                                  "read gets an empty line and a warning (or, with --on-error raise, stops the command).")
    sources = caption.add_mutually_exclusive_group()
    sources.add_argument("images", nargs="*", default=[],
                         help="image files (JPEG, PNG, GIF, WebP, BMP), directories of them or glob patterns; or "
                              "--input FILE, not both (default: the paths in --input or on stdin)")
    sources.add_argument("--input", help="file of image paths, one a line; a blank line gets an empty output line "
                         "(default: stdin, unless images are given)")
    caption.add_argument("--plot-attention", metavar="PNG",
                         help="write the attention of every word of the first image to a PNG (default: no plot)")
    add_model_flags(caption)
    caption.set_defaults(handler=command_caption)

    evaluate = commands.add_parser("evaluate", help="corpus BLEU-1..4 (and attention localisation on shapes), greedy vs beam",
                                   description="Caption a test set with greedy search and with beam search and score both with "
                                   "corpus BLEU-1..4 against all references (nltk). On the synthetic shapes data also "
                                   "reports attention localisation: the fraction of generated colour and shape words whose "
                                   "most-attended grid cell lies on the named object.")
    data = evaluate.add_argument_group("test data (one of)")
    data.add_argument("--shapes-test", type=int, metavar="N",
                      help="N synthetic shapes images (make_splits' test split) (default: none)")
    data.add_argument("--shapes-seed", type=int, default=1000, help="seed of the synthetic test split (default: 1000)")
    data.add_argument("--karpathy-json", help="Karpathy dataset_*.json, with --image-folder and --split (default: none)")
    data.add_argument("--split", choices=("train", "val", "test"), default="test", help="Karpathy split (default: test)")
    data.add_argument("--tsv", help="image<TAB>caption file, several lines per image allowed (default: none)")
    data.add_argument("--image-folder",
                      help="folder the image paths are relative to (needed with --karpathy-json; default: the TSV's own folder)")
    data.add_argument("--tfds-split", help="TFDS coco_captions split, e.g. test (default: none)")
    data.add_argument("--tfds-data-dir", help="TFDS data dir where coco_captions is prepared (default: TFDS's own)")
    data.add_argument("--tfds-max-examples", type=int, help="only the first N TFDS examples (default: all)")
    data.add_argument("--on-missing", choices=("raise", "skip"), default="raise", help="captions whose image file is missing: stop with an error or skip them (default: raise)")
    evaluate.add_argument("--json", help="also write the scores to this JSON file (default: not written)")
    evaluate.add_argument("--captions", action="store_true", help="include the generated captions in --json (default: off)")
    add_model_flags(evaluate)
    evaluate.set_defaults(handler=command_evaluate)

    from seq2seq.tasks.captioning.images import DEFAULT_MAX_PIXELS

    export = cli.add_export_command(
        commands, "serving_default: encoded images (JPEG, PNG, GIF, BMP or WebP bytes) -> captions, scores and errors "
        "(one per image: empty when captioned, else the reason; decoding, resizing and beam search in the graph); "
        "caption_with_attention: images, beam_size -> also tokens and attention weights.",
        "captioning", beam_size=3, length_penalty=0.0, handler=command_export,
    )
    export.add_argument("--run-dir", help="the training run to export (default: none, give it or --from-model)")
    export.add_argument("--from-model", metavar="SAVEDMODEL",
                        help="instead of a run: a captioning SavedModel this toolkit exported, written again with the "
                             "current graph and the same weights (default: none)")
    export.add_argument("--max-pixels", type=cli.positive_int, default=DEFAULT_MAX_PIXELS,
                        help="the served graph refuses, unread, an image whose header declares more pixels than this, "
                             f"as the caption command does (default: {DEFAULT_MAX_PIXELS:,})")
    return parser


def main(argv=None):
    return cli.main(build_parser, argv)


def run():
    """The console command: `main`, then the process ends (see `cli.main`)."""
    cli.main(build_parser, exit_process=True)


if __name__ == "__main__":
    run()
