"""Training-time augmentation of captioning images (seq2seq.tasks.captioning.augment): it keeps
what a caption says true (every object inside the frame, every colour keeps its name), it is
deterministic per batch (exact resume), off means the batches of old, and it refuses cached
features."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import yaml

from seq2seq import caption
from seq2seq.tasks.captioning import augment, shapes
from seq2seq.tasks.captioning.config import AugmentationConfig, BatchConfig, CaptionConfig, DataConfig, ModelConfig
from seq2seq.tasks.captioning.data import read_split
from seq2seq.tasks.captioning.pipeline import CaptionRun, make_batches
from seq2seq.training import TrainingConfig

NAMED_COLOURS = {**shapes.COLOURS, "background": shapes.BACKGROUND}
STRONG = AugmentationConfig(jpeg_min_quality=30, min_scale=0.8, min_aspect=0.6, brightness=0.05, contrast=0.1,
                            noise_stddev=0.02)
GEOMETRY_ONLY = dataclasses.replace(STRONG, jpeg_min_quality=100, brightness=0.0, contrast=0.0, noise_stddev=0.0)


def nearest_colour(pixels):
    """The name in NAMED_COLOURS nearest to each RGB pixel [..., 3]."""
    names = list(NAMED_COLOURS)
    palette = np.array([NAMED_COLOURS[name] for name in names], np.float32)
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float32) - palette, axis=-1)
    return np.array(names)[np.argmin(distances, axis=-1)]


def augmented(settings, images, indices, seed=5):
    return augment.augmenter(settings, seed)(tf.constant(images), tf.constant(indices, tf.int64)).numpy()


@pytest.fixture(scope="module")
def scenes():
    return shapes.generate_scenes(240, seed=11)


@pytest.mark.parametrize("batch_seed", range(4))
def test_every_object_stays_whole_inside_the_frame_and_keeps_its_colour_name(scenes, batch_seed):
    """Over 960 draws: the shrunk and shifted image keeps each object's pixels off the frame's
    edge (none cut off), and after all kinds of change the object's pixels still read as its colour."""
    images = np.stack([scene.image for scene in scenes])
    indices = np.arange(len(scenes)) + 1000 * batch_seed
    geometry = augmented(GEOMETRY_ONLY, images, indices)
    changed = augmented(STRONG, images, indices)
    moved = 0
    for scene, placed, image in zip(scenes, geometry, changed):
        names = nearest_colour(placed)
        for obj in scene.objects:
            mask = names == obj.colour
            assert mask.sum() >= 0.3 * shapes._side(obj.size, 64) ** 2 * 0.8 * 0.6, "object lost"
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), "object cut"
            core = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
            if core.sum() >= 4:
                median = np.median(image[core].astype(np.float32), axis=0)
                assert nearest_colour(median) == obj.colour
        moved += not np.array_equal(placed, scene.image)
    assert moved > 0.9 * len(scenes)


def test_the_same_batch_is_augmented_alike_and_other_batches_differently(scenes):
    images = np.stack([scene.image for scene in scenes[:16]])
    first = augmented(STRONG, images, np.arange(16))
    assert np.array_equal(first, augmented(STRONG, images, np.arange(16)))
    assert not np.array_equal(first, augmented(STRONG, images, np.arange(16) + 16))
    assert not np.array_equal(first, augmented(STRONG, images, np.arange(16), seed=6))
    assert not np.array_equal(first[0], first[1])


def test_each_kind_is_off_at_its_neutral_value(scenes):
    images = np.stack([scene.image for scene in scenes[:8]])
    neutral = AugmentationConfig(jpeg_min_quality=100, min_scale=1.0, min_aspect=1.0, brightness=0.0, contrast=0.0,
                                 noise_stddev=0.0)
    assert np.array_equal(augmented(neutral, images, np.arange(8)), images)
    for kind, value in [("jpeg_min_quality", 50), ("min_scale", 0.9), ("min_aspect", 0.9), ("brightness", 0.05),
                        ("contrast", 0.1), ("noise_stddev", 0.02)]:
        assert not np.array_equal(augmented(dataclasses.replace(neutral, **{kind: value}), images, np.arange(8)), images)


