"""seq2seq: encoder-decoder models on TensorFlow 2 and Keras 3 for translation and captioning."""

from seq2seq.attention import BahdanauAttention, LuongAttention
from seq2seq.decoders import AttentionDecoder
from seq2seq.decoding import (
    DecodingResult,
    beam_search,
    greedy_search,
    max_length_from_source,
    sampling_search,
    sequence_score,
)
from seq2seq.encoders import Bridge, RNNEncoder
from seq2seq.model import Seq2SeqModel, build_rnn_model
from seq2seq.rnn import RecurrentCell
from seq2seq.transformer import TransformerDecoder, TransformerEncoder, bridge_for, build_transformer_model

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
