"""A synthetic captioning dataset of coloured shapes, generated with Pillow.

Tests, the notebook and the benchmark need a captioning corpus that downloads nothing,
trains in minutes on a CPU, and has ground truth for where each word should attend.
Each scene holds one to three non-overlapping shapes on a plain light background, each
with a distinct colour and a distinct shape kind, so every colour or shape word in a
caption names exactly one object, whose pixel bounding box is recorded.

Captions are lowercase words separated by single spaces, without punctuation. The first
caption of every scene follows one canonical template, objects ordered left to right:

    1 object:  "a large red circle"
    2 objects: "a large red circle left of a small blue square"
    3 objects: "a small red circle left of a large blue square above a small green triangle"

where each relation ("left of", "above", "below") links an object to the next one on
its right, and is "above" or "below" when the vertical offset is the larger one. The
other four captions are paraphrases (relation seen from the other side, sizes left out,
"there is ...", "two shapes ...").
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from seq2seq.errors import DataError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 55, 175),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
BACKGROUND = (240, 240, 232)
RELATION_INVERSE = {"left of": "right of", "above": "below", "below": "above"}
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 224
MAX_OBJECTS = 3
SIZE_FRACTION = {"small": 0.2, "large": 0.34}
# Neighbours whose horizontal and vertical offsets are within this ratio of each other
# would make "left of" versus "above" a coin toss, so such placements are redrawn.
CLEAR_RELATION_RATIO = 1.25
PLACEMENT_ATTEMPTS = 200
CAPTIONS_FILE = "captions.tsv"
OBJECTS_FILE = "objects.json"


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; box is (x0, y0, x1, y1) in pixels, x1 and y1 exclusive."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def describe(self, *, with_size: bool = True) -> str:
        """'large red circle', or 'red circle' without the size."""
        words = [self.size] if with_size else []
        return " ".join(words + [self.colour, self.shape])

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box)}

    @classmethod
    def from_json(cls, record: dict) -> "ShapeObject":
        return cls(record["shape"], record["colour"], record["size"], tuple(int(v) for v in record["box"]))


@dataclass
class Scene:
    """A rendered scene: image uint8 [H, W, 3], 5 captions (canonical first), objects left to right."""

    image: np.ndarray
    captions: list[str]
    objects: list[ShapeObject] = field(default_factory=list)


def generate_scenes(n: int, seed: int, image_size: int | tuple[int, int] = 64) -> list[Scene]:
    """Render n scenes of image_size pixels square, or (width, height); the same (n, seed,
    image_size) always gives byte-identical output. Object sizes are fractions of the shorter
    side, so "small" and "large" mean the same at every size and aspect ratio."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    for side in (width, height):
        if not MIN_IMAGE_SIZE <= side <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size: each side must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {width}x{height}")
    rng = np.random.default_rng(seed)
    return [_generate_scene(rng, width, height) for _ in range(n)]


def make_splits(train: int, val: int, test: int, seed: int,
                image_size: int | tuple[int, int] = 64) -> dict[str, list[Scene]]:
    """Train/val/test scenes, each split drawn from its own seed derived from `seed`."""
    split_seeds = np.random.SeedSequence(seed).spawn(3)
    counts = {"train": train, "val": val, "test": test}
    return {
        name: generate_scenes(count, int(split_seed.generate_state(1)[0]), image_size)
        for (name, count), split_seed in zip(counts.items(), split_seeds)
    }


def vocabulary() -> list[str]:
    """Every word any caption can contain, sorted."""
    fixed = "a an left right of to the above below there is are two three shapes and that one on plain background picture from"
    return sorted(set(fixed.split()) | set(COLOURS) | set(SHAPES) | set(SIZES))


def words_for_object(obj: ShapeObject) -> set[str]:
    """The caption words that name this object unambiguously within its scene."""
    return {obj.colour, obj.shape}


def object_for_word(scene: Scene, word: str, position_hint: int | None = None) -> ShapeObject | None:
    """The object a generated word names, or None if the word names no single object.

    Colour and shape words are unique within a scene. A size word ("small", "large") may
    match several objects; then `position_hint` picks the n-th match from the left, and
    without it the word is ambiguous and None is returned.
    """
    matches = [obj for obj in scene.objects if word in words_for_object(obj) or word == obj.size]
    if len(matches) == 1:
        return matches[0]
    if matches and position_hint is not None and 0 <= position_hint < len(matches):
        return matches[position_hint]
    return None


