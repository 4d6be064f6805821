"""The exported SavedModel: loads without this project, runs in saved_model_cli, and holds
only ops TF Serving has (no Python callbacks)."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import SAMPLE_SENTENCES, Background
from seq2seq import serving_check

SAVED_MODEL_CLI = Path(sys.executable).parent / "saved_model_cli"
TEXTS = SAMPLE_SENTENCES + ["", "a zebra is riding a xylophone ."]

# Runs in a fresh interpreter that imports tensorflow (and, for the SentencePiece export only,
# tensorflow_text), never this project.
FRESH_PROCESS_SCRIPT = """
import json, sys
import tensorflow as tf

def serve(path, texts):
    model = tf.saved_model.load(path)
    out = model.signatures["serving_default"](texts=tf.constant(texts))
    return {"translations": [t.decode("utf-8") for t in out["translations"].numpy()],
            "scores": out["scores"].numpy().tolist(), "outputs": sorted(out)}

word_path, sentencepiece_path, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
result = {"word": serve(word_path, texts)}
result["word_modules"] = sorted({m.split(".")[0] for m in sys.modules})
import tensorflow_text  # registers the SentencePiece ops, as a TF Serving build with tensorflow-text does
result["sentencepiece"] = serve(sentencepiece_path, texts)
result["modules"] = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps(result))
"""


def decode(values):
    return [v.decode("utf-8") for v in np.asarray(values).reshape(-1)]


@pytest.fixture(scope="module")
def commands(tmp_path_factory, word_model, sentencepiece_model):
    """The module's slow subprocesses, started together so their TensorFlow start-ups overlap."""
    directory = tmp_path_factory.mktemp("commands")
    started = {
        "fresh": Background(
            [sys.executable, "-I", "-c", FRESH_PROCESS_SCRIPT, word_model[1], sentencepiece_model[1], json.dumps(TEXTS)],
            directory / "fresh", cwd=directory,
        ),
        "show": Background([SAVED_MODEL_CLI, "show", "--dir", word_model[1], "--all"], directory / "show"),
        "run": Background(
            [SAVED_MODEL_CLI, "run", "--dir", word_model[1], "--tag_set", "serve", "--signature_def",
             "serving_default", "--input_exprs", f"texts={[SAMPLE_SENTENCES[0]]!r}"],
            directory / "run",
        ),
    }
    yield started
    for command in started.values():
        command.stop()


