"""Captioning runs (configured by `tasks.captioning.config`): data, training, loading a trained model, captioning, export.

A run directory holds everything needed to continue or use a run:
  config.yaml              the resolved configuration
  captions.vocab           the caption vocabulary, one token a line
  backbone.weights.h5      the frozen backbone (cached-feature runs only; their checkpoints
                           hold the projection and decoder, not the backbone)
  checkpoints/             model + optimizer + step, for resuming
  best.weights.h5          weights with the best validation metric
  logs/                    TensorBoard logs

Images are held in memory at the model's image size (uint8), once each; a training batch
gathers its captions and, through an image index per caption, their images, so an image
with five captions is stored once. With a frozen backbone and `cache_features`, the backbone
runs once over the data and the model trains on the cached feature grids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from seq2seq import distribute
from seq2seq.batching import plan_batches
from seq2seq.cli import log
from seq2seq.factory import build_model
from seq2seq.run import open_run, train_under_precision
from seq2seq.text import DataError, Vocabulary, WordTokenizer, encode_all, tokenize_all
from seq2seq.training import PlannedBatches, Trainer, ValidationScore, restore_model_weights
from tasks.captioning import data, shapes
from tasks.captioning.captioner import Captioner
from tasks.captioning.config import BatchConfig, CaptionConfig, DataConfig, ModelConfig  # noqa: F401  (this module's API too)
from tasks.captioning.encoder import ImageEncoder, compute_features, image_model_from_feature_model
from tasks.captioning.evaluation import corpus_bleu_scores
from tasks.captioning.images import ImageError, load_image, load_images

VOCAB_FILE = "captions.vocab"
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"


@dataclasses.dataclass
class CaptionSet:
    """Images [N, S, S, 3] uint8 with all captions of each; `scenes` for the synthetic data (boxes)."""

    images: np.ndarray
    captions: list[list[str]]
    image_ids: list[str]
    scenes: list | None = None

    def __len__(self):
        return len(self.captions)


def shapes_set(scenes):
    images = np.stack([scene.image for scene in scenes]) if scenes else np.zeros((0, 0, 0, 3), np.uint8)
    return CaptionSet(images, [scene.captions for scene in scenes], [str(i) for i in range(len(scenes))], scenes)


def shapes_test_set(count, seed, image_size):
    """The synthetic evaluation split: make_splits(0, 0, count, seed)["test"], from its own seed."""
    return shapes_set(shapes.make_splits(0, 0, count, seed, image_size)["test"])


def examples_set(examples, image_size, on_error, source):
    """Loads and resizes the image of every CaptionExample; bad image files are skipped with a count or raise."""
    size = (image_size, image_size)
    paths = [example for example in examples if not isinstance(example.image, str)]
    if not paths:
        images, kept, _ = load_images([example.image for example in examples], size=size, on_error=on_error, warn=log)
        kept = set(kept)
        examples = [example for example in examples if example.image in kept]
    else:  # encoded bytes (TFDS)
        arrays, kept_examples, failures = [], [], 0
        for example in examples:
            try:
                arrays.append(load_image(example.image, size=size, name=f"{source} image {example.image_id}"))
                kept_examples.append(example)
            except ImageError as error:
                if on_error == "raise":
                    raise
                failures += 1
                log(f"warning: skipping image: {error}")
        if failures:
            log(f"skipped {failures} of {len(examples)} images")
        images = np.stack(arrays) if arrays else np.zeros((0, *size, 3), np.uint8)
        examples = kept_examples
    if not examples:
        raise DataError(f"{source}: none of the images could be read")
    return CaptionSet(images, [example.captions for example in examples], [example.image_id for example in examples])


def read_split(config, split):
    """The CaptionSet of split "train" or "valid" (None when there is no validation data)."""
    d, size = config.data, config.model.image_size
    if d.shapes_train is not None:
        count = d.shapes_train if split == "train" else d.shapes_val
        if not count:
            return None
        splits = shapes.make_splits(count if split == "train" else 0, count if split == "valid" else 0, 0, d.shapes_seed, size)
        return shapes_set(splits["train" if split == "train" else "val"])
    if d.karpathy_json:
        name = "train" if split == "train" else "val"
        try:
            examples = data.read_karpathy_json(d.karpathy_json, d.image_folder, name, on_missing=d.on_missing, warn=log)
        except data.DataError as error:
            if split == "valid" and "no images in split" in str(error):
                return None
            raise
        return examples_set(examples, size, d.on_error, d.karpathy_json)
    if d.train_tsv:
        path = d.train_tsv if split == "train" else d.valid_tsv
        if not path:
            return None
        examples = data.read_caption_tsv(path, d.image_folder, on_missing=d.on_missing, warn=log)
        return examples_set(examples, size, d.on_error, path)
    tfds_split = d.tfds_train_split if split == "train" else d.tfds_valid_split
    if not tfds_split:
        return None
    examples = list(data.load_tfds_coco(tfds_split, d.tfds_data_dir, max_examples=d.tfds_max_examples, warn=log))
    return examples_set(examples, size, d.on_error, f"coco_captions[{tfds_split}]")


class CaptionRun:
    """A run directory with its config, tokenizer and vocabulary."""

    def __init__(self, run_dir, config, vocab):
        self.run_dir = Path(run_dir)
        self.config = config
        self.vocab = vocab
        self.tokenizer = WordTokenizer(lowercase=config.data.lowercase)

    @classmethod
    def create(cls, config, train_set):
        run_dir = Path(config.training.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = WordTokenizer(lowercase=config.data.lowercase)
        texts = [caption for captions in train_set.captions for caption in captions]
        vocab = Vocabulary.build(tokenize_all(tokenizer, texts), config.data.vocab_size, config.data.min_count)
        vocab.save(run_dir / VOCAB_FILE)
        config.save(run_dir / "config.yaml")
        return cls(run_dir, config, vocab)

    @classmethod
    def load(cls, run_dir):
        run_dir = Path(run_dir)
        return cls(run_dir, CaptionConfig.load_run(run_dir, "captioning"), Vocabulary.load(run_dir / VOCAB_FILE))

    def image_encoder(self):
        m = self.config.model
        weights = m.backbone_weights
        if (self.run_dir / BACKBONE_WEIGHTS_FILE).is_file():
            weights = str(self.run_dir / BACKBONE_WEIGHTS_FILE)
        return ImageEncoder(
            m.backbone, image_size=m.image_size, units=m.encoder_size, weights=weights, trainable_backbone=m.fine_tune,
            activation=m.encoder_activation, dropout=m.encoder_dropout, small_cnn_pools=m.small_cnn_pools,
            small_cnn_3x3_blocks=m.small_cnn_3x3_blocks, grid_positions=m.grid_positions, name="encoder",
        )

    def build_model(self, encoder=None, source_shape=None):
        """The image model, or with a built FeatureEncoder `encoder` and its source_shape
        (positions, feature_dim) the model on cached features."""
        m = self.config.model
        if encoder is None:
            encoder = self.image_encoder()
            source_shape = (m.image_size, m.image_size, 3)
        return build_model(
            m, len(self.vocab), encoder=encoder, source_shape=source_shape, attention_regularizer=m.attention_regularizer
        )

    def build_feature_model(self, image_encoder):
        """A model on cached features whose encoder is `image_encoder`'s head (shared weights)."""
        head = image_encoder.projection_only()
        source_shape = (image_encoder.num_positions, image_encoder.feature_dim)
        head.build((None, *source_shape))
        return self.build_model(encoder=head, source_shape=source_shape)

    def load_model(self, weights="best"):
        """The trained image model: "best" weights, or the "last" checkpoint."""
        image_encoder = self.image_encoder()
        if self.config.model.cache_features:
            model = self.build_feature_model(image_encoder)
        else:
            model = self.build_model()
        checkpoints = tf.train.get_checkpoint_state(str(self.run_dir / "checkpoints"))
        paths = list(checkpoints.all_model_checkpoint_paths) if checkpoints else []
        if weights == "best" and (self.run_dir / "best.weights.h5").is_file():
            model.load_weights(self.run_dir / "best.weights.h5")
        elif paths:
            restore_model_weights(model, paths[-1])
        else:
            raise DataError(f"{self.run_dir}: no trained weights yet (no best.weights.h5 and no checkpoint)")
        if self.config.model.cache_features:
            model = image_model_from_feature_model(model, self.image_encoder())
        return model

    def captioner(self, model):
        encoder = model.encoder
        return Captioner(
            model, self.vocab, self.tokenizer, self.config.model.image_size, encoder.grid_size,
            max_length=self.config.data.max_caption_length,
        )


