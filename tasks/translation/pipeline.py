"""Translation runs: data and vocabularies, training, loading a trained model, export.

A run directory holds everything needed to continue or use a run:
  config.yaml                  the resolved configuration
  source.vocab, target.vocab   plain-text vocabularies, one token a line
  source.spm, target.spm       SentencePiece models (sentencepiece scheme only)
  corpus/                      the training data encoded once (seq2seq.corpus), with copies of
                               the vocabularies it was encoded with
  checkpoints/                 model + optimizer + step, for resuming and averaging
  best.weights.h5              weights with the best validation metric
  logs/                        TensorBoard logs

Under `training.distribution` (seq2seq.distribute) only the chief worker writes the run
directory; the other workers read it, so it must be on storage every worker sees.
"""

import dataclasses
import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import sacrebleu
import tensorflow as tf

from seq2seq import distribute
from seq2seq.batching import filter_by_length, plan_batches
from seq2seq.cli import log
from seq2seq.config import RUN_CONFIG
from seq2seq.corpus import SIDES, Corpus, CorpusWriter, TokenCounter, corpus_batches, file_fingerprint, file_sha256, read_manifest
from seq2seq.factory import build_model
from seq2seq.run import load_trained_weights, open_run, restore_exported_weights, save_export, train_under_precision
from seq2seq.text import DataError, Vocabulary, WordTokenizer, encode_all
from seq2seq.training import Trainer, ValidationScore, sequence_batches
from seq2seq.tasks.translation import data
from seq2seq.tasks.translation.config import TranslationConfig
from seq2seq.tasks.translation.inference import translate_lines  # noqa: F401  (part of this module's API)
from seq2seq.tasks.translation.subword import (
    SentencePieceTokenizer, sentencepiece_models_in_graph, sentencepiece_vocabulary, train_sentencepiece,
)
from seq2seq.tasks.translation.shortlist import build_shortlist, training_pairs
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


CORPUS_DIR = "corpus"  # the encoded training data in a run directory (seq2seq.corpus)


def training_data(config):
    """(inputs, lines) of the training data: `inputs` identifies it for a corpus manifest
    (file fingerprints, or the TFDS data set); lines[side]() reads that side's sentences
    lazily, afresh each call."""
    d = config.data
    if d.train_tsv:
        inputs = {"tsv": file_fingerprint(d.train_tsv)}
        lines = {
            "source": lambda: data.iter_tsv_column(d.train_tsv, 0, 1),
            "target": lambda: data.iter_tsv_column(d.train_tsv, 1, 0),
        }
    elif d.tfds_name:
        inputs = {"tfds": {"name": d.tfds_name, "split": d.tfds_train_split, "data_dir": d.tfds_data_dir,
                           "source_lang": d.source_lang, "target_lang": d.target_lang}}

        def side_of(index):
            pairs = data.iter_tfds_pairs(d.tfds_name, d.tfds_train_split, d.source_lang, d.target_lang, d.tfds_data_dir)
            return (pair[index] for pair in pairs)

        lines = {"source": lambda: side_of(0), "target": lambda: side_of(1)}
    else:
        inputs = {"source": file_fingerprint(d.train_source), "target": file_fingerprint(d.train_target)}
        lines = {"source": lambda: data.iter_lines(d.train_source), "target": lambda: data.iter_lines(d.train_target)}
    return inputs, lines


def _same_inputs(manifest, inputs):
    """Whether a corpus manifest was encoded from `inputs`: the same fingerprints (wherever
    the files are now) or the same TFDS data set."""

    def content(value):
        if isinstance(value, dict):
            return {key: content(item) for key, item in value.items() if key != "path"}
        return value

    return content(manifest.get("inputs")) == content(inputs)


def tokenization_settings(config):
    """What decides a corpus's tokens besides the data: the tokenization section."""
    return dataclasses.asdict(config.tokenization)


