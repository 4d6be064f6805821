"""Translation runs: data and vocabularies, training, loading a trained model, export.

A run directory holds everything needed to continue or use a run:
  config.yaml                  the resolved configuration
  source.vocab, target.vocab   plain-text vocabularies, one token a line
  source.spm, target.spm       SentencePiece models (sentencepiece scheme only)
  checkpoints/                 model + optimizer + step, for resuming and averaging
  best.weights.h5              weights with the best validation metric
  logs/                        TensorBoard logs

Under `training.distribution` (seq2seq.distribute) only the chief worker writes the run
directory; the other workers read it, so it must be on storage every worker sees.
"""

from pathlib import Path

import numpy as np
import sacrebleu
import tensorflow as tf

from seq2seq import distribute
from seq2seq.batching import filter_by_length, plan_batches
from seq2seq.cli import log
from seq2seq.config import RUN_CONFIG
from seq2seq.factory import build_model
from seq2seq.run import load_trained_weights, open_run, restore_exported_weights, save_export, train_under_precision
from seq2seq.text import DataError, Vocabulary, WordTokenizer, encode_all, tokenize_all
from seq2seq.training import Trainer, ValidationScore, sequence_batches
from seq2seq.tasks.translation import data
from seq2seq.tasks.translation.config import TranslationConfig
from seq2seq.tasks.translation.inference import translate_lines  # noqa: F401  (part of this module's API)
from seq2seq.tasks.translation.subword import (
    SentencePieceTokenizer, sentencepiece_models_in_graph, sentencepiece_vocabulary, train_sentencepiece,
)
from seq2seq.tasks.translation.translator import Translator



def read_pairs(config, split):
    """(sources, targets) for split "train" or "valid"; empty lists when no validation data."""
    d = config.data
    if split == "train":
        if d.train_tsv:
            return data.read_tsv(d.train_tsv)
        if d.tfds_name:
            return data.load_tfds(d.tfds_name, d.tfds_train_split, d.source_lang, d.target_lang, d.tfds_data_dir)
        return data.read_parallel(d.train_source, d.train_target)
    if d.valid_tsv:
        return data.read_tsv(d.valid_tsv)
    if d.valid_source:
        return data.read_parallel(d.valid_source, d.valid_target)
    if d.tfds_name and d.tfds_valid_split:
        return data.load_tfds(d.tfds_name, d.tfds_valid_split, d.source_lang, d.target_lang, d.tfds_data_dir)
    return [], []


