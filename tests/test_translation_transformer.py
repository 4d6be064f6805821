"""Transformer models through `python -m seq2seq.translate`: the config's encoder_type and
decoder_type choose them, and train, translate, export and the serving signature are unchanged."""

import keras
import numpy as np
import re

import pytest
import tensorflow as tf
import yaml

from conftest import SAMPLE_SENTENCES, TINY_MODEL, cli
from seq2seq import serving_check
from seq2seq.transformer import TransformerDecoder, TransformerEncoder
from seq2seq.tasks.translation.config import ModelConfig
from seq2seq.tasks.translation.pipeline import TranslationRun

TRANSFORMER_FLAGS = ["--num-heads", "2", "--encoder-layers", "2", "--decoder-layers", "1", "--ffn-dim", "32"]


def train(tmp_path, corpus, encoder_type, decoder_type):
    run_dir = tmp_path / f"{encoder_type}_{decoder_type}"
    code = cli(
        "train", "--train-source", corpus / "train.en", "--train-target", corpus / "train.de",
        "--valid-source", corpus / "valid.en", "--valid-target", corpus / "valid.de",
        "--max-steps", 20, "--steps-per-checkpoint", 10, "--no-validation-bleu", "--output-dir", run_dir,
        "--encoder-type", encoder_type, "--decoder-type", decoder_type, *TINY_MODEL, *TRANSFORMER_FLAGS,
    )
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory, toy_corpus):
    return train(tmp_path_factory.mktemp("transformer"), toy_corpus, "transformer", "transformer")


def test_config_selects_transformer_layers_and_saves_them(transformer_run):
    saved = yaml.safe_load((transformer_run / "config.yaml").read_text())["model"]
    assert saved["encoder_type"] == saved["decoder_type"] == "transformer" and saved["num_heads"] == 2
    run = TranslationRun.load(transformer_run)
    model = run.load_model()
    assert isinstance(model.encoder, TransformerEncoder) and isinstance(model.decoder, TransformerDecoder)
    assert model.encoder.num_layers == 2 and model.decoder.num_layers == 1


def test_export_serves_the_translations_of_the_in_process_translator(transformer_run, tmp_path, capsys):
    assert cli("export", "--run-dir", transformer_run, "--output", tmp_path / "export", "--version", 1) == 0
    served = tf.saved_model.load(str(tmp_path / "export" / "1")).signatures["serving_default"]
    outputs = served(texts=tf.constant(SAMPLE_SENTENCES))
    run = TranslationRun.load(transformer_run)
    translator = run.translator(run.load_model())
    expected = translator.translate(tf.constant(SAMPLE_SENTENCES), beam_size=5, n_best=1, length_penalty=0.6)
    assert [t.decode() for t in outputs["translations"].numpy()] == [
        t.decode() for t in expected["translations"].numpy()
    ]
    np.testing.assert_allclose(outputs["scores"].numpy(), expected["scores"].numpy(), atol=1e-5)
    report = serving_check.serving_op_report(tmp_path / "export" / "1")
    assert report["ok"] and report["py_func_ops"] == [] and report["stock_tf_serving"]


def test_translate_with_attention_plot_from_a_transformer_run(transformer_run, tmp_path, capsys):
    png = tmp_path / "alignment.png"
    assert cli("translate", "--model", transformer_run, "--plot-alignment", png, *SAMPLE_SENTENCES) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SAMPLE_SENTENCES) and png.stat().st_size > 1000


@pytest.mark.parametrize("encoder_type, decoder_type", [("rnn", "transformer"), ("transformer", "rnn")])
def test_mixed_models_train_and_translate(tmp_path, toy_corpus, capsys, encoder_type, decoder_type):
    run_dir = train(tmp_path, toy_corpus, encoder_type, decoder_type)
    model = TranslationRun.load(run_dir).load_model()
    assert isinstance(model.encoder, TransformerEncoder) == (encoder_type == "transformer")
    assert isinstance(model.decoder, TransformerDecoder) == (decoder_type == "transformer")
    capsys.readouterr()
    assert cli("translate", "--model", run_dir, "--beam-size", 3, *SAMPLE_SENTENCES) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(SAMPLE_SENTENCES)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="encoder_type must be one of"):
        ModelConfig(encoder_type="convolutional")


def test_mixed_model_honours_every_rnn_decoder_field_and_sizes_each_part_from_its_own_field():
    """A Transformer encoder with an RNN decoder: the decoder gets `units` and its attention,
    input feeding and embedding fields; the encoder gets `encoder_units`."""
    from seq2seq.factory import build_model

    spec = ModelConfig(
        encoder_type="transformer", decoder_type="rnn", units=16, encoder_units=16, num_heads=2, embedding_dim=8, decoder_layers=2,
        input_feeding=False, attention_score="dot", attention_normalize=True, encoder_layers=1,
    )
    model = build_model(spec, 30, 40)
    assert model.encoder.units == 16 and model.decoder.units == 16 and model.decoder.num_layers == 2
    config = model.decoder.get_config()
    assert config["input_feeding"] is False and config["embedding_dim"] == 8
    assert config["attention_score"] == "dot" and config["attention_normalize"] is True
    sized = build_model(ModelConfig(encoder_type="transformer", units=24, encoder_units=16, num_heads=2), 30, 40)
    assert sized.encoder.units == 16 and sized.decoder.units == 24


@pytest.mark.parametrize("fields, message", [
    ({"num_heads": 8}, "model num_heads does not apply to a rnn encoder with a rnn decoder; remove it (it is read by: "
                       "transformer encoder, transformer decoder)"),
    ({"encoder_type": "transformer", "decoder_type": "transformer", "attention": "bahdanau"}, "model attention does not apply"),
    ({"encoder_type": "transformer", "decoder_type": "transformer", "merge_mode": "sum"}, "model merge_mode does not apply"),
    ({"encoder_type": "rnn", "decoder_type": "transformer", "input_feeding": False}, "model input_feeding does not apply"),
])
def test_a_field_the_chosen_parts_do_not_read_is_an_error_naming_it(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**fields)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_int8_weights_keep_the_logits_of_a_model_with_tied_embeddings(tie_embeddings):
    from seq2seq.model import quantize_weights
    from seq2seq.transformer import build_transformer_model

    keras.utils.set_random_seed(0)
    model = build_transformer_model(30, 30, num_layers=1, units=32, num_heads=2, tie_embeddings=tie_embeddings)
    source = np.random.default_rng(0).integers(4, 30, size=(2, 7))
    target_in = np.random.default_rng(1).integers(4, 30, size=(2, 5))
    before = model({"source": source, "target_in": target_in}).numpy()
    after = quantize_weights(model)({"source": source, "target_in": target_in}).numpy()
    assert any(v.dtype == "int8" for v in model.weights)
    np.testing.assert_allclose(after, before, atol=0.05 * np.abs(before).max())
