"""Ensembles (seq2seq.ensemble): the members' averaged distributions decoded by the shared searches."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.ensemble import Ensemble
from seq2seq.factory import build_model
from seq2seq.model import build_rnn_model
from seq2seq.tasks.translation.config import ModelConfig
from test_decoding import END, START, FakeModel, log_softmax


class FakeMember:
    """A FakeModel table behind the member interface an Ensemble uses (encode, decoder.step, ids)."""

    def __init__(self, table):
        self.table = table
        self.decoder = type("FakeDecoder", (), {"step": staticmethod(table.step), "vocab_size": table.vocab})()
        self.start_id, self.end_id = START, END

    def encode(self, source, training=False):
        b = self.table.batch_size
        return {"row": tf.range(b), "memory": tf.zeros([b, 1, 1])}, {"prev": tf.fill([b], START), "t": tf.zeros([b], tf.int32)}


def combined_log_probs(tables, row, step, prev2, prev, combine):
    """The ensemble's next-token log-probabilities in NumPy: log of the mean probability, or the
    mean log-probability renormalized (the searches normalize whatever a step returns)."""
    member = np.stack([table.token_log_probs(row, step, prev2, prev) for table in tables])
    if combine == "log_probabilities":
        return log_softmax(member.mean(0))
    return np.log(np.exp(member).mean(0))


def brute_force_best(tables, row, max_length, combine):
    """(log-probability, tokens) of the most likely hypothesis under the combination, over all of
    them: ended by END, or cut at max_length."""
    hypotheses = []

    def extend(prefix, total, prev2, prev):
        log_probs = combined_log_probs(tables, row, len(prefix), prev2, prev, combine)
        for token in range(tables[0].vocab):
            score = total + log_probs[token]
            if token == END:
                hypotheses.append((score, prefix))
            elif len(prefix) + 1 == max_length:
                hypotheses.append((score, prefix + [token]))
            else:
                extend(prefix + [token], score, prev, token)

    extend([], 0.0, START, START)
    return max(hypotheses, key=lambda hypothesis: hypothesis[0])


@pytest.mark.parametrize("combine", ["probabilities", "log_probabilities"])
def test_exhaustive_beam_over_two_tables_finds_the_brute_force_best_of_their_combination(combine):
    tables = [FakeModel.random(seed=1), FakeModel.random(seed=2)]
    ensemble = Ensemble([FakeMember(t) for t in tables], combine=combine)
    max_length = 4
    result = ensemble.generate([None, None], search="beam", max_length=max_length, beam_size=128)
    for row in range(tables[0].batch_size):
        score, tokens = brute_force_best(tables, row, max_length, combine)
        length = int(result.lengths[row, 0])
        got = result.ids[row, 0, :length].numpy().tolist()
        assert got == tokens, (row, got, tokens)
        np.testing.assert_allclose(result.log_probs[row, 0], score, atol=1e-4)


def test_greedy_over_two_tables_takes_the_argmax_of_the_mean_probabilities():
    tables = [FakeModel.random(seed=3), FakeModel.random(seed=4)]
    result = Ensemble([FakeMember(t) for t in tables]).generate([None, None], max_length=6)
    for row in range(tables[0].batch_size):
        prev2, prev, tokens = START, START, []
        while len(tokens) < 6:
            token = int(np.argmax(combined_log_probs(tables, row, len(tokens), prev2, prev, "probabilities")))
            tokens.append(token)
            if token == END:
                break
            prev2, prev = prev, token
        length = int(result.lengths[row, 0])
        assert result.ids[row, 0, :length].numpy().tolist() == [t for t in tokens if t != END]


def small_models():
    keras.utils.set_random_seed(0)
    rnn = build_rnn_model(20, 16, cell_type="lstm", units=16, bidirectional=True)
    spec = ModelConfig(encoder_type="transformer", decoder_type="transformer", units=16, encoder_layers=1,
                       decoder_layers=1, num_heads=2, ffn_dim=32)
    transformer = build_model(spec, 16, 30)  # another source vocabulary: the source sides may differ
    return rnn, transformer


@pytest.fixture(scope="module")
def models():
    rnn, transformer = small_models()
    rng = np.random.default_rng(0)
    rnn_sources = rng.integers(4, 20, size=(3, 5)).astype(np.int32)
    transformer_sources = rng.integers(4, 30, size=(3, 7)).astype(np.int32)  # other tokens, other lengths
    return rnn, transformer, rnn_sources, transformer_sources


@pytest.mark.parametrize("combine", ["probabilities", "log_probabilities"])
@pytest.mark.parametrize("search, options", [("greedy", {}), ("beam", {"beam_size": 3, "n_best": 2})])
def test_an_ensemble_of_a_model_with_itself_gives_the_models_own_output(models, combine, search, options):
    for model, sources in ((models[0], models[2]), (models[1], models[3])):
        alone = model.generate(sources, search=search, max_length=10, **options)
        doubled = Ensemble([model, model], combine=combine).generate([sources, sources], search=search, max_length=10,
                                                                     **options)
        np.testing.assert_array_equal(doubled.ids, alone.ids)
        np.testing.assert_allclose(doubled.scores, alone.scores, atol=1e-4)
        np.testing.assert_allclose(doubled.attention, alone.attention, atol=1e-5)


def test_an_rnn_and_a_transformer_decode_together_in_a_graph_with_a_prefix(models):
    rnn, transformer, rnn_sources, transformer_sources = models
    ensemble = Ensemble([rnn, transformer])
    prefix = (tf.constant([[5, 6], [0, 0], [7, 0]]), tf.constant([2, 0, 1]))

    @tf.function
    def decode(first, second):
        return ensemble.generate([first, second], search="beam", max_length=8, beam_size=3, prefix=prefix)

    result = decode(rnn_sources, transformer_sources)
    eager = ensemble.generate([rnn_sources, transformer_sources], search="beam", max_length=8, beam_size=3, prefix=prefix)
    np.testing.assert_array_equal(result.ids, eager.ids)
    assert result.ids[0, 0, :2].numpy().tolist() == [5, 6] and int(result.ids[2, 0, 0]) == 7
    assert result.attention.shape[-1] == rnn_sources.shape[1]  # the first member's source positions


def test_members_over_other_target_vocabularies_are_refused_naming_both():
    keras.utils.set_random_seed(0)
    first = build_rnn_model(20, 16, units=8)
    second = build_rnn_model(20, 24, units=8)
    with pytest.raises(ValueError, match="model 0 has 16 target tokens .* model 1 has 24"):
        Ensemble([first, second])
    with pytest.raises(ValueError, match="combine must be one of"):
        Ensemble([first], combine="max")
    with pytest.raises(ValueError, match="2 source batches for 1 ensemble members"):
        Ensemble([first]).encode([None, None])


# Translation: Translator.ensemble and translate --model A --model B ---------------------------

TEXTS = ["a man is riding a bike .", "the girl sees a ball .", "", "a dog likes the horse ."]


def test_a_translator_ensemble_of_a_model_with_itself_translates_as_the_model(word_translator):
    from seq2seq.tasks.translation.translator import Translator

    ensemble = Translator.ensemble([word_translator, word_translator])
    for beam_size in (1, 3):
        search = (tf.constant(beam_size), tf.constant(1), tf.constant(0.6))
        alone = word_translator.translate(tf.constant(TEXTS), *search)
        both = ensemble.translate(tf.constant(TEXTS), *search)
        assert both["translations"].numpy().tolist() == alone["translations"].numpy().tolist()
        np.testing.assert_allclose(both["scores"], alone["scores"], atol=1e-4)
    prefixed = ensemble.translate_with_prefix(tf.constant(TEXTS), tf.constant(["ein hund", "", "", "das"]), *search)
    assert prefixed["translations"].numpy()[0].decode().startswith("ein hund")


def test_cli_ensemble_of_a_run_dir_and_an_export_of_one_model_prints_its_translations(capsys, word_model):
    from conftest import cli

    run_dir, export_dir = word_model
    assert cli("translate", "--model", export_dir, "--beam-size", 3, *TEXTS) == 0
    alone = capsys.readouterr().out
    assert cli("translate", "--model", run_dir, "--model", export_dir, "--beam-size", 3, *TEXTS) == 0
    assert capsys.readouterr().out == alone
    assert cli("translate", "--model", run_dir, "--model", export_dir, "--ensemble-combine", "log_probabilities",
               "--beam-size", 3, *TEXTS) == 0
    assert capsys.readouterr().out == alone


def test_cli_ensemble_over_two_target_vocabularies_is_one_error_line(capsys, word_model, sentencepiece_model):
    from conftest import cli

    code = cli("translate", "--model", word_model[1], "--model", sentencepiece_model[1], TEXTS[0])
    captured = capsys.readouterr()
    assert code == 2
    [line] = captured.err.strip().splitlines()
    assert line.startswith(f"error: --model {word_model[1]} --model {sentencepiece_model[1]}: ensemble members must "
                           "share the target vocabulary: member 0 has"), line


ENSEMBLE_SERVE = """
import json, sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
out = model.signatures["serving_default"](texts=tf.constant(json.loads(sys.argv[2])))
prefixed = model.signatures["translate_with_prefix"](
    texts=tf.constant(json.loads(sys.argv[2])), prefixes=tf.constant(json.loads(sys.argv[3])),
    beam_size=tf.constant(3), n_best=tf.constant(1), length_penalty=tf.constant(0.6))
