"""One model factory for both tasks: a ModelSpec names the encoder and decoder, mixed freely.

Encoders: "rnn" (RNNEncoder) or "transformer" (TransformerEncoder) over token ids or vectors;
a task may bring its own (captioning's "cnn" image encoder), passed to `build_model` as a
built-to-be layer. Decoders: "rnn" (AttentionDecoder) or "transformer" (TransformerDecoder).
`units` is always the decoder's size and `encoder_units` the encoder's (default: units).
A field that the chosen parts do not read, set to anything but its default, is an error
naming it, so that no setting is silently dropped.
"""

import dataclasses

from seq2seq.decoders import AttentionDecoder
from seq2seq.encoders import RNNEncoder
from seq2seq.model import Seq2SeqModel
from seq2seq.transformer import TransformerDecoder, TransformerEncoder, bridge_for

# The ModelSpec fields each decoder reads (the encoders': ModelSpec.ENCODER_FIELDS).
DECODER_FIELDS = {
    "rnn": {
        "cell_type", "units", "embedding_dim", "decoder_layers", "attention", "attention_score", "attention_normalize",
        "input_feeding", "tie_embeddings", "dropout", "bridge",
    },
    "transformer": {
        "units", "decoder_layers", "num_heads", "ffn_dim", "positions", "max_positions", "tie_embeddings", "dropout",
        "alignment_layer",
    },
}


@dataclasses.dataclass
class ModelSpec:
    """The encoder-decoder. encoder_type / decoder_type: "rnn" or "transformer".

    units: the decoder's size (RNN units, or the Transformer model size); encoder_units: the
    encoder's (default units; a bidirectional RNN's memory is twice it). RNN parts: cell_type,
    embedding_dim (default: their units), layers, bidirectional and merge_mode (encoder),
    attention, attention_score, attention_normalize, input_feeding and bridge (decoder).
    Transformer parts: num_heads, ffn_dim (default 4 * size), positions, max_positions and
    alignment_layer (the decoder layer whose cross-attention is reported as the alignment).
    """

    # The fields each encoder type reads; a task with its own encoder names its type here instead.
    ENCODER_FIELDS = {
        "rnn": {"cell_type", "encoder_units", "embedding_dim", "encoder_layers", "bidirectional", "merge_mode", "dropout"},
        "transformer": {"encoder_units", "encoder_layers", "num_heads", "ffn_dim", "positions", "max_positions", "dropout"},
    }

    encoder_type: str = "rnn"
    decoder_type: str = "rnn"
    cell_type: str = "lstm"
    units: int = 256
    encoder_units: int | None = None
    embedding_dim: int | None = None
    encoder_layers: int = 1
    decoder_layers: int = 1
    bidirectional: bool = True
    merge_mode: str = "concat"
    attention: str = "luong"
    attention_score: str = "general"
    attention_normalize: bool = False
    input_feeding: bool = True
    tie_embeddings: bool = False
    dropout: float = 0.2
    bridge: str = "dense"
    num_heads: int = 4
    ffn_dim: int | None = None
    positions: str = "sinusoidal"
    max_positions: int = 512
    alignment_layer: int = -1

    def __post_init__(self):
        if self.encoder_type not in self.ENCODER_FIELDS:
            raise ValueError(f"model encoder_type must be one of {list(self.ENCODER_FIELDS)}, got {self.encoder_type!r}")
        if self.decoder_type not in DECODER_FIELDS:
            raise ValueError(f"model decoder_type must be one of {list(DECODER_FIELDS)}, got {self.decoder_type!r}")
        used = self.ENCODER_FIELDS[self.encoder_type] | DECODER_FIELDS[self.decoder_type]
        for field in dataclasses.fields(ModelSpec):
            if field.name in used or field.name.endswith("_type"):
                continue
            if getattr(self, field.name) != _default(type(self), field.name):
                raise ValueError(
                    f"model {field.name} does not apply to a {self.encoder_type} encoder with a "
                    f"{self.decoder_type} decoder; remove it (it is read by: {self._readers(field.name)})"
                )

    @property
    def encoder_size(self):
        return self.encoder_units or self.units

    def _readers(self, name):
        parts = [(f"{kind} encoder", fields) for kind, fields in self.ENCODER_FIELDS.items()]
        parts += [(f"{kind} decoder", fields) for kind, fields in DECODER_FIELDS.items()]
        return ", ".join(part for part, fields in parts if name in fields)


def _default(spec_class, name):
    field = next(field for field in dataclasses.fields(spec_class) if field.name == name)
    return field.default


def build_encoder(spec, source_vocab_size=None):
    """The spec's encoder over token ids (source_vocab_size) or, with None, over vectors."""
    if spec.encoder_type == "transformer":
        return TransformerEncoder(
            units=spec.encoder_size, num_layers=spec.encoder_layers, num_heads=spec.num_heads, ffn_dim=spec.ffn_dim,
            dropout=spec.dropout, positions=spec.positions, max_length=spec.max_positions, vocab_size=source_vocab_size,
            name="encoder",
        )
    if spec.encoder_type == "rnn":
        return RNNEncoder(
            cell_type=spec.cell_type, units=spec.encoder_size, num_layers=spec.encoder_layers,
            bidirectional=spec.bidirectional, merge_mode=spec.merge_mode, dropout=spec.dropout,
            vocab_size=source_vocab_size, embedding_dim=spec.embedding_dim, name="encoder",
        )
    raise ValueError(f"encoder_type {spec.encoder_type!r} is a task's own encoder: pass the layer as `encoder`")


def build_decoder(spec, target_vocab_size):
    if spec.decoder_type == "transformer":
        return TransformerDecoder(
            target_vocab_size, units=spec.units, num_layers=spec.decoder_layers, num_heads=spec.num_heads,
            ffn_dim=spec.ffn_dim, dropout=spec.dropout, positions=spec.positions, max_length=spec.max_positions,
            tie_embeddings=spec.tie_embeddings, alignment_layer=spec.alignment_layer, name="decoder",
        )
    return AttentionDecoder(
        target_vocab_size, cell_type=spec.cell_type, units=spec.units, num_layers=spec.decoder_layers,
        attention=spec.attention, attention_score=spec.attention_score, attention_normalize=spec.attention_normalize,
        embedding_dim=spec.embedding_dim, input_feeding=spec.input_feeding, tie_embeddings=spec.tie_embeddings,
        dropout=spec.dropout, name="decoder",
    )


def build_model(
    spec, target_vocab_size, source_vocab_size=None, source_dim=None, encoder=None, source_shape=None,
    start_id=2, end_id=3, attention_regularizer=0.0,
):
    """A built Seq2SeqModel of `spec`.

    Sources are token ids (source_vocab_size), vectors [batch, time, source_dim], or whatever
    a task's own `encoder` layer takes (then give its `source_shape` without the batch axis).
    """
    if encoder is None:
        if source_vocab_size is None and not source_dim:
            raise ValueError("give source_vocab_size for token sources or source_dim for vector sources")
        encoder = build_encoder(spec, source_vocab_size)
        source_shape = (None,) if source_vocab_size is not None else (None, source_dim)
    decoder = build_decoder(spec, target_vocab_size)
    model = Seq2SeqModel(
        encoder, decoder, bridge_for(decoder, kind=spec.bridge), source_shape=source_shape, start_id=start_id,
        end_id=end_id, attention_regularizer=attention_regularizer,
    )
    model.build()
    return model
