"""Captioning run configuration: YAML file sections, overridable by command-line flags."""

import dataclasses

from seq2seq.config import SectionedConfig, check_choices, option, with_default
from seq2seq.factory import ModelSpec
from seq2seq.training import TrainingConfig
from seq2seq.tasks.captioning.images import IMAGE_FITS
from seq2seq.tasks.captioning.encoder import (
    ACTIVATIONS, BACKBONES, SMALL_CNN_FILTERS, SMALL_CNN_POOLS, check_small_cnn_options,
)

TFDS_NAMES = ("coco_captions",)
BAD_FILE_ACTIONS = ("raise", "skip")  # what a missing or unreadable image file does: stop with an error, or be skipped


@dataclasses.dataclass
class DataConfig:
    """Where the captions come from: the built-in synthetic shapes, a Karpathy split JSON, TSV files or TFDS coco_captions."""

    shapes_train: int | None = option(
        None, "train on this many images of the built-in synthetic shapes data", bounds="[1, inf)"
    )
    shapes_val: int = option(
        200, "synthetic shapes images to validate on; 0: no validation", bounds="[0, inf)", may_change_on_resume=True
    )
    shapes_seed: int = option(0, "seed that draws the synthetic shapes images", bounds="[0, inf)")
    karpathy_json: str | None = option(
        None, "Karpathy split dataset_*.json: trains on train and restval, validates on val (needs image_folder)"
    )
    image_folder: str | None = option(
        None, "folder the image paths of karpathy_json or the TSV files are relative to", if_none="a TSV's own folder"
    )
    train_tsv: str | None = option(None, "training captions, one image_path<TAB>caption a line (several per image allowed)")
    valid_tsv: str | None = option(
        None, "validation captions, in the format of train_tsv", if_none="no validation", may_change_on_resume=True
    )
    tfds_name: str | None = option(None, "TensorFlow Datasets data set to train on", choices=TFDS_NAMES)
    tfds_train_split: str = option("train", "TFDS split to train on")
    tfds_valid_split: str = option("val", "TFDS split to validate on", may_change_on_resume=True)
    tfds_data_dir: str | None = option(
        None, "TFDS data dir where coco_captions is prepared (it is not downloaded)", if_none="TFDS's own"
    )
    tfds_max_examples: int | None = option(
        None, "read only the first N examples of each TFDS split", if_none="all", bounds="[1, inf)"
    )
    on_missing: str = option(
        "raise", "captions whose image file is missing: stop with an error, or skip them", choices=BAD_FILE_ACTIONS
    )
    on_error: str = option(
        "skip", "image files that cannot be read: stop with an error, or skip them with a warning", choices=BAD_FILE_ACTIONS
    )
    lowercase: bool = option(True, "lowercase the captions before tokenizing")
    vocab_size: int = option(
        10000, "largest vocabulary built from the training captions, reserved tokens included", bounds="[5, inf)"
    )
    min_count: int = option(1, "words seen fewer times in the training captions become <unk>", bounds="[1, inf)")
    max_caption_length: int = option(
        30, "longest caption in tokens: longer training captions are cut, and captioning stops there", bounds="[1, inf)"
    )

    def __post_init__(self):
        check_choices(self)
        sources = [self.shapes_train is not None, bool(self.karpathy_json), bool(self.train_tsv), bool(self.tfds_name)]
        if sum(sources) != 1:
            raise ValueError(
                "give the training data one way: --shapes-train N (synthetic shapes), --karpathy-json FILE "
                "with --image-folder DIR, --train-tsv FILE, or --tfds-name coco_captions"
            )
        if self.karpathy_json and not self.image_folder:
            raise ValueError("--karpathy-json needs --image-folder (the folder its image paths are relative to)")


