"""`python -m seq2seq.translate`: train / translate / evaluate / export from the terminal.

Most commands run in-process through `seq2seq.translate.main` (fast: TensorFlow is already
imported); stdin handling and one error path run as real subprocesses.
"""

import gzip
import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import (MEASURED_TRANSLATE, PROJECT_ROOT, SAMPLE_SENTENCES, TINY_MODEL, Background, cli, toy_pairs,
                      user_stderr, write_lines)
from seq2seq.text import UNK, UNK_ID, Vocabulary, WordTokenizer

LONG_LINE_WORDS = 10_000


def error_line(capsys, code):
    """Asserts the command failed with exactly one `error: ...` line; returns it."""
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def train_flags(corpus, run_dir, steps=2):
    return ["--train-source", corpus / "train.en", "--train-target", corpus / "train.de", "--output-dir", run_dir,
            "--max-steps", steps, "--steps-per-checkpoint", steps, "--no-validation-bleu", *TINY_MODEL]


# --- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, flags",
    [
        ("train", ["--config", "--output-dir", "--train-source", "--train-tsv", "--tfds-name", "--max-steps",
                   "--scheme", "--max-source-length"]),
        ("translate", ["--beam-size", "--n-best", "--length-penalty", "--model", "--input", "--plot-alignment",
                       "--replace-unknown"]),
        ("evaluate", ["--references", "--hypotheses", "--source", "--json", "--model"]),
        ("export", ["--run-dir", "--output", "--version", "--beam-size"]),
    ],
)
def test_help_of_every_subcommand_exits_0_and_lists_its_flags(capsys, command, flags):
    with pytest.raises(SystemExit) as exit_info:
        cli(command, "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text, f"{command} --help does not mention {flag}"


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in ("train", "translate", "evaluate", "export"))


# --- errors: one line, non-zero exit, before any training ----------------------------------------


def test_missing_input_file_is_one_error_line(capsys, tmp_path, word_model, commands):
    # (Asking for `commands` here starts the module's subprocesses early: they run alongside the in-process tests.)
    line = error_line(capsys, cli("translate", "--model", word_model[1], "--input", tmp_path / "nope.txt"))
    assert "nope.txt" in line and "not found" in line


def test_missing_training_file_names_it(capsys, tmp_path, toy_corpus):
    flags = train_flags(toy_corpus, tmp_path / "run")
    flags[1] = tmp_path / "missing.en"
    line = error_line(capsys, cli("train", *flags))
    assert "missing.en" in line and "not found" in line
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_invalid_utf8_training_file_names_file_and_line_before_training(capsys, tmp_path, toy_corpus):
    sources, targets = toy_pairs(10)
    bad = tmp_path / "bad.en"
    bad.write_bytes("\n".join(sources[:2]).encode() + b"\nein \xff\xfe mann\n" + "\n".join(sources[3:]).encode() + b"\n")
    target = write_lines(tmp_path / "ok.de", targets)
    run_dir = tmp_path / "run"
    line = error_line(capsys, cli("train", "--train-source", bad, "--train-target", target, "--output-dir", run_dir,
                                  "--max-steps", 2, *TINY_MODEL))
    assert f"{bad}:3:" in line and "UTF-8" in line
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def test_parallel_files_with_different_line_counts_name_both_files(capsys, tmp_path):
    sources, targets = toy_pairs(10)
    source = write_lines(tmp_path / "a.en", sources)
    target = write_lines(tmp_path / "a.de", targets[:7])
    line = error_line(capsys, cli("train", "--train-source", source, "--train-target", target,
                                  "--output-dir", tmp_path / "run", "--max-steps", 2))
    assert str(source) in line and str(target) in line and "10" in line and "7" in line
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_one_error_line(capsys, tmp_path, toy_corpus):
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  train_source: {toy_corpus / 'train.en'}\n  train_target: {toy_corpus / 'train.de'}\n"
                      f"model:\n  unitz: 16\ntraining:\n  output_dir: {tmp_path / 'run'}\n")
    line = error_line(capsys, cli("train", "--config", config))
    assert "unitz" in line and "model" in line


