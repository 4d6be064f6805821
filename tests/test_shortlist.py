"""Vocabulary shortlists: the table built from co-occurrences, a batch's output ids, searches over
a shortlist (the whole vocabulary as a shortlist changes nothing but rounding; a shortlist only
ever yields its own tokens), and the export and commands around them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq import products
from seq2seq.ensemble import Ensemble
from seq2seq.model import build_rnn_model, quantize_weights
from seq2seq.tasks.translation import shortlist as shortlists
from seq2seq.tasks.translation.shortlist import batch_shortlist, build_shortlist
from seq2seq.transformer import build_transformer_model

VOCAB = 30
BUILDERS = {
    "transformer": lambda: build_transformer_model(VOCAB, VOCAB, num_layers=1, units=16, num_heads=2, dropout=0.0),
    "transformer_tied": lambda: build_transformer_model(
        VOCAB, VOCAB, num_layers=1, units=16, num_heads=2, dropout=0.0, tie_embeddings=True
    ),
    "rnn": lambda: build_rnn_model(VOCAB, VOCAB, units=16, attention="bahdanau", dropout=0.0),
}
SEARCHES = {"greedy": {}, "beam": {"beam_size": 3}}


def _pairs():
    """Source token 10 + k always comes with target token 20 + k (k < 5); token 4 is in every target."""
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(200):
        ks = rng.choice(5, size=2, replace=False)
        noise = rng.integers(15, 19, size=2)
        pairs.append(([10 + ks[0], 10 + ks[1], int(noise[0])], [4, 20 + ks[0], 20 + ks[1], int(noise[1])]))
    return pairs


def test_the_table_keeps_each_source_tokens_translation_first_and_the_frequent_list_the_commonest():
    table, frequent = build_shortlist(_pairs(), VOCAB, VOCAB, per_token=2, frequent=1)
    assert table.shape == (VOCAB, 2) and table.dtype == np.int32
    assert frequent.tolist() == [4]
    for k in range(5):
        assert table[10 + k, 0] == 20 + k
    assert not table[:4].any()  # reserved source ids: only the reserved id 0
    assert 4 not in table  # frequent tokens are in every shortlist anyway
    assert not table[25:].any()  # tokens never seen: nothing


def test_counting_in_chunks_builds_the_same_table(monkeypatch):
    whole = build_shortlist(_pairs(), VOCAB, VOCAB, per_token=3, frequent=2)
    monkeypatch.setattr(shortlists, "PAIRS_CHUNK", 7)
    chunked = build_shortlist(_pairs(), VOCAB, VOCAB, per_token=3, frequent=2)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


def test_build_refuses_an_empty_shortlist():
    with pytest.raises(ValueError, match="per_token >= 1"):
        build_shortlist(_pairs(), VOCAB, VOCAB, per_token=0)


def test_a_batch_shortlist_is_sorted_unique_with_reserved_ids_first_and_every_prefix_token():
    table = np.zeros((VOCAB, 2), np.int32)
    table[10] = [22, 21]
    table[11] = [21, 0]
    ids = batch_shortlist(tf.constant(table), tf.constant([9, 4]), tf.constant([[10, 11, 0]]), tf.constant([[27, 0]]))
    assert ids.numpy().tolist() == [0, 1, 2, 3, 4, 9, 21, 22, 27]


def _model(kind):
    keras.utils.set_random_seed(0)
    model = BUILDERS[kind]()
    source = np.random.default_rng(0).integers(4, VOCAB, size=(3, 6)).astype("int32")
    model({"source": source, "target_in": source})
    return model, tf.constant(source)


@pytest.mark.parametrize("search", sorted(SEARCHES))
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_the_whole_vocabulary_as_a_shortlist_decodes_exactly_as_without(kind, search):
    model, source = _model(kind)
    plain = model.generate(source, search=search, max_length=6, **SEARCHES[search])
    listed = model.generate(source, search=search, max_length=6, output_ids=tf.range(VOCAB), **SEARCHES[search])
    np.testing.assert_array_equal(plain.ids.numpy(), listed.ids.numpy())
    np.testing.assert_array_equal(plain.lengths.numpy(), listed.lengths.numpy())
    for a, b in zip(plain[2:], listed[2:]):  # a product over gathered rows may round differently
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_greedy_over_a_shortlist_holding_its_choices_chooses_them_again_with_higher_log_probs(kind):
    model, source = _model(kind)
    plain = model.generate(source, search="greedy", max_length=6)
    chosen = np.unique(np.concatenate([np.arange(4), plain.ids.numpy().ravel(), [5, 7]]))
    listed = model.generate(source, search="greedy", max_length=6, output_ids=tf.constant(chosen, tf.int32))
    np.testing.assert_array_equal(plain.ids.numpy(), listed.ids.numpy())
    # Normalized over fewer tokens, each chosen token is at least as likely.
    assert np.all(listed.log_probs.numpy() >= plain.log_probs.numpy() - 1e-6)
    assert np.any(listed.log_probs.numpy() > plain.log_probs.numpy() + 1e-4)


@pytest.mark.parametrize("kind", ["rnn", "transformer"])
def test_searches_over_a_shortlist_yield_only_its_tokens_and_keep_a_forced_prefix(kind):
    model, source = _model(kind)
    allowed = np.array([0, 1, 2, 3, 6, 9, 13, 17, 24], np.int32)
    prefix = (tf.constant([[13, 6], [9, 0], [0, 0]]), tf.constant([2, 1, 0]))
    for search in SEARCHES:
        out = model.generate(
            source, search=search, max_length=6, output_ids=tf.constant(allowed), prefix=prefix, **SEARCHES[search]
        )
        ids = out.ids.numpy()
        assert set(ids.ravel()) <= set(allowed)
        assert ids[0, :, :2].tolist() == [[13, 6]] * ids.shape[1] and ids[1, 0, 0] == 9


def test_an_int8_model_and_an_ensemble_decode_over_the_whole_vocabulary_as_without():
    model, source = _model("rnn")
    quantize_weights(model)
    other, _ = _model("transformer_tied")
    for searcher, sources in ((model, source), (Ensemble([model, other]), [source, source])):
        plain = searcher.generate(sources, search="beam", beam_size=3, max_length=6)
        listed = searcher.generate(sources, search="beam", beam_size=3, max_length=6, output_ids=tf.range(VOCAB))
        np.testing.assert_array_equal(plain.ids.numpy(), listed.ids.numpy())
        np.testing.assert_allclose(plain.scores.numpy(), listed.scores.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_an_int8_output_layer_over_a_shortlist_dequantizes_only_its_columns(dtype):
    model, source = _model("rnn")
    quantize_weights(model)
    layer = model.decoder.output_layer
    ids = tf.constant([0, 1, 2, 3, 7, 21, 29])
    # The same values as the shortlist's columns of the whole dequantized kernel.
    whole = products.weight(layer.kernel, layer.kernel_scale)
    np.testing.assert_array_equal(
        products.dequantized_columns(layer.kernel, layer.kernel_scale, ids, dtype).numpy(),
        tf.cast(tf.gather(whole, ids, axis=1), dtype).numpy(),
    )

    # In a shortlisted search, no cast reads the whole [units, vocabulary] int8 kernel.
    @tf.function
    def search(s, ids):
        with products.product_dtype(dtype):
            return model.generate(s, search="beam", beam_size=3, max_length=6, output_ids=ids).ids

    graph = search.get_concrete_function(tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)).graph
    needed, pending = set(), [tensor.op for tensor in graph.outputs]
    while pending:  # the ops the outputs depend on (TensorFlow prunes the others)
        op = pending.pop()
        if op not in needed:
            needed.add(op)
            pending += [tensor.op for tensor in op.inputs] + list(op.control_inputs)
    full = tuple(layer.kernel.shape)
    casts = [op.name for op in needed if op.type == "Cast" and op.inputs[0].dtype == tf.int8 and tuple(op.inputs[0].shape) == full]
    assert casts == []
    listed = search(tf.constant(source), tf.range(VOCAB)).numpy()
    with products.product_dtype(dtype):
        plain = model.generate(tf.constant(source), search="beam", beam_size=3, max_length=6).ids.numpy()
    np.testing.assert_array_equal(listed, plain)


def test_export_with_a_shortlist_serves_it_keeps_it_and_the_commands_can_switch_it_off(word_model, tmp_path, capsys):
    from conftest import cli
    from seq2seq.tasks.translation.pipeline import TranslationRun, exported_shortlist

    run_dir, plain_export = word_model
    assert cli("export", "--run-dir", run_dir, "--shortlist", 1, "--shortlist-frequent", 2,
               "--output", tmp_path / "listed", "--version", 1) == 0
    assert "shortlist: 1 target tokens a source token and the 2 most frequent" in capsys.readouterr().err
    table, frequent = exported_shortlist(tmp_path / "listed" / "1")
    assert table.shape[1] == 1 and len(frequent) == 2

    listed = tf.saved_model.load(str(tmp_path / "listed" / "1"))
    plain = tf.saved_model.load(str(plain_export))
    texts = tf.constant(["the cat sees the dog .", "a bird eats ."])
    search = (tf.constant(2), tf.constant(1), tf.constant(0.6))
    out = listed.translate(texts, *search)
    run = TranslationRun.load(run_dir)
    source_ids = run.source_vocab.lookup_ids(run.source_tokenizer.tokenize(texts)).to_tensor()
    allowed = {run.target_vocab.tokens[i] for i in batch_shortlist(table, frequent, source_ids).numpy()}
    produced = {token.decode() for token in out["target_tokens"].numpy().ravel() if token}
    assert produced and produced <= allowed and len(allowed) < len(run.target_vocab)
    listed.use_shortlist.assign(False)
    np.testing.assert_array_equal(listed.translate(texts, *search)["translations"], plain.translate(texts, *search)["translations"])

    # --from-model keeps the shortlist; --shortlist 0 drops it.
    assert cli("export", "--from-model", tmp_path / "listed" / "1", "--output", tmp_path / "again", "--version", 1) == 0
    np.testing.assert_array_equal(exported_shortlist(tmp_path / "again" / "1")[0], table)
    assert cli("export", "--from-model", tmp_path / "listed" / "1", "--shortlist", 0,
               "--output", tmp_path / "none", "--version", 1) == 0
    assert exported_shortlist(tmp_path / "none" / "1") is None
    assert not hasattr(tf.saved_model.load(str(tmp_path / "none" / "1")), "use_shortlist")

    # translate --no-shortlist decodes over the whole vocabulary: the plain export's output.
    capsys.readouterr()
    assert cli("translate", "--model", tmp_path / "listed" / "1", "--no-shortlist", "--beam-size", 2,
               "the cat sees the dog .") == 0
    switched_off = capsys.readouterr().out
    assert cli("translate", "--model", plain_export, "--beam-size", 2, "the cat sees the dog .") == 0
    assert switched_off == capsys.readouterr().out


def test_a_shortlist_is_refused_for_ensembles_and_data_that_cannot_be_read(word_model, tmp_path, capsys):
    from conftest import cli

    run_dir, export_dir = word_model
    assert cli("export", "--run-dir", run_dir, "--from-model", export_dir, "--shortlist", 2, "--output", tmp_path) == 2
    assert "--shortlist is for single-model exports, not ensembles" in capsys.readouterr().err
    moved = tmp_path / "moved"
    assert cli("export", "--from-model", export_dir, "--output", moved, "--version", 1) == 0
    config = moved / "1" / "assets.extra" / "config.yaml"
    config.write_text(config.read_text().replace("train.en", "missing.en"))
    assert cli("export", "--from-model", moved / "1", "--shortlist", 2, "--output", tmp_path / "x") == 2
    assert "--shortlist reads the training data the model's config names, and failed" in capsys.readouterr().err
