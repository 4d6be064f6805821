"""Training data encoded once into shards on disk (seq2seq.corpus) and how translation
runs use them: the shards hold exactly the in-memory encoding, batches from them equal the
in-memory batches, a changed or half-written corpus is encoded again, a resumed run trains on
exactly the batches of an uninterrupted one, and preparing memory does not grow with the corpus.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import OWN_PEAK_RSS, PROJECT_ROOT, TINY_MODEL, cli, toy_pairs, write_lines
from seq2seq import corpus as corpus_module
from seq2seq.corpus import Corpus, file_fingerprint, padded_rows, read_manifest
from seq2seq.text import DataError, Vocabulary, encode_all, tokenize_all
from seq2seq.tasks.translation.config import TranslationConfig
from seq2seq.tasks.translation.pipeline import (
    CORPUS_DIR, TranslationRun, corpus_training_batches, make_batches, prepare_corpus,
)


def pairs_with_rare_words(count, seed=0):
    """Toy pairs, some with words seen once, some empty or long (dropped by length)."""
    sources, targets = toy_pairs(count, seed)
    for index in range(0, count, 17):
        sources[index] += f" zebra{index} , «quoted» 3.5"
        targets[index] += f" Zebra{index} !"
    sources[5], targets[9] = "", "   "
    return sources, targets


def config_for(tmp_path, sources, targets, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = [write_lines(tmp_path / "train.en", sources), write_lines(tmp_path / "train.de", targets)]
    values = {"data": {"train_source": str(paths[0]), "train_target": str(paths[1]), "max_source_length": 12},
              "training": {"output_dir": str(tmp_path / "run"), "seed": 3}, "batching": {"batch_size": 8}}
    for name, fields in sections.items():
        values[name] = {**values.get(name, {}), **fields}
    return TranslationConfig.from_dict(values)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 lines, so that a small corpus spans many and ids cross chunk borders."""
    monkeypatch.setattr(corpus_module, "ENCODE_CHUNK", 7)
    monkeypatch.setattr(corpus_module, "REMAP_BLOCK", 50)


@pytest.mark.parametrize("tokenization", [
    {}, {"lowercase": True, "source_vocab_size": 30, "min_count": 2},
    {"scheme": "sentencepiece", "source_vocab_size": 60, "target_vocab_size": 60},
])
def test_shards_hold_the_in_memory_encoding_and_the_vocabularies_of_the_whole_corpus(tmp_path, small_chunks,
                                                                                      tokenization):
    sources, targets = pairs_with_rare_words(200)
    config = config_for(tmp_path, sources, targets, tokenization=tokenization)
    run = TranslationRun.create(config)
    corpus = Corpus.open(run.run_dir / CORPUS_DIR)
    if config.tokenization.scheme == "word":
        t = config.tokenization
        assert run.source_vocab.tokens == Vocabulary.build(
            tokenize_all(run.source_tokenizer, sources), t.source_vocab_size, t.min_count).tokens
        assert run.target_vocab.tokens == Vocabulary.build(
            tokenize_all(run.target_tokenizer, targets), t.target_vocab_size, t.min_count).tokens
    for side, texts, tokenizer, vocab in (("source", sources, run.source_tokenizer, run.source_vocab),
                                          ("target", targets, run.target_tokenizer, run.target_vocab)):
        expected = encode_all(tokenizer, vocab, texts).to_list()
        assert [corpus.sentence(side, i).tolist() for i in range(len(corpus))] == expected
        assert corpus.dtypes[side] == np.uint16
        assert (run.run_dir / f"{side}.vocab").read_bytes() == (corpus.directory / f"{side}.vocab").read_bytes()
    assert len(corpus) == 200 and corpus.manifest["sides"]["target"]["sentences"] == 200


@pytest.mark.parametrize("batching", [{}, {"max_tokens": 60, "bucket_width": 3, "pad_to_multiple": 4}])
def test_batches_from_shards_equal_the_in_memory_batches(tmp_path, batching):
    sources, targets = pairs_with_rare_words(120)
    config = config_for(tmp_path, sources, targets, batching=batching)
    run = TranslationRun.create(config)
    from_shards = corpus_training_batches(run, Corpus.open(run.run_dir / CORPUS_DIR))
    in_memory = make_batches(run, sources, targets, shuffle=True, report_name="train")
    assert [list(b) for b in from_shards.plan(1)] == [list(b) for b in in_memory.plan(1)]
    assert from_shards.target_tokens(0, 9) == in_memory.target_tokens(0, 9)
    pairs = zip(from_shards.stream(3).take(8).as_numpy_iterator(), in_memory.stream(3).take(8).as_numpy_iterator())
    for (shard_inputs, shard_targets), (memory_inputs, memory_targets) in pairs:
        for name in ("source", "target_in"):
            np.testing.assert_array_equal(shard_inputs[name], memory_inputs[name])
        np.testing.assert_array_equal(shard_targets, memory_targets)


