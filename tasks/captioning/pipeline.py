"""Captioning runs (configured by `seq2seq.tasks.captioning.config`): data, training, loading a trained model, captioning, export.

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
from seq2seq.config import RUN_CONFIG
from seq2seq.factory import build_model
from seq2seq.run import load_trained_weights, open_run, restore_exported_weights, save_export, train_under_precision
from seq2seq.text import DataError, Vocabulary, WordTokenizer, encode_all, tokenize_all
from seq2seq.training import Trainer, ValidationScore, sequence_batches
from seq2seq.tasks.captioning import augment
from seq2seq.tasks.captioning.captioner import Captioner
from seq2seq.tasks.captioning.config import CaptionConfig
from seq2seq.tasks.captioning.encoder import ImageEncoder, compute_features, image_model_from_feature_model
from seq2seq.tasks.captioning.evaluation import corpus_bleu_scores
from seq2seq.tasks.captioning.data import read_split
from seq2seq.tasks.captioning.images import DEFAULT_MAX_PIXELS
from seq2seq.tasks.captioning.inference import caption_sources

VOCAB_FILE = "captions.vocab"
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"


class CaptionRun:
    """A run directory with its config, tokenizer and vocabulary."""

    FILES = (VOCAB_FILE, BACKBONE_WEIGHTS_FILE)  # what `create` and the training's `prepare` write besides config.yaml

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
        config.save(run_dir / RUN_CONFIG)
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
        load_trained_weights(model, self.run_dir, weights)
        if self.config.model.cache_features:
            model = image_model_from_feature_model(model, self.image_encoder())
        return model

    def captioner(self, model, max_pixels=DEFAULT_MAX_PIXELS):
        encoder = model.encoder
        return Captioner(
            model, self.vocab, self.tokenizer, self.config.model.image_size, encoder.grid_size,
            max_length=self.config.data.max_caption_length, max_pixels=max_pixels, image_fit=self.config.model.image_fit,
        )


def make_batches(run, caption_set, sources, shuffle, report_name, augmented=False):
    """PlannedBatches over every (caption, image) pair of `caption_set`; over-long captions are truncated (reported).
    `augmented`: the images of every batch are changed at random as the run's augmentation section says."""
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

    augment_sources = augment.augmenter(run.config.augmentation, seed) if augmented else None
    return sequence_batches(
        tf.convert_to_tensor(sources), ids, plan, pad_to_multiple=b.pad_to_multiple, source_index=image_index,
        augment_sources=augment_sources,
    )


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

    with open_run(
        config, strategy, CaptionRun.load, create, holds="vocabulary", prepare=save_backbone, files=CaptionRun.FILES
    ) as run:
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
        augmented = augment.is_on(run.config)
        log(f"augmentation of the training images: {augment.describe(run.config.augmentation) if augmented else 'off'}")
        batches = make_batches(run, train_set, train_sources, shuffle=True, report_name="train", augmented=augmented)
        validation, callbacks = None, []
        if valid_set:
            validation = make_batches(run, valid_set, valid_sources, shuffle=False, report_name="valid")
            if validation_bleu:
                grid = (image_encoder if m.cache_features else model.encoder).grid_size
                captioner = Captioner(model, run.vocab, run.tokenizer, m.image_size, grid, run.config.data.max_caption_length,
                                      image_fit=m.image_fit)
                callbacks.append(validation_bleu_callback(captioner, valid_sources, valid_set.captions))
        trainer.fit(batches, validation=validation, callbacks=callbacks)
    return run, model


def export(run, model, export_dir, beam_size=3, length_penalty=0.0, max_pixels=DEFAULT_MAX_PIXELS):
    """Writes a SavedModel with `serving_default` (encoded images -> captions, scores, errors; beam search
    inside), `caption_with_attention` (images, beam_size -> also tokens and attention over the grid) and
    `caption_with_prefix` (images, prefixes, beam_size -> captions that start with the prefixes). Images that declare more than `max_pixels` pixels are refused unread (`info()["max_pixels"]`)."""
    captioner = run.captioner(model, max_pixels=max_pixels)
    signatures = {
        "serving_default": captioner.serving_function(beam_size, length_penalty),
        "caption_with_attention": captioner.attention_function(length_penalty),
        "caption_with_prefix": captioner.prefix_function(length_penalty),
    }
    extra = save_export(captioner, export_dir, signatures, run.config, beam_size, length_penalty)
    run.vocab.save(extra / VOCAB_FILE)
    return Path(export_dir)


def load_export(export_dir):
    """The run and the image model of a captioning SavedModel this toolkit exported, so that it can be
    exported again with the current graph: the same weights, config and vocabulary (from assets.extra)."""
    export_dir = Path(export_dir)
    extra = export_dir / "assets.extra"
    if not (extra / RUN_CONFIG).is_file() or not (extra / VOCAB_FILE).is_file():
        raise DataError(f"{export_dir}: not a captioning SavedModel exported by seq2seq (no assets.extra/{RUN_CONFIG} "
                        f"and {VOCAB_FILE})")
    config = CaptionConfig.load(extra / RUN_CONFIG)
    unloaded = dataclasses.replace(config, model=dataclasses.replace(config.model, backbone_weights=None))  # weights follow
    run = CaptionRun(export_dir, unloaded, Vocabulary.load(extra / VOCAB_FILE))
    model = restore_exported_weights(run.build_model, export_dir)
    run.config = config  # the export's own config goes into the new export
    return run, model
