"""Captioning run configuration: YAML file sections, overridable by command-line flags."""

import dataclasses

from seq2seq.config import SectionedConfig
from seq2seq.factory import ModelSpec
from seq2seq.training import TrainingConfig
from seq2seq.tasks.captioning.encoder import BACKBONES, check_small_cnn_options


@dataclasses.dataclass
class DataConfig:
    """Where the captions come from: the built-in synthetic shapes, a Karpathy split JSON, TSV files or TFDS coco_captions."""

    shapes_train: int | None = None
    shapes_val: int = 200
    shapes_seed: int = 0
    karpathy_json: str | None = None
    image_folder: str | None = None
    train_tsv: str | None = None
    valid_tsv: str | None = None
    tfds_name: str | None = None
    tfds_train_split: str = "train"
    tfds_valid_split: str = "val"
    tfds_data_dir: str | None = None
    tfds_max_examples: int | None = None
    on_missing: str = "raise"
    on_error: str = "skip"
    lowercase: bool = True
    vocab_size: int = 10000
    min_count: int = 1
    max_caption_length: int = 30

    def __post_init__(self):
        sources = [self.shapes_train is not None, bool(self.karpathy_json), bool(self.train_tsv), bool(self.tfds_name)]
        if sum(sources) != 1:
            raise ValueError(
                "give the training data one way: --shapes-train N (synthetic shapes), --karpathy-json FILE "
                "with --image-folder DIR, --train-tsv FILE, or --tfds-name coco_captions"
            )
        if self.shapes_train is not None and self.shapes_train < 1:
            raise ValueError(f"--shapes-train must be at least 1, got {self.shapes_train}")
        if self.shapes_val < 0:
            raise ValueError(f"--shapes-val must be at least 0, got {self.shapes_val}")
        if self.karpathy_json and not self.image_folder:
            raise ValueError("--karpathy-json needs --image-folder (the folder its image paths are relative to)")
        if self.tfds_name and self.tfds_name != "coco_captions":
            raise ValueError(f"--tfds-name must be 'coco_captions', got {self.tfds_name!r}")
        if self.on_missing not in ("raise", "skip"):
            raise ValueError(f"on_missing must be 'raise' or 'skip', got {self.on_missing!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.max_caption_length < 1:
            raise ValueError(f"max_caption_length must be at least 1, got {self.max_caption_length}")


@dataclasses.dataclass
class ModelConfig(ModelSpec):
    """Image encoder (Show, Attend and Tell: a CNN and a projection to `encoder_units`, default
    units; see seq2seq.tasks.captioning.encoder.ImageEncoder) and a decoder, "rnn" (attention) or
    "transformer" (seq2seq.factory.ModelSpec)."""

    ENCODER_FIELDS = {"cnn": {"encoder_units"}}

    encoder_type: str = "cnn"
    attention: str = "bahdanau"
    dropout: float = 0.0
    backbone: str = "small_cnn"
    backbone_weights: str | None = None
    fine_tune: bool | None = None
    cache_features: bool = False
    image_size: int = 64
    small_cnn_pools: int = 3
    small_cnn_3x3_blocks: int = 4
    grid_positions: bool = False
    encoder_activation: str = "relu"
    encoder_dropout: float = 0.0
    # Off by default: on the shapes data it sent consecutive words of one object to different
    # cells and cut attention localisation (saved_models/shapes_captioner/COMMAND.md).
    attention_regularizer: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.backbone == "small_cnn" and self.backbone_weights == "imagenet":
            raise ValueError("small_cnn has no ImageNet weights; train it from scratch (no --backbone-weights)")
        check_small_cnn_options(self.backbone, self.small_cnn_pools, self.small_cnn_3x3_blocks)
        if self.fine_tune is None:
            self.fine_tune = self.backbone == "small_cnn"
        if self.cache_features and self.fine_tune:
            raise ValueError("--cache-features needs a frozen backbone (--no-fine-tune): cached features would go stale")
        if self.attention_regularizer < 0:
            raise ValueError(f"attention_regularizer must be >= 0, got {self.attention_regularizer}")


@dataclasses.dataclass
class BatchConfig:
    """Batches of `batch_size` captions (each with its image).

    sort_by_length: cut batches from captions sorted by length (less padding). None (the default)
    sorts only when the backbone is frozen: caption length follows the scene (one object, short
    caption; three objects, long caption), so sorted batches hold alike images, and a fine-tuned
    backbone's BatchNorm would then train on batch statistics that tell the scene apart but that
    its moving averages, used at inference, do not (validation loss far above training loss).
    """

    batch_size: int = 64
    pad_to_multiple: int = 1
    sort_by_length: bool | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclasses.dataclass
class CaptionConfig(SectionedConfig):
    data: DataConfig
    model: ModelConfig
    batching: BatchConfig
    training: TrainingConfig

    SECTIONS = {"data": DataConfig, "model": ModelConfig, "batching": BatchConfig, "training": TrainingConfig}
