"""Keeps TensorFlow's native (C++) log lines off the user's terminal.

TensorFlow 2.21 writes them through absl before its logging is initialised, so neither
`TF_CPP_MIN_LOG_LEVEL` in `os.environ` nor Python's logging reaches them ("oneDNN custom
operations are on", "failed call to cuInit: ... CUDA error", CPU feature notes). The only
place to stop them is the process's file descriptor 2: `native_logs_filtered` points it at a
pipe and a thread forwards every line to the real stderr except the native log lines, so our
own messages, Python warnings and progress bars still print, in order and unbuffered.
"""

import contextlib
import os
import re
import sys
import threading

# "I0000 00:00:1796240576.827080    7213 port.cc:153] ..." (glog/absl format), and absl's banners.
_NATIVE_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d")
_NATIVE_BANNERS = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"To enable the following instructions:",
)
_GLOG_TEMPLATE = b"X0000 00:00:00"  # X: one of IWEF, 0: a digit


def is_native_log_line(line):
    """Whether `line` (bytes) is one of TensorFlow's native log lines."""
    return bool(_NATIVE_LINE.match(line)) or any(line.startswith(banner) for banner in _NATIVE_BANNERS)


def _undecided(start):
    """Whether the start of a line could still become a native log line."""
    if any(banner.startswith(start) for banner in _NATIVE_BANNERS):
        return True
    if len(start) >= len(_GLOG_TEMPLATE):
        return False
    for char, expected in zip(start, _GLOG_TEMPLATE):
        if expected == ord("X") and char not in b"IWEF":
            return False
        if expected == ord("0") and not chr(char).isdigit():
            return False
        if expected in b" :" and char != expected:
            return False
    return True


class _LineFilter:
    """Forwards bytes to `write` line by line, dropping native log lines. A line is decided
    from its first characters, so a partial line (a progress bar's `\\r` update) passes at once."""

    def __init__(self, write):
        self.write = write
        self.start = b""  # the undecided start of the current line
        self.mode = "start"  # "start": deciding; "pass" or "drop": until the end of the line

    def feed(self, data):
        while data:
            if self.mode == "start":
                end = data.find(b"\n")
                piece, data = (data, b"") if end < 0 else (data[: end + 1], data[end + 1 :])
                self.start += piece
                if self.start.endswith(b"\n"):
                    if not is_native_log_line(self.start):
                        self.write(self.start)
                    self.start = b""
                elif not _undecided(self.start):
                    self.mode = "drop" if is_native_log_line(self.start) else "pass"
                    if self.mode == "pass":
                        self.write(self.start)
                    self.start = b""
            else:
                end = data.find(b"\n")
                piece, data = (data, b"") if end < 0 else (data[: end + 1], data[end + 1 :])
                if self.mode == "pass":
                    self.write(piece)
                if end >= 0:
                    self.mode = "start"

    def close(self):
        if self.start and not is_native_log_line(self.start):
            self.write(self.start)


@contextlib.contextmanager
def native_logs_filtered(enabled=True):
    """Within the block, TensorFlow's native log lines written to stderr are dropped.

    Does nothing when `enabled` is false or stderr has no file descriptor."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    line_filter = _LineFilter(lambda data: os.write(saved, data))

    def forward():
        while chunk := os.read(read_end, 65536):
            line_filter.feed(chunk)
        line_filter.close()
        os.close(read_end)

    thread = threading.Thread(target=forward, name="native-log-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end (unless a child still holds it)
        thread.join(timeout=5)
        os.close(saved)
