"""Reading parallel text for translation.

Every reader checks its input completely and raises ``DataError`` naming the file
(and line, where one applies) before any training starts.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from seq2seq.text import DataError


def read_lines(path) -> list[str]:
    """Lines of a UTF-8 text file, plain or gzip (``.gz`` suffix), without their line endings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    try:
        with opener(path, "rb") as file:
            for line_number, raw_line in enumerate(file, start=1):
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(
                        f"{path}:{line_number}: not valid UTF-8 at byte {error.start} of the line ({error.reason})"
                    ) from None
                if line_number == 1:
                    line = line.removeprefix("\ufeff")
                if line.endswith("\n"):
                    line = line[:-2] if line.endswith("\r\n") else line[:-1]
                lines.append(line)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None
    return lines


def read_parallel(src_path, tgt_path) -> tuple[list[str], list[str]]:
    """Source and target lines of two line-aligned files; the line counts must match."""
    src_lines = read_lines(src_path)
    tgt_lines = read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"parallel files differ in length: {src_path} has {len(src_lines)} lines, "
            f"{tgt_path} has {len(tgt_lines)} lines"
        )
    return src_lines, tgt_lines


def read_tsv(path, src_column: int = 0, tgt_column: int = 1) -> tuple[list[str], list[str]]:
    """Source and target columns of a tab-separated file."""
    if src_column < 0 or tgt_column < 0:
        raise ValueError(f"column numbers must be non-negative, got {src_column} and {tgt_column}")
    needed_columns = max(src_column, tgt_column) + 1
    src_lines, tgt_lines = [], []
    for line_number, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) < needed_columns:
            raise DataError(
                f"{path}:{line_number}: expected at least {needed_columns} tab-separated columns, found {len(fields)}"
            )
        src_lines.append(fields[src_column])
        tgt_lines.append(fields[tgt_column])
    return src_lines, tgt_lines


def load_tfds(
    name: str,
    split: str,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
    data_dir: str | None = None,
) -> tuple[list[str], list[str]]:
    """Source and target sentences of a TensorFlow Datasets translation dataset.

    Without languages the dataset's supervised keys give the pair (for example
    ``ted_hrlr_translate/pt_to_en`` yields Portuguese, English); with languages the
    features are read by language code (as in ``wmt14_translate/de-en``).
    """
    import tensorflow_datasets as tfds

    if (src_lang is None) != (tgt_lang is None):
        raise ValueError("give both src_lang and tgt_lang, or neither to use the dataset's supervised keys")
    if src_lang is None:
        dataset = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True)
        pairs = tfds.as_numpy(dataset)
    else:
        dataset = tfds.load(name, split=split, data_dir=data_dir)
        missing = [lang for lang in (src_lang, tgt_lang) if lang not in dataset.element_spec]
        if missing:
            raise DataError(
                f"TFDS dataset {name} has no feature {missing[0]!r}; its features are {sorted(dataset.element_spec)}"
            )
        pairs = ((example[src_lang], example[tgt_lang]) for example in tfds.as_numpy(dataset))
    src_lines, tgt_lines = [], []
    for src, tgt in pairs:
        src_lines.append(src.decode("utf-8"))
        tgt_lines.append(tgt.decode("utf-8"))
    return src_lines, tgt_lines
