"""Tests for seq2seq.text: tokenizer, vocabulary, encode/decode and SavedModel export."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from seq2seq import text
from seq2seq.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    DataError,
    Vocabulary,
    WordTokenizer,
    decode,
    encode,
)

MULTI30K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


def tokens_of(texts, tokenizer=None):
    tokenizer = tokenizer or WordTokenizer()
    return [[token.decode("utf-8") for token in row] for row in tokenizer.tokenize(tf.constant(texts)).to_list()]


def detokenized(token_rows, tokenizer=None):
    tokenizer = tokenizer or WordTokenizer()
    ragged = tf.ragged.constant(token_rows, dtype=tf.string, ragged_rank=1) if token_rows else None
    return [value.decode("utf-8") for value in tokenizer.detokenize(ragged).numpy()]


def small_vocabulary():
    return Vocabulary(list(text.RESERVED_TOKENS) + ["a", "man", "runs", ".", ","])


def test_reserved_tokens_have_fixed_ids():
    assert (text.PAD, text.UNK, text.BOS, text.EOS) == ("<pad>", "<unk>", "<s>", "</s>")
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("Hello, world!", ["Hello", ",", "world", "!"]),
        ("I don't like well-known places.", ["I", "don't", "like", "well-known", "places", "."]),
        ('He said "stop" (loudly) [twice]; ok: yes?', ["He", "said", '"', "stop", '"', "(", "loudly", ")", "[", "twice", "]", ";", "ok", ":", "yes", "?"]),
        ("  many   spaces\there\n", ["many", "spaces", "here"]),
        ("Ein „Mann“ läuft über die Straße.", ["Ein", "„", "Mann", "“", "läuft", "über", "die", "Straße", "."]),
        ("It costs 3.5 or 1,000 at 12:30.", ["It", "costs", "3.5", "or", "1,000", "at", "12:30", "."]),
        ("a 'Grand Opening' at the ladies' room", ["a", "'", "Grand", "Opening'", "at", "the", "ladies'", "room"]),
        ("zero\u200bwidth and\u00a0no-break", ["zero", "width", "and", "no-break"]),
    ],
)
def test_tokenize_splits_punctuation_and_keeps_word_internal_marks(sentence, expected):
    assert tokens_of([sentence]) == [expected]


def test_tokenize_empty_and_whitespace_only_give_zero_tokens():
    tokens = WordTokenizer().tokenize(tf.constant(["", "   \t ", "word"]))
    assert tokens.row_lengths().numpy().tolist() == [0, 0, 1]


def test_tokenize_lowercases_unicode_when_asked():
    assert tokens_of(["ÄPFEL und Straße, ÉTÉ"], WordTokenizer(lowercase=True)) == [["äpfel", "und", "straße", ",", "été"]]
    assert tokens_of(["ÄPFEL"], WordTokenizer()) == [["ÄPFEL"]]


def test_tokenize_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        WordTokenizer().tokenize(tf.constant([["a"]]))


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (["Hello", ",", "world", "!"], "Hello, world!"),
        (["a", "(", "red", ")", "hat", "[", "x", "]", ";", "b", ":", "c", "?"], "a (red) hat [x]; b: c?"),
        (["says", '"', "hi", '"', "and", '"', "bye", '"', "."], 'says "hi" and "bye".'),
        (["Ein", "„", "Mann", "“", "läuft", "."], "Ein „Mann“ läuft."),
        (["a", "'", "Grand", "Opening'", "sign"], "a 'Grand Opening' sign"),
        (["50", "%", "of", "$", "5"], "50% of $5"),
        ([], ""),
    ],
)
def test_detokenize_attaches_punctuation(tokens, expected):
    assert detokenized([tokens]) == [expected]


def test_detokenize_handles_empty_rows_between_filled_rows():
    rows = [[], ["A", "dog", "."], [], ['"', "x", '"']]
    assert detokenized(rows) == ["", "A dog.", "", '"x"']


def test_tokenizer_gives_same_results_in_tf_function_and_eager():
    tokenizer = WordTokenizer(lowercase=True)
    sentences = tf.constant(["Hello, World!", "", 'A "quoted" (word).'])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def round_trip(texts):
        return tokenizer.detokenize(tokenizer.tokenize(texts))

    eager = tokenizer.detokenize(tokenizer.tokenize(sentences)).numpy().tolist()
    assert round_trip(sentences).numpy().tolist() == eager == [b"hello, world!", b"", b'a "quoted" (word).']


def test_tokenizer_config_round_trips_through_json():
    config = json.loads(json.dumps(WordTokenizer(lowercase=True).get_config()))
    assert WordTokenizer.from_config(config).lowercase is True
    with pytest.raises(ValueError, match="lowercase"):
        WordTokenizer(lowercase="yes")


@pytest.mark.parametrize("language", ["en", "de"])
def test_detokenize_inverts_tokenize_on_multi30k(language):
    path = MULTI30K / f"val.{language}.gz"
    if not path.exists():
        pytest.skip(f"{path} not available")
    with gzip.open(path, "rt", encoding="utf-8") as file:
        sentences = [line.rstrip("\n") for _, line in zip(range(1000), file)]
    tokenizer = WordTokenizer()
    restored = tokenizer.detokenize(tokenizer.tokenize(tf.constant(sentences))).numpy()
    exact = sum(original == result.decode("utf-8") for original, result in zip(sentences, restored))
    assert exact / len(sentences) >= 0.98, f"only {exact} of {len(sentences)} {language} sentences round-trip"


def test_build_orders_by_frequency_then_alphabetically():
    vocab = Vocabulary.build([["b", "a", "c"], ["c", "b"], ["d", "c"]])
    assert vocab.tokens == ["<pad>", "<unk>", "<s>", "</s>", "c", "b", "a", "d"]
    assert vocab.tokens == Vocabulary.build([["d", "c"], ["c", "b"], ["b", "a", "c"]]).tokens


def test_build_applies_max_size_min_count_and_ignores_reserved_tokens():
    token_lists = [["x", "x", "x", "y", "y", "z", "<unk>", "</s>"]]
    assert Vocabulary.build(token_lists, max_size=5).tokens[4:] == ["x"]
    assert Vocabulary.build(token_lists, min_count=2).tokens[4:] == ["x", "y"]
    assert Vocabulary.build([[b"caf\xc3\xa9"]]).tokens[4:] == ["café"]
    with pytest.raises(ValueError, match="max_size"):
        Vocabulary.build(token_lists, max_size=3)


def test_python_lookups():
    vocab = small_vocabulary()
    assert len(vocab) == 9
    assert vocab.token_to_id("man") == 5
    assert vocab.token_to_id("woman") == UNK_ID
    assert vocab.id_to_token(6) == "runs"
    with pytest.raises(IndexError, match="outside the vocabulary of size 9"):
        vocab.id_to_token(9)


def test_constructor_rejects_bad_token_lists():
    with pytest.raises(ValueError, match="reserved tokens"):
        Vocabulary(["a", "<pad>", "<unk>", "<s>", "</s>"])
    with pytest.raises(ValueError, match="appears twice"):
        Vocabulary(list(text.RESERVED_TOKENS) + ["a", "a"])


def test_save_and_load_round_trip(tmp_path):
    vocab = Vocabulary.build([["Straße", "ü", "don't", "ü"]])
    path = tmp_path / "vocab.txt"
    vocab.save(path)
    assert path.read_text(encoding="utf-8") == "<pad>\n<unk>\n<s>\n</s>\nü\nStraße\ndon't\n"
    assert Vocabulary.load(path).tokens == vocab.tokens


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"vocab\.txt: vocabulary file is empty"),
        (b"<pad>\n<unk>\n<s>\n</s>\nok\n\xff\xfe\n", r"vocab\.txt:6: not valid UTF-8"),
        (b"<pad>\n<unk>\n<s>\n</s>\na\nb\na\n", r"vocab\.txt:7: duplicate token 'a' \(first on line 5\)"),
        (b"<pad>\n<s>\n<unk>\n</s>\n", r"vocab\.txt:2: expected reserved token '<unk>', found '<s>'"),
        (b"<pad>\n<unk>\n", r"vocab\.txt:3: expected reserved token '<s>', found end of file"),
        (b"<pad>\n<unk>\n\n<s>\n</s>\n", r"vocab\.txt:3: empty token"),
    ],
)
def test_load_rejects_bad_files_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        Vocabulary.load(path)


def test_load_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.txt: vocabulary file not found"):
        Vocabulary.load(tmp_path / "nowhere.txt")


def test_in_graph_lookups_dense_and_ragged():
    vocab = small_vocabulary()
    dense = vocab.lookup_ids(tf.constant([["a", "man"], ["dog", "."]]))
    assert dense.dtype == tf.int32
    assert dense.numpy().tolist() == [[4, 5], [UNK_ID, 7]]
    ragged = vocab.lookup_ids(tf.ragged.constant([["man", "runs", "fast"], []]))
    assert ragged.to_list() == [[5, 6, UNK_ID], []]
    assert vocab.lookup_tokens(tf.constant([[4, 5, 3]])).numpy().tolist() == [[b"a", b"man", b"</s>"]]
    assert vocab.lookup_tokens(tf.ragged.constant([[6], []])).to_list() == [[b"runs"], []]


def test_lookup_table_is_built_once_and_reused_inside_tf_function():
    vocab = small_vocabulary()

    @tf.function
    def lookup(tokens):
        return vocab.lookup_ids(tokens)

    assert lookup(tf.constant(["man", "x"])).numpy().tolist() == [5, UNK_ID]
    table = vocab._table
    assert lookup(tf.constant(["runs", "a", "b"])).numpy().tolist() == [6, 4, UNK_ID]
    assert vocab.lookup_ids(tf.constant(["."])).numpy().tolist() == [7]
    assert vocab._table is table


def test_encode_adds_markers_and_truncates_before_them():
    vocab, tokenizer = small_vocabulary(), WordTokenizer()
    sentences = tf.constant(["A man runs.", "", "man, man, man"])
    assert encode(sentences, tokenizer, vocab).to_list() == [[UNK_ID, 5, 6, 7], [], [5, 8, 5, 8, 5]]
    with_markers = encode(sentences, tokenizer, vocab, add_bos=True, add_eos=True, max_length=2)
    assert with_markers.dtype == tf.int32
    assert with_markers.to_list() == [[BOS_ID, UNK_ID, 5, EOS_ID], [BOS_ID, EOS_ID], [BOS_ID, 5, 8, EOS_ID]]
    assert encode(sentences, tokenizer, vocab, add_eos=True).to_list()[1] == [EOS_ID]


def test_decode_cuts_at_first_eos_and_drops_pad_and_bos():
    vocab, tokenizer = small_vocabulary(), WordTokenizer()
    ids = tf.constant(
        [
            [BOS_ID, 4, 5, 6, 7, EOS_ID, 4, PAD_ID],
            [5, 8, 5, 6, EOS_ID, EOS_ID, PAD_ID, PAD_ID],
            [EOS_ID, 4, 4, 4, 4, 4, 4, 4],
            [4, 5, 6, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
        ]
    )
    assert decode(ids, vocab, tokenizer).numpy().tolist() == [b"a man runs.", b"man, man runs", b"", b"a man runs"]
    assert decode(tf.cast(ids, tf.int64), vocab, tokenizer).numpy().tolist()[0] == b"a man runs."


class Translator(tf.Module):
    """A minimal serving module: strings in, ids and normalized text out."""

    def __init__(self, vocab, tokenizer):
        super().__init__()
        self.vocab = vocab
        self.tokenizer = tokenizer

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(self, texts):
        ids = encode(texts, self.tokenizer, self.vocab, add_eos=True)  # [N, None]
        dense_ids = ids.to_tensor(default_value=PAD_ID)  # [N, T]
        return {"ids": dense_ids, "text": decode(dense_ids, self.vocab, self.tokenizer)}


@pytest.mark.parametrize("call_before_saving", [True, False])
def test_module_with_vocabulary_saves_and_reloads_with_identical_outputs(tmp_path, call_before_saving):
    vocab = Vocabulary.build(tokens_of(["A man runs.", "A woman (old) walks, slowly!"]))
    module = Translator(vocab, WordTokenizer())
    sentences = tf.constant(["A man walks slowly!", "An old man runs.", ""])
    if call_before_saving:
        module.serve(sentences)
    tf.saved_model.save(module, str(tmp_path / "model"))
    assert not any((tmp_path / "model" / "assets").glob("*"))
    original = module.serve(sentences)
    expected_first_row = [vocab.token_to_id(token) for token in ["A", "man", "walks", "slowly", "!"]] + [EOS_ID]

    restored = tf.saved_model.load(str(tmp_path / "model"))
    outputs = restored.serve(sentences)
    np.testing.assert_array_equal(outputs["ids"].numpy(), original["ids"].numpy())
    assert outputs["ids"].numpy()[0].tolist() == expected_first_row
    assert outputs["ids"].numpy()[1, 0] == UNK_ID
    assert outputs["text"].numpy().tolist() == original["text"].numpy().tolist()
    assert outputs["text"].numpy().tolist() == [b"A man walks slowly!", b"<unk> old man runs.", b""]


def test_saved_serving_graph_uses_core_ops_only(tmp_path):
    """Stock TF Serving has no tensorflow-text kernels and no Python: every op must be a core op."""
    from tensorflow.core.protobuf import saved_model_pb2

    module = Translator(Vocabulary.build([["a", "b"]]), WordTokenizer(lowercase=True))
    tf.saved_model.save(module, str(tmp_path / "model"))
    saved_model = saved_model_pb2.SavedModel.FromString((tmp_path / "model" / "saved_model.pb").read_bytes())
    graph = saved_model.meta_graphs[0].graph_def
    op_types = {node.op for node in graph.node}
    op_types |= {node.op for function in graph.library.function for node in function.node_def}
    op_types -= {function.signature.name for function in graph.library.function}
    assert {"StringSplitV2", "StaticRegexReplace", "StringLower", "LookupTableFindV2"} <= op_types
    assert not [op for op in op_types if not hasattr(tf.raw_ops, op)]
