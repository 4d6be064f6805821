"""Streaming `translate` and `caption`: input read lazily in chunks, each chunk's output written
as soon as it is done, flat memory, progress only on a terminal; and `caption` of directories
and glob patterns.

The end-to-end checks drive `python -m seq2seq.translate` as a subprocess on a pipe (50,000
lines) and on a terminal (5,000 lines) with the tiny word model of conftest; the rest run in
process with small chunks, so that chunk boundaries are crossed with a handful of lines.
"""

import io
import os
import pty
import subprocess
import sys
import threading

import pytest
from PIL import Image

from conftest import MEASURED_TRANSLATE, PROJECT_ROOT, SAMPLE_SENTENCES, cli, user_stderr, write_lines
from seq2seq import caption, streaming
from seq2seq.cli import CommandError

# One input line pattern for the subprocess runs: sentences of different lengths, an empty
# and a whitespace-only line; 7 does not divide the chunk size, so chunks start mid-pattern.
PATTERN = [*SAMPLE_SENTENCES, "", "a woman is holding an apple .", "  ", "the boy is eating a book ."]
BIG_INPUT_LINES = 50_000
SMALL_INPUT_LINES = 5_000
FIRST_FEED_LINES = 3_000  # more than one chunk: the first chunk can be translated before the rest is sent
MEMORY_GROWTH_LIMIT_KB = 60_000



def pattern_lines(count):
    return [PATTERN[i % len(PATTERN)] for i in range(count)]


def peak_kb(stderr):
    return int(stderr.rsplit("maxrss_kb", 1)[-1].split()[0])


def child_env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(PROJECT_ROOT))


# --- the chunked reader and its helpers --------------------------------------------------------


@pytest.mark.parametrize("count, size, expected", [
    (7, 3, [[0, 1, 2], [3, 4, 5], [6]]),
    (6, 3, [[0, 1, 2], [3, 4, 5]]),
    (2, 5, [[0, 1]]),
    (3, 1, [[0], [1], [2]]),
    (0, 4, []),
])
def test_chunks_keep_order_and_end_with_the_partial_chunk(count, size, expected):
    assert list(streaming.chunks(range(count), size)) == expected


def test_chunks_take_no_more_than_one_chunk_ahead():
    taken = []

    def endless():
        number = 0
        while True:
            taken.append(number)
            yield number
            number += 1

    chunks = streaming.chunks(endless(), 4)
    assert next(chunks) == [0, 1, 2, 3] and len(taken) == 4
    assert next(chunks) == [4, 5, 6, 7] and len(taken) == 8


@pytest.mark.parametrize("count, small", [(0, True), (3, True), (4, False), (9, False)])
def test_ends_within_tells_a_small_input_reading_one_more_item_at_most(count, small):
    taken = []

    def items():
        for number in range(count):
            taken.append(number)
            yield number

    rest, within = streaming.ends_within(items(), 3)
    assert within == small and len(taken) == min(count, 4)
    assert list(rest) == list(range(count))


def test_chunks_refuse_a_size_below_1():
    with pytest.raises(ValueError, match="chunk size must be at least 1, got 0"):
        next(streaming.chunks([1], 0))


def test_decoded_lines_are_lazy_and_name_the_bad_line():
    stream = io.BytesIO(b"eins\r\nzwei\nein \xff mann\nvier\n")
    lines = streaming.decoded_lines(stream, "input.txt")
    assert [next(lines), next(lines)] == ["eins", "zwei"]
    with pytest.raises(CommandError, match=r"^input.txt:3: not valid UTF-8 \(invalid start byte\)$"):
        next(lines)


def test_input_lines_name_a_missing_file_before_reading_and_read_lazily(tmp_path):
    with pytest.raises(CommandError, match="nope.txt: file not found"):
        streaming.input_lines(tmp_path / "nope.txt")
    path = write_lines(tmp_path / "in.txt", ["a", "", "b"])
    assert list(streaming.input_lines(path)) == ["a", "", "b"]


