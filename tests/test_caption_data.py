"""Caption corpus readers: Karpathy JSON, TSV, TFDS coco_captions (mocked), validation."""

import json
import socket

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from seq2seq.tasks.captioning.data import (
    CaptionExample,
    DataError,
    load_tfds_coco,
    read_caption_tsv,
    read_karpathy_json,
)
from seq2seq.tasks.captioning.images import load_image


def make_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)


def sentence(raw):
    return {"raw": raw, "tokens": raw.lower().split()}


def write_karpathy(tmp_path, images):
    path = tmp_path / "dataset_test.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


@pytest.fixture
def karpathy(tmp_path):
    """A COCO-style file (with filepath) covering every split value, and its images."""
    images = [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": [sentence("A dog."), sentence("A brown dog runs")]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [sentence("Two cats")]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "val", "sentences": [sentence("A red bus"), sentence("   ")]},
        {"filepath": "val2014", "filename": "d.jpg", "split": "test", "sentences": [{"tokens": ["a", "kite"]}]},
    ]
    for entry in images:
        make_image(tmp_path / "coco" / entry["filepath"] / entry["filename"])
    return write_karpathy(tmp_path, images), tmp_path / "coco"


def test_karpathy_train_includes_restval_and_keeps_every_caption(karpathy):
    json_path, folder = karpathy
    train = read_karpathy_json(json_path, folder, "train")
    assert [example.image_id for example in train] == ["train2014/a.jpg", "val2014/b.jpg"]
    assert train[0].captions == ["A dog.", "A brown dog runs"]
    assert train[0].image == str(folder / "train2014" / "a.jpg")
    assert load_image(train[1].image).shape == (4, 4, 3)


def test_karpathy_val_drops_blank_captions_with_a_count(karpathy):
    json_path, folder = karpathy
    messages = []
    val = read_karpathy_json(json_path, folder, "val", warn=messages.append)
    assert val == [CaptionExample(str(folder / "val2014" / "c.jpg"), ["A red bus"], "val2014/c.jpg")]
    assert messages == [f"{json_path}: dropped 1 empty or whitespace-only captions"]


def test_karpathy_test_falls_back_to_tokens(karpathy):
    json_path, folder = karpathy
    assert read_karpathy_json(json_path, folder, "test")[0].captions == ["a kite"]


def test_karpathy_flickr_entries_without_filepath(tmp_path):
    make_image(tmp_path / "Images" / "1000.jpg")
    json_path = write_karpathy(tmp_path, [{"filename": "1000.jpg", "split": "test", "sentences": [sentence("a child")]}])
    (example,) = read_karpathy_json(json_path, tmp_path / "Images", "test")
    assert example.image == str(tmp_path / "Images" / "1000.jpg") and example.image_id == "1000.jpg"


def test_karpathy_missing_images_are_counted_and_listed(karpathy):
    json_path, folder = karpathy
    (folder / "train2014" / "a.jpg").unlink()
    (folder / "val2014" / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"dataset_test\.json: 2 of 2 images referenced by captions are missing: .*a\.jpg, .*b\.jpg"):
        read_karpathy_json(json_path, folder, "train")


def test_karpathy_missing_images_can_be_skipped(karpathy):
    json_path, folder = karpathy
    (folder / "train2014" / "a.jpg").unlink()
    messages = []
    train = read_karpathy_json(json_path, folder, "train", on_missing="skip", warn=messages.append)
    assert [example.image_id for example in train] == ["val2014/b.jpg"]
    assert len(messages) == 1 and "1 of 2 images" in messages[0] and "a.jpg" in messages[0]


def test_karpathy_bad_inputs(tmp_path, karpathy):
    json_path, folder = karpathy
    with pytest.raises(ValueError, match="split must be one of"):
        read_karpathy_json(json_path, folder, "restval")
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(DataError, match=r"empty\.json: caption file is empty"):
        read_karpathy_json(empty, folder, "train")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        read_karpathy_json(broken, folder, "train")
    no_test = write_karpathy(tmp_path, [{"filename": "x.jpg", "split": "train", "sentences": []}])
    with pytest.raises(DataError, match=r"no images in split 'test'"):
        read_karpathy_json(no_test, folder, "test")
    with pytest.raises(DataError, match=r"nowhere\.json: caption file not found"):
        read_karpathy_json(tmp_path / "nowhere.json", folder, "train")


def test_tsv_groups_captions_by_image_and_resolves_paths(tmp_path):
    make_image(tmp_path / "data" / "pics" / "one.png")
    make_image(tmp_path / "data" / "two.png")
    make_image(tmp_path / "elsewhere" / "three.png")
    absolute = tmp_path / "elsewhere" / "three.png"
    tsv = tmp_path / "data" / "captions.tsv"
    tsv.write_text(
        "pics/one.png\ta cat on a mat\n"
        "two.png\ta dog\n"
        "\n"
        "pics/one.png\tthe cat sleeps\n"
        f"{absolute}\ta bird\n"
        "two.png\t  \n"
    )
    messages = []
    examples = read_caption_tsv(tsv, warn=messages.append)
    assert examples == [
        CaptionExample(str(tmp_path / "data" / "pics" / "one.png"), ["a cat on a mat", "the cat sleeps"], "pics/one.png"),
        CaptionExample(str(tmp_path / "data" / "two.png"), ["a dog"], "two.png"),
        CaptionExample(str(absolute), ["a bird"], str(absolute)),
    ]
    assert messages == [f"{tsv}: dropped 1 empty or whitespace-only captions"]