def encode_training_data(run_dir, config, run=None):
    """Encodes the training data into run_dir/corpus/ (seq2seq.corpus): with `run`, with its
    tokenizers and vocabularies (a resumed run whose data changed); else with new ones, built
    on the way (SentencePiece from a sample of the data, word vocabularies from streaming
    counts) and saved in corpus/ too. Returns the TranslationRun. An encoding that fails or
    is stopped leaves no corpus/ behind."""
    corpus_dir = Path(run_dir) / CORPUS_DIR
    try:
        return _encode_training_data(run_dir, corpus_dir, config, run)
    except BaseException:
        shutil.rmtree(corpus_dir, ignore_errors=True)
        raise


def _encode_training_data(run_dir, corpus_dir, config, run):
    t = config.tokenization
    inputs, lines = training_data(config)  # fingerprinted before reading: a later change is noticed
    started = time.monotonic()
    writer = CorpusWriter(corpus_dir)
    vocabs = None
    if run is not None:
        tokenizers, vocabs = [run.source_tokenizer, run.target_tokenizer], [run.source_vocab, run.target_vocab]
    elif t.vocabularies_from:
        tokenizers, vocabs = tokenization_from(t.vocabularies_from, config)
        log(f"using the vocabularies of {t.vocabularies_from}: {len(vocabs[0])} source, {len(vocabs[1])} target tokens")
        for side, tokenizer in zip(SIDES, tokenizers):
            if isinstance(tokenizer, SentencePieceTokenizer):
                tokenizer.save(corpus_dir / f"{side}.spm")
    elif t.scheme == "sentencepiece":
        sides = [("joint", lambda: itertools.chain(lines["source"](), lines["target"]()), t.source_vocab_size)] \
            if t.joint_vocabulary else [("source", lines["source"], t.source_vocab_size),
                                        ("target", lines["target"], t.target_vocab_size)]
        models = []
        for side, texts, size in sides:
            log(f"training the {side} SentencePiece model on up to {t.sentencepiece_sample_size:,} sampled sentences")
            models.append(train_sentencepiece(
                texts(), size, model_type=t.sentencepiece_model_type, sample_size=t.sentencepiece_sample_size
            ))
        if t.joint_vocabulary:
            models = models * 2  # the one model serves both sides
        tokenizers = [SentencePieceTokenizer(model) for model in models]
        vocabs = [sentencepiece_vocabulary(model) for model in models]
        for side, model in zip(SIDES, models):
            (corpus_dir / f"{side}.spm").write_bytes(model)
    else:
        tokenizers = [WordTokenizer(lowercase=t.lowercase), WordTokenizer(lowercase=t.lowercase)]
    counters = [TokenCounter()] * 2 if t.joint_vocabulary else [TokenCounter(), TokenCounter()]
    counts = []
    for side, tokenizer, counter in zip(SIDES, tokenizers, counters):
        counts.append(writer.encode(side, lines[side](), tokenizer, counter))
    names = [config.data.train_source or "source side", config.data.train_target or "target side"]
    data.check_line_counts(names[0], counts[0], names[1], counts[1])
    if vocabs is None:
        sizes = (t.source_vocab_size, t.target_vocab_size)
        if t.joint_vocabulary:
            vocabs = [Vocabulary.from_counts(counters[0].counts(), sizes[0], t.min_count)] * 2
        else:
            vocabs = [Vocabulary.from_counts(c.counts(), size, t.min_count) for c, size in zip(counters, sizes)]
    for side, vocab in zip(SIDES, vocabs):
        vocab.save(corpus_dir / f"{side}.vocab")
    manifest = {
        "inputs": inputs,
        "tokenization": tokenization_settings(config),
        "vocabularies": vocabulary_hashes(corpus_dir),
    }
    corpus = writer.finish(dict(zip(SIDES, vocabs)), manifest)
    sides = corpus.manifest["sides"]
    log(
        f"encoded {len(corpus):,} pairs ({sides['source']['tokens']:,} source, {sides['target']['tokens']:,} target "
        f"tokens; {corpus.size_on_disk() / 2**20:,.1f} MiB in {corpus_dir}) in {time.monotonic() - started:.0f} s"
    )
    return run or TranslationRun(run_dir, config, *tokenizers, *vocabs)


