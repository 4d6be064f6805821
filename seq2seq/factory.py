"""One model factory for both tasks: a ModelSpec names the encoder and decoder, mixed freely.

Encoders: "rnn" (RNNEncoder) or "transformer" (TransformerEncoder) over token ids or vectors;
a task may bring its own (captioning's "cnn" image encoder), passed to `build_model` as a
built-to-be layer. Decoders: "rnn" (AttentionDecoder) or "transformer" (TransformerDecoder).
`units` is always the decoder's size and `encoder_units` the encoder's (default: units).
A field that the chosen parts do not read, set to anything but its default, is an error
naming it, so that no setting is silently dropped.
"""

import dataclasses

from seq2seq.attention import ATTENTION_KINDS, LuongAttention
from seq2seq.config import check_choices, option
from seq2seq.decoders import AttentionDecoder
from seq2seq.encoders import MERGE_MODES, Bridge, RNNEncoder
from seq2seq.model import Seq2SeqModel
from seq2seq.rnn import CELL_TYPES
from seq2seq.transformer import POSITION_KINDS, TransformerDecoder, TransformerEncoder, bridge_for


# The ModelSpec fields each decoder reads (the encoders': ModelSpec.ENCODER_FIELDS).
DECODER_FIELDS = {
    "rnn": {
        "cell_type", "units", "embedding_dim", "decoder_layers", "attention", "attention_score", "attention_normalize",
        "input_feeding", "tie_embeddings", "dropout", "bridge",
    },
    "transformer": {
        "units", "decoder_layers", "num_heads", "ffn_dim", "positions", "max_positions", "tie_embeddings", "dropout",
        "attention_dropout", "activation_dropout", "alignment_layer", "share_embeddings",
    },
}


