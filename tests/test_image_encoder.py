"""ImageEncoder: the RNNEncoder record from every backbone, preprocessing, freezing, weights files,
serialization, and feature caching. Small images and random weights only: nothing is downloaded."""

import math

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.legacy.saving import legacy_h5_format

from seq2seq.decoders import AttentionDecoder
from seq2seq.encoders import Bridge
from seq2seq.model import Seq2SeqModel
from seq2seq.tasks.captioning.encoder import (
    BACKBONES,
    FeatureEncoder,
    ImageEncoder,
    compute_features,
    grid_size,
    image_model_from_feature_model,
)

# The smallest size each backbone takes, to keep the tests fast (grids are 1x1 except small_cnn's 8x8).
SIZES = {"mobilenet_v3_small": 32, "efficientnet_b0": 32, "inception_v3": 75, "resnet50": 32, "small_cnn": 64}
UNITS = 16
VOCAB = 12


def images(batch, size, seed=0):
    """Random RGB uint8 images [batch, size, size, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def assert_close(actual, expected, rtol=1e-5):
    """Tolerance relative to the largest value: random pretrained-architecture features can be ~1e-10."""
    expected = np.asarray(expected)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def encoders():
    """One built encoder per backbone (frozen pretrained backbones with random weights)."""
    built = {}
    for backbone in BACKBONES:
        keras.utils.set_random_seed(1)
        encoder = ImageEncoder(backbone, SIZES[backbone], units=UNITS, weights=None)
        encoder.build((None, SIZES[backbone], SIZES[backbone], 3))
        built[backbone] = encoder
    return built


def caption_model(encoder, source_shape):
    decoder = AttentionDecoder(VOCAB, cell_type="gru", units=UNITS, name="decoder")
    bridge = Bridge("gru", UNITS, 1, name="bridge")
    model = Seq2SeqModel(encoder, decoder, bridge, source_shape=source_shape)
    model.build()
    return model


def caption_inputs(source, seed=0):
    target_in = np.random.default_rng(seed).integers(1, VOCAB, (len(source), 5)).astype("int32")
    return {"source": source, "target_in": target_in}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_record_for_every_backbone(encoders, backbone):
    encoder = encoders[backbone]
    size = SIZES[backbone]
    h, w = grid_size(backbone, size)
    assert encoder.grid_size == (h, w)
    assert encoder.output_size == encoder.final_state_size == UNITS
    out = encoder(images(2, size))
    assert tuple(out["memory"].shape) == (2, h * w, UNITS)
    assert out["memory"].dtype == "float32"
    assert out["memory_mask"].dtype == "bool"
    assert tuple(out["memory_mask"].shape) == (2, h * w)
    assert numpy(out["memory_mask"]).all()
    (layer_states,) = out["final_states"]
    ((mean_feature,),) = layer_states
    assert_close(numpy(mean_feature), numpy(out["memory"]).mean(axis=1))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_uint8_and_float_pixels_give_the_same_memory(encoders, backbone):
    pixels = images(2, SIZES[backbone], seed=3)
    from_uint8 = numpy(encoders[backbone](pixels)["memory"])
    from_float = numpy(encoders[backbone](pixels.astype("float32"))["memory"])
    np.testing.assert_array_equal(from_uint8, from_float)


@pytest.mark.parametrize(
    "backbone, module",
    [("inception_v3", keras.applications.inception_v3), ("resnet50", keras.applications.resnet50)],
)
def test_backbone_preprocess_input_is_applied(encoders, backbone, module):
    encoder = encoders[backbone]
    pixels = images(2, SIZES[backbone], seed=4).astype("float32")
    expected = numpy(encoder.backbone(module.preprocess_input(pixels.copy())))
    got = numpy(encoder.backbone_features(pixels))
    assert_close(got, expected.reshape(got.shape))
    raw = numpy(encoder.backbone(pixels)).reshape(got.shape)
    assert not np.allclose(got, raw, rtol=1e-2, atol=1e-2 * np.abs(raw).max())


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_b0"])
def test_backbones_with_built_in_rescaling_take_raw_pixels(encoders, backbone):
    encoder = encoders[backbone]
    assert any(isinstance(layer, keras.layers.Rescaling) for layer in encoder.backbone.layers)
    pixels = images(2, SIZES[backbone], seed=5).astype("float32")
    np.testing.assert_allclose(numpy(encoder.preprocess(pixels)), pixels)


def test_efficientnet_with_imagenet_statistics_matches_keras_imagenet_stem(encoders):
    """Keras' ImageNet EfficientNet rescales by 1/sqrt(stddev) after its Normalization layer, which the
    encoder's backbone lacks; the encoder applies that scale to its input instead. Equivalently, the
    reference divides by sqrt(variance * stddev) inside Normalization."""
    size = SIZES["efficientnet_b0"]
    keras.utils.set_random_seed(2)
    encoder = ImageEncoder("efficientnet_b0", size, units=UNITS)
    reference = ImageEncoder("efficientnet_b0", size, units=UNITS)
    reference.backbone.set_weights(encoder.backbone.get_weights())
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    stddev = np.array([0.229, 0.224, 0.225], np.float32)
    for model, variance in ((encoder.backbone, stddev**2), (reference.backbone, stddev**2 * stddev)):
        normalization = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
        normalization.adapt_mean.assign(mean)
        normalization.adapt_variance.assign(variance)
        normalization.finalize_state()
    pixels = images(2, size, seed=6).astype("float32")
    expected = numpy(reference.backbone(pixels))
    got = numpy(encoder.backbone_features(pixels))
    assert_close(got, expected.reshape(got.shape), rtol=1e-4)


def test_efficientnet_imagenet_weights_are_copied_into_the_plain_architecture(monkeypatch):
    """weights="imagenet", simulated offline: the weights of Keras' ImageNet model (here a random model
    with ImageNet statistics) land in the encoder's backbone, statistics included."""
    application = keras.applications.EfficientNetB0
    keras.utils.set_random_seed(7)
    pretrained = application(include_top=False, weights=None, input_shape=(32, 32, 3))
    normalization = next(layer for layer in pretrained.layers if isinstance(layer, keras.layers.Normalization))
    normalization.adapt_mean.assign([0.485, 0.456, 0.406])
    normalization.adapt_variance.assign([0.229**2, 0.224**2, 0.225**2])

    def fake_application(include_top, weights, input_shape):
        if weights == "imagenet":
            return pretrained
        return application(include_top=include_top, weights=weights, input_shape=input_shape)

    monkeypatch.setattr(keras.applications, "EfficientNetB0", fake_application)
    encoder = ImageEncoder("efficientnet_b0", 32, units=UNITS, weights="imagenet")
    assert encoder.backbone is not pretrained
    for got, expected in zip(encoder.backbone.get_weights(), pretrained.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
    loaded = next(layer for layer in encoder.backbone.layers if isinstance(layer, keras.layers.Normalization))
    np.testing.assert_allclose(numpy(loaded.mean).ravel(), [0.485, 0.456, 0.406])  # the snapshot was refreshed
    assert encoder.get_config()["weights"] == "imagenet"


def test_frozen_backbone_has_no_trainable_weights_and_fine_tuned_does(encoders):
    frozen = encoders["mobilenet_v3_small"]
    assert frozen.trainable_backbone is False
    assert not frozen.backbone.trainable_weights
    assert {id(v) for v in frozen.trainable_weights} == {id(v) for v in frozen.head.trainable_weights}
    # A frozen backbone runs BatchNorm in inference mode even when training.
    pixels = images(2, 32, seed=7)
    np.testing.assert_array_equal(numpy(frozen(pixels, training=True)["memory"]), numpy(frozen(pixels)["memory"]))

    tuned = ImageEncoder("mobilenet_v3_small", 32, units=UNITS, trainable_backbone=True)
    tuned.build((None, 32, 32, 3))
    assert len(tuned.backbone.trainable_weights) > 50
    assert len(tuned.trainable_weights) == len(tuned.backbone.trainable_weights) + 2

    assert encoders["small_cnn"].trainable_backbone is True  # the default: trained from scratch
    assert encoders["small_cnn"].backbone.count_params() < 300_000
    frozen_cnn = ImageEncoder("small_cnn", 64, units=UNITS, trainable_backbone=False)
    frozen_cnn.build((None, 64, 64, 3))
    assert len(frozen_cnn.trainable_weights) == 2


@pytest.mark.parametrize("backbone, suffix", [("mobilenet_v3_small", ".weights.h5"), ("small_cnn", ".weights.h5")])
def test_local_weights_file_is_loaded(encoders, tmp_path, backbone, suffix):
    source = encoders[backbone]
    path = tmp_path / f"backbone{suffix}"
    source.backbone.save_weights(path)
    keras.utils.set_random_seed(99)  # a different random init, overwritten by the file
    loaded = ImageEncoder(backbone, SIZES[backbone], units=UNITS, weights=str(path))
    pixels = images(2, SIZES[backbone], seed=8)
    np.testing.assert_array_equal(numpy(loaded.backbone_features(pixels)), numpy(source.backbone_features(pixels)))


def test_legacy_h5_file_of_a_keras_application_is_loaded(tmp_path):
    """The format of Keras' downloadable *_notop.h5 files, e.g. copied to a machine without internet."""
    keras.utils.set_random_seed(3)
    application = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "resnet50_notop.h5"
    with h5py.File(path, "w") as file:  # Keras 3 only writes .weights.h5 itself; this is the legacy writer
        legacy_h5_format.save_weights_to_hdf5_group(file, application)
    encoder = ImageEncoder("resnet50", 32, units=UNITS, weights=str(path))
    pixels = images(2, 32, seed=9).astype("float32")
    expected = numpy(application(keras.applications.resnet50.preprocess_input(pixels.copy())))
    assert_close(numpy(encoder.backbone_features(pixels)), expected.reshape(2, 1, -1))


def test_config_round_trip_gives_identical_outputs(encoders, tmp_path):
    # A pretrained backbone whose weights file is gone: from_config must not need it.
    path = tmp_path / "gone.weights.h5"
    encoders["mobilenet_v3_small"].backbone.save_weights(path)
    for original in (
        encoders["small_cnn"],
        ImageEncoder("mobilenet_v3_small", 32, units=UNITS, weights=str(path), activation="tanh", dropout=0.1),
    ):
        size = original.image_size
        original.build((None, size, size, 3))
        path.unlink(missing_ok=True)
        config = original.get_config()
        clone = ImageEncoder.from_config(config)
        assert clone.get_config() == config
        clone.build((None, size, size, 3))
        clone.set_weights(original.get_weights())
        pixels = images(3, size, seed=10)
        for key in ("memory", "memory_mask"):
            np.testing.assert_array_equal(numpy(clone(pixels)[key]), numpy(original(pixels)[key]))


def round_trip_captioning_model(tmp_path):
    keras.utils.set_random_seed(4)
    model = caption_model(ImageEncoder("small_cnn", 64, units=UNITS, name="encoder"), (64, 64, 3))
    inputs = caption_inputs(images(2, 64, seed=11))
    path = tmp_path / "captioner.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.encoder, ImageEncoder)
    np.testing.assert_array_equal(numpy(loaded(inputs)), numpy(model(inputs)))
    result = loaded.generate(inputs["source"], max_length=4)
    np.testing.assert_array_equal(numpy(result.ids), numpy(model.generate(inputs["source"], max_length=4).ids))


def test_keras_file_round_trip_of_a_captioning_model(tmp_path):
    round_trip_captioning_model(tmp_path)


def test_cached_features_train_a_projection_that_the_image_encoder_reproduces(tmp_path):
    keras.utils.set_random_seed(5)
    encoder = ImageEncoder("small_cnn", 64, units=UNITS, trainable_backbone=False)
    pixels = images(5, 64, seed=12)
    features = compute_features(encoder, pixels, batch_size=2)
    assert features.shape == (5, 64, encoder.feature_dim) and features.dtype == np.float32

    feature_model = caption_model(encoder.projection_only(), (encoder.num_positions, encoder.feature_dim))
    inputs = caption_inputs(features, seed=13)
    before = [w.copy() for w in encoder.head.get_weights()]
    optimizer = keras.optimizers.SGD(0.5)
    for _ in range(2):
        with tf.GradientTape() as tape:
            logits = feature_model(inputs, training=True)
            loss = keras.ops.mean(
                keras.losses.sparse_categorical_crossentropy(inputs["target_in"], logits, from_logits=True)
            )
        optimizer.apply(tape.gradient(loss, feature_model.trainable_variables), feature_model.trainable_variables)
    assert not np.allclose(before[0], encoder.head.get_weights()[0])

    # The projection is shared: the image encoder gives the cached path's memory.
    np.testing.assert_allclose(
        numpy(encoder(pixels)["memory"]), numpy(feature_model.encoder(features)["memory"]), atol=1e-4
    )

    # After a save and load nothing is shared: rebuild an image model from the feature model.
    path = tmp_path / "features.keras"
    feature_model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.encoder, FeatureEncoder)
    fresh = ImageEncoder.from_config(encoder.get_config())
    fresh.build((None, 64, 64, 3))
    fresh.backbone.set_weights(encoder.backbone.get_weights())
    image_model = image_model_from_feature_model(loaded, fresh)
    np.testing.assert_allclose(
        numpy(image_model({**inputs, "source": pixels})), numpy(feature_model(inputs)), atol=1e-4
    )


