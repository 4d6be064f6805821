"""Caption corpora as one record type: CaptionExample(image, captions, image_id).

Readers for the Karpathy split JSON (Flickr8k, Flickr30k, COCO), for plain
`image<TAB>caption` files, and for TFDS `coco_captions`. Every reader keeps all reference
captions of an image together (BLEU and CIDEr need them) and validates before training
starts: an empty file or captions pointing at missing images raise a DataError that
names the file; blank captions are dropped with a count. `read_split` turns a run's data
config into a CaptionSet: the images loaded at the model's size, with their captions.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from seq2seq.cli import log
from seq2seq.errors import DataError  # noqa: F401  (raised here; imported from here by callers)
from seq2seq.tasks.captioning import shapes
from seq2seq.tasks.captioning.images import ImageError, load_image, load_images

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
MISSING_SHOWN = 5
FLICKR_TOKEN_SUFFIX = re.compile(r"#\d+$")

Warn = Callable[[str], None]


@dataclass
class CaptionExample:
    """One image (a file path or encoded bytes) with all of its reference captions."""

    image: str | bytes
    captions: list[str]
    image_id: str


def read_karpathy_json(
    json_path: str | os.PathLike,
    image_folder: str | os.PathLike,
    split: str,
    *,
    on_missing: Literal["raise", "skip"] = "raise",
    warn: Warn | None = None,
) -> list[CaptionExample]:
    """Examples of one split ("train", "val" or "test") from a Karpathy dataset_*.json.

    "restval" images count as train. The image path is image_folder/filepath/filename
    (filepath is present for COCO, absent for Flickr). The image_id is that relative path.
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {sorted(KARPATHY_SPLITS)}, got {split!r}")
    report = warn or _print_to_stderr
    source = os.fspath(json_path)
    text = _read_text(source)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: not valid JSON ({exc})") from exc
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{source}: expected a Karpathy split file with an 'images' list")
    wanted = KARPATHY_SPLITS[split]
    examples: list[CaptionExample] = []
    blank_captions = 0
    for index, entry in enumerate(images):
        if not isinstance(entry, dict) or "filename" not in entry:
            raise DataError(f"{source}: images[{index}] has no 'filename'")
        if entry.get("split") not in wanted:
            continue
        relative = os.path.join(entry.get("filepath", ""), entry["filename"])
        captions = []
        for sentence in entry.get("sentences", []):
            if not isinstance(sentence, dict):
                raise DataError(f"{source}: images[{index}] has a sentence that is not an object: {sentence!r}")
            raw = sentence.get("raw")
            if not isinstance(raw, str):
                raw = " ".join(str(token) for token in sentence.get("tokens", []))
            if raw.strip():
                captions.append(raw.strip())
            else:
                blank_captions += 1
        examples.append(CaptionExample(os.path.join(os.fspath(image_folder), relative), captions, relative))
    if not examples:
        raise DataError(f"{source}: no images in split {split!r} (looked for split values {list(wanted)})")
    return _finish(examples, source, blank_captions, on_missing, report)