@dataclasses.dataclass
class ModelSpec:
    """The encoder-decoder: an encoder and a decoder type, and the fields of each part
    (ENCODER_FIELDS and DECODER_FIELDS say which part reads which field)."""

    # The fields each encoder type reads; a task with its own encoder names its type here instead.
    ENCODER_FIELDS = {
        "rnn": {"cell_type", "encoder_units", "embedding_dim", "encoder_layers", "bidirectional", "merge_mode", "dropout"},
        "transformer": {
            "encoder_units", "encoder_layers", "num_heads", "ffn_dim", "positions", "max_positions", "dropout",
            "attention_dropout", "activation_dropout", "share_embeddings",
        },
    }

    encoder_type: str = option("rnn", "encoder architecture", choices=lambda spec: spec.ENCODER_FIELDS)
    decoder_type: str = option("rnn", "decoder architecture", choices=DECODER_FIELDS)
    cell_type: str = option("lstm", "RNN cell of the RNN encoder and decoder", choices=CELL_TYPES)
    units: int = option(
        256, "size of the decoder (RNN units or Transformer model size), and of the encoder by default", bounds="[1, inf)"
    )
    encoder_units: int | None = option(
        None, "size of the encoder; a bidirectional RNN encoder's memory is twice it with merge_mode concat",
        if_none="units", bounds="[1, inf)",
    )
    embedding_dim: int | None = option(
        None, "size of the token embeddings of the RNN parts", if_none="their units", bounds="[1, inf)"
    )
    encoder_layers: int = option(1, "number of stacked encoder layers", bounds="[1, inf)")
    decoder_layers: int = option(1, "number of stacked decoder layers", bounds="[1, inf)")
    bidirectional: bool = option(True, "let the RNN encoder read the source in both directions")
    merge_mode: str = option("concat", "how a bidirectional RNN encoder joins its two directions", choices=MERGE_MODES)
    attention: str = option(
        "luong", "attention of the RNN decoder: multiplicative (luong) or additive (bahdanau)", choices=ATTENTION_KINDS
    )
    attention_score: str = option(
        "general", "score of luong attention; dot and scaled_dot need equal encoder and decoder sizes",
        choices=LuongAttention.SCORES,
    )
    attention_normalize: bool = option(False, "weight-normalize bahdanau attention")
    input_feeding: bool = option(True, "feed each step's attentional vector into the next RNN decoder step (Luong et al.)")
    tie_embeddings: bool = option(
        False, "use the target embeddings as the decoder's output projection (RNN decoder: needs embedding_dim == units)"
    )
    share_embeddings: bool = option(
        False, "one matrix for the source embedding, the target embedding and the output projection (Transformer "
        "encoder and decoder of equal sizes; needs a joint vocabulary, i.e. equal source and target vocabularies)",
    )
    dropout: float = option(0.2, "dropout rate of the RNN and Transformer layers", bounds="[0, 1)")
    attention_dropout: float | None = option(
        None, "dropout rate of the Transformer attention probabilities", if_none="dropout", bounds="[0, 1)"
    )
    activation_dropout: float | None = option(
        None, "dropout rate after the inner (ReLU) activation of the Transformer feed-forward layers",
        if_none="dropout", bounds="[0, 1)",
    )
    bridge: str = option(
        "dense", "initial state of the RNN decoder: projected from the encoder's final states (dense) or zeros",
        choices=Bridge.KINDS,
    )
    num_heads: int = option(4, "attention heads of the Transformer layers", bounds="[1, inf)")
    ffn_dim: int | None = option(
        None, "inner size of the Transformer feed-forward layers", if_none="4 * the layer's size", bounds="[1, inf)"
    )
    positions: str = option("sinusoidal", "position encoding of the Transformer layers", choices=POSITION_KINDS)
    max_positions: int = option(
        512, "positions a learned position table holds, at least the longest sequence (later ones reuse its last row)",
        bounds="[1, inf)",
    )
    alignment_layer: int = option(
        -1, "Transformer decoder layer whose cross-attention is reported as the alignment; -1: the last"
    )

    def __post_init__(self):
        check_choices(self, "model ")
        used = self.ENCODER_FIELDS[self.encoder_type] | DECODER_FIELDS[self.decoder_type]
        for field in dataclasses.fields(ModelSpec):
            if field.name in used or field.name.endswith("_type"):
                continue
            if getattr(self, field.name) != _default(type(self), field.name):
                raise ValueError(
                    f"model {field.name} does not apply to a {self.encoder_type} encoder with a "
                    f"{self.decoder_type} decoder; remove it (it is read by: {self._readers(field.name)})"
                )
        self.check_shared_embeddings()

    def check_shared_embeddings(self, source_vocab_size=None, target_vocab_size=None):
        """A one-line ValueError saying what to fix when share_embeddings cannot give one matrix:
        both parts must be Transformers of one size (the embedding width), over one vocabulary
        (checked when the vocabulary sizes are given)."""
        if not self.share_embeddings:
            return
        if (self.encoder_type, self.decoder_type) != ("transformer", "transformer"):
            raise ValueError(
                f"model share_embeddings needs a transformer encoder and a transformer decoder, got a "
                f"{self.encoder_type} encoder with a {self.decoder_type} decoder; set both types to transformer "
                "or drop share_embeddings"
            )
        if self.encoder_size != self.units:
            raise ValueError(
                f"model share_embeddings needs encoder_units equal to units (one embedding width), got "
                f"{self.encoder_size} and {self.units}; make them equal or drop share_embeddings"
            )
        if source_vocab_size is not None and source_vocab_size != target_vocab_size:
            raise ValueError(
                f"model share_embeddings needs one joint vocabulary, got {source_vocab_size} source and "
                f"{target_vocab_size} target tokens; use a joint source/target vocabulary or drop share_embeddings"
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
            dropout=spec.dropout, attention_dropout=spec.attention_dropout,
            activation_dropout=spec.activation_dropout, positions=spec.positions, max_length=spec.max_positions,
            vocab_size=source_vocab_size, name="encoder",
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
            ffn_dim=spec.ffn_dim, dropout=spec.dropout, attention_dropout=spec.attention_dropout,
            activation_dropout=spec.activation_dropout, positions=spec.positions, max_length=spec.max_positions,
            tie_embeddings=spec.tie_embeddings or spec.share_embeddings, alignment_layer=spec.alignment_layer,
            name="decoder",
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
    With `spec.share_embeddings` the encoder's and the decoder's embedding (and output
    projection) are one variable, which needs token sources over the target vocabulary.
    """
    spec.check_shared_embeddings(source_vocab_size, target_vocab_size)
    if spec.share_embeddings and (encoder is not None or source_vocab_size is None):
        raise ValueError("model share_embeddings needs token-id sources (a source vocabulary); drop share_embeddings")
    if encoder is None:
        if source_vocab_size is None and not source_dim:
            raise ValueError("give source_vocab_size for token sources or source_dim for vector sources")
        encoder = build_encoder(spec, source_vocab_size)
        source_shape = (None,) if source_vocab_size is not None else (None, source_dim)
    decoder = build_decoder(spec, target_vocab_size)
    model = Seq2SeqModel(
        encoder, decoder, bridge_for(decoder, kind=spec.bridge), source_shape=source_shape, start_id=start_id,
        end_id=end_id, attention_regularizer=attention_regularizer, share_embeddings=spec.share_embeddings,
    )
    model.build()
    return model