@pytest.mark.parametrize("data, count", [(b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"\n\n\n", 3), (b"a\r\nb\r\n", 2)])
def test_count_lines_counts_what_input_lines_reads(tmp_path, data, count):
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    assert streaming.count_lines(path) == count == len(list(streaming.input_lines(path)))


def test_progress_off_a_terminal_draws_nothing_and_passes_notes_through(capsys):
    assert not streaming.progress_wanted()
    with streaming.Progress("sentences") as progress:
        progress.update(10)
        progress.write("warning: a note")
    assert capsys.readouterr().err == "warning: a note\n"


def test_truncation_warnings_name_the_line_of_the_whole_input():
    import tensorflow as tf

    from seq2seq.tasks.translation.inference import translate_lines

    class TruncatesLongLines:
        def translate(self, texts, beam_size, n_best, length_penalty):
            texts = [t.decode() for t in texts.numpy()]
            return {"nbest_translations": tf.constant([[t.upper()] for t in texts]),
                    "source_truncated": tf.constant([len(t) > 3 for t in texts])}

    warnings = []
    lines = ["ab", "abcdef", "a", "abcd"]
    assert translate_lines(TruncatesLongLines(), lines, first_line=2001, warn=warnings.append) == [line.upper() for line in lines]
    assert sorted(warnings) == [f"warning: line {n} is longer than the maximum source length and was truncated"
                                for n in (2002, 2004)]


def test_fewer_lines_than_concurrent_batches_hold_are_cut_into_one_batch_a_thread():
    """3 lines with two threads: batches of 2 and 1 (sorted by length), not one of 3; the
    translations, in input order, are the same as from one batch."""
    import tensorflow as tf

    from seq2seq.tasks.translation.inference import translate_lines

    sizes = []

    class Echo:
        def translate(self, texts, beam_size, n_best, length_penalty):
            texts = [t.decode() for t in texts.numpy()]
            sizes.append(len(texts))
            return {"nbest_translations": tf.constant([[t[::-1]] for t in texts]),
                    "source_truncated": tf.constant([False] * len(texts))}

    lines = ["abc", "a", "ab"]
    assert translate_lines(Echo(), lines, concurrent_batches=2) == ["cba", "a", "ba"]
    assert sorted(sizes) == [1, 2]
    sizes.clear()
    assert translate_lines(Echo(), lines, concurrent_batches=1) == ["cba", "a", "ba"] and sizes == [3]


def test_decoding_streams_one_a_core_on_one_thread_only_in_a_process_of_the_command_own(monkeypatch):
    from seq2seq import cli as commands

    assert commands.decoding_streams(own_process=False) == 2  # a notebook or this test process: untouched
    code = (
        "import os, tensorflow as tf; from seq2seq import cli; streams = cli.decoding_streams(True); "
        "print(streams, len(os.sched_getaffinity(0)), tf.config.threading.get_intra_op_parallelism_threads())"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TF_NUM_INTRAOP_THREADS"}
    streams, cores, threads = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment
    ).stdout.split()
    assert (int(streams), int(threads)) == ((int(cores), 1) if int(cores) > 1 else (2, 0))
    environment["TF_NUM_INTRAOP_THREADS"] = "2"
    streams, _, threads = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment
    ).stdout.split()
    assert (streams, threads) == ("2", "0")  # 0: the setting left to TensorFlow (and the user's variable)


# --- translate in process, with chunks of 2 lines ------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr("seq2seq.translate.SENTENCES_PER_CHUNK", 2)
    monkeypatch.setattr("seq2seq.caption.IMAGES_PER_CHUNK", 2)