def caption_batches(sources, image_index, caption_ids, plan_fn, start_id=2, end_id=3, pad_to_multiple=1):
    """PlannedBatches for teacher forcing over captions, each with its image.

    sources: [num_images, ...] (uint8 pixels or cached features), stored once; image_index:
    [num_captions] int, the source row of each caption; caption_ids: ragged [num_captions, None]
    without start/end tokens. Batches are ({"source", "target_in": <s> y}, target_out: y </s>).
    """
    sources = tf.convert_to_tensor(sources)
    image_index = tf.constant(np.asarray(image_index, np.int64))
    targets = tf.cast(caption_ids, tf.int32)

    def pad(x):
        if pad_to_multiple <= 1:
            return x
        return tf.pad(x, [[0, 0], [0, (-tf.shape(x)[1]) % pad_to_multiple]])

    def make_batch(indices):
        target = tf.gather(targets, indices)  # ragged [batch, None]
        starts = tf.fill([tf.shape(indices)[0], 1], start_id)
        ends = tf.fill([tf.shape(indices)[0], 1], end_id)
        target_in = pad(tf.concat([starts, target], axis=1).to_tensor(0))  # [batch, time]
        target_out = pad(tf.concat([target, ends], axis=1).to_tensor(0))  # [batch, time]
        source = tf.gather(sources, tf.gather(image_index, indices))  # [batch, ...]
        return {"source": source, "target_in": target_in}, target_out

    return PlannedBatches(plan_fn, make_batch, target_lengths=targets.row_lengths().numpy() + 1)