class TranslationRun:
    """A run directory with its config, tokenizers and vocabularies."""

    FILES = ("source.vocab", "target.vocab", "source.spm", "target.spm")  # what `create` writes besides config.yaml

    def __init__(self, run_dir, config, source_tokenizer, target_tokenizer, source_vocab, target_vocab):
        self.run_dir = Path(run_dir)
        self.config = config
        self.source_tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer
        self.source_vocab = source_vocab
        self.target_vocab = target_vocab

    @classmethod
    def create(cls, config, train_sources, train_targets):
        """Trains tokenizers and builds vocabularies from the training data, and saves them."""
        run_dir = Path(config.training.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        t = config.tokenization
        if t.scheme == "sentencepiece":
            log("training SentencePiece models")
            tokenizers, vocabs = [], []
            for side, texts, size in (
                ("source", train_sources, t.source_vocab_size),
                ("target", train_targets, t.target_vocab_size),
            ):
                model_bytes = train_sentencepiece(texts, size, model_type=t.sentencepiece_model_type)
                (run_dir / f"{side}.spm").write_bytes(model_bytes)
                tokenizers.append(SentencePieceTokenizer(model_bytes))
                vocabs.append(sentencepiece_vocabulary(model_bytes))
        else:
            tokenizers = [WordTokenizer(lowercase=t.lowercase), WordTokenizer(lowercase=t.lowercase)]
            vocabs = [
                Vocabulary.build(tokenize_all(tokenizers[0], train_sources), t.source_vocab_size, t.min_count),
                Vocabulary.build(tokenize_all(tokenizers[1], train_targets), t.target_vocab_size, t.min_count),
            ]
        vocabs[0].save(run_dir / "source.vocab")
        vocabs[1].save(run_dir / "target.vocab")
        config.save(run_dir / RUN_CONFIG)
        return cls(run_dir, config, *tokenizers, *vocabs)

    @classmethod
    def load(cls, run_dir):
        run_dir = Path(run_dir)
        return cls.from_files(run_dir, run_dir, TranslationConfig.load_run(run_dir, "translation"))

    @classmethod
    def from_files(cls, run_dir, directory, config):
        """The run with the tokenizers and vocabularies saved in `directory` (a run directory,
        or an export's assets.extra, which holds the same files)."""
        if config.tokenization.scheme == "sentencepiece":
            tokenizers = [SentencePieceTokenizer.load(directory / f"{side}.spm") for side in ("source", "target")]
        else:
            tokenizers = [WordTokenizer(lowercase=config.tokenization.lowercase) for _ in range(2)]
        vocabs = [Vocabulary.load(directory / f"{side}.vocab") for side in ("source", "target")]
        return cls(run_dir, config, *tokenizers, *vocabs)

    def build_model(self):
        return build_model(self.config.model, len(self.target_vocab), len(self.source_vocab))

    def translator(self, model, replace_unknown=False):
        return Translator(
            model,
            self.source_tokenizer,
            self.target_tokenizer,
            self.source_vocab,
            self.target_vocab,
            max_source_length=self.config.data.max_source_length,
            replace_unknown=replace_unknown,
        )

    def load_model(self, weights="best", average_last=None):
        """The trained model: "best" weights, the "last" checkpoint, or the average of the last N checkpoints."""
        return load_trained_weights(self.build_model(), self.run_dir, weights, average_last)


def make_batches(run, sources, targets, shuffle, report_name):
    """PlannedBatches over the encoded pairs, after dropping over-long and empty pairs (reported)."""
    d, b = run.config.data, run.config.batching
    source_ids = encode_all(run.source_tokenizer, run.source_vocab, sources)
    target_ids = encode_all(run.target_tokenizer, run.target_vocab, targets)
    source_lengths = source_ids.row_lengths().numpy()
    target_lengths = target_ids.row_lengths().numpy()
    kept, dropped = filter_by_length(source_lengths, target_lengths, d.max_source_length, d.max_target_length)
    if dropped:
        log(
            f"{report_name}: dropped {dropped} of {len(sources)} pairs that are empty or longer than "
            f"{d.max_source_length} source / {d.max_target_length} target tokens"
        )
    if not len(kept):
        raise DataError(f"{report_name}: no sentence pairs left to train on")
    source_ids = tf.gather(source_ids, kept)
    target_ids = tf.gather(target_ids, kept)
    lengths = np.maximum(source_lengths[kept], target_lengths[kept] + 1)
    seed = run.config.training.seed

    def plan(epoch):
        return plan_batches(
            lengths, batch_size=b.batch_size, max_tokens=b.max_tokens, seed=seed, epoch=epoch,
            shuffle=shuffle, bucket_width=b.bucket_width,
        )

    return sequence_batches(source_ids, target_ids, plan, pad_to_multiple=b.pad_to_multiple)


def validation_bleu_callback(translator, sources, references, batch_size=128):
    """The `ValidationScore` of a translation run: sacreBLEU of greedy translations."""

    def score():
        hypotheses = translate_lines(translator, sources, beam_size=1, batch_size=batch_size)
        bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
        return bleu, f"validation BLEU (greedy): {bleu:.2f}"

    return ValidationScore(score)


def train(config, validation_bleu=True, callbacks=()):
    """Trains (or resumes) the run in config.training.output_dir; `callbacks` are extra
    Keras callbacks for `fit` (e.g. a wall-clock budget)."""
    return train_under_precision(config, lambda config, note: _train(config, note, validation_bleu, callbacks))


def _train(config, precision_note, validation_bleu, callbacks):
    strategy = distribute.make_strategy(config.training.distribution)
    read = {}  # the training pairs, when creating the run read them already

    def create():
        read["train"] = read_pairs(config, "train")
        return TranslationRun.create(config, *read["train"])

    with open_run(config, strategy, TranslationRun.load, create, files=TranslationRun.FILES) as run:
        train_sources, train_targets = read["train"] if "train" in read else read_pairs(run.config, "train")
        valid_sources, valid_targets = read_pairs(run.config, "valid")
        log(
            f"train: {len(train_sources)} pairs; valid: {len(valid_sources)} pairs; "
            f"vocabularies: {len(run.source_vocab)} source, {len(run.target_vocab)} target tokens"
        )
        batches = make_batches(run, train_sources, train_targets, shuffle=True, report_name="train")
        validation = None
        callbacks = list(callbacks)
        if valid_sources:
            validation = make_batches(run, valid_sources, valid_targets, shuffle=False, report_name="valid")
        with distribute.scope(strategy):
            model = run.build_model()
            trainer = Trainer(model, run.config.training, strategy)
        log(f"model: {model.count_params():,} parameters, precision {precision_note}")
        if valid_sources and validation_bleu:
            callbacks.append(validation_bleu_callback(run.translator(model), valid_sources, valid_targets))
        trainer.fit(batches, validation=validation, callbacks=callbacks)
    return run, model


def export(run, model, export_dir, beam_size=5, length_penalty=0.6, replace_unknown=False):
    """Writes a SavedModel with `serving_default` (texts -> translations, scores; beam search
    inside) and `translate` (texts, beam_size, n_best, length_penalty -> everything)."""
    translator = run.translator(model, replace_unknown=replace_unknown)
    signatures = {
        "serving_default": translator.serving_function(beam_size, length_penalty),
        "translate": translator.translate,
    }
    extra = save_export(translator, export_dir, signatures, run.config)
    for side, tokenizer, vocab in (("source", run.source_tokenizer, run.source_vocab), ("target", run.target_tokenizer, run.target_vocab)):
        vocab.save(extra / f"{side}.vocab")
        if isinstance(tokenizer, SentencePieceTokenizer):
            tokenizer.save(extra / f"{side}.spm")
    return Path(export_dir)


def load_export(export_dir):
    """The run and the model of a translation SavedModel this toolkit exported, so that it can
    be exported again with the current graph: the same weights (an int8 export's model comes
    back quantized, its int8 values unchanged), config, tokenizers and vocabularies.

    Exports carry their vocabularies and SentencePiece models in assets.extra/; for older
    SentencePiece exports the models are read from the graph."""
    export_dir = Path(export_dir)
    extra = export_dir / "assets.extra"
    if not (extra / RUN_CONFIG).is_file():
        raise DataError(f"{export_dir}: not a translation SavedModel exported by seq2seq (no assets.extra/config.yaml)")
    config = TranslationConfig.load(extra / RUN_CONFIG)
    carried = all((extra / f"{side}.spm").is_file() for side in ("source", "target"))
    if config.tokenization.scheme == "sentencepiece" and not carried:
        models = sentencepiece_models_in_graph(export_dir)
        tokenizers = [SentencePieceTokenizer(models[side]) for side in ("source", "target")]
        vocabs = [sentencepiece_vocabulary(models[side]) for side in ("source", "target")]
        run = TranslationRun(export_dir, config, *tokenizers, *vocabs)
    else:
        run = TranslationRun.from_files(export_dir, extra, config)
    return run, restore_exported_weights(run.build_model, export_dir)
