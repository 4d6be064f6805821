"""Streaming the decoding commands' input and output: lines read lazily in chunks, each
chunk's results written (and flushed) as soon as it is done, and a progress display on a
terminal. Memory stays flat however long the input is, and an interrupted run keeps the
output of the chunks it finished."""

import itertools
import os
import shutil
import sys

from tqdm import tqdm

from seq2seq import cli

EXIT_OUTPUT_CLOSED = 141  # what a shell reports for a program stopped by SIGPIPE

# Whether stderr is a terminal, asked when this module is imported: the commands import it
# before `cli.main` points file descriptor 2 at its log filter's pipe.
STDERR_IS_TERMINAL = os.isatty(2)


def chunks(items, size):
    """Lists of `size` consecutive items of an iterable (the last one shorter), read lazily:
    no more than one chunk is ever taken from `items` ahead of the caller."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def ends_within(items, size):
    """(the same items, whether there are at most `size` of them), reading no more than `size` + 1
    of them ahead: so a command can tell a small input from a large one before its first chunk."""
    items = iter(items)
    head = list(itertools.islice(items, size + 1))
    return itertools.chain(head, items), len(head) <= size


def decoded_lines(stream, name, first_line=1):
    """The lines of a binary stream decoded as UTF-8, one at a time; invalid UTF-8 is the
    same one-line error, naming the line, as `cli.decode_lines`."""
    for number, raw in enumerate(stream, start=first_line):
        yield cli.decode_lines([raw], name, first_line=number)[0]


def input_lines(path=None):
    """The lines of a file (or of stdin when `path` is None), read lazily. A missing file (or
    a directory) is an error now, before the generator is consumed."""
    if path is None:
        return decoded_lines(sys.stdin.buffer, "<stdin>")
    cli.check_input_file(path)
    return _file_lines(path)


def _file_lines(path):
    with open(path, "rb") as stream:
        yield from decoded_lines(stream, path)


def paired_lines(lines, others, name, what):
    """(line, other) pairs of two line streams that must have as many lines, lazily; when one
    ends before the other, a one-line error that says which (`name` is the file of `others`,
    holding one `what` a line)."""
    for number, (line, other) in enumerate(itertools.zip_longest(lines, others), start=1):
        if other is None:
            raise cli.CommandError(f"{name} ended at line {number - 1} but the input goes on: give one {what} a line")
        if line is None:
            raise cli.CommandError(f"{name} has more lines than the input ({number - 1}): give one {what} a line")
        yield line, other


def count_lines(path):
    """How many lines `input_lines(path)` gives, counted in binary blocks (fast): the total of a progress display."""
    count, last = 0, b"\n"
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def write_lines(lines, stream=None):
    """Writes lines to `stream` (default: stdout), one a line, and flushes: the reader of a pipe gets them now."""
    stream = stream or sys.stdout
    stream.write("".join(f"{line}\n" for line in lines))
    stream.flush()


def progress_wanted():
    """Whether to draw progress: stderr is a terminal (and has not been replaced, say by a test's capture)."""
    return sys.stderr is sys.__stderr__ and (STDERR_IS_TERMINAL or sys.stderr.isatty())


def terminal_size():
    """Columns and rows for the progress line: those of the terminal on file descriptor 2 when it
    reports them, else shutil's guess (COLUMNS and LINES, stdout's terminal, 80x24). tqdm draws
    nothing at all on a terminal of size 0x0, as a pseudo-terminal starts out."""
    try:
        size = os.get_terminal_size(2)
    except OSError:  # fd 2 is not a terminal: `cli.main`'s log filter, say
        size = None
    return size if size and size.columns and size.lines else shutil.get_terminal_size()


class Progress:
    """Items done, items per second (and, with a total, the ETA) on stderr, redrawn in place on
    a terminal and absent otherwise, so that logs and pipes carry only the command's own lines."""

    def __init__(self, unit, total=None, enabled=None):
        self.enabled = progress_wanted() if enabled is None else enabled
        size = terminal_size()
        self.bar = tqdm(total=total, unit=f" {unit}", file=sys.stderr, disable=not self.enabled, mininterval=0.5,
                        ncols=size.columns, nrows=size.lines)

    def update(self, count):
        self.bar.update(count)

    def write(self, message):
        """A warning or note on stderr that does not garble the progress line."""
        if self.enabled:
            tqdm.write(message, file=sys.stderr)
        else:
            cli.log(message)

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def output_closed():
    """The exit code once the reader of stdout stopped early (`... | head`), after pointing
    stdout at /dev/null so that the interpreter's last flush cannot fail too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (a test's capture)
        pass
    return EXIT_OUTPUT_CLOSED