def test_padded_rows_puts_start_and_end_tokens_and_pads_to_a_multiple():
    sentences = [np.array([8, 9, 10]), np.array([], np.int32), np.array([5, 6])]
    np.testing.assert_array_equal(padded_rows(sentences), [[8, 9, 10], [0, 0, 0], [5, 6, 0]])
    np.testing.assert_array_equal(padded_rows(sentences[1:], lead=2, pad_to_multiple=4),
                                  [[2, 0, 0, 0], [2, 5, 6, 0]])
    np.testing.assert_array_equal(padded_rows(sentences, trail=3), [[8, 9, 10, 3], [3, 0, 0, 0], [5, 6, 3, 0]])


def test_corpus_lengths_are_read_across_blocks(tmp_path, small_chunks):
    sources, targets = pairs_with_rare_words(130)
    run = TranslationRun.create(config_for(tmp_path, sources, targets))
    corpus = Corpus.open(run.run_dir / CORPUS_DIR)
    expected = encode_all(run.target_tokenizer, run.target_vocab, targets).row_lengths().numpy()
    np.testing.assert_array_equal(corpus.lengths("target"), expected)  # REMAP_BLOCK 50: three blocks
    assert corpus.lengths("target").dtype == np.int32


def test_joint_vocabulary_is_one_vocabulary_of_both_sides(tmp_path, small_chunks):
    sources, targets = pairs_with_rare_words(100)
    config = config_for(tmp_path, sources, targets, tokenization={"joint_vocabulary": True})
    run = TranslationRun.create(config)
    expected = Vocabulary.build(tokenize_all(run.source_tokenizer, sources + targets), 8000, 1)
    assert run.source_vocab.tokens == run.target_vocab.tokens == expected.tokens
    assert "zebra0" in expected.tokens and "Zebra0" in expected.tokens
    corpus = Corpus.open(run.run_dir / CORPUS_DIR)
    assert corpus.sentence("target", 0).tolist() == encode_all(run.target_tokenizer, expected, targets[:1]).to_list()[0]
    model = TranslationRun.load(run.run_dir)
    assert model.source_vocab.tokens == model.target_vocab.tokens


def test_joint_sentencepiece_is_one_model_for_both_sides(tmp_path):
    sources, targets = pairs_with_rare_words(100)
    config = config_for(tmp_path, sources, targets, tokenization={
        "scheme": "sentencepiece", "joint_vocabulary": True, "source_vocab_size": 70, "target_vocab_size": 70})
    run = TranslationRun.create(config)
    assert (run.run_dir / "source.spm").read_bytes() == (run.run_dir / "target.spm").read_bytes()
    assert run.source_vocab.tokens == run.target_vocab.tokens
    pieces = run.source_vocab.tokens
    assert any("ä" in piece for piece in pieces) and any("y" in piece for piece in pieces)  # German, English only


def test_a_run_takes_the_vocabularies_of_another_run_or_of_its_export(tmp_path):
    """vocabularies_from: the new run tokenizes and encodes with the other run's SentencePiece
    models and vocabularies (what ensemble members need), from a run dir or an export."""
    sources, targets = pairs_with_rare_words(100)
    tokenization = {"scheme": "sentencepiece", "source_vocab_size": 60, "target_vocab_size": 70}
    first = TranslationRun.create(config_for(tmp_path / "a", sources, targets, tokenization=tokenization))
    export_extra = tmp_path / "export" / "assets.extra"
    export_extra.mkdir(parents=True)
    for name in TranslationRun.FILES:
        (export_extra / name).write_bytes((first.run_dir / name).read_bytes())
    other_sources, other_targets = toy_pairs(40, seed=5)
    for origin in (first.run_dir, tmp_path / "export"):
        config = config_for(tmp_path / origin.name, other_sources, other_targets, tokenization={
            "scheme": "sentencepiece", "source_vocab_size": 500, "vocabularies_from": str(origin)})
        run = TranslationRun.create(config)
        for name in TranslationRun.FILES:
            assert (run.run_dir / name).read_bytes() == (first.run_dir / name).read_bytes(), name
        assert len(run.source_vocab) == len(first.source_vocab) and len(run.target_vocab) == len(first.target_vocab)
        corpus = Corpus.open(run.run_dir / CORPUS_DIR)
        expected = encode_all(first.target_tokenizer, first.target_vocab, other_targets[:1]).to_list()[0]
        assert corpus.sentence("target", 0).tolist() == expected
        assert TranslationRun.load(run.run_dir).target_vocab.tokens == first.target_vocab.tokens


