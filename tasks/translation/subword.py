"""SentencePiece subwords, trained by our `train` command, applied inside the TF graph.

Tokenizing needs the SentencePiece op from tensorflow-text (TF Serving builds that include
tensorflow-text ops load it); detokenizing is plain string ops: pieces are joined and the
word-boundary mark becomes a space.
"""

import hashlib
import io
import itertools
from pathlib import Path

import tensorflow as tf

from seq2seq.text import RESERVED_TOKENS, DataError, Vocabulary

WORD_BOUNDARY = "\u2581"


def train_sentencepiece(texts, vocab_size, model_type="unigram", character_coverage=1.0, sample_size=1_000_000):
    """Trains a SentencePiece model on the strings `texts` yields and returns its serialized
    bytes. SentencePiece keeps a uniform random sample of `sample_size` of the non-blank texts
    (reservoir sampling), so memory stays bounded however many there are."""
    import sentencepiece

    texts = iter(t for t in texts if t.strip())
    first = next(texts, None)
    if first is None:
        raise DataError("cannot train a SentencePiece model on no text")
    failures = []

    def sentences():
        try:
            yield from itertools.chain([first], texts)
        except DataError as error:  # raised below as it is, not as SentencePiece's RuntimeError
            failures.append(error)

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=sample_size,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    if failures:
        raise failures[0]
    return model.getvalue()


def sentencepiece_vocabulary(model_bytes):
    """Our Vocabulary (reserved tokens first) over the pieces of a SentencePiece model."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    reserved = set(RESERVED_TOKENS) | {"<unk>", "<s>", "</s>"}
    return Vocabulary(list(RESERVED_TOKENS) + [p for p in pieces if p not in reserved])


class SentencePieceTokenizer(tf.Module):
    """Splits text into SentencePiece pieces (strings) and joins pieces back into text."""

    def __init__(self, model_bytes, name=None):
        super().__init__(name=name)
        import tensorflow_text

        self.model_bytes = model_bytes
        # A name of its own per model: resources created under one name made a restored
        # SavedModel that runs two models share one (the source tokenized with the target model).
        digest = hashlib.sha256(model_bytes).hexdigest()[:16]
        self._tokenizer = tensorflow_text.SentencepieceTokenizer(
            model=model_bytes, out_type=tf.string, name=f"sentencepiece_{digest}"
        )

    @classmethod
    def load(cls, path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: SentencePiece model not found")
        return cls(path.read_bytes())

    def save(self, path):
        Path(path).write_bytes(self.model_bytes)

    def tokenize(self, texts):
        """Strings [N] -> ragged string pieces [N, None]."""
        return self._tokenizer.tokenize(tf.convert_to_tensor(texts, tf.string))

    def detokenize(self, tokens):
        """Ragged string pieces [N, None] -> strings [N]."""
        joined = tf.strings.reduce_join(tokens, axis=1)
        return tf.strings.strip(tf.strings.regex_replace(joined, WORD_BOUNDARY, " "))


def sentencepiece_models_in_graph(export_dir):
    """{"source": bytes, "target": bytes}: the SentencePiece models in a SavedModel's graph,
    found through its object graph (root.source_tokenizer._tokenizer._model_resource)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(export_dir) / "saved_model.pb").read_bytes())
    graph = saved_model.meta_graphs[0]
    nodes = graph.object_graph_def.nodes
    functions = {function.signature.name: function for function in graph.graph_def.library.function}

    def child(node_id, name):
        for reference in nodes[node_id].children:
            if reference.local_name == name:
                return reference.node_id
        raise DataError(f"{export_dir}: no SentencePiece model found in the graph (missing {name!r})")

    models = {}
    for side in ("source", "target"):
        resource = child(child(child(0, f"{side}_tokenizer"), "_tokenizer"), "_model_resource")
        creator = nodes[child(resource, "_create_resource")].function.concrete_functions[0]
        found = [node.attr["model"].s for node in functions[creator].node_def if node.op == "SentencepieceOp"]
        if not found:
            raise DataError(f"{export_dir}: no SentencePiece model found in the graph of the {side} tokenizer")
        models[side] = found[0]
    return models
