"""Training corpora encoded once into shards on disk, so that a run trains on corpora larger
than memory (batches read their rows from the shards) and a restart skips the reading and
tokenizing.

A corpus directory holds, for each side ("source", "target"):
  <side>.ids       every sentence's token ids, one flat array on disk (uint16 when the vocabulary
                   fits, else int32), sentence after sentence, without <s> or </s>
  <side>.offsets   int64 [sentences + 1]: sentence i is ids[offsets[i]:offsets[i + 1]]
and manifest.json, written last: a directory without it is an unfinished encoding. The
manifest describes what was encoded (input fingerprints, tokenization settings, the
vocabularies' hashes), so that a caller can tell whether the shards still match its inputs.

Encoding streams: lines are tokenized in chunks inside a `tf.data` pipeline on every core,
each distinct token gets a provisional id in order of appearance (and a count, from which a
word vocabulary is built), and once the vocabularies are known one pass over the
provisional ids maps them to vocabulary ids. Memory holds a chunk, the distinct tokens and
one int per sentence, never the corpus.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from seq2seq.cli import log
from seq2seq.errors import DataError
from seq2seq.text import BOS_ID, EOS_ID, UNK_ID

MANIFEST = "manifest.json"
FORMAT = 1
SIDES = ("source", "target")
ENCODE_CHUNK = 4096  # lines tokenized per in-graph call
REMAP_BLOCK = 1 << 22  # ids (or offsets) read and written per block
PROGRESS_SECONDS = 30  # how often encoding logs its progress
FINGERPRINT_BLOCKS = 16  # blocks of a file hashed for its fingerprint
FINGERPRINT_BLOCK_SIZE = 1 << 16


def file_fingerprint(path):
    """What identifies a file's content cheaply: its resolved path, size, modification time
    and a SHA-256 of 16 blocks of 64 KiB spread over the file (its start and end included)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    path = Path(path).resolve()
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        last_start = max(0, stat.st_size - FINGERPRINT_BLOCK_SIZE)
        for block in range(FINGERPRINT_BLOCKS):
            file.seek(last_start * block // (FINGERPRINT_BLOCKS - 1))
            digest.update(file.read(FINGERPRINT_BLOCK_SIZE))
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample_sha256": digest.hexdigest()}


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(directory):
    """The manifest of a finished corpus in `directory`, or None (no corpus, or unfinished)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


class TokenCounter:
    """Provisional ids (in order of first appearance) and counts of the distinct tokens seen.

    Sides that share a vocabulary share a counter."""

    def __init__(self):
        self._ids = {}
        self._counts = np.zeros(1024, np.int64)

    def __len__(self):
        return len(self._ids)

    def add(self, unique_tokens, unique_counts):
        """Provisional ids (int32 [U]) of a chunk's distinct tokens (bytes [U]), whose counts in
        the chunk are `unique_counts` [U]."""
        ids = self._ids
        table = np.fromiter((ids.setdefault(token, len(ids)) for token in unique_tokens), np.int32, len(unique_tokens))
        if len(ids) > len(self._counts):
            self._counts = np.concatenate([self._counts, np.zeros(max(len(ids), len(self._counts)), np.int64)])
        self._counts[table] += unique_counts
        return table

    def counts(self):
        """{token: count} of every token seen."""
        return {token.decode("utf-8"): int(count) for token, count in zip(self._ids, self._counts)}

    def occurrences(self, selected):
        """How often the tokens of provisional ids where `selected` (bool [len(self)]) is true occur."""
        return int(self._counts[: len(self._ids)][selected].sum())

    def id_mapping(self, vocabulary):
        """int32 [len(self)]: the vocabulary id of each provisional id (UNK_ID for tokens it lacks)."""
        return np.fromiter(
            (vocabulary.token_to_id(token.decode("utf-8")) for token in self._ids), np.int32, len(self._ids)
        )


class CorpusWriter:
    """Encodes the sides of a corpus into `directory` (emptied first): `encode` each side's
    lines, then `finish` with the vocabularies, which maps the ids and writes the manifest."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._sides = {}

    def encode(self, side, lines, tokenizer, counter):
        """Tokenizes the strings `lines` yields (in chunks, on every core) and stores their
        provisional ids; returns how many lines there were. Progress is logged every
        PROGRESS_SECONDS; an error reading the lines (a DataError) is raised as it is."""
        failures = []

        def chunks():
            try:
                yield from _chunks(lines, ENCODE_CHUNK)
            except DataError as error:
                failures.append(error)

        dataset = tf.data.Dataset.from_generator(chunks, output_signature=tf.TensorSpec([None], tf.string))

        def split(texts):
            tokens = tokenizer.tokenize(texts)  # [chunk, None]
            unique, index, count = tf.unique_with_counts(tokens.flat_values, out_idx=tf.int32)
            return unique, index, count, tf.cast(tokens.row_lengths(), tf.int32)

        dataset = dataset.map(split, num_parallel_calls=os.cpu_count() or 1, deterministic=True).prefetch(2)
        work_path = self.directory / f"{side}.provisional"
        lengths, sentences = np.zeros([1 << 16], np.int32), 0  # one growing array: no heap of small ones
        started = next_report = time.monotonic()
        with open(work_path, "wb") as out:
            for unique, index, count, row_lengths in dataset.as_numpy_iterator():
                out.write(counter.add(unique, count)[index].tobytes())
                if sentences + len(row_lengths) > len(lengths):
                    lengths = np.concatenate([lengths, np.zeros_like(lengths)])
                lengths[sentences : sentences + len(row_lengths)] = row_lengths
                sentences += len(row_lengths)
                if time.monotonic() - next_report >= PROGRESS_SECONDS:
                    next_report = time.monotonic()
                    log(f"encoding the training {side} sentences: {sentences:,} in {next_report - started:.0f} s")
        if failures:
            raise failures[0]
        self._sides[side] = (counter, lengths[:sentences].copy())
        return sentences

    def finish(self, vocabularies, manifest):
        """Writes each side's ids as vocabulary ids of `vocabularies[side]`, then the manifest
        (`manifest` plus the format, sizes and dtypes); returns the opened Corpus."""
        entry = dict(manifest, format=FORMAT, sides={})
        for side, (counter, lengths) in self._sides.items():
            vocabulary = vocabularies[side]
            dtype = np.uint16 if len(vocabulary) <= np.iinfo(np.uint16).max + 1 else np.int32
            mapping = counter.id_mapping(vocabulary).astype(dtype)
            work_path = self.directory / f"{side}.provisional"
            with open(work_path, "rb") as provisional, open(self.directory / f"{side}.ids", "wb") as out:
                while len(block := np.fromfile(provisional, np.int32, REMAP_BLOCK)):
                    out.write(mapping[block].tobytes())
            work_path.unlink()
            offsets = np.zeros([len(lengths) + 1], np.int64)
            np.cumsum(lengths, out=offsets[1:])
            offsets.tofile(self.directory / f"{side}.offsets")
            entry["sides"][side] = {
                "dtype": np.dtype(dtype).name, "sentences": len(lengths), "tokens": int(offsets[-1]),
                "unknown_tokens": counter.occurrences(mapping == UNK_ID),
            }
        (self.directory / MANIFEST).write_text(json.dumps(entry, indent=1) + "\n")
        return Corpus.open(self.directory)


def _chunks(lines, size):
    chunk = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Corpus:
    """The sides of a finished corpus directory, read row by row (`sentence`).

    Rows are read with positioned reads (os.pread), not through a memory map: on Linux a
    mapped file's pages (whole page-cache folios, far more than the row) stay counted in the
    process's RSS once touched, so a memory map of 10M pairs grew the RSS by 500 MB in 3,200
    random rows; reads leave the RSS at the lengths arrays whatever the corpus size."""

    def __init__(self, directory, manifest):
        self.directory = Path(directory)
        self.manifest = manifest
        self.dtypes = {side: np.dtype(entry["dtype"]) for side, entry in manifest["sides"].items()}
        self._files = {}
        for side in self.dtypes:
            self._files[side] = (open(self.directory / f"{side}.ids", "rb"), open(self.directory / f"{side}.offsets", "rb"))
        self._lengths = {}

    @classmethod
    def open(cls, directory):
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"{directory}: no finished corpus (no {MANIFEST})")
        return cls(directory, manifest)

    def __len__(self):
        return self.manifest["sides"]["source"]["sentences"]

    def lengths(self, side):
        """int32 [sentences]: each sentence's tokens (read from the offsets in blocks)."""
        if side not in self._lengths:
            lengths, previous = [], np.zeros([1], np.int64)
            with open(self.directory / f"{side}.offsets", "rb") as file:
                while len(block := np.fromfile(file, np.int64, REMAP_BLOCK)):
                    lengths.append(np.diff(np.concatenate([previous, block])).astype(np.int32))
                    previous = block[-1:]
            self._lengths[side] = np.concatenate(lengths)[1:] if lengths else np.zeros([0], np.int32)
        return self._lengths[side]

    def sentence(self, side, index):
        """The token ids of sentence `index` (int32 [length])."""
        ids, offsets = self._files[side]
        start, end = np.frombuffer(os.pread(offsets.fileno(), 16, 8 * int(index)), np.int64)
        itemsize = self.dtypes[side].itemsize
        return np.frombuffer(os.pread(ids.fileno(), int(end - start) * itemsize, int(start) * itemsize),
                             self.dtypes[side]).astype(np.int32)

    def size_on_disk(self):
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())