print(json.dumps({"translations": [t.decode() for t in out["translations"].numpy()],
                  "prefixed": [t.decode() for t in prefixed["translations"].numpy()]}))
"""


@pytest.fixture(scope="module")
def ensemble_export(tmp_path_factory, word_model):
    from conftest import cli

    directory = tmp_path_factory.mktemp("ensemble_export")
    assert cli("export", "--run-dir", word_model[0], "--run-dir", word_model[0], "--output", directory,
               "--version", 1) == 0
    return directory / "1"


def test_an_exported_ensemble_serves_in_a_fresh_process_as_in_process_and_passes_the_op_check(
    ensemble_export, word_translator
):
    import json
    import subprocess
    import sys

    from seq2seq import serving_check
    from seq2seq.tasks.translation.translator import Translator

    prefixes = ["ein hund", "", "", "das"]
    completed = subprocess.run([sys.executable, "-I", "-c", ENSEMBLE_SERVE, str(ensemble_export), json.dumps(TEXTS),
                                json.dumps(prefixes)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    served = json.loads(completed.stdout.strip().splitlines()[-1])
    in_process = Translator.ensemble([word_translator, word_translator])
    search = (tf.constant(5), tf.constant(1), tf.constant(0.6))
    expected = in_process.translate(tf.constant(TEXTS), *search)["translations"].numpy()
    assert served["translations"] == [t.decode() for t in expected]
    alone = word_translator.translate(tf.constant(TEXTS), *search)["translations"].numpy()
    assert served["translations"] == [t.decode() for t in alone]  # a model with itself: the model
    forced = in_process.translate_with_prefix(tf.constant(TEXTS), tf.constant(prefixes), tf.constant(3), tf.constant(1),
                                              tf.constant(0.6))
    assert served["prefixed"] == [t.decode() for t in forced["translations"].numpy()]
    assert "OK: only stock TensorFlow ops" in serving_check.format_report(serving_check.serving_op_report(ensemble_export))
    members = json.loads((ensemble_export / "assets.extra" / "ensemble.json").read_text())
    assert members == {"members": 2, "combine": "probabilities"}
    assert (ensemble_export / "assets.extra" / "members" / "1" / "target.vocab").is_file()


def test_an_exported_ensemble_is_not_taken_as_one_model(capsys, ensemble_export, tmp_path):
    from conftest import cli

    code = cli("export", "--from-model", ensemble_export, "--output", tmp_path / "again")
    captured = capsys.readouterr()
    assert code == 2
    assert "an exported ensemble" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_exporting_an_ensemble_over_two_target_vocabularies_is_one_error_line(capsys, word_model, sentencepiece_model,
                                                                               tmp_path):
    from conftest import cli

    code = cli("export", "--run-dir", word_model[0], "--run-dir", sentencepiece_model[0], "--output", tmp_path / "x")
    captured = capsys.readouterr()
    assert code == 2
    [line] = captured.err.strip().splitlines()
    assert line.startswith(f"error: --run-dir {word_model[0]} --run-dir {sentencepiece_model[0]}: ensemble members must "
                           "share the target vocabulary")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
