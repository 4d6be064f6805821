"""python -m seq2seq.caption end to end on a tiny synthetic run: train, resume, caption, evaluate, export.

One tiny model is trained once per module (a few steps, 32x32 images); every command runs
in-process through `seq2seq.caption.main`, the way a user's shell would call it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CAPTION_TRAIN as TINY_TRAIN
from seq2seq import caption
from seq2seq.tasks.captioning import shapes



def run_cli(capsys, *argv):
    code = caption.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text, message", [
    ("data: [unclosed\n", "not valid YAML (line 2, column 1:"),
    ("- data\n", "expected a mapping with sections"),
])
def test_bad_config_file_is_one_error_line(capsys, tmp_path, text, message):
    """The same errors, from the same function, as `translate train --config`."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    code, _, err = run_cli(capsys, "train", "--config", config)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {config}: ") and message in lines[0]


@pytest.fixture(scope="module")
def tiny_export(tiny_caption_run):
    model_dir = tiny_caption_run.parent / "exported"
    assert caption.main(["export", "--run-dir", str(tiny_caption_run), "--output", str(model_dir)]) == 0
    return model_dir / "1"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three synthetic PNGs (32x32), one 50x40 PNG, a JPEG, a text file named .jpg and a truncated PNG."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, scene in enumerate(shapes.generate_scenes(3, seed=11, image_size=32)):
        paths.append(folder / f"scene{index}.png")
        Image.fromarray(scene.image).save(paths[-1])
    odd = shapes.generate_scenes(1, seed=12, image_size=50)[0].image[:40]
    Image.fromarray(odd).save(folder / "odd.png")
    Image.fromarray(odd).save(folder / "photo.jpg", quality=90)
    (folder / "page.jpg").write_text("<html><body>404 not found</body></html>")
    data = paths[0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return {
        "good": paths, "odd": folder / "odd.png", "jpeg": folder / "photo.jpg",
        "not_image": folder / "page.jpg", "truncated": folder / "truncated.png",
    }


def test_train_writes_a_run_and_resumes(tiny_caption_run, capsys):
    for name in ("config.yaml", "captions.vocab", "best.weights.h5", "checkpoints", "training_summary.json"):
        assert (tiny_caption_run / name).exists(), name
    vocab = (tiny_caption_run / "captions.vocab").read_text().split("\n")
    assert vocab[:4] == ["<pad>", "<unk>", "<s>", "</s>"] and "circle" in vocab
    summary = json.loads((tiny_caption_run / "training_summary.json").read_text())
    assert summary["step"] == 4 and "val_bleu" in summary["history"]
    checkpoints = sorted(p.name for p in (tiny_caption_run / "checkpoints").iterdir())
    code, out, err = run_cli(capsys, "train", *TINY_TRAIN[:-2], "--verbose", "1", "--output-dir", tiny_caption_run)
    assert code == 0
    assert "holds a run: continuing it" in err and "training already finished" in out
    assert sorted(p.name for p in (tiny_caption_run / "checkpoints").iterdir()) == checkpoints


def test_mirrored_training_on_one_cpu_matches_plain_training(tiny_caption_run, tmp_path, capsys):
    """`--distribution mirrored` (one CPU replica) runs the strategy code path and, with the
    same seed, follows the loss curve of the run without a strategy."""
    code, _, err = run_cli(capsys, "train", *TINY_TRAIN, "--distribution", "mirrored", "--output-dir", tmp_path / "run")
    assert code == 0, err
    plain = json.loads((tiny_caption_run / "training_summary.json").read_text())["history"]
    mirrored = json.loads((tmp_path / "run" / "training_summary.json").read_text())["history"]
    assert len(mirrored["loss"]) == len(plain["loss"]) == 2
    np.testing.assert_allclose(mirrored["loss"], plain["loss"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(mirrored["val_loss"], plain["val_loss"], rtol=0, atol=1e-4)


def test_caption_one_line_per_image_in_order(tiny_caption_run, images, capsys):
    paths = [*images["good"], images["odd"], images["jpeg"]]
    code, out, err = run_cli(capsys, "caption", *paths, "--model", tiny_caption_run, "--beam-size", "2")
    assert code == 0, err
    lines = out.split("\n")[:-1]
    assert len(lines) == len(paths) and all(line.strip() for line in lines)
    # --input FILE gives the same captions
    listing = images["good"][0].parent / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    code, out_file, _ = run_cli(capsys, "caption", "--input", listing, "--model", tiny_caption_run, "--beam-size", "2")
    assert code == 0 and out_file == out


@pytest.mark.parametrize("bad", ["not_image", "truncated"])
def test_caption_skips_bad_images_with_a_warning_and_a_count(tiny_caption_run, images, capsys, bad):
    paths = [images["good"][0], images[bad], images["good"][1]]
    code, out, err = run_cli(capsys, "caption", *paths, "--model", tiny_caption_run, "--beam-size", "1")
    assert code == 0
    lines = out.split("\n")[:-1]
    assert len(lines) == 3 and lines[0] and lines[1] == "" and lines[2]
    assert f"warning: skipping image: {images[bad]}" in err
    assert "skipped 1 of 3 images" in err
    assert "Traceback" not in err


def test_caption_on_error_raise_is_a_one_line_error(tiny_caption_run, images, capsys):
    code, out, err = run_cli(capsys, "caption", images["good"][0], images["not_image"], "--model", tiny_caption_run, "--on-error", "raise")
    assert code == 2 and out == ""
    assert err.startswith(f"error: {images['not_image']}: ") and err.count("\n") == 1


def test_caption_only_bad_or_missing_images(tiny_caption_run, images, capsys):
    code, _, err = run_cli(capsys, "caption", images["not_image"], "--model", tiny_caption_run)
    assert code == 2 and err.strip().endswith("error: none of the 1 images could be read")
    code, _, err = run_cli(capsys, "caption", images["good"][0].parent / "missing.png", "--model", tiny_caption_run, "--on-error", "raise")
    assert code == 2 and "missing.png" in err and "Traceback" not in err


def test_caption_errors_for_missing_model_and_bad_beam(tmp_path, images, capsys):
    code, _, err = run_cli(capsys, "caption", images["good"][0], "--model", tmp_path / "nope")
    assert code == 2 and "model not found" in err
    with pytest.raises(SystemExit) as exit_info:
        caption.main(["caption", str(images["good"][0]), "--beam-size", "0"])
    assert exit_info.value.code == 2 and "argument --beam-size: must be at least 1, got 0" in capsys.readouterr().err


def test_caption_plot_attention(tiny_caption_run, images, tmp_path, capsys):
    png = tmp_path / "attention.png"
    code, _, err = run_cli(capsys, "caption", images["good"][0], "--model", tiny_caption_run, "--plot-attention", png)
    assert code == 0 and png.stat().st_size > 1000 and "attention of the first image" in err


def test_evaluate_shapes_greedy_and_beam(tiny_export, tmp_path, capsys):
    scores_file = tmp_path / "scores.json"
    code, out, err = run_cli(
        capsys, "evaluate", "--model", tiny_export.parent, "--shapes-test", "6", "--shapes-seed", "99",
        "--beam-size", "2", "--json", scores_file, "--captions",
    )
    assert code == 0, err
    assert "greedy: BLEU-1" in out and "beam 2: BLEU-1" in out and "BLEU-4" in out and "CIDEr-D" in out
    assert "METEOR and SPICE need Java" in out
    scores = json.loads(scores_file.read_text())
    assert scores["images"] == 6 and set(scores["searches"]) == {"greedy", "beam 2"}
    for result in scores["searches"].values():
        assert 0 <= result["bleu_4"] <= result["bleu_1"] <= 1 and 0 <= result["cider_d"] <= 10
        assert len(result["captions"]) == 6 and "words" in result and "localisation" in result


def test_evaluate_tsv_with_missing_images(tiny_caption_run, images, tmp_path, capsys):
    tsv = tmp_path / "test.tsv"
    tsv.write_text(f"{images['good'][0]}\ta red circle\n{tmp_path / 'gone.png'}\ta blue square\n")
    code, _, err = run_cli(capsys, "evaluate", "--model", tiny_caption_run, "--tsv", tsv, "--beam-size", "1")
    assert code == 2 and "1 of 2 images referenced by captions are missing" in err and "gone.png" in err
    code, out, err = run_cli(capsys, "evaluate", "--model", tiny_caption_run, "--tsv", tsv, "--beam-size", "1", "--on-missing", "skip")
    assert code == 0 and "greedy: BLEU-1" in out and "(1 images;" in out
    code, _, err = run_cli(capsys, "evaluate", "--model", tiny_caption_run)
    assert code == 2 and "give the evaluation data one way" in err


def test_train_rejects_bad_data_with_one_line_errors(tmp_path, images, capsys):
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n  \n")
    missing = tmp_path / "missing.tsv"
    missing.write_text(f"{images['good'][0]}\ta red circle\nnot_there.png\ta blue square\n")
    cases = [
        (["--train-tsv", empty], f"{empty}: caption file is empty"),
        (["--train-tsv", missing], "1 of 2 images referenced by captions are missing: "),
        (["--train-tsv", tmp_path / "nope.tsv"], "caption file not found"),
        (["--shapes-train", "4", "--train-tsv", missing], "give the training data one way"),
        (["--shapes-train", "4", "--backbone", "vgg"], "backbone must be one of"),
        (["--shapes-train", "4", "--cache-features"], "--cache-features needs a frozen backbone"),
        (["--shapes-train", "4", "--backbone", "resnet50", "--small-cnn-pools", "2"], "small_cnn backbone only"),
    ]
    for flags, message in cases:
        code, _, err = run_cli(capsys, "train", *flags, "--output-dir", tmp_path / "run")
        assert code == 2, flags
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, "train", "--shapes-train", "4")
    assert code == 2 and "give an output directory" in err


def test_train_all_bad_images_is_an_error_and_raise_mode_names_the_file(tmp_path, images, capsys):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(f"{images['not_image']}\ta red circle\n{images['good'][0]}\ta blue square\n")
    code, _, err = run_cli(capsys, "train", "--train-tsv", tsv, "--on-error", "raise", "--output-dir", tmp_path / "run")
    assert code == 2 and str(images["not_image"]) in err and "Traceback" not in err


def test_train_tsv_and_karpathy_with_cached_features(tmp_path, images, capsys):
    """A frozen backbone with cached features trains on TSV data; the run captions images (image model rebuilt)."""
    tsv = tmp_path / "train.tsv"
    tsv.write_text("".join(f"{p}\ta small red circle\n" for p in images["good"]) + f"{images['not_image']}\ta dog\n")
    flags = ["--image-size", "32", "--units", "8", "--batch-size", "4", "--max-steps", "2", "--no-tensorboard", "--verbose", "0", "--no-validation-bleu"]
    code, _, err = run_cli(
        capsys, "train", "--train-tsv", tsv, "--no-fine-tune", "--cache-features", *flags, "--output-dir", tmp_path / "cached",
    )
    assert code == 0, err
    assert "skipped 1 of 4 images" in err and (tmp_path / "cached" / "backbone.weights.h5").is_file()
    code, out, err = run_cli(capsys, "caption", images["good"][0], "--model", tmp_path / "cached", "--beam-size", "1")
    assert code == 0 and len(out.split("\n")) == 2, err
    karpathy = tmp_path / "dataset.json"
    entries = [
        {"filename": p.name, "split": split, "sentences": [{"raw": "A small red circle."}]}
        for p, split in zip(images["good"], ("train", "train", "val"))
    ]
    karpathy.write_text(json.dumps({"images": entries}))
    code, _, err = run_cli(
        capsys, "train", "--karpathy-json", karpathy, "--image-folder", images["good"][0].parent, *flags,
        "--output-dir", tmp_path / "karpathy",
    )
    assert code == 0, err
    assert "train: 2 images, 2 captions; valid: 1 images" in err


def test_train_tfds_coco_mock(tmp_path, capsys):
    import tensorflow_datasets as tfds

    flags = ["--image-size", "32", "--units", "8", "--batch-size", "4", "--max-steps", "2", "--no-tensorboard", "--verbose", "0", "--no-validation-bleu"]
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        code, out, err = run_cli(
            capsys, "train", "--tfds-name", "coco_captions", "--tfds-data-dir", tmp_path / "tfds",
            "--tfds-max-examples", "4", "--tfds-valid-split", "val", *flags, "--output-dir", tmp_path / "coco",
        )
    assert code == 0, err
    assert "train: 4 images" in err and "valid: 4 images" in err
    assert (tmp_path / "coco" / "best.weights.h5").is_file()


def test_export_signatures_and_in_process_equality(tiny_caption_run, tiny_export, images):
    import tensorflow as tf

    from seq2seq.tasks.captioning.pipeline import CaptionRun

    assert (tiny_export / "saved_model.pb").is_file() and (tiny_export / "assets.extra" / "config.yaml").is_file()
    run = CaptionRun.load(tiny_caption_run)
    captioner = run.captioner(run.load_model())
    data = tf.constant([p.read_bytes() for p in [*images["good"], images["odd"], images["jpeg"]]])
    expected = captioner.caption_bytes(data, tf.constant(3), tf.constant(0.0))
    loaded = tf.saved_model.load(str(tiny_export))
    served = loaded.signatures["serving_default"](images=data)
    assert set(served) == {"captions", "scores", "errors"}
    assert served["errors"].numpy().tolist() == [b""] * len(data.numpy())
    assert served["captions"].numpy().tolist() == expected["captions"].numpy().tolist()
    np.testing.assert_allclose(served["scores"].numpy(), expected["scores"].numpy(), rtol=1e-5, atol=1e-5)
    detailed = loaded.signatures["caption_with_attention"](images=data, beam_size=tf.constant(1))
    assert int(detailed["grid_height"]) == 4 and int(detailed["grid_width"]) == 4
    attention = detailed["attention"].numpy()  # [N, T, 16]
    lengths = detailed["lengths"].numpy()
    assert attention.shape[:2] == detailed["tokens"].shape and attention.shape[2] == 16
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(attention[row, :length].sum(-1), 1.0, atol=1e-4)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    data = [open(path, "rb").read() for path in sys.argv[2:]]
    out = model.signatures["serving_default"](images=tf.constant(data))
    leaked = [m for m in sys.modules if m.split(".")[0] in ("seq2seq", "tasks")]
    print(json.dumps({"captions": [c.decode() for c in out["captions"].numpy()],
                      "scores": out["scores"].numpy().tolist(), "leaked": leaked}))
    """
)


def test_export_loads_in_a_fresh_process_without_this_project(tiny_caption_run, tiny_export, images, tmp_path, capsys):
    paths = [*images["good"], images["jpeg"]]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can put this project on sys.path.
    done = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS, str(tiny_export), *map(str, paths)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["leaked"] == []
    code, out, _ = run_cli(capsys, "caption", *paths, "--model", tiny_caption_run, "--beam-size", "3")
    # The CLI loads with Pillow, the export decodes in-graph. PNGs decode to identical pixels;
    # JPEG decoders may differ by a level on some pixels, and this untrained model's long
    # near-tie outputs can then fork late, so the JPEG caption is compared on its start.
    assert code == 0
    captions = out.split("\n")[:-1]
    assert captions[:-1] == fresh["captions"][:-1]
    assert captions[-1].split()[:5] == fresh["captions"][-1].split()[:5]


def test_a_console_caption_of_an_export_starts_tensorflow_without_keras(tiny_export, images, capsys):
    """A console `caption` of a SavedModel (`cli.start_runtime`) imports neither Keras nor
    matplotlib (`python -X importtime` lists every import); its output is the in-process output."""
    paths = [str(path) for path in images["good"][:2]]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "seq2seq.caption", "caption", *paths, "--model", str(tiny_export)],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "tensorflow" in imported and "seq2seq.runtime" in imported
    assert not {"keras", "matplotlib"} & imported
    code, out, _ = run_cli(capsys, "caption", *paths, "--model", tiny_export)
    assert code == 0 and done.stdout == out


def test_saved_model_cli_run(tiny_export, images):
    data = images["good"][0].read_bytes()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "saved_model_cli"), "run", "--dir", str(tiny_export), "--tag_set", "serve",
         "--signature_def", "serving_default", "--input_exprs", f"images=[{data!r}]"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Result for output key captions" in done.stdout and "Result for output key scores" in done.stdout
    # The same with an object-dtype .npy through --inputs, for the attention signature.
    npy = images["good"][0].parent / "images.npy"
    np.save(npy, np.array([data, data], dtype=object), allow_pickle=True)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "saved_model_cli"), "run", "--dir", str(tiny_export), "--tag_set", "serve",
         "--signature_def", "caption_with_attention", "--inputs", f"images={npy}", "--input_exprs", "beam_size=2"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Result for output key attention" in done.stdout


def test_export_holds_only_stock_tf_ops(tiny_export):
    from seq2seq.serving_check import serving_op_report

    report = serving_op_report(tiny_export)
    assert report["py_func_ops"] == []
    assert report["unregistered_ops"] == [] and report["tensorflow_text_ops"] == []
    assert report["stock_tf_serving"], report
    assert {"DecodeImage", "While"} & set(report["op_types"]) or "StatelessWhile" in report["op_types"]


def test_export_refuses_an_existing_version(tiny_caption_run, tiny_export, capsys):
    code, _, err = run_cli(capsys, "export", "--run-dir", tiny_caption_run, "--output", tiny_export.parent, "--version", "1")
    assert code == 2 and "exists and is not empty" in err


def test_transformer_decoder_over_image_features_trains_exports_and_captions(tmp_path, images, capsys):
    """--decoder-type transformer over the CNN's grid, through the CLI: train, export, caption
    with the export, and its attention over the grid is a distribution per output token."""
    import tensorflow as tf

    flags = ["--decoder-type", "transformer", "--decoder-layers", "2", "--num-heads", "2", "--encoder-units", "12"]
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_TRAIN, *flags, "--output-dir", run_dir)
    assert code == 0, err
    assert "model: " in err
    code, _, err = run_cli(capsys, "export", "--run-dir", run_dir, "--output", tmp_path / "exported")
    assert code == 0, err
    code, out, err = run_cli(capsys, "caption", *images["good"], "--model", tmp_path / "exported", "--beam-size", "2")
    assert code == 0, err
    assert len(out.split("\n")[:-1]) == len(images["good"])
    loaded = tf.saved_model.load(str(tmp_path / "exported" / "1"))
    data = tf.constant([p.read_bytes() for p in images["good"]])
    detailed = loaded.signatures["caption_with_attention"](images=data, beam_size=tf.constant(1))
    attention, lengths = detailed["attention"].numpy(), detailed["lengths"].numpy()
    assert attention.shape[-1] == 16
    for row, length in zip(attention, lengths):
        np.testing.assert_allclose(row[:length].sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--no-bidirectional"], "model bidirectional does not apply to a cnn encoder with a rnn decoder"),
    (["--decoder-type", "transformer", "--no-input-feeding"], "model input_feeding does not apply to a cnn encoder"),
    (["--encoder-type", "rnn"], "model encoder_type must be one of ['cnn']"),
])
def test_model_fields_that_do_not_apply_are_one_line_errors(tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "train", *TINY_TRAIN, *argv, "--output-dir", tmp_path / "run")
    assert code == 2 and message in err, err
    assert len(err.strip().split("\n")) == 1


@pytest.fixture(scope="module")
def loaded_export(tiny_export):
    import tensorflow as tf

    return tf.saved_model.load(str(tiny_export))


def test_served_export_answers_every_image_and_holds_its_pixel_limit(loaded_export, images):
    """One bad image no longer fails the batch: each input gets a status in `errors`, a bad one an
    empty caption; the export's pixel limit (the CLI's by default) is in its `info`."""
    import tensorflow as tf

    from seq2seq.tasks.captioning.images import DEFAULT_MAX_PIXELS
    from test_images import png_with_declared_size

    good = images["good"][0].read_bytes()
    batch = [good, images["truncated"].read_bytes(), b"", images["not_image"].read_bytes(),
             png_with_declared_size(20_000, 20_000, idat_rows=10), good]
    served = loaded_export.signatures["serving_default"](images=tf.constant(batch))
    assert served["errors"].numpy().tolist() == [
        b"", b"corrupt or truncated image data", b"empty input", b"not a JPEG, PNG, GIF, BMP or WebP image",
        f"image of 20000x20000 pixels is over the limit of {DEFAULT_MAX_PIXELS:,} pixels".encode(), b"",
    ]
    captions = served["captions"].numpy().tolist()
    assert captions[0] and captions[0] == captions[-1] and captions[1:-1] == [b""] * 4
    assert int(loaded_export.info()["max_pixels"]) == DEFAULT_MAX_PIXELS
    empty = loaded_export.signatures["caption_with_attention"](images=tf.constant([], tf.string), beam_size=tf.constant(2))
    assert empty["captions"].shape[0] == 0 and empty["errors"].shape[0] == 0


def test_cli_and_export_caption_an_exif_rotated_jpeg_and_a_transparent_png_alike(
        tiny_caption_run, loaded_export, tmp_path, capsys):
    """One preprocessing for both: the CLI (Pillow) and the export (in-graph) turn an EXIF-rotated
    JPEG and a transparent PNG into the same pixels, hence the same captions."""
    import tensorflow as tf

    scene = shapes.generate_scenes(1, seed=21, image_size=32)[0].image
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(scene))).save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    alpha = np.where(scene.sum(-1) > 600, 0, 255).astype(np.uint8)  # the light background transparent
    Image.fromarray(np.dstack([scene, alpha]), "RGBA").save(tmp_path / "cutout.png")
    paths = [tmp_path / "rotated.jpg", tmp_path / "cutout.png"]
    code, out, err = run_cli(capsys, "caption", *paths, "--model", tiny_caption_run, "--beam-size", "3")
    assert code == 0, err
    served = loaded_export.signatures["serving_default"](images=tf.constant([path.read_bytes() for path in paths]))
    assert out.split("\n")[:-1] == [caption.decode() for caption in served["captions"].numpy()]


def test_load_export_gives_back_the_exported_run_and_weights(tiny_caption_run, tiny_export):
    """What re-exporting a shipped captioner with the current graph starts from."""
    from seq2seq.tasks.captioning.pipeline import CaptionRun, load_export

    run, model = load_export(tiny_export)
    trained = CaptionRun.load(tiny_caption_run)
    assert run.vocab.tokens == trained.vocab.tokens and run.config.model == trained.config.model
    for restored, original in zip(model.weights, trained.load_model().weights, strict=True):
        np.testing.assert_array_equal(restored.numpy(), original.numpy())


def test_export_from_model_keeps_the_weights_and_sets_the_pixel_limit(tiny_export, images, tmp_path, capsys):
    """`export --from-model` writes an export again with the current graph and its weights;
    `--max-pixels` is the limit the served graph holds images to."""
    import tensorflow as tf

    again = tmp_path / "again"
    assert caption.main(["export", "--from-model", str(tiny_export), "--output", str(again), "--max-pixels", "1500"]) == 0
    old, new = tf.saved_model.load(str(tiny_export)), tf.saved_model.load(str(again / "1"))
    assert int(new.info()["max_pixels"]) == 1500
    for before, after in zip(old.model_variables, new.model_variables):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    small, large = images["good"][0], images["odd"]  # 32x32 (1,024 pixels) and 50x40 (2,000)
    served = new.signatures["serving_default"](images=tf.constant([Path(small).read_bytes(), Path(large).read_bytes()]))
    errors = [error.decode() for error in served["errors"].numpy()]
    assert errors[0] == "" and "over the limit of 1,500 pixels" in errors[1], errors
    code, _, err = run_cli(capsys, "export", "--output", str(tmp_path / "x"))
    assert code == 2 and "give either --run-dir" in err


def test_exported_caption_with_prefix_signature_matches_the_in_process_captioner(loaded_export, tiny_caption_run, images):
    import tensorflow as tf

    from seq2seq.tasks.captioning.pipeline import CaptionRun

    run = CaptionRun.load(tiny_caption_run)
    captioner = run.captioner(run.load_model())
    word = next(token for token in captioner.vocab.tokens if token.isalpha())
    batch = tf.constant([path.read_bytes() for path in images["good"][:2]])
    prefixes = tf.constant([word, ""])
    served = loaded_export.signatures["caption_with_prefix"](images=batch, prefixes=prefixes, beam_size=tf.constant(3))
    expected = captioner.prefix_function()(images=batch, prefixes=prefixes, beam_size=tf.constant(3))
    assert served["captions"].numpy().tolist() == expected["captions"].numpy().tolist()
    assert served["captions"].numpy()[0].decode().split()[0] == word


def test_cli_and_export_fit_other_shapes_alike_and_old_exports_squash(tiny_caption_run, loaded_export, images, capsys):
    """The tiny run pads a non-square image to a square (image_fit "pad", in the export's info); the
    CLI (Pillow) and the export (in-graph) do it alike, hence the same captions. An export made before
    image_fit existed has no such entry, and the CLI squashes for it, as its graph does."""
    import tensorflow as tf

    assert loaded_export.info()["image_fit"].numpy() == b"pad"
    paths = [images["odd"], images["jpeg"]]  # 50x40
    code, out, err = run_cli(capsys, "caption", *paths, "--model", tiny_caption_run, "--beam-size", "2")
    assert code == 0, err
    served = loaded_export.signatures["caption_with_attention"](
        images=tf.constant([Path(path).read_bytes() for path in paths]), beam_size=tf.constant(2)
    )
    assert out.split("\n")[:-1] == [caption.decode() for caption in served["captions"].numpy()]

    class OldExport:
        @staticmethod
        def info():
            return {"image_size": tf.constant(64), "max_pixels": tf.constant(10, tf.int64)}

    assert caption.model_info(OldExport()) == {"image_size": 64, "max_pixels": 10, "image_fit": "squash"}