def write_split(scenes: Sequence[Scene], folder: str | os.PathLike) -> None:
    """Write scenes as NNNNNN.png plus captions.tsv (file \\t caption) and objects.json."""
    os.makedirs(folder, exist_ok=True)
    records = []
    with open(os.path.join(folder, CAPTIONS_FILE), "w", encoding="utf-8", newline="") as tsv:
        for index, scene in enumerate(scenes):
            file_name = f"{index:06d}.png"
            Image.fromarray(scene.image).save(os.path.join(folder, file_name))
            for caption in scene.captions:
                tsv.write(f"{file_name}\t{caption}\n")
            records.append({"image": file_name, "objects": [obj.to_json() for obj in scene.objects]})
    with open(os.path.join(folder, OBJECTS_FILE), "w", encoding="utf-8") as handle:
        json.dump({"scenes": records}, handle, indent=1)


def read_split(folder: str | os.PathLike) -> list[Scene]:
    """Read back a folder written by write_split, in the same order."""
    objects_path = os.path.join(folder, OBJECTS_FILE)
    captions_path = os.path.join(folder, CAPTIONS_FILE)
    for path in (objects_path, captions_path):
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found (is {folder} a folder written by write_split?)")
    try:
        with open(objects_path, encoding="utf-8") as handle:
            records = json.load(handle)["scenes"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{objects_path}: not a scenes file ({exc})") from exc
    captions: dict[str, list[str]] = {}
    with open(captions_path, encoding="utf-8", newline="") as tsv:
        for line_number, row in enumerate(csv.reader(tsv, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) != 2:
                raise DataError(f"{captions_path}:{line_number}: expected 'file<TAB>caption', got {row!r}")
            captions.setdefault(row[0], []).append(row[1])
    scenes = []
    for record in records:
        image_path = os.path.join(folder, record["image"])
        if not os.path.isfile(image_path):
            raise DataError(f"{image_path}: image listed in {objects_path} is missing")
        with Image.open(image_path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        scenes.append(
            Scene(
                image=pixels,
                captions=captions.get(record["image"], []),
                objects=[ShapeObject.from_json(obj) for obj in record["objects"]],
            )
        )
    return scenes


def _generate_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count, replace=False)
    sizes = list(rng.choice(SIZES, size=count))
    shorter = min(width, height)
    boxes = _place_boxes(rng, [_side(str(size), shorter) for size in sizes], width, height)
    while boxes is None:
        # Rare crowded draw: shrink one large object and try again (always fits when all are small).
        sizes[sizes.index("large")] = "small"
        boxes = _place_boxes(rng, [_side(str(size), shorter) for size in sizes], width, height)
    objects = sorted(
        (ShapeObject(str(shape), str(colour), str(size), box) for shape, colour, size, box in zip(shapes, colours, sizes, boxes)),
        key=lambda obj: obj.centre[0],
    )
    return Scene(image=_render(objects, width, height), captions=_captions(objects, rng), objects=objects)


def _side(size: str, shorter_side: int) -> int:
    return max(6, int(round(SIZE_FRACTION[size] * shorter_side)))


def _place_boxes(rng: np.random.Generator, sides: list[int], width: int, height: int) -> list[tuple[int, int, int, int]] | None:
    """Random non-overlapping boxes whose left-to-right neighbours have a clear relation."""
    gap = max(1, min(width, height) // 32)
    margin = gap
    for _ in range(PLACEMENT_ATTEMPTS):
        boxes = []
        for side in sides:
            x0 = int(rng.integers(margin, width - side - margin + 1))
            y0 = int(rng.integers(margin, height - side - margin + 1))
            boxes.append((x0, y0, x0 + side, y0 + side))
        if _boxes_apart(boxes, gap) and _relations_clear(boxes):
            return boxes
    return None


def _boxes_apart(boxes: list[tuple[int, int, int, int]], gap: int) -> bool:
    for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):
        for bx0, by0, bx1, by1 in boxes[i + 1 :]:
            overlap_x = ax0 < bx1 + gap and bx0 < ax1 + gap
            overlap_y = ay0 < by1 + gap and by0 < ay1 + gap
            if overlap_x and overlap_y:
                return False
    return True


def _relations_clear(boxes: list[tuple[int, int, int, int]]) -> bool:
    centres = sorted(((x0 + x1) / 2.0, (y0 + y1) / 2.0) for x0, y0, x1, y1 in boxes)
    for (ax, ay), (bx, by) in zip(centres, centres[1:]):
        dx, dy = bx - ax, abs(by - ay)
        if dx < 2:
            return False
        if max(dx, dy) < CLEAR_RELATION_RATIO * min(dx, dy):
            return False
    return True


def relation(left: ShapeObject, right: ShapeObject) -> str:
    """Relation of `left` to `right` (right has the larger x centre): 'left of', 'above' or 'below'."""
    (ax, ay), (bx, by) = left.centre, right.centre
    if bx - ax >= abs(by - ay):
        return "left of"
    return "above" if ay < by else "below"


def _render(objects: list[ShapeObject], width: int, height: int) -> np.ndarray:
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        # Pillow boxes are inclusive, ours exclusive: the last drawn pixel is x1 - 1.
        right, bottom = x1 - 1, y1 - 1
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, right, bottom), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x0, bottom), ((x0 + right) / 2.0, y0), (right, bottom)], fill=fill)
        else:
            middle_x, middle_y = (x0 + right) / 2.0, (y0 + bottom) / 2.0
            draw.polygon([(middle_x, y0), (right, middle_y), (middle_x, bottom), (x0, middle_y)], fill=fill)
    return np.asarray(image, dtype=np.uint8).copy()


