"""seq2seq: encoder-decoder models on TensorFlow 2 and Keras 3 for translation and captioning."""

import importlib

# Imported on first use, so that `python -m seq2seq.translate` with a SavedModel does not
# pay for Keras (about 0.8 s) before its first output line.
_HOMES = {
    "BahdanauAttention": "attention",
    "LuongAttention": "attention",
    "AttentionDecoder": "decoders",
    "DecodingResult": "decoding",
    "beam_search": "decoding",
    "greedy_search": "decoding",
    "max_length_from_source": "decoding",
    "sampling_search": "decoding",
    "sequence_score": "decoding",
    "Bridge": "encoders",
    "RNNEncoder": "encoders",
    "Seq2SeqModel": "model",
    "build_rnn_model": "model",
    "RecurrentCell": "rnn",
    "TransformerDecoder": "transformer",
    "TransformerEncoder": "transformer",
    "bridge_for": "transformer",
    "build_transformer_model": "transformer",
}


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"seq2seq.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'seq2seq' has no attribute {name!r}")


__all__ = [
    "AttentionDecoder",
    "BahdanauAttention",
    "Bridge",
    "DecodingResult",
    "LuongAttention",
    "RNNEncoder",
    "RecurrentCell",
    "Seq2SeqModel",
    "TransformerDecoder",
    "TransformerEncoder",
    "beam_search",
    "bridge_for",
    "build_rnn_model",
    "build_transformer_model",
    "greedy_search",
    "max_length_from_source",
    "sampling_search",
    "sequence_score",
]
__version__ = "0.1.0"
TESTED_WITH = "Keras 3.15 and TensorFlow 2.21"  # the versions keras_compat's private hooks were verified with