def padded_rows(sentences, lead=None, trail=None, pad_to_multiple=1):
    """int32 [len(sentences), T]: the id arrays `sentences`, optionally after a `lead` id and
    before a `trail` id, padded with 0 to the longest (T a multiple of `pad_to_multiple`)."""
    first = 0 if lead is None else 1
    longest = max((len(sentence) for sentence in sentences), default=0)
    width = longest + first + (0 if trail is None else 1)
    width += (-width) % pad_to_multiple
    out = np.zeros([len(sentences), width], np.int32)
    for row, sentence in enumerate(sentences):
        out[row, first : first + len(sentence)] = sentence
        if trail is not None:
            out[row, first + len(sentence)] = trail
    if lead is not None:
        out[:, 0] = lead
    return out


def corpus_batches(corpus, kept, plan_fn, pad_to_multiple=1):
    """PlannedBatches for teacher forcing over the corpus pairs `kept` (indices into the
    corpus; the plan indexes into `kept`), read from the shards: ({"source", "target_in":
    <s> y}, target_out: y </s>), as `sequence_batches` makes."""
    from seq2seq.training import PlannedBatches

    kept = np.asarray(kept, np.int32 if len(corpus) < 2**31 else np.int64)

    def gather(indices):
        rows = kept[indices]
        sources = [corpus.sentence("source", row) for row in rows]
        targets = [corpus.sentence("target", row) for row in rows]
        return (
            padded_rows(sources, pad_to_multiple=pad_to_multiple),
            padded_rows(targets, lead=BOS_ID, pad_to_multiple=pad_to_multiple),
            padded_rows(targets, trail=EOS_ID, pad_to_multiple=pad_to_multiple),
        )

    def make_batch(indices):
        source, target_in, target_out = tf.numpy_function(gather, [indices], [tf.int32] * 3, stateful=False)
        for tensor in (source, target_in, target_out):
            tensor.set_shape([None, None])
        return {"source": source, "target_in": target_in}, target_out

    return PlannedBatches(plan_fn, make_batch, target_lengths=corpus.lengths("target")[kept] + 1)
