"""Image encoders for captioning: a CNN feature grid as attention memory.

Show, Attend and Tell (Xu et al., 2015): a convolutional backbone turns an image into a
grid of feature vectors [h, w, c]; the grid is flattened to h*w memory positions and
projected to the decoder size, and the decoder starts from the mean feature. `ImageEncoder`
returns the same record as `seq2seq.encoders.RNNEncoder`, so it drops into `Seq2SeqModel`:

    encoder = ImageEncoder("small_cnn", image_size=64, units=256)
    model = Seq2SeqModel(encoder, AttentionDecoder(...), Bridge(...), source_shape=(64, 64, 3))

Callers always pass raw RGB pixels 0..255 (uint8 or float); each backbone's own
preprocessing happens inside the layer.

Feature caching, for a frozen backbone: run the backbone once over the data set with
`compute_features`, train a model whose encoder is `encoder.projection_only()` (a
`FeatureEncoder`, which shares its weights with the image encoder) on the cached
[N, h*w, c] arrays, then serve the image model. When the feature model was saved and loaded
(so nothing is shared any more), `image_model_from_feature_model` rebuilds the image model
and copies the weights.
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from seq2seq.model import Seq2SeqModel
from seq2seq.precision import Dense, Dropout

BACKBONES = ("mobilenet_v3_small", "efficientnet_b0", "inception_v3", "resnet50", "small_cnn")
PRETRAINED_BACKBONES = BACKBONES[:4]
ACTIVATIONS = (None, "relu", "tanh")
# Smallest square input each backbone accepts (keras.applications' own limits; small_cnn pools at most 3 times).
MIN_IMAGE_SIZE = {"mobilenet_v3_small": 32, "efficientnet_b0": 32, "inception_v3": 75, "resnet50": 32, "small_cnn": 8}
SMALL_CNN_FILTERS = (32, 64, 128, 128)  # by default the first three blocks halve the grid: 64x64 -> 8x8
SMALL_CNN_POOLS = (1, 2, 3)  # how many of the first blocks end in a 2x2 max pool
# Keras' ImageNet EfficientNet divides by sqrt(stddev) once more after its Normalization layer
# (keras/src/applications/efficientnet.py, tensorflow/tensorflow#49930).
_EFFICIENTNET_IMAGENET_STDDEV = (0.229, 0.224, 0.225)


def _halve_ceil(size, times):
    for _ in range(times):
        size = (size + 1) // 2
    return size


def grid_size(backbone: str, image_size: int, small_cnn_pools: int = 3) -> tuple[int, int]:
    """(h, w) of the attention grid a backbone gives for a square image_size input, without building it.

    Attention cell (i, j) covers image rows [i * image_size / h, (i + 1) * image_size / h), and likewise
    for columns (receptive fields are larger; this is the usual mapping for visualisation).
    """
    _check_backbone(backbone, image_size, small_cnn_pools)
    if backbone == "small_cnn":
        size = image_size // 2**small_cnn_pools  # 2x2 max pools, floor
    elif backbone == "inception_v3":
        size = (image_size - 3) // 2 + 1  # 3x3 stride 2, valid
        size = size - 2  # 3x3 valid
        size = (size - 3) // 2 + 1  # max pool
        size = size - 2  # 3x3 valid
        for _ in range(3):  # max pool, mixed3 and mixed8 reductions
            size = (size - 3) // 2 + 1
    else:  # MobileNetV3, EfficientNet, ResNet50: five stride-2 stages with "same"-like padding
        size = _halve_ceil(image_size, 5)
    return size, size


def check_small_cnn_options(backbone, small_cnn_pools, small_cnn_3x3_blocks):
    """The small_cnn-only options: in range, and left at their defaults for other backbones."""
    if small_cnn_pools not in SMALL_CNN_POOLS:
        raise ValueError(f"small_cnn_pools must be one of {SMALL_CNN_POOLS}, got {small_cnn_pools!r}")
    if small_cnn_3x3_blocks not in range(len(SMALL_CNN_FILTERS) + 1):
        raise ValueError(f"small_cnn_3x3_blocks must be in 0..{len(SMALL_CNN_FILTERS)}, got {small_cnn_3x3_blocks!r}")
    if (small_cnn_pools, small_cnn_3x3_blocks) != (3, 4) and backbone != "small_cnn":
        raise ValueError(f"small_cnn_pools and small_cnn_3x3_blocks apply to the small_cnn backbone only, not {backbone}")


def _check_backbone(backbone, image_size, small_cnn_pools=3, small_cnn_3x3_blocks=4):
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    check_small_cnn_options(backbone, small_cnn_pools, small_cnn_3x3_blocks)
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE[backbone]:
        raise ValueError(
            f"image_size for {backbone} must be an int of at least {MIN_IMAGE_SIZE[backbone]}, got {image_size!r}"
        )


def _check_weights(weights):
    if weights is None or weights == "imagenet":
        return weights
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be 'imagenet', None or a path to a .h5 weights file, got {weights!r}")
    path = os.fspath(weights)
    if not path.endswith(".h5"):
        raise ValueError(f"weights file must be a Keras .weights.h5 or .h5 file, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"weights file not found: {path!r}")
    return path


@keras.saving.register_keras_serializable(package="seq2seq")
class FeatureEncoder(keras.layers.Layer):
    """Projects a grid of feature vectors to attention memory: dropout -> Dense(units) -> activation.

    With `positions`, a learned vector per grid position is added to the memory, so that what the
    decoder reads through the attention also says where it is (for "left of", "above").

    Input [batch, positions, feature_dim] (precomputed backbone features, see `compute_features`).
    Returns, like RNNEncoder:
      memory:       [batch, positions, units]
      memory_mask:  [batch, positions] bool, all True
      final_states: [[(mean_feature,)]], mean_feature [batch, units] the mean of the memory over positions
    This is the head of `ImageEncoder`; on its own it is the encoder of a model trained on cached features.
    """

    def __init__(self, units=256, activation="relu", dropout=0.0, positions=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive int, got {units!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.units = units
        self.activation = activation
        self.dropout = dropout
        self.positions = bool(positions)
        self.dropout_layer = Dropout(dropout)
        self.projection = Dense(units, activation=activation, name="projection")

    @property
    def output_size(self):
        return self.units

    @property
    def final_state_size(self):
        return self.units

    def build(self, input_shape):
        """input_shape: (batch, positions, feature_dim). Building twice is a no-op, so an
        ImageEncoder and a feature model can share this layer."""
        if self.built:
            return
        self.projection.build((None, None, input_shape[-1]))
        if self.positions:
            if input_shape[1] is None:
                raise ValueError("FeatureEncoder(positions=True) needs a known number of grid positions")
            self.position_embedding = self.add_weight(
                name="position_embedding",
                shape=(input_shape[1], self.units),
                initializer=keras.initializers.RandomNormal(stddev=0.1),
            )
        self.built = True

    def call(self, features, training=False):
        x = self.dropout_layer(features, training=training)
        memory = self.projection(x)  # [batch, positions, units]
        if self.positions:
            memory = memory + ops.cast(self.position_embedding, memory.dtype)[None]
        mask = ops.ones(ops.shape(memory)[:2], dtype="bool")  # [batch, positions]
        mean_feature = ops.mean(memory, axis=1)  # [batch, units]
        return {"memory": memory, "memory_mask": mask, "final_states": [[(mean_feature,)]]}

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": self.activation,
            "dropout": self.dropout,
            "positions": self.positions,
        }


@keras.saving.register_keras_serializable(package="seq2seq")
class ImageEncoder(keras.layers.Layer):
    """Image batch [batch, H, W, 3] (RGB, 0..255, uint8 or float) -> attention memory over the feature grid.

    backbone: "mobilenet_v3_small", "efficientnet_b0", "inception_v3", "resnet50" (keras.applications,
        include_top=False) or "small_cnn" (4 conv blocks, ~240k parameters, 8x8 grid for 64x64 input,
        trained from scratch).
    small_cnn_pools: how many small_cnn blocks halve the grid (1..3, default 3). Fewer pools give a
        finer grid whose cells see less of the image (receptive field 38 pixels with 3 pools, 26 with
        2), so the attention has to find the object it names (a 16x16 grid for 64x64 input with 2).
    small_cnn_3x3_blocks: how many of small_cnn's four blocks use 3x3 convolutions, the others 1x1
        (default 4). Fewer shrink each cell's receptive field (with 3 pools: 38 pixels with 4, 22
        with 3, 14 with 2), so a cell's features describe what lies on that cell.
    grid_positions: add a learned vector per grid cell to the memory (FeatureEncoder `positions`).
    image_size: H == W; the layer only accepts that size.
    units: memory size (the projection of each grid cell).
    weights: "imagenet" (downloaded by Keras), None (random), or a path to a local .weights.h5/.h5 file
        holding weights for the same keras.applications backbone (include_top=False). "imagenet" is
        ignored for small_cnn; a file is loaded into it.
    trainable_backbone: fine-tune the backbone (True) or freeze it (False; its BatchNorms then always run
        in inference mode). None means True for small_cnn and False for the pretrained backbones.
    activation: after the projection: "relu", "tanh" or None.
    dropout: on the backbone features, before the projection.

    Returns the RNNEncoder record (see FeatureEncoder); h*w positions in row-major order, so position p is
    grid cell (p // w, p % w).

    A loaded model (`from_config`) builds its backbone without pretrained weights, since the saved
    weights replace them: loading never downloads and never needs the original weights file.
    """

    def __init__(
        self,
        backbone="small_cnn",
        image_size=64,
        units=256,
        weights=None,
        trainable_backbone=None,
        activation="relu",
        dropout=0.0,
        small_cnn_pools=3,
        small_cnn_3x3_blocks=4,
        grid_positions=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_backbone(backbone, image_size, small_cnn_pools, small_cnn_3x3_blocks)
        self.small_cnn_pools = small_cnn_pools
        self.small_cnn_3x3_blocks = small_cnn_3x3_blocks
        self.grid_positions = bool(grid_positions)
        self.weights_source = _check_weights(weights)
        self.backbone_name = backbone
        self.image_size = image_size
        self.units = units
        self.trainable_backbone = backbone == "small_cnn" if trainable_backbone is None else bool(trainable_backbone)
        self.activation = activation
        self.dropout = dropout
        self.head = FeatureEncoder(units, activation=activation, dropout=dropout, positions=grid_positions, name="head")
        self.backbone = self._make_backbone(self.weights_source)
        self.backbone.trainable = self.trainable_backbone

    def _make_backbone(self, weights):
        shape = (self.image_size, self.image_size, 3)
        if self.backbone_name == "small_cnn":
            model = _small_cnn(shape, self.small_cnn_pools, self.small_cnn_3x3_blocks)
        elif self.backbone_name == "efficientnet_b0":
            # Always the weights=None architecture (no extra ImageNet rescaling layer), so that a model
            # built from config, or from a local file, has the same layers; see _efficientnet_input.
            model = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=shape)
            if weights == "imagenet":
                pretrained = keras.applications.EfficientNetB0(include_top=False, weights="imagenet", input_shape=shape)
                model.set_weights(pretrained.get_weights())
                _finalize_normalization(model)
        else:
            application = {
                "mobilenet_v3_small": keras.applications.MobileNetV3Small,
                "inception_v3": keras.applications.InceptionV3,
                "resnet50": keras.applications.ResNet50,
            }[self.backbone_name]
            imagenet = "imagenet" if weights == "imagenet" else None
            model = application(include_top=False, weights=imagenet, input_shape=shape)
        if weights not in (None, "imagenet"):
            model.load_weights(weights)
            _finalize_normalization(model)
        return model

    @property
    def grid_size(self):
        """(h, w) of the attention grid."""
        return tuple(self.backbone.output_shape[1:3])

    @property
    def num_positions(self):
        h, w = self.grid_size
        return h * w

    @property
    def feature_dim(self):
        """Channels of the backbone feature map (the size of a cached feature vector)."""
        return self.backbone.output_shape[-1]

    @property
    def output_size(self):
        return self.units

    @property
    def final_state_size(self):
        return self.units

    def build(self, input_shape):
        """input_shape: (batch, H, W, 3) with H == W == image_size (None accepted)."""
        expected = (self.image_size, self.image_size, 3)
        got = tuple(input_shape)[1:]
        if len(got) != 3 or any(g is not None and g != e for g, e in zip(got, expected)):
            raise ValueError(f"ImageEncoder expects images of shape {expected}, got {got}")
        self.head.build((None, self.num_positions, self.feature_dim))

    def preprocess(self, images):
        """Raw pixels [batch, H, W, 3] 0..255 -> the backbone's expected input, float32."""
        x = ops.cast(images, "float32")
        if self.backbone_name == "small_cnn":
            return x / 255.0
        if self.backbone_name == "inception_v3":
            return keras.applications.inception_v3.preprocess_input(x)  # [-1, 1]
        if self.backbone_name == "resnet50":
            return keras.applications.resnet50.preprocess_input(x)  # BGR, ImageNet mean subtracted
        if self.backbone_name == "efficientnet_b0":
            return self._efficientnet_input(x)
        return x  # MobileNetV3 rescales to [-1, 1] itself

    def _efficientnet_input(self, x):
        """EfficientNet rescales and normalises 0..255 pixels itself. Keras' ImageNet model has one more
        layer, Rescaling(1 / sqrt(stddev)) after its Normalization; our backbone never has it, so when
        ImageNet statistics are loaded (mean != 0) the same per-channel scale s is applied here, before
        the backbone: ((s x + 255 m (1 - s)) / 255 - m) / sqrt(v) == s ((x / 255 - m) / sqrt(v))."""
        normalization = _normalization_layer(self.backbone)
        mean = ops.cast(normalization.adapt_mean, "float32")  # [3], read live: follows loaded weights
        imagenet_scale = ops.convert_to_tensor([1.0 / math.sqrt(s) for s in _EFFICIENTNET_IMAGENET_STDDEV])
        scale = ops.where(ops.any(ops.not_equal(mean, 0.0)), imagenet_scale, ops.ones_like(imagenet_scale))
        return x * scale + 255.0 * mean * (1.0 - scale)

    def backbone_features(self, images, training=False):
        """images [batch, H, W, 3] 0..255 -> backbone features [batch, h*w, feature_dim]."""
        features = self.backbone(self.preprocess(images), training=training)  # [batch, h, w, c]
        return ops.reshape(features, (-1, self.num_positions, self.feature_dim))

    def call(self, images, training=False):
        return self.head(self.backbone_features(images, training=training), training=training)

    def compute_mask(self, inputs, mask=None):
        return None

    def projection_only(self):
        """The FeatureEncoder head: the encoder for a model trained on `compute_features` output.

        It is this encoder's own head (shared weights), so training a feature model trains this encoder."""
        return self.head

    def load_projection(self, feature_encoder):
        """Copies a trained FeatureEncoder's weights into this encoder's head (e.g. after loading a saved
        feature model)."""
        theirs = (feature_encoder.units, feature_encoder.activation, feature_encoder.positions)
        if theirs != (self.units, self.activation, self.grid_positions):
            raise ValueError(
                f"FeatureEncoder(units={feature_encoder.units}, activation={feature_encoder.activation!r}, "
                f"positions={feature_encoder.positions}) does not match this encoder (units={self.units}, "
                f"activation={self.activation!r}, grid_positions={self.grid_positions})"
            )
        kernel = feature_encoder.projection.kernel
        if kernel.shape[0] != self.feature_dim:
            raise ValueError(f"FeatureEncoder takes {kernel.shape[0]} features, this backbone gives {self.feature_dim}")
        if not self.head.built:
            self.head.build((None, self.num_positions, self.feature_dim))
        self.head.set_weights(feature_encoder.get_weights())

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": self.backbone_name,
            "image_size": self.image_size,
            "units": self.units,
            "weights": self.weights_source,
            "trainable_backbone": self.trainable_backbone,
            "activation": self.activation,
            "dropout": self.dropout,
            "small_cnn_pools": self.small_cnn_pools,
            "small_cnn_3x3_blocks": self.small_cnn_3x3_blocks,
            "grid_positions": self.grid_positions,
        }

    @classmethod
    def from_config(cls, config):
        """Builds without pretrained weights (the saved weights follow); `weights` stays in the config."""
        config = dict(config)
        weights = config.pop("weights", None)
        layer = cls(**config, weights=None)
        layer.weights_source = weights
        return layer