def _spelled_relation(name: str) -> str:
    """The longer paraphrase of a relation: 'to the left of' for 'left of'."""
    return f"to the {name}" if name in ("left of", "right of") else name


def _with_article(phrase: str) -> str:
    """'an orange circle' but 'a red circle'."""
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def canonical_caption(objects: Sequence[ShapeObject]) -> str:
    """The template caption: every object with size, colour and shape, left to right, chained by relations."""
    ordered = sorted(objects, key=lambda obj: obj.centre[0])
    words = [f"a {ordered[0].describe()}"]
    for left, right in zip(ordered, ordered[1:]):
        words.append(f"{relation(left, right)} a {right.describe()}")
    return " ".join(words)


def _captions(objects: list[ShapeObject], rng: np.random.Generator) -> list[str]:
    """Canonical caption first, then four distinct paraphrases chosen at random."""
    canonical = canonical_caption(objects)
    full = [obj.describe() for obj in objects]
    short = [obj.describe(with_size=False) for obj in objects]
    if len(objects) == 1:
        only = objects[0]
        paraphrases = [
            _with_article(short[0]),
            f"there is a {full[0]}",
            f"a {only.size} {only.shape} that is {only.colour}",
            f"one {short[0]} on a plain background",
            f"a picture of a {full[0]}",
        ]
    elif len(objects) == 2:
        forward = relation(objects[0], objects[1])
        backward = RELATION_INVERSE[forward]
        paraphrases = [
            f"{_with_article(short[0])} {forward} {_with_article(short[1])}",
            f"a {full[1]} {_spelled_relation(backward)} a {full[0]}",
            f"there is a {full[0]} {_spelled_relation(forward)} a {full[1]}",
            f"two shapes a {full[0]} and a {full[1]}",
            f"{_with_article(short[1])} {backward} {_with_article(short[0])}",
        ]
    else:
        first = relation(objects[0], objects[1])
        second = relation(objects[1], objects[2])
        paraphrases = [
            f"{_with_article(short[0])} {first} {_with_article(short[1])} {second} {_with_article(short[2])}",
            f"a {full[2]} {RELATION_INVERSE[second]} a {full[1]} {RELATION_INVERSE[first]} a {full[0]}",
            f"three shapes a {full[0]} a {full[1]} and a {full[2]}",
            f"there are three shapes {_with_article(short[0])} {_with_article(short[1])} and {_with_article(short[2])}",
            f"{_with_article(short[0])} and {_with_article(short[1])} and {_with_article(short[2])} from left to right",
        ]
    chosen = rng.choice(len(paraphrases), size=4, replace=False)
    return [canonical] + [paraphrases[int(index)] for index in chosen]