def test_vocabularies_from_is_checked_against_the_scheme_and_joint_vocabulary(tmp_path):
    sources, targets = pairs_with_rare_words(60)
    first = TranslationRun.create(config_for(tmp_path / "a", sources, targets))
    cases = [
        ({"vocabularies_from": str(tmp_path / "nowhere")}, "no source.vocab and target.vocab there"),
        ({"vocabularies_from": str(first.run_dir), "scheme": "sentencepiece"},
         "holds word-scheme vocabularies but the scheme is sentencepiece: use --scheme word"),
        ({"vocabularies_from": str(first.run_dir), "joint_vocabulary": True}, "has two different vocabularies"),
    ]
    for index, (tokenization, message) in enumerate(cases):
        config = config_for(tmp_path / str(index), sources, targets, tokenization=tokenization)
        with pytest.raises(DataError, match=message):
            TranslationRun.create(config)
        assert not (tmp_path / str(index) / "run" / CORPUS_DIR).exists()


def test_joint_vocabulary_and_shared_embeddings_are_checked_in_the_config(tmp_path):
    sources, targets = toy_pairs(10)
    with pytest.raises(ValueError, match="joint_vocabulary needs source_vocab_size == target_vocab_size"):
        config_for(tmp_path, sources, targets, tokenization={"joint_vocabulary": True, "source_vocab_size": 100})
    transformer = {"encoder_type": "transformer", "decoder_type": "transformer", "share_embeddings": True}
    with pytest.raises(ValueError, match="share_embeddings needs one vocabulary for both sides: add --joint-vocabulary"):
        config_for(tmp_path, sources, targets, model=transformer)
    config_for(tmp_path, sources, targets, model=transformer, tokenization={"joint_vocabulary": True})


def test_a_changed_training_file_is_encoded_again_never_used_stale(tmp_path, capsys):
    sources, targets = pairs_with_rare_words(60)
    config = config_for(tmp_path, sources, targets)
    run = TranslationRun.create(config)
    corpus_dir = run.run_dir / CORPUS_DIR
    prepare_corpus(run)
    assert "encoding the training data again" not in capsys.readouterr().err
    first = read_manifest(corpus_dir)

    changed = list(sources)
    changed[30] = "the girl sees a zebra0 ."
    write_lines(config.data.train_source, changed)
    assert file_fingerprint(config.data.train_source) != first["inputs"]["source"]
    prepare_corpus(run)
    assert "was encoded from training data that changed since: encoding the training data again" in capsys.readouterr().err
    corpus = Corpus.open(corpus_dir)
    assert corpus.sentence("source", 30).tolist() == encode_all(run.source_tokenizer, run.source_vocab, changed[30:31]).to_list()[0]
    assert read_manifest(corpus_dir)["vocabularies"] == first["vocabularies"]  # the run's vocabularies, kept

    write_lines(config.data.train_source, changed + ["one line more"])
    with pytest.raises(Exception, match="parallel files differ in length: .*train.en has 61 lines, .*train.de has 60"):
        prepare_corpus(run)
    assert read_manifest(corpus_dir) is None  # never a corpus that looks finished


def test_a_half_written_corpus_is_encoded_again_and_a_finished_one_reused(tmp_path, capsys):
    sources, targets = pairs_with_rare_words(60)
    config = config_for(tmp_path, sources, targets)
    run = TranslationRun.create(config)
    corpus_dir = run.run_dir / CORPUS_DIR
    capsys.readouterr()
    TranslationRun.create(config)
    assert "encoded from the same training data and settings by an earlier start: using it" in capsys.readouterr().err
    (corpus_dir / "manifest.json").unlink()
    (corpus_dir / "target.ids").write_bytes(b"\0\0")
    prepare_corpus(run)
    assert "holds no finished corpus: encoding the training data again" in capsys.readouterr().err
    corpus = Corpus.open(corpus_dir)
    assert corpus.sentence("target", 59).tolist() == encode_all(run.target_tokenizer, run.target_vocab, targets[59:]).to_list()[0]
    lowercase = config_for(tmp_path, sources, targets, tokenization={"lowercase": True})
    TranslationRun.create(lowercase)
    assert "using it" not in capsys.readouterr().err