def make_batches(run, caption_set, sources, shuffle, report_name):
    """PlannedBatches over every (caption, image) pair of `caption_set`; over-long captions are truncated (reported)."""
    flat, image_index = [], []
    for index, captions in enumerate(caption_set.captions):
        flat.extend(captions)
        image_index.extend([index] * len(captions))
    ids = encode_all(run.tokenizer, run.vocab, flat)
    lengths = ids.row_lengths().numpy()
    limit = run.config.data.max_caption_length
    if (lengths > limit).any():
        log(f"{report_name}: truncated {int((lengths > limit).sum())} of {len(flat)} captions longer than {limit} tokens")
        ids = ids[:, :limit]
        lengths = np.minimum(lengths, limit)
    keep = np.flatnonzero(lengths > 0)
    if len(keep) < len(flat):
        log(f"{report_name}: dropped {len(flat) - len(keep)} captions without tokens")
        ids = tf.gather(ids, keep)
        image_index = np.asarray(image_index)[keep]
        lengths = lengths[keep]
    if not len(keep):
        raise DataError(f"{report_name}: no captions left to train on")
    b, seed = run.config.batching, run.config.training.seed

    sort_by_length = b.sort_by_length if b.sort_by_length is not None else not run.config.model.fine_tune

    def plan(epoch):
        return plan_batches(
            lengths + 1, batch_size=b.batch_size, seed=seed, epoch=epoch, shuffle=shuffle, sort_by_length=sort_by_length
        )

    return caption_batches(sources, image_index, ids, plan, pad_to_multiple=b.pad_to_multiple)


def caption_sources(captioner, sources, beam_size=1, length_penalty=0.0, batch_size=64, function=None):
    """Runs `captioner.generate` over model sources in batches; returns the concatenated numpy outputs."""
    function = function or tf.function(captioner.generate)
    outputs = []
    for start in range(0, len(sources), batch_size):
        out = function(tf.constant(sources[start : start + batch_size]), tf.constant(beam_size), tf.constant(length_penalty, tf.float32))
        outputs.append({key: value.numpy() for key, value in out.items()})
    return concat_outputs(outputs)


def concat_outputs(outputs):
    """Concatenates per-batch output dicts along the batch axis, padding the time axis."""
    if not outputs:
        return {}
    merged = {}
    for key in outputs[0]:
        values = [o[key] for o in outputs]
        if values[0].ndim >= 2:
            time = max(v.shape[1] for v in values)
            fill = b"" if values[0].dtype.kind in "SO" else 0
            values = [
                np.pad(v, [(0, 0), (0, time - v.shape[1])] + [(0, 0)] * (v.ndim - 2), constant_values=fill) for v in values
            ]
            if values[0].ndim == 3:
                positions = max(v.shape[2] for v in values)
                values = [np.pad(v, [(0, 0), (0, 0), (0, positions - v.shape[2])]) for v in values]
        merged[key] = np.concatenate(values, axis=0)
    return merged


def caption_images(model, pixels, beam_size=3, length_penalty=0.0, batch_size=32):
    """Captions pixels [N, H, W, 3] uint8 with a Captioner or a loaded SavedModel (both have `caption`).

    Returns the concatenated numpy outputs (captions as bytes)."""
    outputs = []
    for start in range(0, len(pixels), batch_size):
        out = model.caption(
            tf.constant(pixels[start : start + batch_size]), tf.constant(beam_size), tf.constant(length_penalty, tf.float32)
        )
        outputs.append({key: value.numpy() for key, value in out.items()})
    return concat_outputs(outputs)


