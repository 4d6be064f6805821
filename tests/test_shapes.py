"""The synthetic shapes captioning dataset: determinism, captions true to the pixels, files."""

import re
import time

import numpy as np
import pytest

from seq2seq.tasks.captioning import shapes
from seq2seq.tasks.captioning.data import DataError, read_caption_tsv
from seq2seq.tasks.captioning.shapes import (
    COLOURS,
    Scene,
    ShapeObject,
    generate_scenes,
    make_splits,
    object_for_word,
    read_split,
    write_split,
)

OBJECT = r"an? (small|large) (\w+) (\w+)"
RELATION = r"(left of|above|below)"
CANONICAL = re.compile(rf"^{OBJECT}(?: {RELATION} {OBJECT})?(?: {RELATION} {OBJECT})?$")


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(300, seed=7)


def parse_canonical(caption):
    """[(size, colour, shape), ...] and the relations between neighbours, from a canonical caption."""
    match = CANONICAL.match(caption)
    assert match, f"not canonical: {caption!r}"
    groups = [group for group in match.groups() if group is not None]
    mentions = [tuple(groups[index : index + 3]) for index in range(0, len(groups), 4)]
    relations = groups[3::4]
    return mentions, relations


def test_same_seed_gives_identical_scenes_and_other_seeds_differ():
    first, again, other = generate_scenes(20, 3), generate_scenes(20, 3), generate_scenes(20, 4)
    for one, two in zip(first, again):
        assert one.image.tobytes() == two.image.tobytes()
        assert one.captions == two.captions and one.objects == two.objects
    assert [scene.captions for scene in first] != [scene.captions for scene in other]
    assert first[0].image.tobytes() != other[0].image.tobytes()


@pytest.mark.parametrize("image_size", [32, 64, 224, (64, 96), (96, 64), (224, 32)])
def test_image_format_and_object_count(image_size):
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    for scene in generate_scenes(60, 1, image_size):
        assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 3
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert x1 - x0 == y1 - y0 == shapes._side(obj.size, min(width, height))


@pytest.mark.parametrize("image_size", [(64, 96), (96, 64)])
def test_scenes_of_other_aspect_ratios_keep_captions_true_to_the_pixels(image_size):
    for scene in generate_scenes(80, 2, image_size):
        for obj in scene.objects:
            mask = np.all(scene.image == COLOURS[obj.colour], axis=-1)
            x0, y0, x1, y1 = obj.box
            assert mask[y0:y1, x0:x1].sum() == mask.sum() > 0
        mentions, relations = parse_canonical(scene.captions[0])
        assert [(o.size, o.colour, o.shape) for o in scene.objects] == mentions
        assert relations == [shapes.relation(a, b) for a, b in zip(scene.objects, scene.objects[1:])]


@pytest.mark.parametrize("image_size", [16, 300, (64, 300)])
def test_unsupported_image_size_is_refused(image_size):
    with pytest.raises(ValueError, match="image_size"):
        generate_scenes(1, 0, image_size)


def test_all_object_counts_sizes_colours_and_shapes_occur(scenes):
    assert {len(scene.objects) for scene in scenes} == {1, 2, 3}
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {obj.size for obj in objects} == {"small", "large"}
    assert {obj.colour for obj in objects} == set(COLOURS)
    assert {obj.shape for obj in objects} == set(shapes.SHAPES)


def test_colours_and_shapes_are_distinct_within_a_scene(scenes):
    for scene in scenes:
        assert len({obj.colour for obj in scene.objects}) == len(scene.objects)
        assert len({obj.shape for obj in scene.objects}) == len(scene.objects)


def test_objects_are_ordered_left_to_right_and_do_not_overlap(scenes):
    for scene in scenes:
        centres = [obj.centre[0] for obj in scene.objects]
        assert centres == sorted(centres)
        for index, first in enumerate(scene.objects):
            for second in scene.objects[index + 1 :]:
                ax0, ay0, ax1, ay1 = first.box
                bx0, by0, bx1, by1 = second.box
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_each_box_holds_all_pixels_of_its_colour(scenes):
    for scene in scenes[:100]:
        for obj in scene.objects:
            mask = np.all(scene.image == COLOURS[obj.colour], axis=-1)
            x0, y0, x1, y1 = obj.box
            inside = mask[y0:y1, x0:x1].sum()
            assert inside == mask.sum(), "pixels of the object's colour outside its box"
            # The drawn shape fills its box edge to edge: triangles cover ~half, the rest more.
            assert inside >= 0.4 * (x1 - x0) * (y1 - y0)
            assert mask[y0:y1, x0:x1].any(axis=0).all() and mask[y0:y1, x0:x1].any(axis=1).all()


