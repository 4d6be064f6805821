"""In-graph text processing shared by translation and captioning.

Everything that runs on tensors uses core TensorFlow string ops only (no
tensorflow-text, no py_function), so a SavedModel that tokenizes, looks up ids
and detokenizes inside its serving function loads in stock TF Serving.

Reserved tokens sit at fixed ids in every vocabulary:
``PAD`` (0), ``UNK`` (1), ``BOS`` (2), ``EOS`` (3).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterable, Sequence

import tensorflow as tf

from seq2seq.errors import DataError  # noqa: F401  (raised here; imported from here by callers)

PAD = "<pad>"
UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
RESERVED_TOKENS = (PAD, UNK, BOS, EOS)


# Every kind of whitespace, control and zero-width character becomes one plain space.
_WHITESPACE_RUN = r"[\s\p{Z}\p{Cc}\x{200B}\x{2060}\x{FEFF}]+"

# Periods, commas and colons between digits ("3.5", "1,000", "12:30") stay inside the
# number: they are swapped for private-use characters while punctuation is split off.
_NUMBER_SEPARATORS = ((".", "\ue000"), (",", "\ue001"), (":", "\ue002"))

# Any character that is not a letter, digit, combining mark, apostrophe, hyphen or a
# protected number separator becomes a token of its own.
_SPLIT_CHARACTER = r"([^\p{L}\p{N}\p{M}\s'’\-\x{E000}-\x{E002}])"

# A leading apostrophe ("'Thriller'", "'em") is split off; word-internal and trailing
# apostrophes ("don't", "ladies'") stay inside the word.
_LEADING_APOSTROPHE = r"(^|\s)(['’])"

# Detokenization: no space before these tokens ...
_ATTACH_TO_PREVIOUS = r"[.,!?;:)\]}%…»]"
# ... and no space after these.
_ATTACH_TO_NEXT = r"[(\[{$€£#¿¡„‚‘«'’]"
# Quotes whose direction depends on position: odd occurrences in a row open,
# even occurrences close ("„" opens and counts, so German „…“ pairs up too).
_AMBIGUOUS_QUOTE = r"[\"“”]"
_COUNTED_QUOTE = r"[\"“”„]"


class WordTokenizer:
    """Unicode-aware word tokenizer that splits punctuation off words.

    ``"Hello, world!"`` becomes ``Hello , world !``; apostrophes and hyphens inside
    words (``don't``, ``well-known``) and separators inside numbers (``3.5``) stay.
    ``detokenize`` reverses the split well enough that scores computed on raw
    references (sacreBLEU) are fair.
    """

    def __init__(self, lowercase: bool = False):
        if not isinstance(lowercase, bool):
            raise ValueError(f"lowercase must be a bool, got {lowercase!r}")
        self.lowercase = lowercase

    def tokenize(self, texts) -> tf.RaggedTensor:
        """Splits strings [N] into a ragged tensor of string tokens [N, None]."""
        texts = tf.convert_to_tensor(texts, dtype=tf.string)
        if texts.shape.rank is not None and texts.shape.rank != 1:
            raise ValueError(f"tokenize expects a string tensor of shape [N], got shape {texts.shape}")
        if self.lowercase:
            texts = tf.strings.lower(texts, encoding="utf-8")
        texts = tf.strings.regex_replace(texts, _WHITESPACE_RUN, " ")
        for separator, placeholder in _NUMBER_SEPARATORS:
            texts = tf.strings.regex_replace(texts, r"(\p{N})\%s(\p{N})" % separator, r"\1%s\2" % placeholder)
        texts = tf.strings.regex_replace(texts, _SPLIT_CHARACTER, r" \1 ")
        texts = tf.strings.regex_replace(texts, _LEADING_APOSTROPHE, r"\1\2 ")
        for separator, placeholder in _NUMBER_SEPARATORS:
            texts = tf.strings.regex_replace(texts, placeholder, separator)
        return tf.strings.split(texts)  # [N, None]

    def detokenize(self, tokens: tf.RaggedTensor) -> tf.Tensor:
        """Joins ragged string tokens [N, None] into text [N], attaching punctuation."""
        if not isinstance(tokens, tf.RaggedTensor):
            raise ValueError(f"detokenize expects a tf.RaggedTensor of shape [N, None], got {type(tokens).__name__}")
        if tokens.ragged_rank != 1 or tokens.dtype != tf.string:
            raise ValueError(f"detokenize expects string tokens of shape [N, None], got {tokens.dtype.name} {tokens.shape}")
        flat = tokens.flat_values  # [T]
        row_ids = tokens.value_rowids()  # [T]
        row_starts = tokens.row_starts()  # [N]
        position = tf.range(tf.size(flat, out_type=row_ids.dtype)) - tf.gather(row_starts, row_ids)  # [T]

        is_counted_quote = tf.strings.regex_full_match(flat, _COUNTED_QUOTE)  # [T]
        quote_counts = tf.cumsum(tf.cast(is_counted_quote, tf.int32), exclusive=True)  # [T]
        quote_counts_with_total = tf.concat([quote_counts, [tf.reduce_sum(tf.cast(is_counted_quote, tf.int32))]], 0)
        quotes_at_row_start = tf.gather(quote_counts_with_total, row_starts)  # [N]
        quotes_before = quote_counts - tf.gather(quotes_at_row_start, row_ids)  # [T], within the row
        is_ambiguous_quote = tf.strings.regex_full_match(flat, _AMBIGUOUS_QUOTE)
        opens_quote = is_ambiguous_quote & (quotes_before % 2 == 0)
        closes_quote = is_ambiguous_quote & (quotes_before % 2 == 1)

        attaches_to_previous = tf.strings.regex_full_match(flat, _ATTACH_TO_PREVIOUS) | closes_quote  # [T]
        attaches_to_next = tf.strings.regex_full_match(flat, _ATTACH_TO_NEXT) | opens_quote  # [T]
        previous_attaches_to_next = tf.concat([[False], attaches_to_next], 0)[:-1]  # [T]
        no_space = tf.equal(position, 0) | attaches_to_previous | previous_attaches_to_next
        pieces = tf.where(no_space, "", " ") + flat  # [T]
        return tf.strings.reduce_join(tokens.with_flat_values(pieces), axis=1)  # [N]

    def get_config(self) -> dict:
        return {"lowercase": self.lowercase}

    @classmethod
    def from_config(cls, config: dict) -> "WordTokenizer":
        return cls(**config)


class Vocabulary(tf.Module):
    """Token list with the reserved tokens at ids 0..3, usable in Python and in-graph.

    The lookup table and the token tensor are built from constants, so a SavedModel
    holding the vocabulary needs no asset file. Being a ``tf.Module``, it is tracked
    when attached to a module or layer that is exported.
    """

    def __init__(self, tokens: Sequence[str], name: str | None = None):
        super().__init__(name=name)
        tokens = [_as_str(token) for token in tokens]
        if tuple(tokens[: len(RESERVED_TOKENS)]) != RESERVED_TOKENS:
            raise ValueError(
                f"a vocabulary must start with the reserved tokens {list(RESERVED_TOKENS)}, "
                f"got {tokens[: len(RESERVED_TOKENS)]}"
            )
        token_to_id = {}
        for index, token in enumerate(tokens):
            if not token or "\n" in token or "\r" in token:
                raise ValueError(f"token {index} is empty or contains a line break: {token!r}")
            if token in token_to_id:
                raise ValueError(f"token {token!r} appears twice: ids {token_to_id[token]} and {index}")
            token_to_id[token] = index
        self._token_list = _Untracked(tokens)
        self._token_to_id = _Untracked(token_to_id)
        self._table = None
        self._token_tensor = None

    @classmethod
    def build(
        cls, token_lists: Iterable[Iterable[str]], max_size: int | None = None, min_count: int = 1
    ) -> "Vocabulary":
        """Counts tokens and keeps the most frequent (ties alphabetical), deterministically.

        ``max_size`` counts the four reserved tokens. Tokens may be ``str`` or UTF-8
        ``bytes`` (as ``RaggedTensor.to_list()`` returns them).
        """
        counts = collections.Counter()
        for tokens in token_lists:
            counts.update(_as_str(token) for token in tokens)
        return cls.from_counts(counts, max_size, min_count)

    @classmethod
    def from_counts(cls, counts: dict, max_size: int | None = None, min_count: int = 1) -> "Vocabulary":
        """`build` from token counts ({token: count}, e.g. a streaming count of a large corpus)."""
        if max_size is not None and max_size < len(RESERVED_TOKENS):
            raise ValueError(f"max_size must be at least {len(RESERVED_TOKENS)} (the reserved tokens), got {max_size}")
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        counts = dict(counts)
        for token in RESERVED_TOKENS:
            counts.pop(token, None)
        ranked = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda item: (-item[1], item[0]))
        if max_size is not None:
            ranked = ranked[: max_size - len(RESERVED_TOKENS)]
        return cls(list(RESERVED_TOKENS) + [token for token, _ in ranked])

    def save(self, path) -> None:
        """Writes one token a line, UTF-8."""
        Path(path).write_text("".join(token + "\n" for token in self._token_list.value), encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Vocabulary":
        """Reads a file written by ``save``; raises DataError naming the file and line."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: vocabulary file not found") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line_number = data[: error.start].count(b"\n") + 1
            raise DataError(f"{path}:{line_number}: not valid UTF-8 ({error.reason})") from None
        if not text.strip():
            raise DataError(f"{path}: vocabulary file is empty")
        lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        first_line = {}
        for line_number, token in enumerate(lines, start=1):
            if not token:
                raise DataError(f"{path}:{line_number}: empty token")
            if token in first_line:
                raise DataError(f"{path}:{line_number}: duplicate token {token!r} (first on line {first_line[token]})")
            first_line[token] = line_number
        for index, reserved in enumerate(RESERVED_TOKENS):
            if index >= len(lines) or lines[index] != reserved:
                found = repr(lines[index]) if index < len(lines) else "end of file"
                raise DataError(
                    f"{path}:{index + 1}: expected reserved token {reserved!r}, found {found}; "
                    f"a vocabulary must start with {list(RESERVED_TOKENS)}"
                )
        return cls(lines)

    def __len__(self) -> int:
        return len(self._token_list.value)

    @property
    def tokens(self) -> list[str]:
        return list(self._token_list.value)

    def token_to_id(self, token: str) -> int:
        """Id of ``token``, UNK_ID when it is not in the vocabulary."""
        return self._token_to_id.value.get(_as_str(token), UNK_ID)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self):
            raise IndexError(f"token id {token_id} is outside the vocabulary of size {len(self)}")
        return self._token_list.value[token_id]

    def lookup_ids(self, tokens) -> tf.Tensor | tf.RaggedTensor:
        """String tokens (dense or ragged) -> int32 ids of the same shape; unknown -> UNK_ID."""
        if isinstance(tokens, tf.RaggedTensor):
            return tokens.with_flat_values(self.lookup_ids(tokens.flat_values))
        return self._lookup_table().lookup(tf.convert_to_tensor(tokens, dtype=tf.string))

    def lookup_tokens(self, ids) -> tf.Tensor | tf.RaggedTensor:
        """Integer ids (dense or ragged) -> string tokens of the same shape."""
        if isinstance(ids, tf.RaggedTensor):
            return ids.with_flat_values(self.lookup_tokens(ids.flat_values))
        return tf.gather(self._token_constant(), ids)

    def _lookup_table(self) -> tf.lookup.StaticHashTable:
        """Builds the string -> id table once, outside any function being traced."""
        if self._table is None:
            with tf.init_scope():
                initializer = tf.lookup.KeyValueTensorInitializer(
                    tf.constant(self._token_list.value, dtype=tf.string),
                    tf.range(len(self), dtype=tf.int32),
                )
                self._table = tf.lookup.StaticHashTable(initializer, default_value=tf.constant(UNK_ID, tf.int32))
        return self._table

    def _token_constant(self) -> tf.Tensor:
        if self._token_tensor is None:
            with tf.init_scope():
                self._token_tensor = tf.constant(self._token_list.value, dtype=tf.string)  # [V]
        return self._token_tensor

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"