def validation_bleu_callback(captioner, sources, references, batch_size=64):
    """The `ValidationScore` of a captioning run: corpus BLEU-4 of greedy captions."""
    function = tf.function(captioner.generate)

    def score():
        out = caption_sources(captioner, sources, beam_size=1, batch_size=batch_size, function=function)
        hypotheses = [c.decode("utf-8") for c in out["captions"]]
        bleu = corpus_bleu_scores(hypotheses, references)["bleu_4"]
        return bleu, f"validation BLEU-4 (greedy): {bleu:.4f}; e.g. {hypotheses[0]!r}"

    return ValidationScore(score)


def train(config, validation_bleu=True):
    """Trains (or resumes) the run in config.training.output_dir."""
    return train_under_precision(config, lambda config, note: _train(config, note, validation_bleu))


def _train(config, precision_note, validation_bleu):
    strategy = distribute.make_strategy(config.training.distribution)
    read = {}  # the training set, when creating the run read it already

    def create():
        read["train"] = read_split(config, "train")
        return CaptionRun.create(config, read["train"])

    def save_backbone(run):
        backbone_file = run.run_dir / BACKBONE_WEIGHTS_FILE
        if run.config.model.cache_features and not backbone_file.is_file():
            # The frozen backbone every worker and every later load computes features with.
            keras.utils.set_random_seed(run.config.training.seed)
            run.image_encoder().backbone.save_weights(backbone_file)

    run = open_run(config, strategy, CaptionRun.load, create, holds="vocabulary", prepare=save_backbone)
    train_set = read["train"] if "train" in read else read_split(run.config, "train")
    valid_set = read_split(run.config, "valid")
    log(
        f"train: {len(train_set)} images, {sum(map(len, train_set.captions))} captions; valid: "
        f"{len(valid_set) if valid_set else 0} images; vocabulary: {len(run.vocab)} tokens"
    )
    m = run.config.model
    keras.utils.set_random_seed(run.config.training.seed)  # the same initial weights on every run and worker
    with distribute.scope(strategy):
        if m.cache_features:
            image_encoder = run.image_encoder()
            model = run.build_feature_model(image_encoder)
        else:
            model = run.build_model()
        trainer = Trainer(model, run.config.training, strategy)
    if m.cache_features:
        log(f"caching {m.backbone} features of {len(train_set)} training images")
        train_sources = compute_features(image_encoder, train_set.images)
        valid_sources = compute_features(image_encoder, valid_set.images) if valid_set else None
    else:
        train_sources, valid_sources = train_set.images, valid_set.images if valid_set else None
    log(f"model: {model.count_params():,} parameters, precision {precision_note}")
    batches = make_batches(run, train_set, train_sources, shuffle=True, report_name="train")
    validation, callbacks = None, []
    if valid_set:
        validation = make_batches(run, valid_set, valid_sources, shuffle=False, report_name="valid")
        if validation_bleu:
            grid = (image_encoder if m.cache_features else model.encoder).grid_size
            captioner = Captioner(model, run.vocab, run.tokenizer, m.image_size, grid, run.config.data.max_caption_length)
            callbacks.append(validation_bleu_callback(captioner, valid_sources, valid_set.captions))
    trainer.fit(batches, validation=validation, callbacks=callbacks)
    return run, model


def export(run, model, export_dir, beam_size=3, length_penalty=0.0):
    """Writes a SavedModel with `serving_default` (encoded images -> captions, scores; beam search inside)
    and `caption_with_attention` (images, beam_size -> also tokens and attention over the grid)."""
    captioner = run.captioner(model)
    export_dir = Path(export_dir)
    if export_dir.exists() and any(export_dir.iterdir()):
        raise DataError(f"{export_dir} exists and is not empty; choose a new version number")
    signatures = {
        "serving_default": captioner.serving_function(beam_size, length_penalty),
        "caption_with_attention": captioner.attention_function(length_penalty),
    }
    tf.saved_model.save(captioner, str(export_dir), signatures=signatures)
    (export_dir / "assets.extra").mkdir(exist_ok=True)
    run.config.save(export_dir / "assets.extra" / "config.yaml")
    run.vocab.save(export_dir / "assets.extra" / VOCAB_FILE)
    return export_dir


