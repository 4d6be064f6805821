"""TensorFlow's native log lines stay off the user's terminal; everything else on stderr passes."""

import os
import subprocess
import sys

from conftest import PROJECT_ROOT
from seq2seq.quiet import _LineFilter, is_native_log_line

NATIVE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1796240646.956360    7499 port.cc:153] oneDNN custom operations are on.\n",
    b"E0000 00:00:1796240651.885521    7499 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n",
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow\n",
]
OURS = [b"error: x.png: not an image\n", b"\r 40%|####      | 4/10\r 50%|#####     | 5/10\n", b"Ein Hund rennt.\n", b"I\n"]


def test_native_lines_are_recognised_and_ours_are_not():
    assert all(is_native_log_line(line) for line in NATIVE)
    assert not any(is_native_log_line(line) for line in OURS)


def test_the_filter_drops_native_lines_split_anywhere_and_passes_partial_lines_at_once():
    stream = b"".join(line for pair in zip(NATIVE, OURS, strict=True) for line in pair)
    for chunk_size in (1, 3, 7, 64, len(stream)):
        written = []
        line_filter = _LineFilter(written.append)
        for start in range(0, len(stream), chunk_size):
            line_filter.feed(stream[start : start + chunk_size])
        line_filter.close()
        assert b"".join(written) == b"".join(OURS), chunk_size
    progress = []
    line_filter = _LineFilter(progress.append)
    line_filter.feed(b"\r 40%|####      | 4/10")
    assert b"".join(progress) == b"\r 40%|####      | 4/10"  # a progress bar's update shows before its line ends


def run_translate(*flags, env_extra=None):
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "seq2seq.translate", *flags, "translate", "A dog runs."],
        capture_output=True, env=env, cwd=PROJECT_ROOT, timeout=300,
    )


def test_translate_prints_no_native_log_line_and_tf_logs_brings_them_back():
    quiet = run_translate()
    assert quiet.returncode == 0 and quiet.stdout.strip(), quiet.stderr[-2000:]
    assert not [line for line in quiet.stderr.splitlines(keepends=True) if is_native_log_line(line)], quiet.stderr
    loud = run_translate("--tf-logs")
    assert loud.returncode == 0 and loud.stdout == quiet.stdout
    assert any(is_native_log_line(line) for line in loud.stderr.splitlines(keepends=True)), loud.stderr


def test_our_errors_still_reach_stderr():
    failed = subprocess.run(
        [sys.executable, "-m", "seq2seq.translate", "translate", "--model", "/no/such/model", "x"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
        env={key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"},
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == ["error: /no/such/model: model not found (give a SavedModel, a TF Serving model dir or a run dir)"]