def test_tsv_image_folder_and_flickr_token_suffix(tmp_path):
    make_image(tmp_path / "Images" / "1000.jpg")
    tsv = tmp_path / "Flickr8k.token.txt"
    tsv.write_text("1000.jpg#0\tA child in pink\n1000.jpg#1\tA girl climbs\n")
    (example,) = read_caption_tsv(tsv, tmp_path / "Images")
    assert example.image == str(tmp_path / "Images" / "1000.jpg")
    assert example.captions == ["A child in pink", "A girl climbs"] and example.image_id == "1000.jpg"


def test_tsv_empty_file_names_it(tmp_path):
    tsv = tmp_path / "nothing.tsv"
    tsv.write_text("")
    with pytest.raises(DataError, match=r"nothing\.tsv: caption file is empty"):
        read_caption_tsv(tsv)


def test_tsv_line_without_tab_names_file_and_line(tmp_path):
    make_image(tmp_path / "a.png")
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("a.png\tfine\na.png a caption with spaces only\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: expected 'image_path<TAB>caption'"):
        read_caption_tsv(tsv)


def test_tsv_missing_images_list_first_few_or_skip(tmp_path):
    make_image(tmp_path / "present.png")
    lines = ["present.png\tthere"] + [f"lost{index}.png\tgone" for index in range(7)]
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        read_caption_tsv(tsv)
    message = str(error.value)
    assert message.startswith(f"{tsv}: 7 of 8 images referenced by captions are missing")
    assert "lost0.png" in message and "lost4.png" in message and "lost5.png" not in message and "and 2 more" in message
    messages = []
    kept = read_caption_tsv(tsv, on_missing="skip", warn=messages.append)
    assert [example.image_id for example in kept] == ["present.png"]
    assert len(messages) == 1 and "7 of 8" in messages[0]


def test_tsv_with_only_blank_captions_is_an_error(tmp_path):
    make_image(tmp_path / "a.png")
    tsv = tmp_path / "blank.tsv"
    tsv.write_text("a.png\t \na.png\t\t\n")
    with pytest.raises(DataError, match=r"blank\.tsv: no non-empty captions"):
        read_caption_tsv(tsv, warn=lambda message: None)


class NetworkUsed(Exception):
    """Raised by the no_network fixture; not a subclass of anything the code under test catches."""


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a connection fail, and fail the test even if that was caught."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkUsed(f"test tried to use the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"network was used: {attempts}"


def test_tfds_coco_with_mock_data_yields_jpeg_bytes_and_captions(tmp_path, no_network):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        examples = list(load_tfds_coco("val", data_dir=tmp_path))
    assert len(examples) == 3
    for example in examples:
        assert isinstance(example.image, bytes) and example.image[:3] == b"\xff\xd8\xff"
        pixels = load_image(example.image)
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        assert example.captions and all(isinstance(caption, str) and caption.strip() for caption in example.captions)
        assert example.image_id.isdigit()


def test_tfds_coco_max_examples(tmp_path, no_network):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        assert len(list(load_tfds_coco("train", data_dir=tmp_path, max_examples=2))) == 2


def test_tfds_coco_not_prepared_is_a_data_error_not_a_download(tmp_path, no_network):
    with pytest.raises(DataError, match="coco_captions is not prepared"):
        next(load_tfds_coco("test", data_dir=tmp_path / "empty_tfds"))


@pytest.mark.parametrize(
    "fine_tune, sort_by_length, sorted_batches",
    [(True, None, False), (False, None, True), (True, True, True), (False, False, False)],
)
def test_caption_batches_sort_by_length_only_for_a_frozen_backbone_by_default(tmp_path, fine_tune, sort_by_length, sorted_batches):
    """Sorted batches group scenes by object count; a fine-tuned BatchNorm backbone must not see that."""
    from seq2seq.training import TrainingConfig
    from seq2seq.tasks.captioning import shapes
    from seq2seq.tasks.captioning.config import BatchConfig, CaptionConfig, DataConfig, ModelConfig
    from seq2seq.tasks.captioning.data import shapes_set
    from seq2seq.tasks.captioning.pipeline import CaptionRun, make_batches

    config = CaptionConfig(
        data=DataConfig(shapes_train=60),
        model=ModelConfig(fine_tune=fine_tune),
        batching=BatchConfig(batch_size=16, sort_by_length=sort_by_length),
        training=TrainingConfig(output_dir=str(tmp_path / "run")),
    )
    train_set = shapes_set(shapes.generate_scenes(60, seed=4))
    run = CaptionRun.create(config, train_set)
    batches = make_batches(run, train_set, np.arange(len(train_set.images)), shuffle=True, report_name="train")
    spreads = []
    for indices in batches.plan(0):
        _, target_out = batches.make_batch(tf.constant(indices))
        lengths = np.count_nonzero(target_out.numpy(), axis=1)
        spreads.append(lengths.max() - lengths.min())
    # Sorted within chunks: most batches hold one length (a chunk's edges may mix two).
    assert (np.median(spreads) == 0) == sorted_batches and (np.median(spreads) > 3) != sorted_batches, spreads
