"""Translation run configuration: YAML file sections, overridable by command-line flags."""

import dataclasses

from seq2seq.config import SectionedConfig, check_choices, option
from seq2seq.factory import ModelSpec
from seq2seq.training import TrainingConfig

SCHEMES = ("word", "sentencepiece")
SENTENCEPIECE_MODEL_TYPES = ("unigram", "bpe", "char", "word")  # SentencePiece's trainer's model_type


@dataclasses.dataclass
class DataConfig:
    """Where the parallel data comes from: line-aligned files, a TSV file or a TFDS name."""

    train_source: str | None = option(None, "training source sentences, one a line (with train_target)")
    train_target: str | None = option(None, "training target sentences, line by line the translations of train_source")
    train_tsv: str | None = option(None, "training pairs, one source<TAB>target a line")
    valid_source: str | None = option(
        None, "validation source sentences, one a line (with valid_target)", may_change_on_resume=True
    )
    valid_target: str | None = option(
        None, "validation target sentences, line-aligned with valid_source", may_change_on_resume=True
    )
    valid_tsv: str | None = option(None, "validation pairs, one source<TAB>target a line", may_change_on_resume=True)
    tfds_name: str | None = option(None, "TensorFlow Datasets translation data set, e.g. ted_hrlr_translate/pt_to_en")
    tfds_train_split: str = option("train", "TFDS split to train on")
    tfds_valid_split: str = option("validation", "TFDS split to validate on", may_change_on_resume=True)
    tfds_data_dir: str | None = option(None, "where TFDS keeps its data sets", if_none="TFDS's own, ~/tensorflow_datasets")
    source_lang: str | None = option(
        None, "TFDS feature of the source language, e.g. de", if_none="the data set's supervised keys"
    )
    target_lang: str | None = option(
        None, "TFDS feature of the target language, e.g. en", if_none="the data set's supervised keys"
    )
    max_source_length: int = option(
        100, "longest source in tokens: longer training pairs are dropped, longer inputs to translate are cut",
        bounds="[1, inf)",
    )
    max_target_length: int = option(100, "longest target in tokens: longer training pairs are dropped", bounds="[1, inf)")

    def __post_init__(self):
        check_choices(self, "data ")
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
    """How sentences become tokens, and the vocabularies."""

    scheme: str = option(
        "word", "word: words and punctuation (core TF ops, stock TF Serving); sentencepiece: subwords "
        "(needs tensorflow-text ops)", choices=SCHEMES,
    )
    lowercase: bool = option(False, "lowercase the text before tokenizing (word scheme)")
    source_vocab_size: int = option(
        8000, "size of the source vocabulary (or SentencePiece model), reserved tokens included", bounds="[5, inf)"
    )
    target_vocab_size: int = option(
        8000, "size of the target vocabulary (or SentencePiece model), reserved tokens included", bounds="[5, inf)"
    )
    min_count: int = option(
        1, "words seen fewer times in the training data become <unk> (word scheme)", bounds="[1, inf)"
    )
    sentencepiece_model_type: str = option(
        "unigram", "SentencePiece segmentation algorithm (sentencepiece scheme)", choices=SENTENCEPIECE_MODEL_TYPES
    )
    sentencepiece_sample_size: int = option(
        1_000_000, "sentences SentencePiece trains on, sampled at random from the training data (bounded memory; "
        "sentencepiece scheme)", bounds="[1, inf)",
    )
    joint_vocabulary: bool = option(
        False, "one vocabulary (one SentencePiece model) for both sides, built from source and target text together "
        "(needs source_vocab_size == target_vocab_size; what model.share_embeddings needs)",
    )
    vocabularies_from: str | None = option(
        None, "use the vocabularies (and SentencePiece models) of this run directory or exported SavedModel "
        "instead of building new ones: what ensemble members need, one target vocabulary; the vocabulary "
        "sizes are then theirs", if_none="built from the training data",
    )

    def __post_init__(self):
        check_choices(self, "tokenization ")
        if self.joint_vocabulary and self.source_vocab_size != self.target_vocab_size:
            raise ValueError(
                f"tokenization joint_vocabulary needs source_vocab_size == target_vocab_size, got "
                f"{self.source_vocab_size} and {self.target_vocab_size}; give both the size of the joint vocabulary"
            )


@dataclasses.dataclass
class ModelConfig(ModelSpec):
    """The encoder-decoder over source and target tokens (seq2seq.factory.ModelSpec)."""


@dataclasses.dataclass
class BatchConfig:
    """Batches of `batch_size` sentence pairs, or of at most `max_tokens` padded tokens."""

    batch_size: int | None = option(64, "sentence pairs per batch (max_tokens, when set, replaces it)", bounds="[1, inf)")
    max_tokens: int | None = option(
        None, "instead of batch_size: at most this many padded tokens per batch (pairs times the longest one)",
        if_none="batch_size decides", bounds="[1, inf)",
    )
    bucket_width: int | None = option(
        None, "sort pairs into length buckets of this width before batching (more varied batches, a little more padding)",
        if_none="sort by exact length", bounds="[1, inf)",
    )
    pad_to_multiple: int = option(
        1, "pad each batch's length to a multiple of this (fewer shapes to compile)", bounds="[1, inf)"
    )

    def __post_init__(self):
        check_choices(self, "batching ")
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

    def __post_init__(self):
        if self.model.share_embeddings and not self.tokenization.joint_vocabulary:
            raise ValueError(
                "model share_embeddings needs one vocabulary for both sides: add --joint-vocabulary "
                "(tokenization joint_vocabulary), or drop share_embeddings"
            )


def section_fields(section):
    """(section name, field) pairs of every configurable field, for generating CLI flags."""
    for name, section_class in TranslationConfig.SECTIONS.items():
        if section is None or name == section:
            for field in dataclasses.fields(section_class):
                yield name, field