class _Untracked:
    """Holds a plain Python container so tf.Module does not wrap and track each entry."""

    def __init__(self, value):
        self.value = value


def _as_str(token) -> str:
    return token.decode("utf-8") if isinstance(token, bytes) else token


def encode(
    texts,
    tokenizer: WordTokenizer,
    vocab: Vocabulary,
    add_bos: bool = False,
    add_eos: bool = False,
    max_length: int | None = None,
) -> tf.RaggedTensor:
    """Strings [N] -> ragged int32 ids [N, None], truncated to ``max_length`` tokens before BOS/EOS."""
    tokens = tokenizer.tokenize(texts)  # [N, None]
    if max_length is not None:
        if max_length < 0:
            raise ValueError(f"max_length must be non-negative, got {max_length}")
        tokens = tokens[:, :max_length]
    ids = vocab.lookup_ids(tokens)  # [N, None]
    rows = ids.nrows()
    parts = [ids]
    if add_bos:
        parts.insert(0, tf.RaggedTensor.from_tensor(tf.fill([rows, 1], tf.constant(BOS_ID, tf.int32))))
    if add_eos:
        parts.append(tf.RaggedTensor.from_tensor(tf.fill([rows, 1], tf.constant(EOS_ID, tf.int32))))
    return tf.concat(parts, axis=1) if len(parts) > 1 else ids


