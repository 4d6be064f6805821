"""Reading parallel text for translation.

Every reader checks its input completely and raises ``DataError`` naming the file
(and line, where one applies) before any training starts.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Iterator

from seq2seq.text import DataError


def read_lines(path) -> list[str]:
    """Lines of a UTF-8 text file, plain or gzip (``.gz`` suffix), without their line endings."""
    return list(iter_lines(path))


def iter_lines(path) -> Iterator[str]:
    """The lines of `read_lines`, read lazily (flat memory however large the file). A missing
    file is an error now, before the first line is asked for."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return _lines(path)


def _lines(path):
    opener = gzip.open if path.suffix == ".gz" else open
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
                yield line
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None


def read_parallel(src_path, tgt_path) -> tuple[list[str], list[str]]:
    """Source and target lines of two line-aligned files; the line counts must match."""
    src_lines = read_lines(src_path)
    tgt_lines = read_lines(tgt_path)
    check_line_counts(src_path, len(src_lines), tgt_path, len(tgt_lines))
    return src_lines, tgt_lines


def check_line_counts(src_path, src_count, tgt_path, tgt_count):
    if src_count != tgt_count:
        raise DataError(
            f"parallel files differ in length: {src_path} has {src_count} lines, {tgt_path} has {tgt_count} lines"
        )


def read_tsv(path, src_column: int = 0, tgt_column: int = 1) -> tuple[list[str], list[str]]:
    """Source and target columns of a tab-separated file."""
    return list(iter_tsv_column(path, src_column, tgt_column)), list(iter_tsv_column(path, tgt_column, src_column))


def iter_tsv_column(path, column: int, other_column: int) -> Iterator[str]:
    """One column of a tab-separated file, read lazily; every line must also hold `other_column`
    (the other side of the pair), so that a short line is the same error on either side."""
    if column < 0 or other_column < 0:
        raise ValueError(f"column numbers must be non-negative, got {column} and {other_column}")
    lines = iter_lines(path)
    needed_columns = max(column, other_column) + 1

    def fields():
        for line_number, line in enumerate(lines, start=1):
            fields = line.split("\t")
            if len(fields) < needed_columns:
                raise DataError(
                    f"{path}:{line_number}: expected at least {needed_columns} tab-separated columns, found {len(fields)}"
                )
            yield fields[column]

    return fields()


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
    pairs = list(iter_tfds_pairs(name, split, src_lang, tgt_lang, data_dir))
    return [src for src, _ in pairs], [tgt for _, tgt in pairs]


def iter_tfds_pairs(name, split, src_lang=None, tgt_lang=None, data_dir=None) -> Iterator[tuple[str, str]]:
    """The (source, target) sentences of `load_tfds`, read lazily."""
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
    return ((src.decode("utf-8"), tgt.decode("utf-8")) for src, tgt in pairs)
