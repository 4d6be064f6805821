"""Training-time image augmentation for captioning: what users' images do that clean renders don't.

Captions name colours and positions ("a red circle left of a blue square"), so every change
here keeps what a caption says true: no flips and no crops. The image is shrunk (by a scale
factor, and one axis, chosen at random, by a further aspect factor, as a photo of another
aspect ratio squashed into the square input is) and placed at a random position where all of
it stays inside the frame, the freed border repeating the edge pixels; brightness and contrast
move a little, too little to change a colour's name; Gaussian noise is added; the result is
re-encoded as JPEG at a random quality. Each kind is off at its neutral value.

The random draws are stateless, seeded by the batch's example indices and the run's seed, so
a resumed run sees exactly the augmented batches an uninterrupted one does. They run in the
tf.data pipeline on the uint8 images, before the backbone: augmentation and cached backbone
features do not mix (`AugmentationConfig` refuses the pair).
"""

from __future__ import annotations

import tensorflow as tf

MAX_JPEG_QUALITY = 100


def is_on(config):
    """Whether a captioning config's training images are augmented: `augmentation.augment`, or by
    default on for a backbone trained from scratch (no backbone_weights) and off otherwise."""
    augment = config.augmentation.augment
    if augment is None:
        return config.model.backbone_weights is None and not config.model.cache_features
    return augment


def describe(settings):
    """The kinds of augmentation `settings` turns on, for the training log."""
    kinds = [
        (settings.min_scale < 1, f"shrink to {settings.min_scale:g}-1"),
        (settings.min_aspect < 1, f"aspect {settings.min_aspect:g}-1"),
        (settings.brightness > 0, f"brightness +-{settings.brightness:g}"),
        (settings.contrast > 0, f"contrast +-{settings.contrast:g}"),
        (settings.noise_stddev > 0, f"noise {settings.noise_stddev:g}"),
        (settings.jpeg_min_quality < MAX_JPEG_QUALITY, f"JPEG quality {settings.jpeg_min_quality}-{MAX_JPEG_QUALITY}"),
    ]
    return ", ".join(text for on, text in kinds if on) or "on, but every kind at its neutral value"


def batch_seed(indices, seed):
    """A stateless seed [2] int32 from a batch's example indices and the run's seed: the same batch
    of the plan always gets the same draws, another batch (another epoch's shuffle) other ones."""
    text = tf.strings.reduce_join(tf.strings.as_string(indices), separator=",")
    digest = tf.strings.to_hash_bucket_fast(text, 2**31 - 1)
    return tf.stack([tf.constant(seed % (2**31 - 1), tf.int32), tf.cast(digest, tf.int32)])


def augmenter(settings, seed):
    """augment(images [B, H, W, 3] uint8, indices [B]) -> images [B, H, W, 3] uint8, changed as
    `settings` (an AugmentationConfig) says, with draws from `batch_seed(indices, seed)`."""

    def augment(images, indices):
        seeds = tf.random.experimental.stateless_split(batch_seed(indices, seed), num=4)
        pixels = tf.cast(images, tf.float32)
        if settings.min_scale < 1 or settings.min_aspect < 1:
            pixels = shrink_and_shift(pixels, settings.min_scale, settings.min_aspect, seeds[0])
        if settings.brightness > 0 or settings.contrast > 0:
            pixels = jitter_colours(pixels, settings.brightness, settings.contrast, seeds[1])
        if settings.noise_stddev > 0:
            noise = tf.random.stateless_normal(tf.shape(pixels), seeds[2], stddev=255.0 * settings.noise_stddev)
            pixels = pixels + noise
        images = tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)
        if settings.jpeg_min_quality < MAX_JPEG_QUALITY:
            images = jpeg_reencode(images, settings.jpeg_min_quality, seeds[3])
        return images

    return augment


def shrink_factors(batch, min_scale, min_aspect, seed):
    """Per image (x factor, y factor) [B] each: a common scale from [min_scale, 1], and one axis at
    random times a further aspect factor from [min_aspect, 1]."""
    scale_seed, aspect_seed, axis_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    scale = tf.random.stateless_uniform([batch], scale_seed, min_scale, 1.0)
    aspect = tf.random.stateless_uniform([batch], aspect_seed, min_aspect, 1.0)
    squash_x = tf.random.stateless_uniform([batch], axis_seed) < 0.5
    return scale * tf.where(squash_x, aspect, 1.0), scale * tf.where(squash_x, 1.0, aspect)


def shrink_and_shift(pixels, min_scale, min_aspect, seed):
    """pixels [B, H, W, 3] float -> the same images shrunk by `shrink_factors` and placed at a
    random offset that keeps the whole image (so every object) inside the frame; bilinear, the
    border filled with the nearest edge pixel."""
    batch, height, width = tf.shape(pixels)[0], tf.shape(pixels)[1], tf.shape(pixels)[2]
    factors_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    scale_x, scale_y = shrink_factors(batch, min_scale, min_aspect, factors_seed)
    offsets = tf.random.stateless_uniform([2, batch], offset_seed)
    offset_x = placement(offsets[0], scale_x, tf.cast(width, tf.float32))
    offset_y = placement(offsets[1], scale_y, tf.cast(height, tf.float32))
    # Output pixel (x, y) reads input ((x - offset_x) / scale_x, (y - offset_y) / scale_y).
    zeros = tf.zeros([batch])
    transforms = tf.stack(
        [1.0 / scale_x, zeros, -offset_x / scale_x, zeros, 1.0 / scale_y, -offset_y / scale_y, zeros, zeros], axis=1
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels, transforms=transforms, output_shape=tf.stack([height, width]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="NEAREST",
    )


def placement(uniform, scale, side):
    """The offset, from uniform draws in [0, 1), of an image side of `side` pixels shrunk by
    `scale`: the shrunk image's extent [offset + scale * -0.5, offset + scale * (side - 0.5)] (pixel
    centres at integers) stays inside the frame's [-0.5, side - 0.5]."""
    low = -0.5 * (1.0 - scale)
    high = (side - 0.5) * (1.0 - scale)
    return low + uniform * (high - low)


def jitter_colours(pixels, brightness, contrast, seed):
    """pixels [B, H, W, 3] float in [0, 255] -> contrast scaled around each image's mean by a factor
    from [1 - contrast, 1 + contrast], then a brightness offset from [-brightness, brightness] x 255."""
    batch = tf.shape(pixels)[0]
    contrast_seed, brightness_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    factor = tf.random.stateless_uniform([batch, 1, 1, 1], contrast_seed, 1.0 - contrast, 1.0 + contrast)
    offset = tf.random.stateless_uniform([batch, 1, 1, 1], brightness_seed, -brightness, brightness) * 255.0
    mean = tf.reduce_mean(pixels, axis=[1, 2, 3], keepdims=True)
    return (pixels - mean) * factor + mean + offset


def jpeg_reencode(images, min_quality, seed):
    """images [B, H, W, 3] uint8 -> each JPEG-encoded and decoded at a quality from [min_quality, 100]."""
    seeds = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed, minval=None, maxval=None, dtype=tf.int32)

    def reencode(args):
        image, image_seed = args
        return tf.image.stateless_random_jpeg_quality(image, min_quality, MAX_JPEG_QUALITY, image_seed)

    return tf.map_fn(reencode, (images, seeds), fn_output_signature=tf.TensorSpec(images.shape[1:], tf.uint8))
