"""Image bytes or pixels in, captions out: decoding, resizing, the model and beam search in one TF graph.

`Captioner` is a `tf.Module` whose `caption` function (pixels) is what the CLI calls
in-process, and whose `caption_bytes` function (encoded JPEG/PNG/GIF/BMP bytes) is what
`export` writes into the SavedModel; both run the very same search graph.

Attention comes back over the flattened feature grid: position p is grid cell
(p // grid_width, p % grid_width), and cell (i, j) of an h x w grid covers image rows
[i * H / h, (i + 1) * H / h) and columns [j * W / w, (j + 1) * W / w) of the
image_size x image_size model input.
"""

import tensorflow as tf

from seq2seq.model import ExportedModel

IMAGES_SPEC = tf.TensorSpec([None], tf.string, name="images")
BEAM_SPEC = tf.TensorSpec([], tf.int32, name="beam_size")
PENALTY_SPEC = tf.TensorSpec([], tf.float32, name="length_penalty")


class Captioner(tf.Module):
    """Captions a batch of images with a trained image Seq2SeqModel (ImageEncoder encoder).

    image_size: the square model input; any other image size is resized in-graph (bilinear,
    antialiased). grid_size: (h, w) of the attention grid. max_length: the longest caption,
    in tokens, the searches may produce (the end token excluded).
    """

    def __init__(self, model, vocab, tokenizer, image_size, grid_size, max_length=30, name=None):
        super().__init__(name=name)
        self._exported = ExportedModel(model)
        self.model_variables = self._exported.variables
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.max_length = int(max_length)
        pixels_spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")
        self.caption = tf.function(self._caption, input_signature=[pixels_spec, BEAM_SPEC, PENALTY_SPEC])
        self.caption_bytes = tf.function(self._caption_bytes, input_signature=[IMAGES_SPEC, BEAM_SPEC, PENALTY_SPEC])
        self.info = tf.function(self._info, input_signature=[])

    @property
    def model(self):
        return self._exported.model

    def _info(self):
        """{"image_size", "grid_height", "grid_width", "max_length"}: int32 scalars."""
        return {
            "image_size": tf.constant(self.image_size),
            "grid_height": tf.constant(self.grid_size[0]),
            "grid_width": tf.constant(self.grid_size[1]),
            "max_length": tf.constant(self.max_length),
        }

    def resize(self, image):
        """image [H, W, 3] uint8 -> [S, S, 3] uint8 (unchanged when already S x S)."""
        size = self.image_size
        shape = tf.shape(image)

        def resized():
            pixels = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear", antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)

        same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
        return tf.ensure_shape(tf.cond(same, lambda: image, resized), [size, size, 3])

    def decode_images(self, images):
        """Encoded images [N] (JPEG, PNG, GIF first frame, BMP) -> pixels [N, S, S, 3] uint8."""

        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)  # [H, W, 3] uint8
            return self.resize(image)

        spec = tf.TensorSpec([self.image_size, self.image_size, 3], tf.uint8)
        return tf.map_fn(decode, images, fn_output_signature=spec)

    def _caption_bytes(self, images, beam_size, length_penalty):
        """Encoded images [N] -> the `caption` outputs."""
        return self._caption(self.decode_images(images), beam_size, length_penalty)

    def _caption(self, pixels, beam_size, length_penalty):
        """pixels [N, H, W, 3] uint8 -> dict of captions [N], scores [N], tokens [N, T] (padded with ""),
        lengths [N] and attention [N, T, h*w] of the best hypothesis. beam_size 1 runs greedy search."""
        pixels = tf.map_fn(self.resize, pixels, fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.uint8))
        return self.generate(pixels, beam_size, length_penalty)

    def generate(self, sources, beam_size, length_penalty):
        """Model sources (pixels, or cached features for a feature model) -> the `caption` outputs."""
        max_length = self.max_length + 1  # the end token counts

        def greedy():
            return tuple(self.model.generate(sources, search="greedy", max_length=max_length))

        def beam():
            return tuple(
                self.model.generate(
                    sources, search="beam", max_length=max_length, beam_size=beam_size, length_penalty=length_penalty
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
        """The `serving_default` signature: encoded images [N] -> captions [N] and scores [N]."""

        @tf.function(input_signature=[IMAGES_SPEC])
        def serve(images):
            outputs = self.caption_bytes(images, tf.constant(beam_size), tf.constant(length_penalty, tf.float32))
            return {"captions": outputs["captions"], "scores": outputs["scores"]}

        return serve

    def attention_function(self, length_penalty=0.0):
        """The `caption_with_attention` signature: images [N], beam_size -> captions, scores, tokens
        [N, T], lengths [N], attention [N, T, h*w], grid_height and grid_width."""

        @tf.function(input_signature=[IMAGES_SPEC, BEAM_SPEC])
        def caption_with_attention(images, beam_size):
            outputs = dict(self.caption_bytes(images, beam_size, tf.constant(length_penalty, tf.float32)))
            outputs["grid_height"] = tf.constant(self.grid_size[0])
            outputs["grid_width"] = tf.constant(self.grid_size[1])
            return outputs

        return caption_with_attention
