"""Image bytes or pixels in, captions out: decoding, resizing, the model and beam search in one TF graph.

`Captioner` is a `tf.Module` whose `caption` function (pixels) is what the CLI calls
in-process, and whose `caption_bytes` function (encoded JPEG/PNG/GIF/BMP/WebP bytes) is what
`export` writes into the SavedModel; both run the very same search graph.

Decoding in the graph (`image_graph`) gives the pixels the CLI's Pillow loading
(`images.load_image` with size=(S, S)) gives for the same file, and the resize is Pillow's
bilinear (width pass, rounding, height pass). Each image is checked from its header before it
is decoded; a refused or undecodable image gets a reason in `errors` and an empty caption,
and the other images of the batch are captioned as usual.

Attention comes back over the flattened feature grid: position p is grid cell
(p // grid_width, p % grid_width), and cell (i, j) of an h x w grid covers image rows
[i * H / h, (i + 1) * H / h) and columns [j * W / w, (j + 1) * W / w) of the
image_size x image_size model input.
"""

import tensorflow as tf

from seq2seq.decoding import one_prefix_each, prefix_from_ragged
from seq2seq.model import ExportedModel
from seq2seq.tasks.captioning.image_graph import CORRUPT_IMAGE, DECODE_PARALLELISM, decode_rgb, pad_to_square, refusal
from seq2seq.tasks.captioning.images import DEFAULT_MAX_PIXELS, check_fit

IMAGES_SPEC = tf.TensorSpec([None], tf.string, name="images")
BEAM_SPEC = tf.TensorSpec([], tf.int32, name="beam_size")
PENALTY_SPEC = tf.TensorSpec([], tf.float32, name="length_penalty")
PREFIX_SPEC = tf.TensorSpec([None], tf.string, name="prefixes")


