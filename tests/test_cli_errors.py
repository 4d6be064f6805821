"""Both CLIs' errors for input they cannot use: one `error: ...` line and exit code 2 (or, for
a flag's value, argparse's usage and `error: argument --flag: ...`), never a traceback, and no
option that is accepted only to give garbage; and `caption --input` keeps one output line per
input line. Every command runs in-process on the session's tiny runs and exports."""

import shutil

import pytest
from PIL import Image

from conftest import SAMPLE_SENTENCES, write_lines
from seq2seq import caption, cli, translate
from seq2seq.tasks.captioning import shapes

SHIPPED_CAPTIONER = max(caption.SHIPPED_MODEL.glob("[0-9]*"), key=lambda version: int(version.name))  # what TF Serving serves


def run(command, *argv):
    return command.main([str(arg) for arg in argv])


def error_line(capsys, code):
    """Asserts the command failed with exactly one `error: ...` line on stderr; returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def usage_error(capsys, command, *argv):
    """Asserts argparse refused the command line (usage, then one error line, exit 2); returns the error line."""
    with pytest.raises(SystemExit) as exit_info:
        run(command, *argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("usage: ") and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture
def caption_images(tmp_path):
    """Three 32x32 synthetic shapes PNGs."""
    paths = []
    for index, scene in enumerate(shapes.generate_scenes(3, seed=5, image_size=32)):
        paths.append(tmp_path / f"scene{index}.png")
        Image.fromarray(scene.image).save(paths[-1])
    return paths


# --- finding 7: one-line errors ---------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["saved_model.pb", "variables/variables.data-00000-of-00001", "variables/variables.index"])
def test_a_truncated_translation_export_is_one_error_line(capsys, tmp_path, word_model, damaged):
    export = shutil.copytree(word_model[1], tmp_path / "export")
    data = (export / damaged).read_bytes()
    (export / damaged).write_bytes(data[: len(data) // 2])
    line = error_line(capsys, run(translate, "translate", "--model", export, SAMPLE_SENTENCES[0]))
    assert line.startswith(f"error: {export}: cannot load this SavedModel") and "truncated" in line


def test_a_truncated_captioning_export_is_one_error_line(capsys, tmp_path, caption_images):
    export = shutil.copytree(SHIPPED_CAPTIONER, tmp_path / "export")
    data = (export / "saved_model.pb").read_bytes()
    (export / "saved_model.pb").write_bytes(data[:100])
    line = error_line(capsys, run(caption, "caption", "--model", export, caption_images[0]))
    assert line.startswith(f"error: {export}: cannot load this SavedModel") and "truncated" in line


def test_a_captioning_model_given_to_translate_names_the_caption_command(capsys, tiny_caption_run):
    for model, named in ((SHIPPED_CAPTIONER.parent, SHIPPED_CAPTIONER), (tiny_caption_run, tiny_caption_run)):
        line = error_line(capsys, run(translate, "translate", "--model", model, SAMPLE_SENTENCES[0]))
        assert line == f"error: {named} is an image-captioning model; use python -m seq2seq.caption"
    line = error_line(capsys, run(translate, "export", "--run-dir", tiny_caption_run, "--output", tiny_caption_run / "x"))
    assert line == f"error: {tiny_caption_run} is an image-captioning model; use python -m seq2seq.caption"


def test_a_translation_model_given_to_caption_names_the_translate_command(capsys, word_model, caption_images):
    for model in word_model:
        line = error_line(capsys, run(caption, "caption", "--model", model, caption_images[0]))
        assert line == f"error: {model} is a translation model; use python -m seq2seq.translate"
    line = error_line(capsys, run(caption, "export", "--run-dir", word_model[0], "--output", word_model[0] / "x"))
    assert line == f"error: {word_model[0]} is a translation model; use python -m seq2seq.translate"


def test_a_savedmodel_without_a_config_is_told_apart_by_its_functions(capsys, tmp_path):
    export = shutil.copytree(SHIPPED_CAPTIONER, tmp_path / "export")
    (export / "assets.extra" / "config.yaml").unlink()
    line = error_line(capsys, run(translate, "translate", "--model", export, SAMPLE_SENTENCES[0]))
    assert line == f"error: {export}: not a translation SavedModel (no translate function)"


@pytest.mark.parametrize("command", [translate, caption])
@pytest.mark.parametrize("text, message", [
    ("model: 5\n", "config section 'model' must be a mapping of keys to values, got 5"),
    ("training: [1, 2]\n", "config section 'training' must be a mapping of keys to values"),
    ("- 5\n", "expected a mapping with sections"),
    ("data: {a: [unclosed\n", "not valid YAML (line 2, column 1:"),
])
def test_a_config_of_the_wrong_shape_is_one_error_line(capsys, tmp_path, command, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    line = error_line(capsys, run(command, "train", "--config", config))
    assert line.startswith(f"error: {config}: ") and message in line


def test_a_config_that_is_not_utf8_or_is_a_directory_names_it(capsys, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"model:\n  units: \xff\n")
    line = error_line(capsys, run(translate, "train", "--config", config))
    assert line.startswith(f"error: {config}: not valid UTF-8")
    line = error_line(capsys, run(translate, "train", "--config", tmp_path))
    assert line == f"error: {tmp_path}: is a directory, not a config file"


def test_evaluate_with_empty_files_is_one_error_line(capsys, tmp_path):
    empty = write_lines(tmp_path / "empty.txt", [])
    line = error_line(capsys, run(translate, "evaluate", "--references", empty, "--hypotheses", empty))
    assert line == f"error: {empty}: no references to score (the file is empty)"


def test_corpus_scores_of_nothing_is_a_value_error():
    from seq2seq.tasks.translation.evaluation import corpus_scores

    with pytest.raises(ValueError, match="no sentences to score"):
        corpus_scores([], [])


def test_an_input_that_is_a_directory_is_named_as_one(capsys, tmp_path, word_model):
    line = error_line(capsys, run(translate, "translate", "--model", word_model[1], "--input", tmp_path))
    assert line == f"error: {tmp_path}: is a directory, not a file"
    hypotheses = write_lines(tmp_path / "hyp.txt", ["a"])
    line = error_line(capsys, run(translate, "evaluate", "--references", tmp_path, "--hypotheses", hypotheses))
    assert line == f"error: {tmp_path}: is a directory, not a file"


# --- finding 8: no option accepted only to give garbage ----------------------------------------


@pytest.mark.parametrize("command, argv, message", [
    (translate, ["translate", "--length-penalty", "nan", "x"], "argument --length-penalty: must be a finite number, got nan"),
    (translate, ["translate", "--length-penalty", "inf", "x"], "argument --length-penalty: must be a finite number, got inf"),
    (translate, ["evaluate", "--references", "r", "--length-penalty=-inf"], "argument --length-penalty: must be a finite number"),
    (translate, ["export", "--run-dir", "r", "--length-penalty", "nan"], "argument --length-penalty: must be a finite number"),
    (caption, ["caption", "--length-penalty", "nan", "x.png"], "argument --length-penalty: must be a finite number, got nan"),
    (caption, ["export", "--run-dir", "r", "--length-penalty", "inf"], "argument --length-penalty: must be a finite number"),
    (translate, ["translate", "--average-last", "-1", "x"], "argument --average-last: must be at least 1, got -1"),
    (translate, ["translate", "--average-last", "0", "x"], "argument --average-last: must be at least 1, got 0"),
    (translate, ["export", "--run-dir", "r", "--average-last", "0"], "argument --average-last: must be at least 1, got 0"),
    (translate, ["translate", "--beam-size", "0", "x"], "argument --beam-size: must be at least 1, got 0"),
    (translate, ["translate", "--beam-size", "1000", "x"], f"argument --beam-size: must be at most {cli.MAX_BEAM_SIZE}, got 1000"),
    (translate, ["export", "--run-dir", "r", "--beam-size", "65"], f"argument --beam-size: must be at most {cli.MAX_BEAM_SIZE}"),
    (caption, ["caption", "--beam-size", "0", "x.png"], "argument --beam-size: must be at least 1, got 0"),
    (caption, ["caption", "--beam-size", "1000", "x.png"], f"argument --beam-size: must be at most {cli.MAX_BEAM_SIZE}"),
    (caption, ["evaluate", "--shapes-test", "2", "--beam-size", "65"], f"argument --beam-size: must be at most {cli.MAX_BEAM_SIZE}"),
    (translate, ["translate", "--beam-size", "two", "x"], "argument --beam-size: expected an integer, got 'two'"),
    (translate, ["translate", "--batch-size", "0", "x"], "argument --batch-size: must be at least 1, got 0"),
    (translate, ["translate", "--n-best", "0", "x"], "argument --n-best: must be at least 1, got 0"),
    (translate, ["translate", "--input", "f.txt", "x"], "argument texts: not allowed with argument --input"),
    (translate, ["translate", "x", "--input", "f.txt"], "argument --input: not allowed with argument texts"),
    (caption, ["caption", "x.png", "--input", "f.txt"], "argument --input: not allowed with argument images"),
])
def test_flag_values_that_would_give_garbage_are_refused_by_argparse(capsys, command, argv, message):
    line = usage_error(capsys, command, *argv)
    assert f": error: {message}" in line, line


@pytest.mark.parametrize("command", [translate, caption])
def test_help_states_the_beam_size_bound(capsys, command):
    subcommand = "translate" if command is translate else "caption"
    with pytest.raises(SystemExit):
        run(command, subcommand, "--help")
    assert f"1 to {cli.MAX_BEAM_SIZE}" in " ".join(capsys.readouterr().out.split())


def test_average_last_more_checkpoints_than_the_run_has_is_one_error_line(capsys, word_model):
    run_dir = word_model[0]
    kept = len(list((run_dir / "checkpoints").glob("ckpt-*.index")))
    line = error_line(capsys, run(translate, "translate", "--model", run_dir, "--average-last", 99, SAMPLE_SENTENCES[0]))
    assert line == f"error: {run_dir}: cannot average the last 99 checkpoints, the run has only {kept}"


def test_load_trained_weights_refuses_a_count_below_1(word_model):
    from seq2seq.run import load_trained_weights

    with pytest.raises(ValueError, match="average_last must be at least 1, got -1"):
        load_trained_weights(None, word_model[0], average_last=-1)


def test_a_non_finite_length_penalty_is_refused_by_beam_search():
    from seq2seq.decoding import beam_search

    with pytest.raises(ValueError, match="length_penalty must be a finite number, got nan"):
        beam_search(None, None, None, 1, 2, 3, 5, beam_size=2, length_penalty=float("nan"))


# --- finding 9a: caption --input keeps one output line per input line --------------------------


def test_caption_input_list_with_blank_lines_keeps_line_n_for_input_line_n(capsys, tmp_path, tiny_caption_run, caption_images):
    listing = write_lines(tmp_path / "list.txt", ["", str(caption_images[0]), "   ", str(caption_images[1]), "",
                                                   str(caption_images[2])])
    code = run(caption, "caption", "--model", tiny_caption_run, "--beam-size", 1, "--input", listing)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.split("\n")[:-1]
    assert len(lines) == 6
    assert [bool(line) for line in lines] == [False, True, False, True, False, True]
    assert "blank input lines: 3 (their output lines are empty)" in captured.err


def test_caption_input_list_of_only_blank_lines_is_no_images(capsys, tmp_path):
    listing = write_lines(tmp_path / "list.txt", ["", "  ", ""])
    line = error_line(capsys, run(caption, "caption", "--input", listing))
    assert line.startswith("error: no images given")
