"""Shared fixtures: a generated toy parallel corpus, and tiny translation runs trained and
exported once per test session through the command line (`seq2seq.translate.main`).

The corpus is generated, not read from disk, so the tests never depend on downloaded data.
Models are tiny (16 units, 30 steps): the tests check plumbing, not translation quality.
"""

import os
import random
import re
import subprocess
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# A toy English -> German language: subject verb object, translated word group by word group.
SUBJECTS = {"a man": "ein mann", "a woman": "eine frau", "a dog": "ein hund", "a child": "ein kind",
            "the boy": "der junge", "the girl": "das mädchen"}
VERBS = {"is riding": "fährt", "is eating": "isst", "sees": "sieht", "is holding": "hält", "likes": "mag"}
OBJECTS = {"a bike": "ein fahrrad", "an apple": "einen apfel", "a ball": "einen ball", "the car": "das auto",
           "a book": "ein buch", "the horse": "das pferd"}

SAMPLE_SENTENCES = ["a man is riding a bike .", "the girl sees a ball .", "a dog likes the horse ."]

# Flags that keep a training run to a few seconds on a busy CPU.
TINY_MODEL = ["--units", "16", "--dropout", "0", "--label-smoothing", "0", "--learning-rate", "0.02",
              "--batch-size", "32", "--verbose", "0", "--no-tensorboard"]

TINY_CAPTION_TRAIN = [
    "--shapes-train", "40", "--shapes-val", "8", "--shapes-seed", "3", "--image-size", "32", "--units", "16",
    "--batch-size", "16", "--max-steps", "4", "--steps-per-checkpoint", "2", "--no-tensorboard", "--verbose", "0",
    "--image-fit", "pad",  # not the default: so the CLI and export tests cover padding (squashing: test_caption_serving)
]


# Child-process code defining `own_peak_rss_kb()`: the process's own high-water mark (VmHWM).
# Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a child started from a
# large pytest process reports the parent's size, whatever the child itself used.
OWN_PEAK_RSS = (
    "def own_peak_rss_kb():\n"
    "    with open('/proc/self/status') as status:\n"
    "        return next(int(line.split()[1]) for line in status if line.startswith('VmHWM:'))\n"
)

# Runs the translate command on ARGS and prints `maxrss_kb N`, the peak memory of the process,
# on the last stderr line (through `main`: the console command ends the process without teardown).
MEASURED_TRANSLATE = OWN_PEAK_RSS + (
    "import sys\n"
    "from seq2seq.translate import main\n"
    "code = 1\n"
    "try:\n    code = main(sys.argv[1:])\n"
    "finally:\n    print('maxrss_kb', own_peak_rss_kb(), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


# What TensorFlow's C++ runtime writes to stderr on import whatever TF_CPP_MIN_LOG_LEVEL says.
_TF_NOISE = re.compile(
    r"^([IWEF]\d{4} \S+ +\d+ \S+:\d+\]|WARNING: All log messages before absl"
    r"|To enable the following instructions:)"
)


def toy_pairs(count, seed=0):
    rng = random.Random(seed)
    sources, targets = [], []
    for _ in range(count):
        s, v, o = rng.choice(list(SUBJECTS)), rng.choice(list(VERBS)), rng.choice(list(OBJECTS))
        sources.append(f"{s} {v} {o} .")
        targets.append(f"{SUBJECTS[s]} {VERBS[v]} {OBJECTS[o]} .")
    return sources, targets


def write_lines(path, lines):
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return Path(path)


def cli(*args):
    """Runs `python -m seq2seq.translate ARGS` in this process; returns its exit code."""
    from seq2seq.translate import main

    return main([str(a) for a in args])


class Background:
    """A command started now and collected later, so that slow start-ups (each fresh Python
    imports TensorFlow) overlap. Output goes to files: a chatty child never blocks on a pipe."""

    def __init__(self, args, directory, input=None, cwd=None, timeout=180):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.args = [str(a) for a in args]
        self.timeout = timeout
        self._stdout = open(directory / "stdout", "w+b")
        self._stderr = open(directory / "stderr", "w+b")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(PROJECT_ROOT))
        self.process = subprocess.Popen(
            self.args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=self._stdout, stderr=self._stderr, cwd=cwd or PROJECT_ROOT, env=env,
        )
        if input is not None:
            self.process.stdin.write(input.encode("utf-8") if isinstance(input, str) else input)
            self.process.stdin.close()
        self._completed = None

    def result(self):
        """The CompletedProcess (bytes stdout and stderr), waiting for the command to end."""
        if self._completed is None:
            try:
                code = self.process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
            outputs = []
            for file in (self._stdout, self._stderr):
                file.seek(0)
                outputs.append(file.read())
                file.close()
            self._completed = subprocess.CompletedProcess(self.args, code, *outputs)
        return self._completed

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def user_stderr(stderr):
    """stderr without TensorFlow's start-up log lines: what the command itself said."""
    return "\n".join(line for line in stderr.splitlines() if line.strip() and not _TF_NOISE.match(line))


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    """Directory with train.en/train.de (300 pairs) and valid.en/valid.de (20 pairs)."""
    directory = tmp_path_factory.mktemp("toy_corpus")
    sources, targets = toy_pairs(320)
    write_lines(directory / "train.en", sources[:300])
    write_lines(directory / "train.de", targets[:300])
    write_lines(directory / "valid.en", sources[300:])
    write_lines(directory / "valid.de", targets[300:])
    return directory


def _train_and_export(directory, corpus, extra_flags):
    run_dir = directory / "run"
    code = cli(
        "train", "--train-source", corpus / "train.en", "--train-target", corpus / "train.de",
        "--valid-source", corpus / "valid.en", "--valid-target", corpus / "valid.de",
        "--max-steps", 30, "--steps-per-checkpoint", 15, "--no-validation-bleu", "--output-dir", run_dir,
        *TINY_MODEL, *extra_flags,
    )
    assert code == 0, "training the fixture model failed"
    code = cli("export", "--run-dir", run_dir, "--output", directory / "export", "--version", 1)
    assert code == 0, "exporting the fixture model failed"
    return run_dir, directory / "export" / "1"


@pytest.fixture(scope="session")
def word_model(tmp_path_factory, toy_corpus):
    """(run_dir, export_dir) of a tiny word-level model; export_dir is `<model>/1`."""
    return _train_and_export(tmp_path_factory.mktemp("word_model"), toy_corpus, [])


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory, toy_corpus):
    """(run_dir, export_dir) of a tiny SentencePiece model (vocabularies of about 100 pieces)."""
    return _train_and_export(
        tmp_path_factory.mktemp("sentencepiece_model"), toy_corpus,
        ["--scheme", "sentencepiece", "--source-vocab-size", 100, "--target-vocab-size", 100],
    )


@pytest.fixture(scope="session")
def word_translator(word_model):
    """The in-process Translator of the word-level run (best weights), traced once a session."""
    from seq2seq.tasks.translation.pipeline import TranslationRun

    run = TranslationRun.load(word_model[0])
    return run.translator(run.load_model())


@pytest.fixture(scope="session")
def tiny_caption_run(tmp_path_factory):
    """A tiny captioning run (a few steps on 32x32 synthetic shapes), trained once for the suite."""
    from seq2seq import caption

    run_dir = tmp_path_factory.mktemp("caption") / "run"
    assert caption.main(["train", *TINY_CAPTION_TRAIN, "--output-dir", str(run_dir)]) == 0
    return run_dir