def test_a_resumed_run_trains_from_its_shards_to_the_weights_of_an_uninterrupted_run(tmp_path, toy_corpus, capsys):
    flags = ["--train-source", toy_corpus / "train.en", "--train-target", toy_corpus / "train.de",
             "--steps-per-checkpoint", 4, "--no-validation-bleu", *TINY_MODEL, "--dropout", "0.3"]
    assert cli("train", *flags, "--output-dir", tmp_path / "whole", "--max-steps", 8) == 0
    assert cli("train", *flags, "--output-dir", tmp_path / "resumed", "--max-steps", 4) == 0
    capsys.readouterr()
    assert cli("train", *flags, "--output-dir", tmp_path / "resumed", "--max-steps", 8) == 0
    err = capsys.readouterr().err
    assert "holds a run: continuing it" in err and "encoding" not in err
    weights = [TranslationRun.load(tmp_path / name).load_model("last").get_weights() for name in ("whole", "resumed")]
    for whole, resumed in zip(*weights):
        np.testing.assert_array_equal(whole, resumed)


def test_tsv_and_tfds_training_data_go_through_the_same_shards(tmp_path, small_chunks):
    sources, targets = pairs_with_rare_words(40)
    tsv = write_lines(tmp_path / "train.tsv", [f"{s}\t{t}" for s, t in zip(sources, targets)])
    config = TranslationConfig.from_dict({"data": {"train_tsv": str(tsv)}, "training": {"output_dir": str(tmp_path / "tsv")}})
    run = TranslationRun.create(config)
    corpus = Corpus.open(run.run_dir / CORPUS_DIR)
    assert [corpus.sentence("target", i).tolist() for i in range(40)] == encode_all(
        run.target_tokenizer, run.target_vocab, targets).to_list()
    assert "tsv" in corpus.manifest["inputs"]

    tfds = pytest.importorskip("tensorflow_datasets")
    from seq2seq.tasks.translation.data import load_tfds

    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        config = TranslationConfig.from_dict({
            "data": {"tfds_name": "ted_hrlr_translate/pt_to_en"}, "training": {"output_dir": str(tmp_path / "tfds")}})
        run = TranslationRun.create(config)
        portuguese, english = load_tfds("ted_hrlr_translate/pt_to_en", "train")
    corpus = Corpus.open(run.run_dir / CORPUS_DIR)
    assert len(corpus) == 12
    assert [corpus.sentence("source", i).tolist() for i in range(12)] == encode_all(
        run.source_tokenizer, run.source_vocab, portuguese).to_list()
    assert corpus.manifest["inputs"]["tfds"]["name"] == "ted_hrlr_translate/pt_to_en"


PREPARE_RSS = OWN_PEAK_RSS + """
import sys
from seq2seq.tasks.translation.config import TranslationConfig
from seq2seq.tasks.translation.pipeline import TranslationRun
config = TranslationConfig.from_dict({"data": {"train_source": sys.argv[1], "train_target": sys.argv[2]},
                                      "training": {"output_dir": sys.argv[3]}})
TranslationRun.create(config)
print(own_peak_rss_kb() // 1024)
"""


def test_preparing_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of preparing 200k pairs is within 60 MB of preparing 50k."""
    peaks = {}
    for count in (50_000, 200_000):
        sources, targets = toy_pairs(count, seed=count)
        sources = [f"{s} {i % 5000}" for i, s in enumerate(sources)]  # distinct tokens grow too, slowly
        paths = [write_lines(tmp_path / f"{count}.en", sources), write_lines(tmp_path / f"{count}.de", targets)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(PROJECT_ROOT))
        result = subprocess.run(
            [sys.executable, "-c", PREPARE_RSS, *map(str, paths), str(tmp_path / f"run{count}")],
            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[count] = int(result.stdout.split()[-1])
        assert len(Corpus.open(tmp_path / f"run{count}" / CORPUS_DIR)) == count
    assert peaks[200_000] - peaks[50_000] < 60, peaks


def test_a_child_measures_its_own_peak_memory_not_its_parents():
    """ru_maxrss would report this process's 400 MB for a child that uses a few MB."""
    ballast = bytearray(400 << 20)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page so it is resident
    result = subprocess.run([sys.executable, "-c", OWN_PEAK_RSS + "print(own_peak_rss_kb())"],
                            capture_output=True, text=True, check=True)
    del ballast
    assert int(result.stdout) < 100_000, result.stdout


def test_the_manifest_records_inputs_settings_and_vocabulary_hashes(tmp_path):
    sources, targets = toy_pairs(30)
    config = config_for(tmp_path, sources, targets)
    run = TranslationRun.create(config)
    manifest = json.loads((run.run_dir / CORPUS_DIR / "manifest.json").read_text())
    assert manifest["inputs"]["source"]["size"] == os.path.getsize(config.data.train_source)
    assert manifest["tokenization"]["scheme"] == "word"
    assert set(manifest["vocabularies"]) == {"source.vocab", "target.vocab"}
    assert manifest["sides"]["source"]["tokens"] == sum(len(s.split()) for s in sources)
    assert tf.io.gfile.exists(str(run.run_dir / CORPUS_DIR / "source.offsets"))
