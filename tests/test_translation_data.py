"""Tests for seq2seq.tasks.translation.data: file readers and the TFDS loader (mocked, no network)."""

import gzip
import re
from pathlib import Path

import pytest

from seq2seq.text import DataError
from seq2seq.tasks.translation.data import load_tfds, read_lines, read_parallel, read_tsv

MULTI30K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


def test_read_lines_strips_only_the_line_ending(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_bytes("  Ein Mann läuft.  \n\tTabs stay\t\r\n\nlast line without newline".encode("utf-8"))
    assert read_lines(path) == ["  Ein Mann läuft.  ", "\tTabs stay\t", "", "last line without newline"]


def test_read_lines_does_not_split_on_unicode_line_separators(tmp_path):
    path = tmp_path / "separators.txt"
    path.write_text("a\u2028b\x85c\n\ufeffd\n", encoding="utf-8")
    assert read_lines(path) == ["a\u2028b\x85c", "\ufeffd"]


def test_read_lines_drops_a_leading_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_lines(path) == ["hello"]


def test_read_lines_reads_gzip_by_suffix(tmp_path):
    path = tmp_path / "data.de.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("Straße\nÜber\n")
    assert read_lines(path) == ["Straße", "Über"]


def test_read_lines_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"missing\.en: file not found"):
        read_lines(tmp_path / "missing.en")


@pytest.mark.parametrize("name", ["bad.txt", "bad.txt.gz"])
def test_read_lines_invalid_utf8_names_path_and_line(tmp_path, name):
    path = tmp_path / name
    content = b"fine\nalso fine\nbroken \xff\xfe here\n"
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(DataError, match=re.escape(name) + ":3: not valid UTF-8"):
        read_lines(path)


def test_read_lines_corrupt_gzip_names_the_path(tmp_path):
    path = tmp_path / "corrupt.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"corrupt\.gz: not a readable gzip file"):
        read_lines(path)


def test_read_parallel_returns_aligned_lines(tmp_path):
    (tmp_path / "train.en").write_text("A man.\nA dog.\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("Ein Mann.\nEin Hund.\n", encoding="utf-8")
    assert read_parallel(tmp_path / "train.en", tmp_path / "train.de") == (["A man.", "A dog."], ["Ein Mann.", "Ein Hund."])


def test_read_parallel_length_mismatch_names_both_files_and_counts(tmp_path):
    (tmp_path / "train.en").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.en has 3 lines, .*train\.de has 2 lines"):
        read_parallel(tmp_path / "train.en", tmp_path / "train.de")


def test_read_tsv_selects_columns(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("id1\tHallo Welt\tHello world\nid2\tJa\tYes\n", encoding="utf-8")
    assert read_tsv(path, src_column=1, tgt_column=2) == (["Hallo Welt", "Ja"], ["Hello world", "Yes"])
    assert read_tsv(path, src_column=2, tgt_column=0) == (["Hello world", "Yes"], ["id1", "id2"])


def test_read_tsv_short_line_names_path_and_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tb\nc\td\nonly one column\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs\.tsv:3: expected at least 2 tab-separated columns, found 1"):
        read_tsv(path)


def test_reads_multi30k_gzip_pairs():
    if not MULTI30K.exists():
        pytest.skip(f"{MULTI30K} not available")
    english, german = read_parallel(MULTI30K / "val.en.gz", MULTI30K / "val.de.gz")
    assert len(english) == len(german) > 500
    assert all(line and not line.endswith("\n") for line in english[:300] + german[:300])


def test_load_tfds_reads_supervised_pairs_and_language_features_from_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    name = "ted_hrlr_translate/pt_to_en"
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        portuguese, english = load_tfds(name, "train")
        by_language = load_tfds(name, "train", src_lang="en", tgt_lang="pt")
        with pytest.raises(DataError, match=r"no feature 'de'; its features are \['en', 'pt'\]"):
            load_tfds(name, "train", src_lang="de", tgt_lang="en")
    assert len(portuguese) == len(english) == 6
    assert all(isinstance(sentence, str) for sentence in portuguese + english)
    assert portuguese != english
    assert by_language == (english, portuguese)


def test_load_tfds_needs_both_languages_or_neither():
    with pytest.raises(ValueError, match="both src_lang and tgt_lang"):
        load_tfds("wmt14_translate/de-en", "train", src_lang="de")