def _small_cnn(input_shape, pools=3, blocks_3x3=4):
    """Conv-BN-ReLU blocks, 3x3 in the first `blocks_3x3` and 1x1 after; the first `pools` end in a
    2x2 max pool: [S, S, 3] -> [S/2^pools, S/2^pools, 128]."""
    layers = [keras.Input(input_shape)]
    for index, filters in enumerate(SMALL_CNN_FILTERS):
        layers += [
            keras.layers.Conv2D(filters, 3 if index < blocks_3x3 else 1, padding="same", use_bias=False, name=f"block{index}_conv"),
            keras.layers.BatchNormalization(name=f"block{index}_bn"),
            keras.layers.ReLU(name=f"block{index}_relu"),
        ]
        if index < pools:
            layers.append(keras.layers.MaxPooling2D(2, name=f"block{index}_pool"))
    return keras.Sequential(layers, name="small_cnn")


def _normalization_layer(model):
    return next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))


def _finalize_normalization(model):
    """Normalization keeps a copy of its statistics that set_weights does not refresh."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()


def compute_features(encoder: ImageEncoder, images, batch_size: int = 32) -> np.ndarray:
    """Runs the frozen backbone (with its preprocessing) once: images [N, H, W, 3] 0..255 ->
    float32 features [N, h*w, feature_dim], the input of `encoder.projection_only()`."""
    if encoder.trainable_backbone:
        raise ValueError(
            "compute_features needs a frozen backbone (trainable_backbone=False): cached features "
            "would go stale as a trainable backbone learns"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    run = tf.function(lambda batch: encoder.backbone_features(batch, training=False))
    outputs = [
        np.asarray(ops.convert_to_numpy(run(tf.convert_to_tensor(images[start : start + batch_size]))), np.float32)
        for start in range(0, len(images), batch_size)
    ]
    if not outputs:
        return np.zeros((0, encoder.num_positions, encoder.feature_dim), np.float32)
    return np.concatenate(outputs, axis=0)


def image_model_from_feature_model(feature_model: Seq2SeqModel, image_encoder: ImageEncoder) -> Seq2SeqModel:
    """A Seq2SeqModel on images from one trained on cached features: image_encoder's backbone, the
    feature model's projection (copied into image_encoder), decoder and bridge (copied into new layers)."""
    # from_config, not deserialize_keras_object: the copies must be unbuilt, since model.build() builds them.
    decoder = type(feature_model.decoder).from_config(feature_model.decoder.get_config())
    bridge = type(feature_model.bridge).from_config(feature_model.bridge.get_config())
    model = Seq2SeqModel(
        image_encoder,
        decoder,
        bridge,
        source_shape=(image_encoder.image_size, image_encoder.image_size, 3),
        start_id=feature_model.start_id,
        end_id=feature_model.end_id,
        attention_regularizer=feature_model.attention_regularizer,
    )
    model.build()
    image_encoder.load_projection(feature_model.encoder)
    decoder.set_weights(feature_model.decoder.get_weights())
    bridge.set_weights(feature_model.bridge.get_weights())
    return model