def read_caption_tsv(
    tsv_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    *,
    on_missing: Literal["raise", "skip"] = "raise",
    warn: Warn | None = None,
) -> list[CaptionExample]:
    """Examples from lines `image_path<TAB>caption`, several lines per image allowed.

    Relative image paths are resolved against image_folder, or the TSV's own folder when
    image_folder is None. A Flickr8k-style `#N` suffix on the image name is removed.
    Examples keep the order in which images first appear; image_id is the path as written.
    """
    report = warn or _print_to_stderr
    source = os.fspath(tsv_path)
    base = os.fspath(image_folder) if image_folder is not None else os.path.dirname(os.path.abspath(source))
    grouped: dict[str, list[str]] = {}
    blank_captions = 0
    for line_number, line in enumerate(_read_text(source).splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{source}:{line_number}: expected 'image_path<TAB>caption', got {line[:80]!r}")
        image_name, caption = line.split("\t", 1)
        image_name = FLICKR_TOKEN_SUFFIX.sub("", image_name.strip())
        if not image_name:
            raise DataError(f"{source}:{line_number}: empty image path")
        captions = grouped.setdefault(image_name, [])
        if caption.strip():
            captions.append(caption.strip())
        else:
            blank_captions += 1
    examples = [
        CaptionExample(os.path.join(base, image_name), captions, image_name) for image_name, captions in grouped.items()
    ]
    return _finish(examples, source, blank_captions, on_missing, report)


def load_tfds_coco(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    max_examples: int | None = None,
    jpeg_quality: int = 95,
    warn: Warn | None = None,
) -> Iterator[CaptionExample]:
    """Stream TFDS `coco_captions` (Karpathy splits) as JPEG-encoded examples.

    Lazy, because COCO train does not fit in memory as bytes. The decoded image is
    re-encoded as JPEG (TFDS hands out decoded pixels). With download=False (the default)
    a dataset that is not prepared in data_dir raises DataError instead of starting a
    multi-gigabyte download. Examples whose captions are all blank are dropped, with a
    count reported through `warn` once the stream ends.
    """
    import tensorflow_datasets as tfds
    from PIL import Image

    report = warn or _print_to_stderr
    decoders = tfds.decode.PartialDecoding({"image": True, "image/id": True, "captions": {"text": True}})
    try:
        dataset = tfds.load(
            "coco_captions",
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            decoders=decoders,
            download=download,
        )
    except AssertionError as exc:
        raise DataError(
            f"coco_captions is not prepared in {data_dir or 'the default TFDS data_dir'}; "
            f"prepare it there or call load_tfds_coco(..., download=True) ({exc})"
        ) from exc
    if max_examples is not None:
        dataset = dataset.take(max_examples)
    blank_captions = 0
    dropped_images = 0
    for record in dataset.as_numpy_iterator():
        captions = []
        for text in record["captions"]["text"]:
            caption = text.decode("utf-8").strip()
            if caption:
                captions.append(caption)
            else:
                blank_captions += 1
        if not captions:
            dropped_images += 1
            continue
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(record["image"], dtype=np.uint8)).save(buffer, format="JPEG", quality=jpeg_quality)
        yield CaptionExample(buffer.getvalue(), captions, str(int(record["image/id"])))
    _report_blank(f"coco_captions[{split}]", blank_captions, dropped_images, report)


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _read_text(path: str) -> str:
    """The file's text; DataError if it is missing or holds nothing but whitespace."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: caption file not found")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise DataError(f"{path}: caption file is empty")
    return text


def _finish(
    examples: list[CaptionExample],
    source: str,
    blank_captions: int,
    on_missing: Literal["raise", "skip"],
    report: Warn,
) -> list[CaptionExample]:
    """Drop blank-only images (with a count), then check every image file exists."""
    kept = [example for example in examples if example.captions]
    _report_blank(source, blank_captions, len(examples) - len(kept), report)
    if not kept:
        raise DataError(f"{source}: no non-empty captions")
    return check_images_exist(kept, source, on_missing=on_missing, warn=report)


def _report_blank(source: str, blank_captions: int, dropped_images: int, report: Warn) -> None:
    if blank_captions:
        message = f"{source}: dropped {blank_captions} empty or whitespace-only captions"
        if dropped_images:
            message += f" ({dropped_images} images were left without captions and dropped)"
        report(message)


def check_images_exist(
    examples: Sequence[CaptionExample],
    source: str,
    *,
    on_missing: Literal["raise", "skip"] = "raise",
    warn: Warn | None = None,
) -> list[CaptionExample]:
    """Fail (or, with on_missing="skip", drop with a warning) examples whose image file is missing."""
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
    report = warn or _print_to_stderr
    missing = [ex for ex in examples if isinstance(ex.image, str) and not os.path.isfile(ex.image)]
    if not missing:
        return list(examples)
    shown = ", ".join(ex.image for ex in missing[:MISSING_SHOWN])
    more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
    summary = f"{source}: {len(missing)} of {len(examples)} images referenced by captions are missing: {shown}{more}"
    if on_missing == "raise":
        raise DataError(summary)
    report(f"warning: skipping {summary}")
    missing_ids = {id(ex) for ex in missing}
    kept = [ex for ex in examples if id(ex) not in missing_ids]
    if not kept:
        raise DataError(f"{source}: every image referenced by captions is missing")
    return kept


@dataclass
class CaptionSet:
    """Images [N, S, S, 3] uint8 with all captions of each; `scenes` for the synthetic data (boxes)."""

    images: np.ndarray
    captions: list[list[str]]
    image_ids: list[str]
    scenes: list | None = None

    def __len__(self):
        return len(self.captions)


def shapes_set(scenes):
    images = np.stack([scene.image for scene in scenes]) if scenes else np.zeros((0, 0, 0, 3), np.uint8)
    return CaptionSet(images, [scene.captions for scene in scenes], [str(i) for i in range(len(scenes))], scenes)


def shapes_test_set(count, seed, image_size):
    """The synthetic evaluation split: make_splits(0, 0, count, seed)["test"], from its own seed."""
    return shapes_set(shapes.make_splits(0, 0, count, seed, image_size)["test"])


def examples_set(examples, image_size, on_error, source, fit="squash"):
    """Loads and resizes the image of every CaptionExample (`fit`: see images.IMAGE_FITS); bad image
    files are skipped with a count or raise."""
    size = (image_size, image_size)
    paths = [example for example in examples if not isinstance(example.image, str)]
    if not paths:
        images, kept, _ = load_images([example.image for example in examples], size=size, fit=fit, on_error=on_error, warn=log)
        kept = set(kept)
        examples = [example for example in examples if example.image in kept]
    else:  # encoded bytes (TFDS)
        arrays, kept_examples, failures = [], [], 0
        for example in examples:
            try:
                arrays.append(load_image(example.image, size=size, fit=fit, name=f"{source} image {example.image_id}"))
                kept_examples.append(example)
            except ImageError as error:
                if on_error == "raise":
                    raise
                failures += 1
                log(f"warning: skipping image: {error}")
        if failures:
            log(f"skipped {failures} of {len(examples)} images")
        images = np.stack(arrays) if arrays else np.zeros((0, *size, 3), np.uint8)
        examples = kept_examples
    if not examples:
        raise DataError(f"{source}: none of the images could be read")
    return CaptionSet(images, [example.captions for example in examples], [example.image_id for example in examples])


def read_split(config, split):
    """The CaptionSet of split "train" or "valid" (None when there is no validation data)."""
    d, size = config.data, config.model.image_size
    if d.shapes_train is not None:
        count = d.shapes_train if split == "train" else d.shapes_val
        if not count:
            return None
        splits = shapes.make_splits(count if split == "train" else 0, count if split == "valid" else 0, 0, d.shapes_seed, size)
        return shapes_set(splits["train" if split == "train" else "val"])
    if d.karpathy_json:
        name = "train" if split == "train" else "val"
        try:
            examples = read_karpathy_json(d.karpathy_json, d.image_folder, name, on_missing=d.on_missing, warn=log)
        except DataError as error:
            if split == "valid" and "no images in split" in str(error):
                return None
            raise
        return examples_set(examples, size, d.on_error, d.karpathy_json, config.model.image_fit)
    if d.train_tsv:
        path = d.train_tsv if split == "train" else d.valid_tsv
        if not path:
            return None
        examples = read_caption_tsv(path, d.image_folder, on_missing=d.on_missing, warn=log)
        return examples_set(examples, size, d.on_error, path, config.model.image_fit)
    tfds_split = d.tfds_train_split if split == "train" else d.tfds_valid_split
    if not tfds_split:
        return None
    examples = list(load_tfds_coco(tfds_split, d.tfds_data_dir, max_examples=d.tfds_max_examples, warn=log))
    return examples_set(examples, size, d.on_error, f"coco_captions[{tfds_split}]", config.model.image_fit)