def tokenization_from(path, config):
    """The tokenizers and vocabularies of another run directory or exported SavedModel (its
    assets.extra), for `tokenization.vocabularies_from`; checked against the config's scheme
    and joint_vocabulary."""
    path = Path(path)
    directory = path / "assets.extra" if (path / "assets.extra" / "source.vocab").is_file() else path
    if not all((directory / f"{side}.vocab").is_file() for side in SIDES):
        raise DataError(
            f"tokenization vocabularies_from {path}: no source.vocab and target.vocab there; give a run directory "
            "or a SavedModel exported by this toolkit"
        )
    has_models = all((directory / f"{side}.spm").is_file() for side in SIDES)
    scheme = config.tokenization.scheme
    if has_models != (scheme == "sentencepiece"):
        wanted = "sentencepiece" if has_models else "word"
        raise DataError(
            f"tokenization vocabularies_from {path} holds {wanted}-scheme vocabularies but the scheme is {scheme}: "
            f"use --scheme {wanted}"
        )
    run = TranslationRun.from_files(path, directory, config)
    if config.tokenization.joint_vocabulary and run.source_vocab.tokens != run.target_vocab.tokens:
        raise DataError(
            f"tokenization vocabularies_from {path} has two different vocabularies, but joint_vocabulary asks for one: "
            "drop --joint-vocabulary (and share_embeddings), or give a run that has one joint vocabulary"
        )
    return [run.source_tokenizer, run.target_tokenizer], [run.source_vocab, run.target_vocab]


def vocabulary_hashes(directory):
    """{file name: SHA-256} of the vocabularies and SentencePiece models in `directory`."""
    return {name: file_sha256(directory / name) for name in TranslationRun.FILES if (directory / name).is_file()}