@dataclasses.dataclass
class ModelConfig(ModelSpec):
    """Image encoder (Show, Attend and Tell: a CNN and a projection to `encoder_units`, default
    units; see seq2seq.tasks.captioning.encoder.ImageEncoder) and a decoder, "rnn" (attention) or
    "transformer" (seq2seq.factory.ModelSpec)."""

    ENCODER_FIELDS = {"cnn": {"encoder_units"}}

    encoder_type: str = with_default(ModelSpec, "encoder_type", "cnn")
    attention: str = with_default(ModelSpec, "attention", "bahdanau")
    dropout: float = with_default(ModelSpec, "dropout", 0.0)
    backbone: str = option(
        "small_cnn", "CNN that turns an image into a grid of features: small_cnn is trained from scratch, the others "
        "come from keras.applications", choices=BACKBONES,
    )
    backbone_weights: str | None = option(
        None, "starting weights of the backbone: imagenet (downloaded by Keras) or a .weights.h5 file", if_none="random"
    )
    fine_tune: bool | None = option(
        None, "train the backbone along with the rest", if_none="small_cnn is trained, a pretrained backbone stays frozen"
    )
    cache_features: bool = option(
        False, "run the frozen backbone once over the images and train on its saved features (needs --no-fine-tune)"
    )
    image_size: int = option(64, "images are resized to this many pixels square", bounds="[1, inf)")
    # Squash by default: on the shapes data, padding captioned other shapes well only for a model
    # trained with much stronger shrinking, which cost clean BLEU-4 and attention localisation
    # (saved_models/shapes_captioner/COMMAND.md).
    image_fit: str = option(
        "squash", "how an image that is not square becomes the square input: squash (each side resized) or pad "
        "(its shorter side extended with copies of the edge pixels, so shapes and relative places stay, and "
        "objects come out smaller: train with a --min-scale that covers it)",
        choices=IMAGE_FITS,
    )
    small_cnn_pools: int = option(
        3, "small_cnn blocks that halve the grid; fewer give a finer grid whose cells see less of the image",
        choices=SMALL_CNN_POOLS,
    )
    small_cnn_3x3_blocks: int = option(
        4, "small_cnn blocks with 3x3 convolutions, the others 1x1; fewer: each grid cell sees less around it",
        choices=range(len(SMALL_CNN_FILTERS) + 1),
    )
    # On by default: with it the shapes captioner kept attention localisation at 93-95% while
    # learning other aspect ratios (min_aspect 0.8); without, 77-80% (shapes_captioner/COMMAND.md).
    grid_positions: bool = option(True, "add a learned vector per grid cell to the memory, so attention also reads where")
    encoder_activation: str | None = option(
        "relu", "activation of the projection of the image features; null in a config file: linear", choices=ACTIVATIONS
    )
    encoder_dropout: float = option(0.0, "dropout rate on the backbone features, before the projection", bounds="[0, 1)")
    # Off by default: on the shapes data it sent consecutive words of one object to different
    # cells and cut attention localisation (saved_models/shapes_captioner/COMMAND.md).
    attention_regularizer: float = option(
        0.0, "weight of the doubly stochastic attention penalty: every grid cell attended about equally over a caption",
        bounds="[0, inf)",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.backbone == "small_cnn" and self.backbone_weights == "imagenet":
            raise ValueError("small_cnn has no ImageNet weights; train it from scratch (no --backbone-weights)")
        check_small_cnn_options(self.backbone, self.small_cnn_pools, self.small_cnn_3x3_blocks)
        if self.fine_tune is None:
            self.fine_tune = self.backbone == "small_cnn"
        if self.cache_features and self.fine_tune:
            raise ValueError("--cache-features needs a frozen backbone (--no-fine-tune): cached features would go stale")


@dataclasses.dataclass
class BatchConfig:
    """Batches of `batch_size` captions (each with its image).

    Sorting by length (sort_by_length) is left off by default for a fine-tuned backbone:
    caption length follows the scene (one object, short caption; three objects, long caption),
    so sorted batches hold alike images, and a fine-tuned backbone's BatchNorm would then train
    on batch statistics that tell the scene apart but that its moving averages, used at
    inference, do not (validation loss far above training loss).
    """

    batch_size: int = option(64, "captions per batch, each with its image", bounds="[1, inf)")
    pad_to_multiple: int = option(
        1, "pad each batch's length to a multiple of this (fewer shapes to compile)", bounds="[1, inf)"
    )
    sort_by_length: bool | None = option(
        None, "cut batches from captions sorted by length, for less padding", if_none="only with a frozen backbone"
    )

    def __post_init__(self):
        check_choices(self, "batching ")


@dataclasses.dataclass
class AugmentationConfig:
    """Random changes to every training image, drawn anew each time it is batched
    (seq2seq.tasks.captioning.augment): none changes what a caption says (no flips, no crops,
    colours keep their names). Each kind is off at its neutral value."""

    augment: bool | None = option(
        None, "augment the training images with the kinds below",
        if_none="on for a backbone trained from scratch (no backbone_weights), off for a pretrained one",
    )
    jpeg_min_quality: int = option(
        30, "re-encode each image as JPEG at a quality drawn from [this, 100]; 100: off", bounds="[1, 100]"
    )
    min_scale: float = option(
        0.85, "shrink each image by a factor from [this, 1] and place it where all of it stays inside the frame "
        "(the border repeats the edge pixels); 1: off", bounds="(0, 1]",
    )
    # Without it, scenes of other aspect ratios (which the served graph squashes into the square
    # input) were captioned at BLEU-4 0.83-0.88; with it and grid_positions, 0.91-0.93, and
    # localisation rose from 89% to 93% (saved_models/shapes_captioner/COMMAND.md, version 3).
    min_aspect: float = option(
        0.8, "shrink one axis (chosen at random) further by a factor from [this, 1], as another aspect ratio "
        "squashed into the square input is; 1: off", bounds="(0, 1]",
    )
    brightness: float = option(0.05, "add a brightness offset from [-this, this] of the 0-255 range; 0: off", bounds="[0, 0.5]")
    contrast: float = option(0.1, "scale the contrast by a factor from [1 - this, 1 + this]; 0: off", bounds="[0, 1)")
    noise_stddev: float = option(
        0.02, "add Gaussian noise with this standard deviation, a fraction of the 0-255 range; 0: off", bounds="[0, 0.5]"
    )


@dataclasses.dataclass
class CaptionConfig(SectionedConfig):
    data: DataConfig
    model: ModelConfig
    batching: BatchConfig
    training: TrainingConfig
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)

    SECTIONS = {
        "data": DataConfig, "model": ModelConfig, "batching": BatchConfig, "training": TrainingConfig,
        "augmentation": AugmentationConfig,
    }

    @classmethod
    def load(cls, path):
        """A saved config; one written before the augmentation section existed trained without
        augmentation, so it stays off for that run."""
        values = cls.read_values(path)
        values.setdefault("augmentation", {"augment": False})
        return cls.from_dict(values)

    def __post_init__(self):
        if self.augmentation.augment and self.model.cache_features:
            raise ValueError(
                "--augment and --cache-features do not mix: cached features are of the images as they are, so "
                "augmented images would never reach the model; drop one (--no-augment, or no --cache-features)"
            )