@pytest.mark.parametrize("text, message", [
    ("data: [unclosed\n", "not valid YAML"),
    ("- data\n- model\n", "expected a mapping with sections"),
    ("", "give an output directory"),
])
def test_bad_config_file_is_one_error_line(capsys, tmp_path, text, message):
    """The same config path as `caption train`: a broken or list-shaped YAML names the file."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    line = error_line(capsys, cli("train", "--config", config))
    assert message in line
    if text:
        assert str(config) in line


def test_flags_override_the_config_file_section_by_field(tmp_path, toy_corpus):
    from seq2seq.cli import train_config
    from seq2seq.translate import build_parser
    from seq2seq.tasks.translation.config import TranslationConfig

    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  train_source: {toy_corpus / 'train.en'}\n  train_target: {toy_corpus / 'train.de'}\n"
                      f"model:\n  units: 16\n  dropout: 0.2\ntraining:\n  output_dir: {tmp_path / 'run'}\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--units", "32"])
    resolved = train_config(TranslationConfig, args)
    assert resolved.model.units == 32 and resolved.model.dropout == 0.2
    assert resolved.training.output_dir == str(tmp_path / "run")


def test_a_run_directory_is_read_where_it_is_now_and_a_folder_without_a_run_is_named(tmp_path, toy_corpus):
    """Both tasks' Run.load read a run's config through SectionedConfig.load_run."""
    from seq2seq.errors import DataError
    from seq2seq.tasks.captioning.config import CaptionConfig
    from seq2seq.tasks.translation.config import TranslationConfig

    config = TranslationConfig.from_dict({"data": {"train_source": str(toy_corpus / "train.en"),
                                                   "train_target": str(toy_corpus / "train.de")},
                                          "training": {"output_dir": "/where/it/trained"}})
    moved = tmp_path / "moved_run"
    moved.mkdir()
    config.save(moved / "config.yaml")
    assert TranslationConfig.load_run(moved, "translation").training.output_dir == str(moved)
    with pytest.raises(DataError, match=r"empty: not a captioning run directory \(no config.yaml\)"):
        CaptionConfig.load_run(tmp_path / "empty", "captioning")


def test_train_without_output_dir_is_one_error_line(capsys, toy_corpus):
    line = error_line(capsys, cli("train", "--train-source", toy_corpus / "train.en",
                                  "--train-target", toy_corpus / "train.de"))
    assert "--output-dir" in line


# --- translate -------------------------------------------------------------------------------


def test_translate_texts_given_as_arguments(capsys, word_model):
    assert cli("translate", "--model", word_model[1], *SAMPLE_SENTENCES) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SAMPLE_SENTENCES)
    assert all(line.strip() for line in lines)


def test_translate_input_file_keeps_one_output_line_per_input_line(capsys, tmp_path, word_model):
    inputs = [SAMPLE_SENTENCES[0], "", "   ", "\t", SAMPLE_SENTENCES[1], ""]
    path = write_lines(tmp_path / "input.en", inputs)
    assert cli("translate", "--model", word_model[1], "--input", path, "--beam-size", 2) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(inputs)
    assert [line == "" for line in lines[:-1]] == [False, True, True, True, False, True]


def test_a_batch_of_only_empty_lines_translates_to_empty_lines(capsys, word_model):
    # Every source has zero tokens, so the padded batch would be [N, 0]: the graph keeps one PAD column.
    assert cli("translate", "--model", word_model[1], "--beam-size", 3, "", "  ", "\u200b") == 0
    assert capsys.readouterr().out == "\n\n\n"


STDIN_INPUTS = [SAMPLE_SENTENCES[0], "", "  \t ", " ".join((["a", "man", "is", "riding", "a", "bike"] * 1700)[:LONG_LINE_WORDS]),
                SAMPLE_SENTENCES[1], "\u3000"]

SHORT_INPUTS = [line for line in STDIN_INPUTS if len(line) < 1000]



@pytest.fixture(scope="module")
def commands(tmp_path_factory, word_model):
    """The module's subprocesses, started together so their TensorFlow start-ups overlap:
    stdin with ordinary, empty, whitespace-only and a 10,000-word line; and invalid UTF-8 on stdin."""
    directory = tmp_path_factory.mktemp("cli_commands")
    started = {
        "stdin": Background([sys.executable, "-c", MEASURED_TRANSLATE, "translate", "--model", word_model[1]],
                            directory / "stdin", input="\n".join(STDIN_INPUTS) + "\n", timeout=120),
        "stdin_short": Background([sys.executable, "-c", MEASURED_TRANSLATE, "translate", "--model", word_model[1]],
                                  directory / "stdin_short", input="\n".join(SHORT_INPUTS) + "\n", timeout=120),
        "texts": Background([sys.executable, "-m", "seq2seq.translate", "translate", "--model", word_model[1],
                             *SAMPLE_SENTENCES[:3]], directory / "texts", timeout=120),
        "bad_utf8": Background([sys.executable, "-m", "seq2seq.translate", "translate", "--model", word_model[1]],
                               directory / "bad_utf8", input=b"a man is riding a bike .\nein \xff mann\n",
                               timeout=120),
    }
    yield started
    for command in started.values():
        command.stop()


@pytest.fixture(scope="module")
def stdin_run(commands):
    completed = commands["stdin"].result()
    return STDIN_INPUTS, subprocess.CompletedProcess(
        completed.args, completed.returncode, completed.stdout.decode(), completed.stderr.decode()
    )


def test_invalid_utf8_on_stdin_fails_in_a_subprocess_without_traceback(commands):
    completed = commands["bad_utf8"].result()
    stderr = user_stderr(completed.stderr.decode("utf-8", "replace"))
    assert completed.returncode == 2
    assert stderr.splitlines() == ["error: <stdin>:2: not valid UTF-8 (invalid start byte)"], stderr
    assert completed.stdout == b""


def test_translate_stdin_to_stdout_line_by_line(stdin_run):
    inputs, completed = stdin_run
    assert completed.returncode == 0, completed.stderr
    outputs = completed.stdout.split("\n")
    assert outputs[-1] == "" and len(outputs) - 1 == len(inputs)
    assert outputs[0].strip() and outputs[4].strip()


def test_empty_and_whitespace_lines_translate_to_empty_lines(stdin_run):
    inputs, completed = stdin_run
    outputs = completed.stdout.split("\n")
    for index in (1, 2, 5):
        assert outputs[index] == "", f"input line {index + 1} {inputs[index]!r} gave {outputs[index]!r}"


def test_a_10000_word_line_is_truncated_with_a_warning(stdin_run, commands):
    """Truncated before it reaches the model: the line costs no more memory than short ones
    (the same command without it is the baseline, so the bound holds on any machine)."""
    _, completed = stdin_run
    stderr = user_stderr(completed.stderr)
    assert "warning: line 4 is longer than the maximum source length and was truncated" in stderr
    assert completed.stdout.split("\n")[3].strip()
    peak_kb = int(stderr.split("maxrss_kb")[-1])
    short = commands["stdin_short"].result()
    assert short.returncode == 0, short.stderr
    baseline_kb = int(short.stderr.decode().split("maxrss_kb")[-1])
    assert peak_kb - baseline_kb < 500_000, f"the 10,000-word line raised the peak from {baseline_kb} to {peak_kb} kB"


def test_n_best_prints_tab_separated_hypotheses(capsys, word_model):
    assert cli("translate", "--model", word_model[1], "--beam-size", 4, "--n-best", 3, *SAMPLE_SENTENCES[:2]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all(len(line.split("\t")) == 3 for line in lines)


@pytest.mark.parametrize("flags, message", [
    (["--beam-size", 2, "--n-best", 3], "--n-best must be between 1 and --beam-size (2), got 3"),
    (["--beam-size", 1, "--n-best", 2], "--n-best must be between 1 and --beam-size (1), got 2"),
])
def test_impossible_search_flags_are_one_error_line(capsys, word_model, flags, message):
    line = error_line(capsys, cli("translate", "--model", word_model[1], *flags, SAMPLE_SENTENCES[0]))
    assert line == f"error: {message}"


def test_a_terminal_on_stdin_gets_each_translation_as_soon_as_the_line_is_entered(word_model):
    import pty
    import select

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "seq2seq.translate", "translate", "--model", str(word_model[1]), "--beam-size", "2"],
        stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=PROJECT_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    os.close(terminal)
    try:
        os.write(controller, (SAMPLE_SENTENCES[0] + "\n").encode())
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready, "no translation while stdin is still open"
        first = process.stdout.readline().decode()
        assert first.strip()
        os.write(controller, b"\n\x04")  # an empty line, then end of input (Ctrl-D)
        rest, _ = process.communicate(timeout=60)
        assert rest.decode() == "\n" and process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)


def test_plot_alignment_writes_a_png(capsys, tmp_path, word_model):
    png = tmp_path / "alignment.png"
    assert cli("translate", "--model", word_model[1], "--plot-alignment", png, SAMPLE_SENTENCES[0]) == 0
    assert "alignment" in capsys.readouterr().err
    from PIL import Image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 100


def test_unknown_words_map_to_the_unknown_token(word_model):
    from seq2seq.tasks.translation.pipeline import TranslationRun

    run = TranslationRun.load(word_model[0])
    tokens = run.source_tokenizer.tokenize(tf.constant(["a zebra is riding a xylophone ."]))
    ids = run.source_vocab.lookup_ids(tokens).to_list()[0]
    assert ids[1] == UNK_ID and ids[5] == UNK_ID
    assert UNK_ID not in ids[:1] + ids[2:5] + ids[6:]


class FixedOutputModel:
    """A stand-in for Seq2SeqModel whose `generate` spells fixed target ids, each attending
    one-hot to a given source position."""

    variables = []

    def __init__(self, ids, attended_positions):
        self.ids = ids
        self.attended_positions = attended_positions

    def generate(self, source_ids, search="greedy", max_length=None, **_):
        batch_size, source_length = tf.shape(source_ids)[0], tf.shape(source_ids)[1]
        ids = tf.tile(tf.constant(self.ids, tf.int32)[None, None], [batch_size, 1, 1])  # [N, 1, T]
        lengths = tf.fill([batch_size, 1], len(self.ids) - 1)  # the last id is EOS
        scores = tf.zeros([batch_size, 1])
        attention = tf.one_hot(self.attended_positions, source_length)  # [T, S]
        attention = tf.tile(attention[None, None], [batch_size, 1, 1, 1])  # [N, 1, T, S]
        return ids, lengths, scores, scores, attention


@pytest.mark.parametrize("replace_unknown, expected", [
    (True, "the Haus is blau."),
    (False, "the <unk> is <unk>."),
])
def test_replace_unknown_uses_the_most_attended_source_word(replace_unknown, expected):
    from seq2seq.tasks.translation.translator import Translator

    source_vocab = Vocabulary(["<pad>", "<unk>", "<s>", "</s>", "das", "ist", "."])
    target_vocab = Vocabulary(["<pad>", "<unk>", "<s>", "</s>", "the", "is", "."])
    # the <unk> is <unk> . </s>, attending to das Haus ist blau . (positions 0 1 2 3 4)
    model = FixedOutputModel(ids=[4, UNK_ID, 5, UNK_ID, 6, 3], attended_positions=[0, 1, 2, 3, 4, 4])
    translator = Translator(model, WordTokenizer(), WordTokenizer(), source_vocab, target_vocab,
                            replace_unknown=replace_unknown)
    for beam_size in (1, 3):
        out = translator.translate(tf.constant(["das Haus ist blau .", "  "]), tf.constant(beam_size),
                                   tf.constant(1), tf.constant(0.6))
        assert [t.decode() for t in out["translations"].numpy()] == [expected, ""]
    assert UNK in target_vocab.tokens


# --- evaluate --------------------------------------------------------------------------------


def test_evaluate_prints_bleu_chrf_and_signatures_and_writes_json(capsys, tmp_path):
    references = write_lines(tmp_path / "ref.de", ["ein mann fährt ein fahrrad .", "das mädchen sieht einen ball ."])
    hypotheses = write_lines(tmp_path / "hyp.de", ["ein mann fährt das auto .", "das mädchen sieht einen ball ."])
    scores_path = tmp_path / "scores.json"
    assert cli("evaluate", "--references", references, "--hypotheses", hypotheses, "--json", scores_path) == 0
    out = capsys.readouterr().out
    assert "BLEU = " in out and "chrF = " in out
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in out
    scores = json.loads(scores_path.read_text())
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed") and "chrf_signature" in scores
    assert scores["sentences"] == 2


def test_hypotheses_identical_to_references_score_bleu_100(capsys, tmp_path, toy_corpus):
    references = toy_corpus / "valid.de"
    assert cli("evaluate", "--references", references, "--hypotheses", references, "--json", tmp_path / "s.json") == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["bleu"] == 100.0 and scores["chrf"] == 100.0
    assert "BLEU = 100.00" in capsys.readouterr().out


def test_evaluate_translates_a_source_file_with_a_model(capsys, tmp_path, toy_corpus, word_model):
    assert cli("evaluate", "--references", toy_corpus / "valid.de", "--source", toy_corpus / "valid.en",
               "--model", word_model[1], "--beam-size", 2, "--json", tmp_path / "s.json") == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["sentences"] == 20 and 0 <= scores["bleu"] <= 100


def test_evaluate_with_different_line_counts_is_one_error_line(capsys, tmp_path):
    references = write_lines(tmp_path / "ref.de", ["a", "b", "c"])
    hypotheses = write_lines(tmp_path / "hyp.de", ["a", "b"])
    line = error_line(capsys, cli("evaluate", "--references", references, "--hypotheses", hypotheses))
    assert "2 hypotheses but 3 references" in line and "ref.de" in line


# --- train -----------------------------------------------------------------------------------


def test_sentencepiece_run_reports_validation_bleu_every_checkpoint(capsys, tmp_path, toy_corpus):
    """Regression: seeding after the tokenizers existed freed the SentencePiece op's model, and
    the first validation BLEU failed with "Resource ... SentencepieceOp ... does not exist"."""
    code = cli(
        "train", "--valid-source", toy_corpus / "valid.en", "--valid-target", toy_corpus / "valid.de",
        "--scheme", "sentencepiece", "--source-vocab-size", 100, "--target-vocab-size", 100,
        *[flag for flag in train_flags(toy_corpus, tmp_path / "run", steps=2) if flag != "--no-validation-bleu"],
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (captured.out + captured.err).count("validation BLEU (greedy):") == 1


def test_train_from_tfds_mock_data(capsys, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    run_dir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        code = cli("train", "--tfds-name", "ted_hrlr_translate/pt_to_en", "--tfds-data-dir", tmp_path / "tfds",
                   "--output-dir", run_dir, "--max-steps", 2, "--steps-per-checkpoint", 2, "--no-validation-bleu",
                   *TINY_MODEL)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "train: 40 pairs; valid: 40 pairs" in err
    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["step"] == 2
    assert len(Vocabulary.load(run_dir / "source.vocab")) > 4


def test_train_again_on_the_same_output_dir_resumes_and_reads_gzip(capsys, tmp_path, toy_corpus):
    run_dir = tmp_path / "run"
    paths = []
    for name in ("train.en", "train.de"):
        paths.append(tmp_path / f"{name}.gz")
        paths[-1].write_bytes(gzip.compress((toy_corpus / name).read_bytes()))
    flags = ["--train-source", paths[0], "--train-target", paths[1], "--output-dir", run_dir,
             "--steps-per-checkpoint", 5, "--no-validation-bleu", *TINY_MODEL, "--verbose", 2]
    assert cli("train", *flags, "--max-steps", 10) == 0
    assert "train: 300 pairs" in capsys.readouterr().err
    assert json.loads((run_dir / "training_summary.json").read_text())["step"] == 10
    assert cli("train", *flags, "--max-steps", 20) == 0
    captured = capsys.readouterr()
    assert "holds a run: continuing it" in captured.err
    assert "resuming from" in captured.out and "(step 10," in captured.out
    assert json.loads((run_dir / "training_summary.json").read_text())["step"] == 20


def test_train_from_tsv_reports_pairs_dropped_by_length(capsys, tmp_path):
    sources, targets = toy_pairs(60)
    sources[:5] = [sentence + " and a dog sees a ball too" for sentence in sources[:5]]  # 13+ tokens
    tsv = write_lines(tmp_path / "train.tsv", [f"{s}\t{t}" for s, t in zip(sources, targets)])
    code = cli("train", "--train-tsv", tsv, "--output-dir", tmp_path / "run", "--max-source-length", 10,
               "--max-steps", 2, "--steps-per-checkpoint", 2, "--no-validation-bleu", *TINY_MODEL)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "train: 60 pairs" in err
    assert "train: dropped 5 of 60 pairs" in err and "longer than 10 source" in err
    assert "fährt" in Vocabulary.load(tmp_path / "run" / "target.vocab").tokens


def test_tsv_line_with_too_few_columns_names_file_and_line(capsys, tmp_path):
    tsv = write_lines(tmp_path / "train.tsv", ["a man .\tein mann .", "no tab here", "x\ty"])
    line = error_line(capsys, cli("train", "--train-tsv", tsv, "--output-dir", tmp_path / "run", "--max-steps", 2))
    assert f"{tsv}:2:" in line


def test_translate_lines_decodes_batches_side_by_side_and_keeps_input_order():
    """Later batches finish first here; the results and raw outputs still come in input order,
    the same as one batch at a time, and two batches really were decoded at once."""
    import threading
    import time

    from seq2seq.tasks.translation.inference import translate_lines

    class SlowFirstBatches:
        def __init__(self):
            self.running, self.most_at_once, self.lock = 0, 0, threading.Lock()

        def translate(self, texts, beam_size, n_best, length_penalty):
            with self.lock:
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            texts = [t.decode() for t in texts.numpy()]
            time.sleep(0.05 / len(texts[0]))  # the batches of short lines (first) take longest
            with self.lock:
                self.running -= 1
            return {
                "nbest_translations": tf.constant([[t[::-1]] for t in texts]),
                "source_truncated": tf.constant([False] * len(texts)),
            }

    lines = [("w" * (i % 7 + 1)) + f" {i}" for i in range(23)]
    expected = [line[::-1] for line in lines]
    model = SlowFirstBatches()
    outputs = []
    assert translate_lines(model, lines, batch_size=4, outputs=outputs) == expected
    assert model.most_at_once == 2
    assert [i for i, _ in outputs] == list(range(len(lines)))
    assert [out["nbest_translations"].numpy()[0].decode() for _, out in outputs] == expected
    one_at_a_time = SlowFirstBatches()
    assert translate_lines(one_at_a_time, lines, batch_size=4, concurrent_batches=1) == expected
    assert one_at_a_time.most_at_once == 1


def test_train_logged_to_a_file_writes_one_line_per_checkpoint_and_no_progress_bar(capsys, tmp_path, toy_corpus):
    """stdout and stderr are not terminals here (as in a redirected log): no `\\r` updates, one
    line a checkpoint with the step, losses, throughput and elapsed time."""
    code = cli("train", "--train-source", toy_corpus / "train.en", "--train-target", toy_corpus / "train.de",
               "--valid-source", toy_corpus / "train.en", "--valid-target", toy_corpus / "train.de",
               "--output-dir", tmp_path / "run", "--max-steps", 6, "--steps-per-checkpoint", 3,
               "--no-validation-bleu", *TINY_MODEL, "--verbose", 1)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "\r" not in out and "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("checkpoint ")]
    assert [line.split(",")[0] for line in lines] == ["checkpoint 1/2", "checkpoint 2/2"]
    assert "step 3, loss: " in lines[0] and "val_loss: " in lines[0] and "step 6," in lines[1]
    assert re.search(r"target tokens/s: \d+, .*elapsed \d+:\d\d:\d\d$", lines[1]), lines[1]


def test_version_names_the_verified_keras_and_tensorflow(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("--version")
    assert exit_info.value.code == 0
    assert re.fullmatch(r"seq2seq \d+\.\d+\.\d+ \(verified with Keras \d+\.\d+ and TensorFlow \d+\.\d+\)\n",
                        capsys.readouterr().out)


def test_a_console_translate_of_a_subword_export_starts_tensorflow_without_keras(capsys, sentencepiece_model):
    """A console `translate` of one SavedModel (`translate.start_runtime`) imports neither Keras
    nor matplotlib (`python -X importtime` lists every import) and still runs the SentencePiece
    ops, whose libraries it loads itself; its output is the in-process output."""
    text = "a man is riding a bike ."
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "seq2seq.translate", "translate", "--model", str(sentencepiece_model[1]),
         text], capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, user_stderr(completed.stderr)
    imported = {line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines() if line.startswith("import time:")}
    assert "tensorflow" in imported and "seq2seq.runtime" in imported
    assert not {"keras", "matplotlib", "tensorflow_text"} & imported
    assert cli("translate", "--model", sentencepiece_model[1], text) == 0
    assert completed.stdout == capsys.readouterr().out


def test_the_runtime_finds_tensorflow_texts_libraries_and_starts_only_before_tensorflow():
    """The layout `runtime.start_without_keras` relies on (if tensorflow-text moves its libraries,
    this fails, and commands quietly start the usual way); in a process that has imported
    TensorFlow it does nothing."""
    from seq2seq import runtime

    assert any("sentencepiece" in library.name for library in runtime.text_op_libraries())
    assert runtime.start_without_keras() is False
    assert not runtime.started_without_keras()


def test_a_text_op_library_that_does_not_load_is_one_error_line(tmp_path, word_model):
    """In a fresh process, a TensorFlow Text library that fails to load stops the command with
    one line naming it (`cli.start_runtime`), not a traceback."""
    broken = tmp_path / "_broken_ops.so"
    broken.write_text("not a shared library")
    script = (
        "import sys, types\n"
        "from pathlib import Path\n"
        "from seq2seq import cli, runtime\n"
        f"runtime.text_op_libraries = lambda: [Path({str(broken)!r})]\n"
        "try:\n"
        f"    cli.start_runtime(types.SimpleNamespace(own_process=True), {str(word_model[1])!r}, 'translation')\n"
        "except cli.CommandError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, user_stderr(done.stderr)
    assert done.stdout.startswith(f"cannot load TensorFlow Text's ops from {broken}"), done.stdout
    assert len(done.stdout.strip().splitlines()) == 1


def test_the_console_command_prints_every_translation_and_its_exit_code(capsys, commands, word_model):
    """A console run of a few texts skips the graph optimizer and ends without teardown
    (`cli.main(exit_process=True)`): the output is whole, the same as in-process, exit code 0."""
    completed = commands["texts"].result()
    assert completed.returncode == 0, completed.stderr
    assert cli("translate", "--model", word_model[1], *SAMPLE_SENTENCES[:3]) == 0
    assert completed.stdout.decode() == capsys.readouterr().out
    failed = subprocess.run([sys.executable, "-m", "seq2seq.translate", "translate", "--model", "no/such/model", "a dog"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert user_stderr(failed.stderr).strip().startswith("error: no/such/model")