def test_chunks_of_2_lines_translate_like_one_chunk(capsys, monkeypatch, tmp_path, word_model):
    path = write_lines(tmp_path / "input.en", [SAMPLE_SENTENCES[0], "", "   ", SAMPLE_SENTENCES[1], SAMPLE_SENTENCES[2]])
    flags = ["translate", "--model", word_model[1], "--input", path, "--beam-size", 3, "--n-best", 2]
    assert cli(*flags) == 0
    whole = capsys.readouterr().out
    monkeypatch.setattr("seq2seq.translate.SENTENCES_PER_CHUNK", 2)
    png = tmp_path / "alignment.png"
    assert cli(*flags, "--plot-alignment", png) == 0
    captured = capsys.readouterr()
    assert captured.out == whole
    lines = captured.out.split("\n")
    assert len(lines) == 6 and lines[-1] == ""
    assert all(len(line.split("\t")) == 2 for line in lines[:-1])  # (an empty line's two hypotheses are empty)
    assert [line == "\t" for line in lines[:-1]] == [False, True, True, False, False]
    assert captured.err.count("alignment of the first sentence written to") == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class RecordingStdin:
    """A stdin that hands out lines one by one and counts how many were taken."""

    def __init__(self, lines):
        self.taken = 0
        self.buffer = self._lines(lines)

    def _lines(self, lines):
        for line in lines:
            self.taken += 1
            yield line

    def isatty(self):
        return False


class RecordingStdout(io.StringIO):
    """A stdout that notes, at every flush, how many input lines had been taken by then."""

    def __init__(self, stdin):
        super().__init__()
        self.stdin = stdin
        self.flushes = []

    def flush(self):
        self.flushes.append((self.stdin.taken, self.getvalue().count("\n")))


def test_each_chunk_is_written_and_flushed_before_the_next_is_read(monkeypatch, word_model, small_chunks):
    stdin = RecordingStdin([f"{sentence}\n".encode() for sentence in SAMPLE_SENTENCES + SAMPLE_SENTENCES[:2]])
    stdout = RecordingStdout(stdin)
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli("translate", "--model", word_model[1], "--beam-size", 1) == 0
    assert stdout.flushes[:3] == [(2, 2), (4, 4), (5, 5)]


class ClosedStdout(io.StringIO):
    """The stdout of `translate ... | head -2`: the reader goes away after the first chunk."""

    def write(self, text):
        if self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_reader_that_stops_early_ends_the_command_quietly(capsys, monkeypatch, tmp_path, word_model, small_chunks):
    path = write_lines(tmp_path / "input.en", SAMPLE_SENTENCES * 2)
    stdout = ClosedStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli("translate", "--model", word_model[1], "--input", path, "--beam-size", 1) == streaming.EXIT_OUTPUT_CLOSED
    assert stdout.getvalue().count("\n") == 2 and capsys.readouterr().err == ""


def test_invalid_utf8_in_a_later_chunk_keeps_the_chunks_done(capsys, tmp_path, word_model, small_chunks):
    path = tmp_path / "input.en"
    path.write_bytes(b"".join(f"{s}\n".encode() for s in SAMPLE_SENTENCES + SAMPLE_SENTENCES[:1]) + b"ein \xff mann\n")
    code = cli("translate", "--model", word_model[1], "--input", path, "--beam-size", 1)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().splitlines() == [f"error: {path}:5: not valid UTF-8 (invalid start byte)"]
    assert captured.out.count("\n") == 4 and all(captured.out.split("\n")[:4])


# --- translate as a subprocess: output while the input still arrives, flat memory, progress ------


@pytest.fixture(scope="module")
def small_run_on_a_terminal(tmp_path_factory, word_model):
    """5,000 lines from a file with stderr on a terminal, started at once so that its TensorFlow
    start-up overlaps the 50,000-line run; gives (stdout lines, everything written to the terminal)."""
    directory = tmp_path_factory.mktemp("streaming")
    source = write_lines(directory / "input.en", pattern_lines(SMALL_INPUT_LINES))
    controller, terminal = pty.openpty()
    with open(directory / "stdout", "wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-c", MEASURED_TRANSLATE, "translate", "--model", str(word_model[1]), "--beam-size", "1",
             "--input", str(source)],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=terminal, cwd=PROJECT_ROOT, env=child_env(),
        )
    os.close(terminal)
    written = []

    def drain():  # the terminal's buffer is small: read it while the command runs
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # the command closed its end of the terminal
                break
            if not data:
                break
            written.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def stop():
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=10)

    def result():
        try:
            process.wait(timeout=180)
        finally:
            stop()
        return (directory / "stdout").read_text().split("\n"), b"".join(written).decode("utf-8", "replace")

    yield result
    stop()
    os.close(controller)