def prepare_corpus(run):
    """Makes sure a resumed run's corpus/ holds its training data: encoded again, with the
    run's vocabularies, when the data changed since, or its encoding never finished."""
    corpus_dir = run.run_dir / CORPUS_DIR
    manifest = read_manifest(corpus_dir)
    inputs, _ = training_data(run.config)
    if manifest is None:
        reason = "holds no finished corpus"
    elif not _same_inputs(manifest, inputs):
        reason = "was encoded from training data that changed since"
    elif manifest["vocabularies"] != vocabulary_hashes(run.run_dir):
        reason = "was encoded with other vocabularies than the run's"
    else:
        return
    log(f"{corpus_dir} {reason}: encoding the training data again, with the run's vocabularies")
    encode_training_data(run.run_dir, run.config, run)


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
    def create(cls, config):
        """A new run: tokenizers and vocabularies from the training data, which is encoded
        into the run's corpus/ on the way (`encode_training_data`), or the ones of a corpus/
        an earlier start of the run finished encoding from the same data and settings."""
        run_dir = Path(config.training.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        corpus_dir = run_dir / CORPUS_DIR
        inputs, _ = training_data(config)
        manifest = read_manifest(corpus_dir)
        if manifest and _same_inputs(manifest, inputs) and manifest["tokenization"] == tokenization_settings(config):
            log(f"{corpus_dir}: encoded from the same training data and settings by an earlier start: using it")
            run = cls.from_files(run_dir, corpus_dir, config)
        else:
            run = encode_training_data(run_dir, config)
        for name in cls.FILES:
            if (corpus_dir / name).is_file():
                shutil.copyfile(corpus_dir / name, run_dir / name)
        config.save(run_dir / RUN_CONFIG)
        return run

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

    def translator(self, model, replace_unknown=False, shortlist=None):
        return Translator(
            model,
            self.source_tokenizer,
            self.target_tokenizer,
            self.source_vocab,
            self.target_vocab,
            max_source_length=self.config.data.max_source_length,
            replace_unknown=replace_unknown,
            shortlist=shortlist,
        )

    def load_model(self, weights="best", average_last=None):
        """The trained model: "best" weights, the "last" checkpoint, or the average of the last N checkpoints."""
        return load_trained_weights(self.build_model(), self.run_dir, weights, average_last)


def make_batches(run, sources, targets, shuffle, report_name):
    """PlannedBatches over the pairs of the strings `sources` and `targets` encoded in memory
    (validation data), after dropping over-long and empty pairs (reported)."""
    source_ids = encode_all(run.source_tokenizer, run.source_vocab, sources)
    target_ids = encode_all(run.target_tokenizer, run.target_vocab, targets)
    source_lengths = source_ids.row_lengths().numpy()
    target_lengths = target_ids.row_lengths().numpy()
    kept, plan = planned_pairs(run.config, source_lengths, target_lengths, shuffle, report_name)
    return sequence_batches(
        tf.gather(source_ids, kept), tf.gather(target_ids, kept), plan, pad_to_multiple=run.config.batching.pad_to_multiple
    )


def corpus_training_batches(run, corpus, report_name="train"):
    """PlannedBatches over the pairs of the run's encoded corpus (read from disk), after
    dropping over-long and empty pairs (reported): the same batches `make_batches` makes
    of the same pairs."""
    source_lengths, target_lengths = corpus.lengths("source"), corpus.lengths("target")
    kept, plan = planned_pairs(run.config, source_lengths, target_lengths, True, report_name)
    return corpus_batches(corpus, kept, plan, pad_to_multiple=run.config.batching.pad_to_multiple)


def planned_pairs(config, source_lengths, target_lengths, shuffle, report_name):
    """(kept, plan): the pairs batched (within the length limits and not empty) and the plan of
    their batches, from their lengths alone (a pair's length: its source, or its target with
    the start token)."""
    kept = kept_pairs(config, source_lengths, target_lengths, report_name)
    return kept, batch_plan(config, np.maximum(source_lengths[kept], target_lengths[kept] + 1), shuffle)


def kept_pairs(config, source_lengths, target_lengths, report_name):
    """Indices of the pairs within the length limits and not empty; the dropped ones are logged."""
    d = config.data
    kept, dropped = filter_by_length(source_lengths, target_lengths, d.max_source_length, d.max_target_length)
    if dropped:
        log(
            f"{report_name}: dropped {dropped} of {len(source_lengths)} pairs that are empty or longer than "
            f"{d.max_source_length} source / {d.max_target_length} target tokens"
        )
    if not len(kept):
        raise DataError(f"{report_name}: no sentence pairs left to train on")
    return kept


def batch_plan(config, lengths, shuffle):
    """plan(epoch): the run's deterministic batches over pairs of these lengths."""
    b, seed = config.batching, config.training.seed

    def plan(epoch):
        return plan_batches(
            lengths, batch_size=b.batch_size, max_tokens=b.max_tokens, seed=seed, epoch=epoch,
            shuffle=shuffle, bucket_width=b.bucket_width,
        )

    return plan


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

    def create():
        return TranslationRun.create(config)

    with open_run(config, strategy, TranslationRun.load, create, prepare=prepare_corpus, files=TranslationRun.FILES) as run:
        corpus = Corpus.open(run.run_dir / CORPUS_DIR)
        valid_sources, valid_targets = read_pairs(run.config, "valid")
        log(
            f"train: {len(corpus)} pairs; valid: {len(valid_sources)} pairs; "
            f"vocabularies: {len(run.source_vocab)} source, {len(run.target_vocab)} target tokens"
        )
        batches = corpus_training_batches(run, corpus)
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


def export(run, model, export_dir, beam_size=5, length_penalty=0.6, replace_unknown=False, ensemble=(),
           combine="probabilities", bf16_products=False, shortlist=None):
    """Writes a SavedModel with `serving_default` (texts -> translations, scores; beam search
    inside), `translate` (texts, beam_size, n_best, length_penalty -> everything) and
    `translate_with_prefix` (the same with a target prefix a text).

    `ensemble`: more (run, model) pairs; the SavedModel then decodes with the ensemble of all
    (`Translator.ensemble(combine)`, one target vocabulary) and keeps every member's config and
    vocabularies in assets.extra/members/N/ beside the first member's own.

    `bf16_products`: the export's searches start with bfloat16 matrix products switched on
    (`Translator.bf16_products`), for servers with AMX or AVX512-BF16; this toolkit's commands
    set the switch per CPU when they load an export anyway.

    `shortlist`: a vocabulary shortlist (`shortlist.build_shortlist`, see `run_shortlist`) the
    searches decode over (switch: `use_shortlist`); kept in assets.extra/shortlist.npz too, so
    that `export --from-model` writes it again. Not for ensembles."""
    if shortlist is not None and ensemble:
        raise ValueError("a vocabulary shortlist is for single-model exports, not ensembles")
    translator = run.translator(model, replace_unknown=replace_unknown, shortlist=shortlist)
    if ensemble:
        members = [translator, *(member_run.translator(member) for member_run, member in ensemble)]
        translator = Translator.ensemble(members, combine)
    translator.bf16_products.assign(bf16_products)
    signatures = {
        "serving_default": translator.serving_function(beam_size, length_penalty),
        "translate": translator.translate,
        "translate_with_prefix": translator.translate_with_prefix,
    }
    extra = save_export(translator, export_dir, signatures, run.config, beam_size, length_penalty)
    save_tokenization(run, extra)
    if shortlist is not None:
        table, frequent = shortlist
        np.savez(extra / SHORTLIST_FILE, table=table, frequent=frequent)
    if ensemble:
        for index, (member_run, _) in enumerate([(run, model), *ensemble]):
            member_dir = extra / ENSEMBLE_MEMBERS / str(index)
            member_dir.mkdir(parents=True)
            member_run.config.save(member_dir / RUN_CONFIG)
            save_tokenization(member_run, member_dir)
        (extra / ENSEMBLE_FILE).write_text(json.dumps({"members": len(ensemble) + 1, "combine": combine}) + "\n")
    return Path(export_dir)


ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_MEMBERS = "members"
SHORTLIST_FILE = "shortlist.npz"


def run_shortlist(run, per_token, frequent):
    """A vocabulary shortlist (`shortlist.build_shortlist`) from the run's training data (as its
    config names it), tokenized with the run's own tokenizers and vocabularies."""
    started = time.monotonic()
    _, lines = training_data(run.config)
    pairs = training_pairs(run, lines["source"](), lines["target"]())
    table, frequent_ids = build_shortlist(pairs, len(run.source_vocab), len(run.target_vocab), per_token, frequent)
    log(f"shortlist: {per_token} target tokens a source token and the {len(frequent_ids)} most frequent, "
        f"from the training data in {time.monotonic() - started:.0f} s")
    return table, frequent_ids


def exported_shortlist(export_dir):
    """The shortlist an export carries in assets.extra (None if it has none)."""
    path = Path(export_dir) / "assets.extra" / SHORTLIST_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return saved["table"], saved["frequent"]


def save_tokenization(run, directory):
    """The run's vocabularies (and SentencePiece models) into `directory`, as exports carry them."""
    for side, tokenizer, vocab in (("source", run.source_tokenizer, run.source_vocab), ("target", run.target_tokenizer, run.target_vocab)):
        vocab.save(directory / f"{side}.vocab")
        if isinstance(tokenizer, SentencePieceTokenizer):
            tokenizer.save(directory / f"{side}.spm")


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
    if (extra / ENSEMBLE_FILE).is_file():
        raise DataError(
            f"{export_dir}: an exported ensemble; translate with it as it is, or export its members again from "
            "their run dirs (--from-model takes single-model exports)"
        )
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
