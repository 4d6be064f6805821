"""Products at inference: int8 weights dequantized once per decoding call (the same search as
float), and bfloat16 products switched on per CPU."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.model import build_rnn_model, float_weights, quantize_weights
from seq2seq.products import use_bfloat16_products
from seq2seq.transformer import build_transformer_model

BUILDERS = {
    "transformer": lambda: build_transformer_model(30, 30, num_layers=1, units=16, num_heads=2, dropout=0.0),
    "rnn": lambda: build_rnn_model(30, 30, units=16, attention="bahdanau", dropout=0.0),
}


def _int8_casts_in_loops(concrete):
    """How many int8 -> float casts the while-loop bodies of a traced function hold."""
    library = concrete.graph.as_graph_def().library
    return sum(
        1
        for function in library.function
        if "while_body" in function.signature.name
        for node in function.node_def
        if node.op == "Cast" and node.attr["SrcT"].type == tf.int8.as_datatype_enum
    )


def _float_copy(model, build):
    """A float model holding `model`'s weights dequantized."""
    copy = build()
    weights = float_weights(model)
    for variable in copy.variables:
        path = variable.path.split("/", 1)[-1]
        if path in weights:
            variable.assign(weights[path])
    return copy


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_an_int8_model_decodes_as_its_dequantized_float_copy_with_no_kernel_cast_in_the_loop(kind):
    keras.utils.set_random_seed(0)
    model = BUILDERS[kind]()
    source = np.random.default_rng(0).integers(4, 30, size=(3, 6)).astype("int32")
    model({"source": source, "target_in": source})
    quantize_weights(model)
    float_model = _float_copy(model, BUILDERS[kind])
    float_model({"source": source, "target_in": source})

    def search(m):
        return tf.function(lambda s: tuple(m.generate(s, search="beam", beam_size=3, max_length=6)))

    traced = search(model).get_concrete_function(tf.TensorSpec([None, None], tf.int32))
    # Only the decoder's int8 embedding rows are cast at a step, never a Dense or attention kernel.
    assert _int8_casts_in_loops(traced) == 1
    ids, lengths, scores, *_ = (t.numpy() for t in traced(tf.constant(source)))
    float_ids, float_lengths, float_scores, *_ = (t.numpy() for t in search(float_model)(tf.constant(source)))
    np.testing.assert_array_equal(ids, float_ids)
    np.testing.assert_array_equal(lengths, float_lengths)
    np.testing.assert_allclose(scores, float_scores, rtol=1e-4, atol=1e-4)


def _matmul_dtypes_in_loops(saved_model_dir):
    """The dtypes of the MatMul ops inside the while-loop bodies of a SavedModel."""
    from pathlib import Path

    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    return {
        tf.as_dtype(node.attr["T"].type).name
        for function in saved.meta_graphs[0].graph_def.library.function
        if "while_body" in function.signature.name
        for node in function.node_def
        if node.op == "MatMul"
    }


def test_bf16_products_translate_like_float_and_auto_follows_the_cpu(word_model):
    from conftest import SAMPLE_SENTENCES

    export = tf.saved_model.load(str(word_model[1]))
    # Both searches are in the graph: float32 products, and bfloat16 ones behind the switch.
    assert _matmul_dtypes_in_loops(word_model[1]) == {"float32", "bfloat16"}
    assert not export.bf16_products.numpy()  # as exported: right on every CPU

    def translate():
        out = export.translate(tf.constant(SAMPLE_SENTENCES), tf.constant(5), tf.constant(1), tf.constant(0.6))
        return out["scores"].numpy()

    assert use_bfloat16_products(export, "float32") == "float32"
    float_scores = translate()
    assert use_bfloat16_products(export, "bf16") == "bf16" and export.bf16_products.numpy()
    # bfloat16 products change the log-probabilities by far less than a token's worth.
    np.testing.assert_allclose(translate(), float_scores, atol=0.05)

    assert use_bfloat16_products(export, "auto", flags={"sse2", "avx512_bf16"}) == "bf16"
    assert use_bfloat16_products(export, "auto", flags={"sse2", "avx2"}) == "float32"
    assert not export.bf16_products.numpy()
    assert use_bfloat16_products(object(), "bf16") == "float32"  # exported before the switch
    with pytest.raises(ValueError, match="precision must be one of"):
        use_bfloat16_products(export, "fp16")


def test_export_bf16_products_writes_the_switch_on(word_model, tmp_path):
    from conftest import cli

    assert cli("export", "--run-dir", word_model[0], "--output", tmp_path / "m", "--version", "1", "--bf16-products") == 0
    assert tf.saved_model.load(str(tmp_path / "m" / "1")).bf16_products.numpy()