@pytest.fixture(scope="module")
def fresh_process(commands):
    completed = commands["fresh"].result()
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    return json.loads(completed.stdout.decode().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def word_export(word_model):
    return tf.saved_model.load(str(word_model[1]))


def test_fresh_process_without_the_project_matches_the_in_process_translator(fresh_process, word_translator):
    assert "seq2seq" not in fresh_process["modules"] and "tasks" not in fresh_process["modules"]
    assert "tensorflow_text" not in fresh_process["word_modules"]
    served = fresh_process["word"]
    assert served["outputs"] == ["scores", "translations"]
    expected = word_translator.translate(tf.constant(TEXTS), tf.constant(5), tf.constant(1), tf.constant(0.6))
    assert served["translations"] == decode(expected["translations"])
    np.testing.assert_allclose(served["scores"], expected["scores"].numpy(), rtol=1e-4, atol=1e-4)
    assert served["translations"][3] == "" and served["scores"][3] == 0.0
    assert any(served["translations"])


def test_fresh_process_serves_the_sentencepiece_export(fresh_process, sentencepiece_model):
    assert "seq2seq" not in fresh_process["modules"] and "tasks" not in fresh_process["modules"]
    served = fresh_process["sentencepiece"]
    assert len(served["translations"]) == len(TEXTS) and len(served["scores"]) == len(TEXTS)
    assert served["translations"][3] == ""
    assert all("\u2581" not in t for t in served["translations"]), "detokenized text keeps no SentencePiece marks"


def test_saved_model_cli_show_lists_serving_default_with_a_string_input(commands):
    completed = commands["show"].result()
    assert completed.returncode == 0, completed.stderr.decode()[-2000:]
    out = completed.stdout.decode()
    serving = out[out.index("signature_def['serving_default']"):]
    serving = serving[: serving.index("Method name is")]
    assert "inputs['texts'] tensor_info:" in serving and "dtype: DT_STRING" in serving
    assert "outputs['translations']" in serving and "outputs['scores']" in serving
    assert "signature_def['translate']" in out


def test_saved_model_cli_run_prints_translations(commands, word_translator):
    sentence = SAMPLE_SENTENCES[0]
    completed = commands["run"].result()
    assert completed.returncode == 0, completed.stderr.decode()[-2000:]
    stdout = completed.stdout.decode()
    expected = word_translator.translate(tf.constant([sentence]), tf.constant(5), tf.constant(1), tf.constant(0.6))
    expected_text = decode(expected["translations"])[0]
    assert "Result for output key translations:" in stdout
    assert "Result for output key scores:" in stdout
    assert repr(expected_text.encode("utf-8")) in stdout


def test_word_level_export_holds_only_stock_tensorflow_ops(word_model, capsys):
    # Through the command (`python -m seq2seq.serving_check DIR --json`), which exits 0 when servable.
    assert serving_check.main([str(word_model[1]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["py_func_ops"] == []
    assert report["unregistered_ops"] == [] and report["tensorflow_text_ops"] == []
    assert report["stock_tf_serving"] and report["ok"]
    # Ops only found inside the beam search's while-loop body and the tokenizer prove nested functions were walked.
    assert {"While", "TopKV2", "TensorListReserve", "StaticRegexReplace", "LookupTableFindV2"} <= set(report["op_types"])
    assert "OK: only stock TensorFlow ops" in serving_check.format_report(report)


def test_sentencepiece_export_needs_only_stock_and_tensorflow_text_ops(sentencepiece_model):
    report = serving_check.serving_op_report(sentencepiece_model[1])
    assert report["py_func_ops"] == [] and report["unregistered_ops"] == []
    assert report["tensorflow_text_ops"], "the SentencePiece tokenizer op comes from tensorflow-text"
    assert all(op.startswith("Sentencepiece") for op in report["tensorflow_text_ops"])
    assert report["ok"] and not report["stock_tf_serving"]


class _CallsPython(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
    def run(self, x):
        def body(i, value):
            value = tf.py_function(lambda v: v * 2.0, [value], tf.float32)
            value.set_shape([])
            return i + 1, value

        return tf.while_loop(lambda i, value: i < 3, body, (tf.constant(0), x))[1]


def test_serving_check_finds_python_callbacks_in_loop_bodies_and_unknown_ops(tmp_path, capsys):
    path = tmp_path / "calls_python"
    tf.saved_model.save(_CallsPython(), str(path))
    # Rename one op of the saved graph to an op nobody registers.
    saved_model = serving_check.read_saved_model(path)
    renamed = next(node for node in saved_model.meta_graphs[0].graph_def.node if node.op == "NoOp")
    renamed.op = "MadeUpCustomOp"
    (path / "saved_model.pb").write_bytes(saved_model.SerializeToString())

    assert serving_check.main([str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert "PROBLEM: Python callbacks" in serving_check.format_report(report)
    assert [p["op"] for p in report["py_func_ops"]] == ["EagerPyFunc"]
    assert report["py_func_ops"][0]["function"] != "graph"  # found inside the while body function
    assert report["unregistered_ops"] == ["MadeUpCustomOp"]
    assert not report["ok"]


def test_serving_check_command_fails_clearly_on_a_missing_dir(tmp_path, capsys):
    assert serving_check.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and len(err.strip().splitlines()) == 1


def test_translate_signature_beam_size_1_is_greedy_and_n_best_works(word_model, word_export, word_translator):
    from seq2seq.tasks.translation.pipeline import TranslationRun

    texts = tf.constant(TEXTS)
    # The model's beam search with one beam finds the greedy hypothesis.
    run = TranslationRun.load(word_model[0])
    source_ids = run.source_vocab.lookup_ids(run.source_tokenizer.tokenize(tf.constant(SAMPLE_SENTENCES)))
    source_ids = source_ids.to_tensor(0)
    greedy = word_translator.model.generate(source_ids, search="greedy", max_length=20)
    beam = word_translator.model.generate(source_ids, search="beam", max_length=20, beam_size=1)
    np.testing.assert_array_equal(beam.ids.numpy(), greedy.ids.numpy())
    np.testing.assert_allclose(beam.log_probs.numpy(), greedy.log_probs.numpy(), rtol=1e-5)

    # The exported graph with beam_size 1 gives the in-process greedy translations.
    exported = word_export.translate(texts, tf.constant(1), tf.constant(1), tf.constant(0.6))
    in_process = word_translator.translate(texts, tf.constant(1), tf.constant(1), tf.constant(0.6))
    assert decode(exported["translations"]) == decode(in_process["translations"])

    # n-best: [N, n] hypotheses, best first, the first one equal to serving_default's answer.
    nbest = word_export.translate(texts, tf.constant(5), tf.constant(3), tf.constant(0.6))
    assert nbest["nbest_translations"].shape == (len(TEXTS), 3)
    scores = nbest["nbest_scores"].numpy()
    assert np.all(np.diff(scores[[0, 1, 2, 4]], axis=1) <= 1e-6)
    served = word_export.signatures["serving_default"](texts=texts)
    assert decode(nbest["nbest_translations"][:, 0]) == decode(served["translations"])
    assert decode(nbest["translations"]) == decode(served["translations"])

    # `translate` is `translate_with_prefix` without prefixes: the export holds one beam loop
    # and one greedy loop for each product precision (float32, bfloat16), not a copy each for
    # every signature (less graph to load).
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((Path(word_model[1]) / "saved_model.pb").read_bytes())
    loops = [f.signature.name for f in saved.meta_graphs[0].graph_def.library.function]
    search_loops = [name for name in loops if re.fullmatch(r"cond_cond_while_body_\d+", name)]
    assert len(search_loops) == 4, sorted(name for name in loops if "body" in name)
    prefixed = word_export.translate_with_prefix(texts, tf.fill([len(TEXTS)], ""), tf.constant(5), tf.constant(3), tf.constant(0.6))
    assert decode(prefixed["nbest_translations"][:, 0]) == decode(nbest["nbest_translations"][:, 0])

    # A batch of only empty sources (no token at all) is served too.
    empty = word_export.signatures["serving_default"](texts=tf.constant(["", " \t"]))
    assert decode(empty["translations"]) == ["", ""] and empty["scores"].numpy().tolist() == [0.0, 0.0]


@pytest.fixture(scope="module")
def int8_export(word_model, tmp_path_factory):
    """The word model exported with int8 weights: a TF Serving model dir holding version 1."""
    from conftest import cli

    directory = tmp_path_factory.mktemp("int8")
    assert cli("export", "--run-dir", word_model[0], "--output", directory, "--version", 1, "--quantize", "int8") == 0
    return directory


def test_int8_export_is_smaller_servable_and_scores_close_to_float(word_model, word_export, int8_export):
    def weight_dtypes(export_dir):
        return [dtype for _, dtype in _weight_dtypes(export_dir)]

    def weight_bytes(export_dir):
        return sum(f.stat().st_size for f in (Path(export_dir) / "variables").iterdir())

    # Both embeddings, the output layer and the attention projections hold int8 kernels.
    assert weight_dtypes(int8_export / "1").count("int8") >= 4 and "int8" not in weight_dtypes(word_model[1])
    assert weight_bytes(int8_export / "1") < 0.85 * weight_bytes(word_model[1])
    report = serving_check.serving_op_report(int8_export / "1")
    assert report["ok"] and report["stock_tf_serving"] and report["py_func_ops"] == []
    quantized = tf.saved_model.load(str(int8_export / "1")).signatures["serving_default"]
    float_scores = word_export.signatures["serving_default"](texts=tf.constant(SAMPLE_SENTENCES))["scores"]
    int8_scores = quantized(texts=tf.constant(SAMPLE_SENTENCES))["scores"]
    # Per-channel int8 weights change the log-probabilities by far less than a token's worth.
    np.testing.assert_allclose(int8_scores.numpy(), float_scores.numpy(), atol=0.05)


def test_export_from_model_writes_the_same_weights_and_translations_again(word_model, sentencepiece_model, tmp_path):
    """`export --from-model` rebuilds run and model from a SavedModel (the shipped models are
    re-exported this way when the graph gets faster): the same variables, the same outputs."""
    import shutil

    from conftest import cli

    def translations(export_dir):
        out = tf.saved_model.load(str(export_dir)).signatures["serving_default"](texts=tf.constant(SAMPLE_SENTENCES))
        return decode(out["translations"]), out["scores"].numpy().tolist()

    def variables(export_dir):
        reader = tf.train.load_checkpoint(str(Path(export_dir) / "variables" / "variables"))
        return {name: reader.get_tensor(name) for name in reader.get_variable_to_dtype_map() if "model_variables" in name}

    run_dir = sentencepiece_model[0]
    assert cli("export", "--run-dir", run_dir, "--output", tmp_path / "int8", "--version", 1, "--quantize", "int8") == 0
    original = tmp_path / "int8" / "1"
    # An export from before exports carried their SentencePiece models: they are read from the graph.
    for name in ("source.spm", "target.spm", "source.vocab", "target.vocab"):
        (original / "assets.extra" / name).unlink()
    shutil.copytree(original, tmp_path / "old")
    assert cli("export", "--from-model", tmp_path / "old", "--output", tmp_path / "again", "--version", 1) == 0
    again = tmp_path / "again" / "1"
    before, after = variables(original), variables(again)
    assert before.keys() == after.keys() and any(value.dtype == np.int8 for value in after.values())
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    assert (again / "assets.extra" / "source.spm").is_file()
    assert translations(again) == translations(original)
    # A word-level float export too (its vocabularies travel in assets.extra).
    assert cli("export", "--from-model", word_model[1], "--output", tmp_path / "word", "--version", 1) == 0
    assert translations(tmp_path / "word" / "1") == translations(word_model[1])


def test_export_from_model_refuses_what_it_cannot_keep(word_model, tmp_path, capsys):
    from conftest import cli

    assert cli("export", "--output", tmp_path) == 2
    assert "give --run-dir (a training run) or --from-model" in capsys.readouterr().err
    assert cli("export", "--from-model", word_model[1], "--quantize", "int8", "--output", tmp_path) == 2
    assert "--from-model keeps the export's weights" in capsys.readouterr().err
    assert cli("export", "--from-model", tmp_path, "--output", tmp_path / "x") == 2
    assert "not a translation SavedModel exported by seq2seq" in capsys.readouterr().err


def _weight_dtypes(export_dir):
    """[(name inside the model, dtype)] of an export's weights in order (names repeat across layers;
    dropout random-generator states left out)."""
    variables = tf.saved_model.load(str(export_dir)).model_variables
    return [(v.name.split("/", 1)[-1], v.dtype.name) for v in variables if "seed_generator" not in v.name]


def test_bf16_export_stores_bfloat16_weights_serves_stock_ops_and_scores_close_to_float(word_model, int8_export, tmp_path):
    """`--quantize bf16` (products on the CPU's bfloat16 units): every weight stored as
    bfloat16, TF Serving's op set, scores within a bfloat16 rounding of float's; an int8
    export converts too (`--from-model`), and a bf16 export is written again as bf16."""
    from conftest import cli

    assert cli("export", "--run-dir", word_model[0], "--output", tmp_path / "bf16", "--version", 1,
               "--quantize", "bf16") == 0
    export_dir = tmp_path / "bf16" / "1"
    dtypes = _weight_dtypes(export_dir)
    assert dtypes and {dtype for _, dtype in dtypes} == {"bfloat16"}, dtypes
    report = serving_check.serving_op_report(export_dir)
    assert report["ok"] and report["stock_tf_serving"] and report["py_func_ops"] == []

    def served(path):
        out = tf.saved_model.load(str(path)).signatures["serving_default"](texts=tf.constant(SAMPLE_SENTENCES))
        return decode(out["translations"]), out["scores"].numpy()

    float_translations, float_scores = served(word_model[1])
    translations, scores = served(export_dir)
    np.testing.assert_allclose(scores, float_scores, atol=0.1)
    assert sum(a == b for a, b in zip(translations, float_translations)) >= len(SAMPLE_SENTENCES) - 1

    assert cli("export", "--from-model", int8_export / "1", "--quantize", "bf16",
               "--output", tmp_path / "from_int8", "--version", 1) == 0
    assert _weight_dtypes(tmp_path / "from_int8" / "1") == dtypes
    np.testing.assert_allclose(served(tmp_path / "from_int8" / "1")[1], float_scores, atol=0.15)

    assert cli("export", "--from-model", export_dir, "--output", tmp_path / "again", "--version", 1) == 0
    again = _weight_dtypes(tmp_path / "again" / "1")
    assert again == dtypes
    assert served(tmp_path / "again" / "1")[0] == translations


def test_an_export_records_its_search_and_the_commands_take_its_length_penalty(word_model, tmp_path, capsys):
    """export writes assets.extra/search.json; translate and evaluate use its length penalty
    unless --length-penalty is given (a model whose recipe chose 1.6 on val gets 1.6)."""
    import json
    import shutil

    from conftest import SAMPLE_SENTENCES, cli

    search = json.loads((word_model[1] / "assets.extra" / "search.json").read_text())
    assert search == {"beam_size": 5, "length_penalty": 0.6}
    export = shutil.copytree(word_model[1], tmp_path / "export")
    (export / "assets.extra" / "search.json").write_text(json.dumps({"beam_size": 5, "length_penalty": -3.0}))
    source = tmp_path / "source.txt"
    source.write_text("\n".join(SAMPLE_SENTENCES) + "\n")

    def translations(*flags):
        capsys.readouterr()
        assert cli("translate", "--model", *flags, "--input", source) == 0
        return capsys.readouterr().out

    recorded = translations(export)
    assert recorded == translations(export, "--length-penalty", "-3")
    # Exported again from it, a model keeps its recorded length penalty unless told otherwise.
    assert cli("export", "--from-model", export, "--output", tmp_path / "again", "--version", "1") == 0
    assert json.loads((tmp_path / "again" / "1" / "assets.extra" / "search.json").read_text())["length_penalty"] == -3.0
    assert cli("export", "--from-model", export, "--output", tmp_path / "again", "--version", "2",
               "--length-penalty", "1.0") == 0
    assert json.loads((tmp_path / "again" / "2" / "assets.extra" / "search.json").read_text())["length_penalty"] == 1.0
    assert translations(word_model[1]) == translations(export, "--length-penalty", "0.6")
    assert recorded != translations(export, "--length-penalty", "0.6")
    (export / "assets.extra" / "search.json").write_text("{}")
    assert cli("translate", "--model", export, "--input", source) == 2
    assert "search.json: not a search settings file" in capsys.readouterr().err
