"""Target prefixes in translation: `Translator.translate_with_prefix`, the exported signature of
the same name, `translate_lines(prefixes=)` and `translate --prefix-file`."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import SAMPLE_SENTENCES, cli, write_lines
from seq2seq import translate as translate_command
from seq2seq.tasks.translation.inference import translate_lines

TEXTS = SAMPLE_SENTENCES + ["", "the boy is eating a book ."]
PREFIXES = ["ein hund", "", "das", "ein", "der junge mag"]


def decode(values):
    return [v.decode("utf-8") for v in np.asarray(values).reshape(-1)]


def with_prefix(translator, texts, prefixes, beam_size, n_best=1):
    return translator.translate_with_prefix(
        tf.constant(texts), tf.constant(prefixes), tf.constant(beam_size), tf.constant(n_best), tf.constant(0.6)
    )


@pytest.mark.parametrize("beam_size, n_best", [(1, 1), (3, 2)])
def test_every_hypothesis_starts_with_its_prefix_and_an_empty_prefix_changes_nothing(word_translator, beam_size, n_best):
    forced = with_prefix(word_translator, TEXTS, PREFIXES, beam_size, n_best)
    free = word_translator.translate(tf.constant(TEXTS), tf.constant(beam_size), tf.constant(n_best), tf.constant(0.6))
    nbest = np.asarray(forced["nbest_translations"])
    for row, prefix in enumerate(PREFIXES):
        if not TEXTS[row]:
            assert decode(nbest[row]) == [""] * n_best  # an empty source stays empty
            continue
        for hypothesis in decode(nbest[row]):
            assert hypothesis.split()[: len(prefix.split())] == prefix.split(), (row, hypothesis)
        if not prefix:
            assert decode(nbest[row]) == decode(free["nbest_translations"][row])
            np.testing.assert_allclose(forced["nbest_scores"][row], free["nbest_scores"][row], atol=1e-5)
    assert decode(forced["translations"]) != decode(free["translations"])  # the prefixes did force something


def test_a_prefix_equal_to_the_greedy_translation_changes_nothing(word_translator):
    free = word_translator.translate(tf.constant(TEXTS), tf.constant(1), tf.constant(1), tf.constant(0.6))
    forced = with_prefix(word_translator, TEXTS, decode(free["translations"]), 1)
    assert decode(forced["translations"]) == decode(free["translations"])
    np.testing.assert_allclose(forced["scores"], free["scores"], atol=1e-5)


def test_the_prefix_of_a_sentencepiece_model_is_honoured_in_its_detokenized_text(sentencepiece_model):
    loaded = tf.saved_model.load(str(sentencepiece_model[1]))
    out = with_prefix(loaded, TEXTS[:2], ["das pferd", "ein"], 3)
    first, second = decode(out["translations"])
    assert first.startswith("das pferd") and second.startswith("ein"), (first, second)


def test_translate_lines_pairs_prefixes_with_lines_after_sorting_by_length(word_translator):
    results = translate_lines(word_translator, TEXTS, beam_size=3, batch_size=2, prefixes=PREFIXES)
    expected = decode(with_prefix(word_translator, TEXTS, PREFIXES, 3)["translations"])
    assert results == expected
    with pytest.raises(ValueError, match="2 prefixes for 5 lines"):
        translate_lines(word_translator, TEXTS, prefixes=PREFIXES[:2])


def test_a_prefix_count_other_than_the_text_count_stops_the_graph(word_translator):
    with pytest.raises(tf.errors.InvalidArgumentError, match="needs one prefix each"):
        with_prefix(word_translator, TEXTS, PREFIXES[:2], 3)


def test_exported_signature_matches_the_in_process_translator(word_model, word_translator):
    loaded = tf.saved_model.load(str(word_model[1]))
    signature = loaded.signatures["translate_with_prefix"]
    out = signature(texts=tf.constant(TEXTS), prefixes=tf.constant(PREFIXES), beam_size=tf.constant(3),
                    n_best=tf.constant(1), length_penalty=tf.constant(0.6))
    expected = with_prefix(word_translator, TEXTS, PREFIXES, 3)
    assert decode(out["translations"]) == decode(expected["translations"])
    np.testing.assert_allclose(out["scores"], expected["scores"], atol=1e-4)


def test_cli_prefix_file_gives_line_n_the_prefix_of_line_n(capsys, tmp_path, word_model, word_translator):
    source = write_lines(tmp_path / "source.txt", TEXTS)
    prefixes = write_lines(tmp_path / "prefixes.txt", PREFIXES)
    assert cli("translate", "--model", word_model[1], "--input", source, "--prefix-file", prefixes,
               "--beam-size", 3) == 0
    expected = decode(with_prefix(word_translator, TEXTS, PREFIXES, 3)["translations"])
    assert capsys.readouterr().out.splitlines() == expected


@pytest.mark.parametrize("prefix_lines, message", [
    (PREFIXES[:3], "ended at line 3 but the input goes on"),
    (PREFIXES + ["ein"], "has more lines than the input (5)"),
])
def test_cli_prefix_file_of_another_length_is_one_error_line(capsys, tmp_path, word_model, prefix_lines, message):
    source = write_lines(tmp_path / "source.txt", TEXTS)
    prefixes = write_lines(tmp_path / "prefixes.txt", prefix_lines)
    code = cli("translate", "--model", word_model[1], "--input", source, "--prefix-file", prefixes)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().splitlines() == [f"error: {prefixes} {message}: give one prefix a line"]


def test_cli_prefix_file_with_a_model_exported_before_prefixes_says_how_to_re_export(
    capsys, tmp_path, monkeypatch, word_model
):
    class OldExport:
        def translate(self, *args):
            raise AssertionError("not called")

    monkeypatch.setattr(translate_command, "resolve_model", lambda path: OldExport())
    prefixes = write_lines(tmp_path / "prefixes.txt", ["ein"])
    code = cli("translate", "--model", word_model[1], "--prefix-file", prefixes, TEXTS[0])
    captured = capsys.readouterr()
    assert code == 2
    [line] = captured.err.strip().splitlines()
    assert "no translate_with_prefix signature" in line and "export --from-model" in line


def test_a_reloaded_sentencepiece_export_tokenizes_each_side_with_its_own_model(sentencepiece_model):
    """Source and target SentencePiece models differ; the reloaded graph must not swap or share
    them (it once tokenized the source with the target model once the target side also tokenized)."""
    from seq2seq.tasks.translation.pipeline import TranslationRun

    run = TranslationRun.load(sentencepiece_model[0])
    in_process = run.translator(run.load_model())
    loaded = tf.saved_model.load(str(sentencepiece_model[1]))
    search = (tf.constant(3), tf.constant(1), tf.constant(0.6))
    expected = in_process.translate(tf.constant(TEXTS), *search)
    served = loaded.translate(tf.constant(TEXTS), *search)
    np.testing.assert_array_equal(served["source_tokens"], expected["source_tokens"])
    assert decode(served["translations"]) == decode(expected["translations"])