def test_50000_lines_from_a_pipe_stream_out_in_order_with_flat_memory(tmp_path, word_model, small_run_on_a_terminal):
    inputs = pattern_lines(BIG_INPUT_LINES)
    stderr_file = open(tmp_path / "stderr", "w+b")
    process = subprocess.Popen(
        [sys.executable, "-c", MEASURED_TRANSLATE, "translate", "--model", str(word_model[1]), "--beam-size", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file, cwd=PROJECT_ROOT, env=child_env(),
    )
    first_output_seen, all_input_sent = threading.Event(), threading.Event()

    def feed():
        try:
            data = [f"{line}\n".encode() for line in inputs]
            process.stdin.write(b"".join(data[:FIRST_FEED_LINES]))
            process.stdin.flush()
            first_output_seen.wait(timeout=120)  # without streaming no output comes: go on after the timeout
            process.stdin.write(b"".join(data[FIRST_FEED_LINES:]))
            process.stdin.close()
        except BrokenPipeError:
            pass
        finally:
            all_input_sent.set()

    watchdog = threading.Timer(240, process.kill)
    feeder = threading.Thread(target=feed, daemon=True)
    watchdog.start()
    feeder.start()
    try:
        first = process.stdout.readline()
        input_still_open = not all_input_sent.is_set()
        first_output_seen.set()
        outputs = [first.decode()] + [line.decode() for line in process.stdout]
        code = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        feeder.join(timeout=10)
    stderr_file.seek(0)
    stderr = user_stderr(stderr_file.read().decode("utf-8", "replace"))
    stderr_file.close()
    assert code == 0, stderr
    assert input_still_open, "the first translations came only after all the input was sent"
    assert len(outputs) == BIG_INPUT_LINES and all(line.endswith("\n") for line in outputs)
    outputs = [line[:-1] for line in outputs]
    translation_of = {}
    for source, output in zip(inputs, outputs):
        assert (output == "") == (source.strip() == ""), f"{source!r} gave {output!r}"
        translation_of.setdefault(source, set()).add(output)
    assert all(len(found) == 1 for found in translation_of.values()), translation_of
    assert len({output for output in outputs if output}) > 1  # distinct outputs: a line out of order would show
    assert [line for line in stderr.splitlines() if not line.startswith("maxrss_kb")] == [], stderr  # no progress off a terminal

    small_outputs, terminal = small_run_on_a_terminal()
    assert small_outputs[:-1] == outputs[:SMALL_INPUT_LINES] and small_outputs[-1] == ""
    assert f"{SMALL_INPUT_LINES}/{SMALL_INPUT_LINES}" in terminal and "sentences/s" in terminal
    big_kb, small_kb = peak_kb(stderr), peak_kb(terminal)
    print(f"peak RSS: {SMALL_INPUT_LINES} lines {small_kb / 1024:.1f} MB, {BIG_INPUT_LINES} lines {big_kb / 1024:.1f} MB")
    assert big_kb - small_kb < MEMORY_GROWTH_LIMIT_KB, f"{big_kb - small_kb} kB more for 10x the input"


# --- caption: directories, glob patterns, chunks -----------------------------------------------


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Four images with mixed-case extensions, an HTML page named .png, a text file, and a folder
    without images (named like an image)."""
    from seq2seq.tasks.captioning import shapes

    folder = tmp_path_factory.mktemp("photos")
    scenes = shapes.generate_scenes(4, seed=21, image_size=32)
    for name, scene in zip(["b.png", "a.PNG", "d.JPG", "c.webp"], scenes):
        Image.fromarray(scene.image).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_text("<html>404</html>")
    (folder / "empty.jpg").mkdir()  # a folder, named like an image: not one of the folder's images
    (folder / "empty.jpg" / "notes.txt").write_text("not an image")
    return folder


def run_caption(capsys, *argv):
    code = caption.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_directory_and_a_glob_pattern_stand_for_their_images_sorted(capsys, tiny_caption_run, photo_folder, small_chunks):
    model = ["--model", tiny_caption_run, "--beam-size", 1]
    by_name = [photo_folder / name for name in ("a.PNG", "b.png", "broken.png", "c.webp", "d.JPG")]
    code, explicit, err = run_caption(capsys, "caption", *by_name, *model)
    assert code == 0, err
    explicit = explicit.split("\n")[:-1]
    assert len(explicit) == 5 and explicit[2] == "" and all(explicit[:2] + explicit[3:])
    code, out, err = run_caption(capsys, "caption", photo_folder, *model)
    assert code == 0, err
    assert out.split("\n")[:-1] == explicit
    assert f"warning: skipping image: {photo_folder / 'broken.png'}" in err and "skipped 1 of 5 images" in err
    code, out, err = run_caption(capsys, "caption", f"{photo_folder}/*.png", photo_folder / "a.PNG", *model)
    assert code == 0, err
    assert out.split("\n")[:-1] == [explicit[1], explicit[2], explicit[0]]


@pytest.mark.parametrize("argument, message", [
    ("missing/*.jpg", "missing/*.jpg: no files match this pattern"),
    ("{folder}/*.gif", "{folder}/*.gif: no files match this pattern"),
    ("{folder}/empty.jpg", "{folder}/empty.jpg: directory holds no image files (jpg, jpeg, png, gif, webp, bmp)"),
])
def test_a_pattern_matching_nothing_or_an_empty_directory_is_a_one_line_error(capsys, tiny_caption_run, photo_folder,
                                                                                argument, message):
    code, out, err = run_caption(capsys, "caption", photo_folder / "a.PNG", argument.format(folder=photo_folder),
                                 "--model", tiny_caption_run)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {message.format(folder=photo_folder)}"]


def test_unreadable_images_across_chunks_keep_their_empty_lines(capsys, tiny_caption_run, photo_folder, small_chunks):
    broken, good = photo_folder / "broken.png", photo_folder / "a.PNG"
    code, out, err = run_caption(capsys, "caption", broken, broken, good, broken, broken, "--model", tiny_caption_run)
    assert code == 0, err
    lines = out.split("\n")
    assert len(lines) == 6 and [bool(line) for line in lines] == [False, False, True, False, False, False]
    assert "skipped 4 of 5 images" in err
    code, out, err = run_caption(capsys, "caption", broken, broken, broken, "--model", tiny_caption_run)
    assert code == 2 and out == ""
    assert err.strip().endswith("error: none of the 3 images could be read")
    code, out, err = run_caption(capsys, "caption", good, good, broken, good, "--model", tiny_caption_run, "--on-error", "raise")
    assert code == 2 and out.count("\n") == 2
    assert err.splitlines()[-1].startswith(f"error: {broken}: ")


def test_caption_paths_on_stdin_are_read_chunk_by_chunk(monkeypatch, tiny_caption_run, photo_folder, small_chunks, tmp_path):
    paths = [photo_folder / name for name in ("a.PNG", "b.png", "c.webp", "d.JPG", "a.PNG")]
    stdin = RecordingStdin([f"{path}\n".encode() for path in paths[:2]] + [b"\n"] + [f"{p}\n".encode() for p in paths[2:]])
    stdout = RecordingStdout(stdin)
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    png = tmp_path / "attention.png"
    assert caption.main(["caption", "--model", str(tiny_caption_run), "--beam-size", "1", "--plot-attention", str(png)]) == 0
    lines = stdout.getvalue().split("\n")[:-1]
    assert len(lines) == 6 and [bool(line) for line in lines] == [True, True, False, True, True, True]
    assert stdout.flushes[:3] == [(2, 2), (4, 4), (6, 6)]  # the blank line on stdin keeps its (empty) output line
    assert png.stat().st_size > 1000
