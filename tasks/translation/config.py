"""Translation run configuration: YAML file sections, overridable by command-line flags."""

import dataclasses

from seq2seq.config import SectionedConfig
from seq2seq.training import TrainingConfig


@dataclasses.dataclass
class DataConfig:
    """Where the parallel data comes from: line-aligned files, a TSV file or a TFDS name."""

    train_source: str | None = None
    train_target: str | None = None
    train_tsv: str | None = None
    valid_source: str | None = None
    valid_target: str | None = None
    valid_tsv: str | None = None
    tfds_name: str | None = None
    tfds_train_split: str = "train"
    tfds_valid_split: str = "validation"
    tfds_data_dir: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    max_source_length: int = 100
    max_target_length: int = 100

    def __post_init__(self):
        sources = [bool(self.train_source or self.train_target), bool(self.train_tsv), bool(self.tfds_name)]
        if sum(sources) != 1:
            raise ValueError(
                "give the training data one way: --train-source and --train-target, --train-tsv, or --tfds-name"
            )
        if bool(self.train_source) != bool(self.train_target):
            raise ValueError("--train-source and --train-target go together")
        if bool(self.valid_source) != bool(self.valid_target):
            raise ValueError("--valid-source and --valid-target go together")


@dataclasses.dataclass
class TokenizationConfig:
    """scheme "word" (core TF string ops; stock TF Serving) or "sentencepiece" (needs tensorflow-text ops)."""

    scheme: str = "word"
    lowercase: bool = False
    source_vocab_size: int = 8000
    target_vocab_size: int = 8000
    min_count: int = 1
    sentencepiece_model_type: str = "unigram"

    def __post_init__(self):
        if self.scheme not in ("word", "sentencepiece"):
            raise ValueError(f"tokenization scheme must be 'word' or 'sentencepiece', got {self.scheme!r}")


ARCHITECTURES = ("rnn", "transformer")


@dataclasses.dataclass
class ModelConfig:
    """The encoder-decoder. encoder_type / decoder_type "rnn" or "transformer" mix freely.

    RNN fields: see seq2seq.model.build_rnn_model. With a Transformer part, `units` is the
    Transformer model size, `encoder_units` the RNN size of a mixed model, and num_heads,
    ffn_dim (default 4 * units), positions and max_positions configure the Transformer
    (see seq2seq.transformer.build_transformer_model).
    """

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

    def __post_init__(self):
        for name in ("encoder_type", "decoder_type"):
            if getattr(self, name) not in ARCHITECTURES:
                raise ValueError(f"model {name} must be one of {list(ARCHITECTURES)}, got {getattr(self, name)!r}")

    @property
    def is_rnn(self):
        return self.encoder_type == self.decoder_type == "rnn"


@dataclasses.dataclass
class BatchConfig:
    """Batches of `batch_size` sentences, or of at most `max_tokens` padded target tokens."""

    batch_size: int | None = 64
    max_tokens: int | None = None
    bucket_width: int | None = None
    pad_to_multiple: int = 1

    def __post_init__(self):
        if self.max_tokens:
            self.batch_size = None
        if not self.batch_size and not self.max_tokens:
            raise ValueError("give batch_size or max_tokens")


@dataclasses.dataclass
class TranslationConfig(SectionedConfig):
    data: DataConfig
    tokenization: TokenizationConfig
    model: ModelConfig
    batching: BatchConfig
    training: TrainingConfig

    SECTIONS = {
        "data": DataConfig,
        "tokenization": TokenizationConfig,
        "model": ModelConfig,
        "batching": BatchConfig,
        "training": TrainingConfig,
    }


def section_fields(section):
    """(section name, field) pairs of every configurable field, for generating CLI flags."""
    for name, section_class in TranslationConfig.SECTIONS.items():
        if section is None or name == section:
            for field in dataclasses.fields(section_class):
                yield name, field