def decode(ids, vocab: Vocabulary, tokenizer: WordTokenizer) -> tf.Tensor:
    """Ids [N, T] (EOS then padding allowed) -> strings [N]: cut at the first EOS, drop PAD and BOS."""
    if isinstance(ids, tf.RaggedTensor):
        ids = ids.to_tensor(default_value=PAD_ID)
    ids = tf.convert_to_tensor(ids)  # [N, T]
    before_eos = tf.equal(tf.cumsum(tf.cast(tf.equal(ids, EOS_ID), tf.int32), axis=1), 0)  # [N, T]
    keep = before_eos & tf.not_equal(ids, PAD_ID) & tf.not_equal(ids, BOS_ID)  # [N, T]
    kept_ids = tf.ragged.boolean_mask(ids, keep)  # [N, None]
    return tokenizer.detokenize(vocab.lookup_tokens(kept_ids))  # [N]


ENCODE_CHUNK = 4096  # texts tokenized per in-graph call: bounded memory, few calls


def tokenize_all(tokenizer, texts):
    """Token lists of every text, tokenized in-graph in chunks (to build a vocabulary)."""
    tokens = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        tokens.extend(tokenizer.tokenize(tf.constant(texts[start : start + ENCODE_CHUNK])).to_list())
    return tokens


def encode_all(tokenizer, vocab, texts):
    """Ragged int32 ids [N, None] of every text, tokenized and looked up in-graph in chunks."""
    parts = [
        vocab.lookup_ids(tokenizer.tokenize(tf.constant(texts[start : start + ENCODE_CHUNK])))
        for start in range(0, len(texts), ENCODE_CHUNK)
    ]
    if not parts:
        return tf.ragged.constant([], dtype=tf.int32, ragged_rank=1)
    return tf.concat(parts, axis=0)
