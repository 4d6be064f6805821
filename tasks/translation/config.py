"""Translation run configuration: YAML file sections, overridable by command-line flags."""

import dataclasses

from seq2seq.config import SectionedConfig
from seq2seq.factory import ModelSpec
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


@dataclasses.dataclass
class ModelConfig(ModelSpec):
    """The encoder-decoder over source and target tokens (seq2seq.factory.ModelSpec)."""


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