def shapes_config(tmp_path, **augmentation):
    return CaptionConfig(
        data=DataConfig(shapes_train=20, shapes_val=0, shapes_seed=1),
        model=ModelConfig(backbone="small_cnn", image_size=64, units=16),
        batching=BatchConfig(batch_size=8),
        training=TrainingConfig(output_dir=str(tmp_path / "run"), seed=4),
        augmentation=AugmentationConfig(**augmentation),
    )


def source_batches(config, augmented_images, steps=6, start=0):
    train_set = read_split(config, "train")
    run = CaptionRun.create(config, train_set)
    batches = make_batches(run, train_set, train_set.images, shuffle=True, report_name="train", augmented=augmented_images)
    stream = iter(batches.stream(start))
    return train_set, batches, [next(stream)[0]["source"].numpy() for _ in range(steps)]


def test_without_augmentation_batches_hold_the_images_as_they_are_and_with_it_resume_exactly(tmp_path):
    config = shapes_config(tmp_path, augment=False)
    train_set, batches, plain = source_batches(config, augment.is_on(config))
    flat_images = [index for index, captions in enumerate(train_set.captions) for _ in captions]
    for step, sources in enumerate(plain):
        epoch, batch = batches.position(step)
        expected = train_set.images[np.asarray(flat_images)[batches.plan(epoch)[batch]]]
        assert np.array_equal(sources, expected)
    config = shapes_config(tmp_path / "on")
    assert augment.is_on(config)
    _, _, changed = source_batches(config, True)
    assert not any(np.array_equal(a, b) for a, b in zip(plain, changed))
    _, _, resumed = source_batches(config, True, steps=3, start=3)
    for one, two in zip(changed[3:], resumed):
        assert np.array_equal(one, two)


def test_augmentation_is_on_by_default_only_for_a_backbone_trained_from_scratch(tmp_path):
    assert augment.is_on(shapes_config(tmp_path))
    assert not augment.is_on(shapes_config(tmp_path, augment=False))
    pretrained = dataclasses.replace(shapes_config(tmp_path).model, backbone="mobilenet_v3_small", backbone_weights="w.h5",
                                     fine_tune=False)
    assert not augment.is_on(dataclasses.replace(shapes_config(tmp_path), model=pretrained))
    cached = dataclasses.replace(pretrained, cache_features=True)
    assert not augment.is_on(dataclasses.replace(shapes_config(tmp_path), model=cached))


def test_augmentation_with_cached_features_is_one_error_line(tmp_path, capsys):
    code = caption.main([
        "train", "--shapes-train", "8", "--backbone", "mobilenet_v3_small", "--no-fine-tune", "--cache-features",
        "--augment", "--output-dir", str(tmp_path / "run"),
    ])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "error: --augment and --cache-features do not mix: cached features are of the images as they are, so "
        "augmented images would never reach the model; drop one (--no-augment, or no --cache-features)"
    ]


def test_a_run_saved_before_augmentation_existed_keeps_training_without_it(tmp_path):
    config = shapes_config(tmp_path)
    values = config.to_dict()
    del values["augmentation"]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(values))
    loaded = CaptionConfig.load(path)
    assert loaded.augmentation.augment is False and not augment.is_on(loaded)


def test_a_run_saved_before_image_fit_existed_keeps_squashing(tmp_path):
    """Its model learnt from squashed images (and was served so)."""
    config = shapes_config(tmp_path)
    values = config.to_dict()
    del values["model"]["image_fit"]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(values))
    assert CaptionConfig.load(path).model.image_fit == "squash"
    values["model"]["image_fit"] = "pad"
    path.write_text(yaml.safe_dump(values))
    assert CaptionConfig.load(path).model.image_fit == "pad"