def test_background_is_plain_outside_the_boxes(scenes):
    for scene in scenes[:50]:
        outside = np.ones(scene.image.shape[:2], dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            outside[y0:y1, x0:x1] = False
        assert np.all(scene.image[outside] == shapes.BACKGROUND)


def test_canonical_caption_names_every_object_left_to_right(scenes):
    for scene in scenes:
        mentions, _ = parse_canonical(scene.captions[0])
        assert mentions == [(obj.size, obj.colour, obj.shape) for obj in scene.objects]


def test_canonical_relations_match_object_centres(scenes):
    checked = set()
    for scene in scenes:
        _, relations = parse_canonical(scene.captions[0])
        for relation, left, right in zip(relations, scene.objects, scene.objects[1:]):
            (lx, ly), (rx, ry) = left.centre, right.centre
            assert lx < rx
            if relation == "left of":
                assert rx - lx >= abs(ry - ly)
            elif relation == "above":
                assert ly < ry and ry - ly > rx - lx
            else:
                assert ly > ry and ly - ry > rx - lx
            checked.add(relation)
    assert checked == {"left of", "above", "below"}


def test_paraphrased_right_of_and_left_of_agree_with_positions(scenes):
    phrase = re.compile(r"an? (?:(?:small|large) )?(\w+) \w+ (?:to the )?(left|right) of an? (?:(?:small|large) )?(\w+) \w+")
    seen = 0
    for scene in scenes:
        centre_of = {obj.colour: obj.centre for obj in scene.objects}
        for caption in scene.captions:
            for subject, side, reference in phrase.findall(caption):
                seen += 1
                if side == "left":
                    assert centre_of[subject][0] < centre_of[reference][0], caption
                else:
                    assert centre_of[subject][0] > centre_of[reference][0], caption
    assert seen > 50


def test_captions_are_five_distinct_clean_lowercase_descriptions(scenes):
    for scene in scenes:
        assert len(scene.captions) == 5 and len(set(scene.captions)) == 5
        colours = {obj.colour for obj in scene.objects}
        for caption in scene.captions:
            assert caption == caption.lower().strip() and "  " not in caption
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption
            assert set(caption.split()) & set(COLOURS) <= colours
            assert colours <= set(caption.split()), f"{caption!r} leaves out a colour of {colours}"


def test_vocabulary_is_small_and_complete(scenes):
    used = {word for scene in scenes for caption in scene.captions for word in caption.split()}
    assert used <= set(shapes.vocabulary())
    assert len(shapes.vocabulary()) < 60
    assert {"an", "right", "to", "two", "three"} <= used


def test_splits_come_from_different_seeds():
    splits = make_splits(train=40, val=10, test=10, seed=11, image_size=32)
    assert {name: len(items) for name, items in splits.items()} == {"train": 40, "val": 10, "test": 10}
    images = {name: {scene.image.tobytes() for scene in items} for name, items in splits.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    again = make_splits(train=40, val=10, test=10, seed=11, image_size=32)
    assert [scene.captions for scene in again["val"]] == [scene.captions for scene in splits["val"]]


def test_object_for_word_maps_colour_and_shape_words():
    scene = Scene(
        image=np.zeros((64, 64, 3), dtype=np.uint8),
        captions=[],
        objects=[
            ShapeObject("circle", "red", "small", (2, 2, 14, 14)),
            ShapeObject("square", "blue", "small", (30, 2, 42, 14)),
            ShapeObject("triangle", "green", "large", (40, 30, 62, 52)),
        ],
    )
    assert object_for_word(scene, "red") is scene.objects[0]
    assert object_for_word(scene, "square") is scene.objects[1]
    assert object_for_word(scene, "large") is scene.objects[2]
    assert object_for_word(scene, "small") is None
    assert object_for_word(scene, "small", position_hint=1) is scene.objects[1]
    assert object_for_word(scene, "yellow") is None and object_for_word(scene, "left") is None
    assert shapes.words_for_object(scene.objects[2]) == {"green", "triangle"}


def test_write_and_read_split_round_trip(tmp_path):
    original = generate_scenes(6, 5, image_size=48)
    write_split(original, tmp_path / "val")
    assert sorted(path.name for path in (tmp_path / "val").iterdir())[:2] == ["000000.png", "000001.png"]
    restored = read_split(tmp_path / "val")
    assert len(restored) == 6
    for before, after in zip(original, restored):
        np.testing.assert_array_equal(before.image, after.image)
        assert before.captions == after.captions and before.objects == after.objects
    examples = read_caption_tsv(tmp_path / "val" / "captions.tsv")
    assert [example.captions for example in examples] == [scene.captions for scene in original]
    assert examples[0].image == str(tmp_path / "val" / "000000.png")


def test_read_split_of_a_foreign_folder_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match="objects.json: file not found"):
        read_split(tmp_path)


def test_caption_data_errors_are_the_translation_data_error(tmp_path):
    """One DataError for both tasks: what the CLIs and the caption pipeline catch."""
    import seq2seq.text

    (tmp_path / "captions.tsv").write_text("\n")
    with pytest.raises(seq2seq.text.DataError, match="captions.tsv"):
        read_caption_tsv(tmp_path / "captions.tsv")


def test_a_thousand_scenes_generate_quickly():
    start = time.perf_counter()
    generate_scenes(1000, seed=0)
    assert time.perf_counter() - start < 5.0