def test_compute_features_needs_a_frozen_backbone(encoders):
    with pytest.raises(ValueError, match="frozen"):
        compute_features(encoders["small_cnn"], images(2, 64), batch_size=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "vgg16"}, "backbone must be one of"),
        ({"backbone": "inception_v3", "image_size": 74}, "at least 75"),
        ({"backbone": "small_cnn", "image_size": 4}, "at least 8"),
        ({"backbone": "resnet50", "image_size": 31}, "at least 32"),
        ({"backbone": "resnet50", "image_size": 32, "weights": "/nonexistent/r50.weights.h5"}, "not found"),
        ({"backbone": "resnet50", "image_size": 32, "weights": "weights.keras"}, r"\.h5"),
        ({"backbone": "small_cnn", "activation": "gelu"}, "activation"),
        ({"backbone": "small_cnn", "dropout": 1.0}, "dropout"),
        ({"backbone": "small_cnn", "units": 0}, "units"),
        ({"backbone": "small_cnn", "small_cnn_pools": 4}, "small_cnn_pools must be one of"),
        ({"backbone": "resnet50", "image_size": 32, "small_cnn_pools": 2}, "small_cnn backbone only"),
    ],
)
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageEncoder(**{"units": UNITS, **kwargs})


def test_wrong_image_shape_raises_value_error(encoders):
    with pytest.raises(ValueError, match="expects images of shape"):
        ImageEncoder("small_cnn", 64, units=UNITS).build((None, 32, 32, 3))
    with pytest.raises(ValueError, match="expects images of shape"):
        ImageEncoder("small_cnn", 64, units=UNITS).build((None, 64, 64))
    with pytest.raises(ValueError, match="backbone must be one of"):
        grid_size("vgg16", 64)