class Captioner(tf.Module):
    """Captions a batch of images with a trained image Seq2SeqModel (ImageEncoder encoder).

    image_size: the square model input; any other image size is resized in-graph (Pillow's
    bilinear, see `resize`), after padding to a square with image_fit "pad" (see
    `images.IMAGE_FITS`). grid_size: (h, w) of the attention grid. max_length: the longest
    caption, in tokens, the searches may produce (the end token excluded). max_pixels: the
    largest declared width x height an encoded image may have (larger ones are refused
    before decoding); the CLI's limit by default.
    """

    def __init__(self, model, vocab, tokenizer, image_size, grid_size, max_length=30, max_pixels=DEFAULT_MAX_PIXELS,
                 image_fit="squash", name=None):
        super().__init__(name=name)
        self._exported = ExportedModel(model)
        self.model_variables = self._exported.variables
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.max_length = int(max_length)
        self.max_pixels = int(max_pixels)
        self.image_fit = check_fit(image_fit)
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels!r}")
        pixels_spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")
        self.caption_with_prefix = tf.function(
            self._caption_with_prefix, input_signature=[pixels_spec, PREFIX_SPEC, BEAM_SPEC, PENALTY_SPEC]
        )
        self.caption_bytes_with_prefix = tf.function(
            self._caption_bytes_with_prefix, input_signature=[IMAGES_SPEC, PREFIX_SPEC, BEAM_SPEC, PENALTY_SPEC]
        )
        # Without prefixes: the prefix functions with empty ones (the same outputs), so a
        # SavedModel holds each decoding graph once.
        self.caption = tf.function(
            lambda pixels, beam_size, length_penalty: self.caption_with_prefix(
                pixels, tf.fill(tf.shape(pixels)[:1], ""), beam_size, length_penalty
            ),
            input_signature=[pixels_spec, BEAM_SPEC, PENALTY_SPEC],
        )
        self.caption_bytes = tf.function(
            lambda images, beam_size, length_penalty: self.caption_bytes_with_prefix(
                images, tf.fill(tf.shape(images), ""), beam_size, length_penalty
            ),
            input_signature=[IMAGES_SPEC, BEAM_SPEC, PENALTY_SPEC],
        )
        self.info = tf.function(self._info, input_signature=[])

    @property
    def model(self):
        return self._exported.model

    def _info(self):
        """{"image_size", "grid_height", "grid_width", "max_length"}: int32 scalars; "max_pixels": int64;
        "image_fit": string."""
        return {
            "image_fit": tf.constant(self.image_fit),
            "image_size": tf.constant(self.image_size),
            "grid_height": tf.constant(self.grid_size[0]),
            "grid_width": tf.constant(self.grid_size[1]),
            "max_length": tf.constant(self.max_length),
            "max_pixels": tf.constant(self.max_pixels, tf.int64),
        }

    def resize(self, image):
        """image [H, W, 3] uint8 -> [S, S, 3] uint8 as the CLI's `images.load_image` makes it: padded
        to a square first with image_fit "pad", then Pillow's bilinear resize: antialiased when
        shrinking, the width pass first, each pass rounded to uint8; unchanged when already S x S."""
        size = self.image_size
        if self.image_fit == "pad":
            image = pad_to_square(image)
        shape = tf.shape(image)

        def resized(pixels, to):
            pixels = tf.image.resize(pixels, to, method="bilinear", antialias=True)
            return tf.clip_by_value(tf.floor(pixels + 0.5), 0.0, 255.0)

        def both_passes():
            pixels = tf.cast(image, tf.float32)
            pixels = tf.cond(tf.equal(shape[1], size), lambda: pixels, lambda: resized(pixels, [shape[0], size]))
            pixels = tf.cond(tf.equal(shape[0], size), lambda: pixels, lambda: resized(pixels, [size, size]))
            return tf.cast(pixels, tf.uint8)

        same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
        return tf.ensure_shape(tf.cond(same, lambda: image, both_passes), [size, size, 3])

    def decode_image(self, data):
        """One encoded image (scalar string) -> (pixels [S, S, 3] uint8, reason): zeros and why it
        was refused (see `refusal`), or its pixels and "". Corrupt pixel data raises (the decoder's
        error), which `decode_images` turns into CORRUPT_IMAGE for that image alone."""
        reason, kind, width, height = refusal(data, self.max_pixels)

        def decoded():
            return self.resize(decode_rgb(data, kind, width, height, self.image_size))

        def refused():
            return tf.zeros([self.image_size, self.image_size, 3], tf.uint8)

        return tf.cond(tf.equal(reason, ""), decoded, refused), reason

    def decode_images(self, images):
        """Encoded images [N] (JPEG, PNG, GIF first frame, BMP, WebP) -> (pixels [N, S, S, 3] uint8,
        errors [N] string): per image "" and its pixels, or a short reason and zeros.

        The images are decoded by a tf.data map whose errors are dropped (`ignore_errors`), so an
        image whose data is corrupt past its header fails alone; the images that come back
        carry their index, and the missing ones get CORRUPT_IMAGE."""
        images = tf.reshape(images, [-1])
        count = tf.size(images, out_type=tf.int64)

        def decode(index, data):
            return (index, *self.decode_image(data))

        blank = tf.zeros([self.image_size, self.image_size, 3], tf.uint8)
        decoded = tf.data.Dataset.from_tensor_slices((tf.range(count), images))
        decoded = decoded.map(decode, num_parallel_calls=DECODE_PARALLELISM, deterministic=True).ignore_errors()
        failed = tf.data.Dataset.from_tensors((count, blank, tf.constant(CORRUPT_IMAGE)))
        indices, pixels, reasons = decoded.concatenate(failed).batch(count + 1).get_single_element()
        rows = tf.math.unsorted_segment_max(tf.range(tf.size(indices)), indices, count + 1)[:count]
        rows = tf.where(rows < 0, tf.size(indices) - 1, rows)  # an image that did not come back: the `failed` row
        return tf.gather(pixels, rows), tf.gather(reasons, rows)

    def _caption_bytes(self, images, beam_size, length_penalty, prefixes=None):
        """Encoded images [N] -> the `caption` outputs and errors [N] ("" or why the image was not
        captioned; such an image gets an empty caption, score 0 and no tokens)."""
        pixels, errors = self.decode_images(images)
        outputs = self.caption_rows(pixels, tf.equal(errors, ""), beam_size, length_penalty, prefixes)
        outputs["errors"] = errors
        return outputs

    def _caption(self, pixels, beam_size, length_penalty, prefixes=None):
        """pixels [N, H, W, 3] uint8 -> dict of captions [N], scores [N], tokens [N, T] (padded with ""),
        lengths [N] and attention [N, T, h*w] of the best hypothesis. beam_size 1 runs greedy search."""
        pixels = tf.map_fn(self.resize, pixels, fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.uint8))
        return self.caption_rows(pixels, tf.ones(tf.shape(pixels)[:1], tf.bool), beam_size, length_penalty, prefixes)

    def _caption_with_prefix(self, pixels, prefixes, beam_size, length_penalty):
        """`caption` whose every caption starts with the words of its prefix (prefixes [N], "" for
        none); the search continues freely after them and their log-probabilities count in the scores."""
        return self._caption(pixels, beam_size, length_penalty, self._checked(prefixes, pixels))

    def _caption_bytes_with_prefix(self, images, prefixes, beam_size, length_penalty):
        """`caption_bytes` with a prefix an image, as in `caption_with_prefix`."""
        return self._caption_bytes(images, beam_size, length_penalty, self._checked(prefixes, images))

    @staticmethod
    def _checked(prefixes, batch):
        return one_prefix_each(prefixes, tf.shape(batch)[0], "captioning with prefixes (one an image)")

    def caption_rows(self, pixels, good, beam_size, length_penalty, prefixes=None):
        """`generate` on the rows of pixels [N, S, S, 3] where good [N] holds; the other rows get an
        empty caption, score 0, length 0, no tokens and no attention. With no good row (an empty
        batch, say) the model runs on one blank image, since it cannot run on none."""
        rows = tf.where(good)[:, 0]
        taken = tf.size(rows)
        sources = tf.gather(pixels, rows)
        blank = tf.zeros(tf.concat([[1], tf.shape(pixels)[1:]], 0), pixels.dtype)
        if prefixes is not None:
            prefixes = tf.cond(taken > 0, lambda: tf.gather(prefixes, rows), lambda: tf.constant([""]))
        outputs = self.generate(
            tf.cond(taken > 0, lambda: sources, lambda: blank), beam_size, length_penalty, prefixes
        )
        position = tf.where(good, tf.cumsum(tf.cast(good, tf.int32), exclusive=True), taken)  # bad: the blank row

        def spread(values):
            values = values[:taken]
            blank_row = tf.zeros(tf.concat([[1], tf.shape(values)[1:]], 0), values.dtype)
            return tf.gather(tf.concat([values, blank_row], 0), position)

        return {key: spread(values) for key, values in outputs.items()}

    def generate(self, sources, beam_size, length_penalty, prefixes=None):
        """Model sources (pixels, or cached features for a feature model) -> the `caption` outputs;
        `prefixes` [N] (or None): the words each caption must start with ("" for none)."""
        max_length = self.max_length + 1  # the end token counts
        prefix = None
        if prefixes is not None:
            prefix = prefix_from_ragged(self.vocab.lookup_ids(self.tokenizer.tokenize(prefixes)))

        def greedy():
            return tuple(self.model.generate(sources, search="greedy", max_length=max_length, prefix=prefix))

        def beam():
            return tuple(
                self.model.generate(
                    sources, search="beam", max_length=max_length, beam_size=beam_size, length_penalty=length_penalty,
                    prefix=prefix,
                )
            )

        ids, lengths, scores, _, attention = tf.cond(beam_size > 1, beam, greedy)
        ids, lengths, scores, attention = ids[:, 0], lengths[:, 0], scores[:, 0], attention[:, 0]  # best hypothesis
        tokens = self.vocab.lookup_tokens(ids)  # [N, T]
        captions = self.tokenizer.detokenize(tf.RaggedTensor.from_tensor(tokens, lengths=lengths))  # [N]
        position = tf.range(tf.shape(tokens)[1])[None]  # [1, T]
        inside = position < lengths[:, None]  # [N, T]
        return {
            "captions": captions,
            "scores": scores,
            "tokens": tf.where(inside, tokens, ""),
            "lengths": lengths,
            "attention": attention * tf.cast(inside, attention.dtype)[:, :, None],
        }

    def serving_function(self, beam_size=3, length_penalty=0.0):
        """The `serving_default` signature: encoded images [N] -> captions [N], scores [N] and errors
        [N] ("" when the image was captioned, else why not, and its caption is empty)."""

        @tf.function(input_signature=[IMAGES_SPEC])
        def serve(images):
            outputs = self.caption_bytes(images, tf.constant(beam_size), tf.constant(length_penalty, tf.float32))
            return {key: outputs[key] for key in ("captions", "scores", "errors")}

        return serve

    def attention_function(self, length_penalty=0.0):
        """The `caption_with_attention` signature: images [N], beam_size -> captions, scores, tokens
        [N, T], lengths [N], attention [N, T, h*w], errors [N] (as in `serving_function`),
        grid_height and grid_width."""

        @tf.function(input_signature=[IMAGES_SPEC, BEAM_SPEC])
        def caption_with_attention(images, beam_size):
            outputs = dict(self.caption_bytes(images, beam_size, tf.constant(length_penalty, tf.float32)))
            outputs["grid_height"] = tf.constant(self.grid_size[0])
            outputs["grid_width"] = tf.constant(self.grid_size[1])
            return outputs

        return caption_with_attention

    def prefix_function(self, length_penalty=0.0):
        """The `caption_with_prefix` signature: images [N], prefixes [N] (the words each caption
        must start with, "" for none), beam_size -> captions, scores and errors [N], as in
        `serving_function`."""

        @tf.function(input_signature=[IMAGES_SPEC, PREFIX_SPEC, BEAM_SPEC])
        def caption_with_prefix(images, prefixes, beam_size):
            outputs = self.caption_bytes_with_prefix(images, prefixes, beam_size, tf.constant(length_penalty, tf.float32))
            return {key: outputs[key] for key in ("captions", "scores", "errors")}

        return caption_with_prefix