def test_grid_size_maps_back_to_the_image():
    assert grid_size("small_cnn", 64) == (8, 8)
    assert grid_size("small_cnn", 64, small_cnn_pools=2) == (16, 16)
    assert grid_size("small_cnn", 64, small_cnn_pools=1) == (32, 32)
    assert grid_size("inception_v3", 299) == (8, 8)
    assert grid_size("resnet50", 224) == grid_size("mobilenet_v3_small", 224) == (7, 7)
    assert grid_size("efficientnet_b0", 97) == (math.ceil(97 / 32),) * 2


def test_small_cnn_with_two_pools_gives_a_finer_grid_and_round_trips():
    encoder = ImageEncoder("small_cnn", 64, units=UNITS, small_cnn_pools=2)
    assert encoder.grid_size == (16, 16)
    pixels = images(2, 64, seed=5)
    memory = numpy(encoder(pixels)["memory"])
    assert memory.shape == (2, 256, UNITS)
    restored = ImageEncoder.from_config(encoder.get_config())
    restored.build((None, 64, 64, 3))
    restored.set_weights(encoder.get_weights())
    assert restored.grid_size == (16, 16)
    assert_close(numpy(restored(pixels)["memory"]), memory)
    # A config written before the option existed builds the three-pool network.
    config = {key: value for key, value in encoder.get_config().items() if key != "small_cnn_pools"}
    assert ImageEncoder.from_config(config).grid_size == (8, 8)


def test_small_cnn_3x3_blocks_sets_the_kernels_and_round_trips():
    encoder = ImageEncoder("small_cnn", 64, units=UNITS, small_cnn_3x3_blocks=2)
    kernels = [layer.kernel_size for layer in encoder.backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    assert kernels == [(3, 3), (3, 3), (1, 1), (1, 1)]
    assert encoder.grid_size == (8, 8)
    restored = ImageEncoder.from_config(encoder.get_config())
    assert [layer.kernel_size for layer in restored.backbone.layers if isinstance(layer, keras.layers.Conv2D)] == kernels
    with pytest.raises(ValueError, match="small_cnn_3x3_blocks must be in"):
        ImageEncoder("small_cnn", 64, units=UNITS, small_cnn_3x3_blocks=5)


def test_grid_positions_tell_the_cells_apart_and_round_trip():
    """Without positions, a blank image gives one memory vector everywhere; with them, each cell differs."""
    blank = np.full((1, 64, 64, 3), 128, np.uint8)
    plain = numpy(ImageEncoder("small_cnn", 64, units=UNITS, small_cnn_3x3_blocks=1)(blank)["memory"])[0]
    assert np.allclose(plain[9:15], plain[9])  # interior cells, away from the zero padding
    encoder = ImageEncoder("small_cnn", 64, units=UNITS, small_cnn_3x3_blocks=1, grid_positions=True)
    memory = numpy(encoder(blank)["memory"])[0]
    assert not np.allclose(memory[9:15], memory[9])
    assert tuple(encoder.head.position_embedding.shape) == (64, UNITS)
    restored = ImageEncoder.from_config(encoder.get_config())
    restored.build((None, 64, 64, 3))
    restored.set_weights(encoder.get_weights())
    assert_close(numpy(restored(blank)["memory"])[0], memory)


def test_grid_positions_must_match_when_loading_a_projection():
    features = FeatureEncoder(UNITS, positions=True)
    features.build((None, 64, 128))
    with pytest.raises(ValueError, match="positions=True"):
        ImageEncoder("small_cnn", 64, units=UNITS).load_projection(features)
    with pytest.raises(ValueError, match="known number of grid positions"):
        FeatureEncoder(UNITS, positions=True).build((None, None, 128))
