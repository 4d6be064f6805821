"""Three-way weight tying (`share_embeddings`) and the Transformer's attention and activation
dropout, on tiny models built by `seq2seq.factory.build_model`.

Sharing must give one variable (counted once, trained by both uses, saved once and shared
again on loading) and exports that keep it one float matrix; the dropouts act in training
only, so stepping still equals teacher forcing at inference.
"""

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from seq2seq.batching import plan_batches
from seq2seq.factory import ModelSpec, build_model
from seq2seq.model import ExportedModel, Seq2SeqModel, bfloat16_model, quantize_weights
from seq2seq.run import restore_exported_weights
from seq2seq.training import Trainer, TrainingConfig, restore_model_weights, sequence_batches

VOCAB = 50
UNITS = 16
TRANSFORMER = dict(
    encoder_type="transformer", decoder_type="transformer", units=UNITS, num_heads=2, ffn_dim=32,
    encoder_layers=1, decoder_layers=2, dropout=0.0,
)


def shared_spec(**options):
    return ModelSpec(**{**TRANSFORMER, "share_embeddings": True, **options})


def make(spec, vocab=VOCAB, seed=0):
    keras.utils.set_random_seed(seed)
    return build_model(spec, vocab, vocab)


def batch(vocab=VOCAB, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.integers(4, vocab, size=(3, 6)).astype(np.int32)
    source[1, 4:] = 0  # padding
    target_in = rng.integers(4, vocab, size=(3, 5)).astype(np.int32)
    target_in[:, 0] = 2
    return {"source": source, "target_in": target_in}


def paths(model):
    """{variable path without the model's own name: variable}, dropout seed states left out."""
    return {v.path.split("/", 1)[-1]: v for v in model.variables if "seed_generator_state" not in v.path}


def copy_weights(source, target):
    """Assigns `source`'s weights to the variables of `target` with the same paths; a
    variable of `target` not in `source` takes the shared matrix (the untied copies of it)."""
    values = paths(source)
    shared = source.encoder.embedding.embeddings
    for path, variable in paths(target).items():
        variable.assign(values[path] if path in values else shared)


# One variable ---------------------------------------------------------------------------------


def test_shared_embedding_is_one_variable_counted_once():
    model = make(shared_spec())
    untied = make(ModelSpec(**TRANSFORMER))
    matrix = model.encoder.embedding.embeddings
    assert model.decoder.embedding is model.encoder.embedding and model.decoder.tie_embeddings
    assert sum(v is matrix for v in model.trainable_weights) == 1
    assert sum(tuple(v.shape) == (VOCAB, UNITS) for v in model.trainable_weights) == 1
    # The decoder's embedding and its output projection kernel are gone (its bias stays, as output_bias).
    assert untied.count_params() - model.count_params() == 2 * VOCAB * UNITS
    assert len(untied.trainable_weights) - len(model.trainable_weights) == 2


def test_gradients_from_the_source_and_target_uses_add_up():
    """The shared matrix's gradient is the sum of the gradients of the source embedding and
    of the tied target embedding / output projection of the same model with two copies."""
    model = make(shared_spec())
    two_copies = make(ModelSpec(**TRANSFORMER, tie_embeddings=True), seed=1)
    copy_weights(model, two_copies)
    inputs = batch()

    def gradients(m, variables):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(m(inputs, training=True) ** 2)
        return tape.gradient(loss, variables)

    [shared] = gradients(model, [model.encoder.embedding.embeddings])
    source, target = gradients(two_copies, [two_copies.encoder.embedding.embeddings,
                                            two_copies.decoder.embedding.embeddings])
    source, target = tf.convert_to_tensor(source), tf.convert_to_tensor(target)
    assert np.abs(source.numpy()).sum() > 0 and np.abs(target.numpy()).sum() > 0
    np.testing.assert_allclose(tf.convert_to_tensor(shared), source + target, rtol=1e-4, atol=1e-6)


# Saving and loading ---------------------------------------------------------------------------


def assert_shared_and_equal(loaded, model):
    assert loaded.share_embeddings and loaded.decoder.embedding is loaded.encoder.embedding
    np.testing.assert_array_equal(loaded.encoder.embedding.embeddings, model.encoder.embedding.embeddings)
    inputs = batch()
    np.testing.assert_array_equal(loaded(inputs), model(inputs))


def test_keras_file_weights_file_and_config_round_trips_keep_the_sharing(tmp_path):
    model = make(shared_spec())
    model.save(tmp_path / "model.keras")
    assert_shared_and_equal(keras.saving.load_model(tmp_path / "model.keras"), model)

    from_config = Seq2SeqModel.from_config(model.get_config())
    from_config.build()
    assert from_config.decoder.embedding is from_config.encoder.embedding
    assert from_config.count_params() == model.count_params()

    model.save_weights(tmp_path / "model.weights.h5")
    fresh = make(shared_spec(), seed=3)
    fresh.load_weights(tmp_path / "model.weights.h5")
    assert_shared_and_equal(fresh, model)


def test_trainer_checkpoint_trains_and_restores_the_shared_matrix(tmp_path):
    model = make(shared_spec())
    before = model.encoder.embedding.embeddings.numpy().copy()
    rng = np.random.default_rng(0)
    sequences = [rng.integers(4, VOCAB, size=rng.integers(2, 6)).tolist() for _ in range(64)]
    ragged = tf.ragged.constant(sequences, dtype=tf.int32)
    lengths = np.array([len(s) for s in sequences])
    batches = sequence_batches(ragged, ragged, lambda epoch: plan_batches(lengths, batch_size=32, seed=0, epoch=epoch))
    config = TrainingConfig(
        output_dir=str(tmp_path), max_steps=2, steps_per_checkpoint=2, learning_rate=1e-2, warmup_steps=1,
        label_smoothing=0.0, tensorboard=False, verbose=0,
    )
    trainer = Trainer(model, config)
    trainer.fit(batches)
    trained = model.encoder.embedding.embeddings.numpy()
    assert not np.array_equal(trained, before)
    fresh = make(shared_spec(), seed=3)
    restore_model_weights(fresh, trainer.latest_checkpoint)
    assert_shared_and_equal(fresh, model)


# Exports ------------------------------------------------------------------------------------


class GreedyExport(tf.Module):
    """A SavedModel as the task exports write it: the model's variables as `model_variables`
    (`ExportedModel`) and, unless `search` is False, a traced greedy search."""

    def __init__(self, model, search=True):
        super().__init__()
        self._exported = ExportedModel(model)
        self.model_variables = self._exported.variables
        if search:
            self.generate = tf.function(self._generate, input_signature=[tf.TensorSpec([None, None], tf.int32)])

    def _generate(self, source):
        result = self._exported.model.generate(source, search="greedy", max_length=8)
        return {"ids": result.ids, "scores": result.scores}


def export(model, directory, search=True):
    """Saves and loads the export of `model`: (its directory, the loaded SavedModel)."""
    tf.saved_model.save(GreedyExport(model, search), str(directory))
    return Path(directory), tf.saved_model.load(str(directory))


def greedy(model, source):
    result = model.generate(tf.constant(source), search="greedy", max_length=8)
    return result.ids.numpy(), result.scores.numpy()


def served(loaded, source):
    outputs = loaded.generate(tf.constant(source))
    return outputs["ids"].numpy(), outputs["scores"].numpy()


def variables_bytes(directory):
    return sum(path.stat().st_size for path in (Path(directory) / "variables").iterdir())


def saved_matrices(loaded, vocab):
    """The dtypes of the exported [vocab, units] weights (the embeddings and output projections)."""
    return [v.dtype.name for v in loaded.model_variables if tuple(v.shape) in ((vocab, UNITS), (UNITS, vocab))]


def test_tied_export_is_smaller_by_the_two_dropped_matrices(tmp_path):
    vocab = 1000  # the matrices dominate the export's size
    shared_dir, shared = export(make(shared_spec(), vocab), tmp_path / "shared", search=False)
    untied_dir, untied = export(make(ModelSpec(**TRANSFORMER), vocab), tmp_path / "untied", search=False)
    assert saved_matrices(shared, vocab) == ["float32"] and len(saved_matrices(untied, vocab)) == 3
    dropped = 2 * vocab * UNITS * 4  # two float32 matrices
    saving = variables_bytes(untied_dir) - variables_bytes(shared_dir)
    assert 0.95 * dropped < saving < 1.05 * dropped, (saving, dropped)


def test_float_export_decodes_as_keras_and_loads_back_shared(tmp_path):
    model = make(shared_spec())
    source = batch()["source"]
    export_dir, loaded = export(model, tmp_path / "float")
    ids, scores = served(loaded, source)
    expected_ids, expected_scores = greedy(model, source)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    restored = restore_exported_weights(lambda: make(shared_spec(), seed=3), export_dir)
    assert restored.decoder.embedding is restored.encoder.embedding
    np.testing.assert_array_equal(greedy(restored, source)[0], expected_ids)


def test_int8_export_keeps_the_shared_matrix_one_float_matrix(tmp_path):
    spec = shared_spec(decoder_layers=1)  # fewer layers to quantize: Keras runs gc.collect for each weight it replaces
    model = make(spec)
    source = batch()["source"]
    float_scores = greedy(model, source)[1]
    quantize_weights(model)
    assert model.decoder.embedding is model.encoder.embedding and model.encoder.embedding.quantization_mode is None
    _, loaded = export(model, tmp_path / "int8")
    # One float copy of the shared matrix; the other kernels are int8.
    assert saved_matrices(loaded, VOCAB) == ["float32"]
    assert sum(v.dtype == tf.int8 for v in loaded.model_variables) == 16  # every other kernel
    ids, scores = served(loaded, source)
    keras_ids, keras_scores = greedy(model, source)
    np.testing.assert_array_equal(ids, keras_ids)
    np.testing.assert_allclose(scores, keras_scores, atol=1e-5)
    np.testing.assert_allclose(scores, float_scores, atol=0.05)  # the int8 tolerance of the translation exports


def test_bf16_export_of_a_shared_model_stays_shared(tmp_path):
    model = make(shared_spec())
    source = batch()["source"]
    float_scores = greedy(model, source)[1]
    copy = bfloat16_model(model, lambda: make(shared_spec(), seed=3))
    assert copy.decoder.embedding is copy.encoder.embedding
    assert copy.encoder.embedding.embeddings.dtype == "bfloat16"
    _, loaded = export(copy, tmp_path / "bf16")
    assert saved_matrices(loaded, VOCAB) == ["bfloat16"]
    ids, scores = served(loaded, source)
    keras_ids, keras_scores = greedy(copy, source)
    np.testing.assert_array_equal(ids, keras_ids)
    np.testing.assert_allclose(scores, keras_scores, atol=1e-5)
    np.testing.assert_allclose(scores, float_scores, atol=0.15)  # the bf16 tolerance of the translation exports


# Errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda: build_model(shared_spec(), VOCAB, VOCAB + 1), "one joint vocabulary, got 51 source and 50 target"),
        (lambda: build_model(shared_spec(encoder_type="rnn"), VOCAB, VOCAB),
         "needs a transformer encoder and a transformer decoder, got a rnn encoder"),
        (lambda: build_model(shared_spec(decoder_type="rnn"), VOCAB, VOCAB),
         "needs a transformer encoder and a transformer decoder"),
        (lambda: build_model(shared_spec(encoder_units=32), VOCAB, VOCAB), "needs encoder_units equal to units"),
        (lambda: build_model(shared_spec(), VOCAB, source_dim=8), "needs token-id sources"),
        (lambda: ModelSpec(share_embeddings=True), "share_embeddings does not apply to a rnn encoder with a rnn"),
        (lambda: ModelSpec(attention_dropout=0.1), "attention_dropout does not apply"),
        (lambda: ModelSpec(activation_dropout=0.1), "activation_dropout does not apply"),
        (lambda: ModelSpec(**TRANSFORMER, attention_dropout=1.0), "attention_dropout must be in"),
        (lambda: ModelSpec(**TRANSFORMER, activation_dropout=-0.1), "activation_dropout must be in"),
    ],
)
def test_bad_settings_are_one_line_errors_saying_what_to_fix(make_model, message):
    with pytest.raises(ValueError, match=message) as error:
        make_model()
    assert "\n" not in str(error.value)


def test_the_new_options_are_train_flags_with_their_docs():
    import argparse

    from seq2seq.translate import build_parser

    [commands] = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    text = " ".join(commands.choices["train"].format_help().split())
    assert "--share-embeddings" in text and "needs a joint vocabulary" in text
    assert "--attention-dropout FLOAT dropout rate of the Transformer attention probabilities" in text
    assert "--activation-dropout FLOAT" in text


# Attention and activation dropout --------------------------------------------------------------


def test_unset_rates_are_the_dropout_rate_with_the_same_layers_and_masks():
    """Left unset, both rates are `dropout` and reuse its layer: the model's variables (and so
    its checkpoints) and its training-mode outputs are those of the same model with the rates set."""
    spec = ModelSpec(**{**TRANSFORMER, "dropout": 0.3})
    default, explicit = make(spec), make(dataclasses.replace(spec, attention_dropout=0.3, activation_dropout=0.3))
    for part in (default.encoder, default.decoder):
        assert part.attention_dropout == part.activation_dropout == 0.3
        assert part.attention_dropout_layer is part.dropout_layer is part.activation_dropout_layer
    assert list(paths(default)) == list(paths(explicit)) and len(default.variables) == len(explicit.variables)
    keras.utils.set_random_seed(7)
    a = default(batch(), training=True)
    keras.utils.set_random_seed(7)
    b = explicit(batch(), training=True)
    np.testing.assert_array_equal(a, b)


def test_zero_rates_leave_training_outputs_equal_to_inference():
    model = make(ModelSpec(**TRANSFORMER, attention_dropout=0.0, activation_dropout=0.0))
    np.testing.assert_array_equal(model(batch(), training=True), model(batch(), training=False))


@pytest.mark.parametrize("rate", ["attention_dropout", "activation_dropout"])
def test_a_nonzero_rate_changes_training_outputs_only(rate):
    plain = make(ModelSpec(**TRANSFORMER))
    dropped = make(ModelSpec(**TRANSFORMER, **{rate: 0.5}))
    for part in (dropped.encoder, dropped.decoder):
        assert getattr(part, rate) == 0.5 and part.dropout == 0.0
    copy_weights(plain, dropped)
    inputs = batch()
    inference = plain(inputs, training=False)
    np.testing.assert_array_equal(dropped(inputs, training=False), inference)
    assert not np.allclose(dropped(inputs, training=True), inference, atol=1e-3)
    np.testing.assert_array_equal(greedy(dropped, inputs["source"])[0], greedy(plain, inputs["source"])[0])


def test_stepping_equals_teacher_forcing_with_all_dropouts_set():
    model = make(shared_spec(dropout=0.3, attention_dropout=0.2, activation_dropout=0.4))
    inputs = batch()
    context, state = model.encode(inputs["source"])
    teacher_forced, attention = model.decoder(inputs["target_in"], state, context)
    steps, step_attention = [], []
    for t in range(inputs["target_in"].shape[1]):
        logits, state, weights = model.decoder.step(tf.constant(inputs["target_in"][:, t]), state, context)
        steps.append(logits)
        step_attention.append(weights)
    np.testing.assert_allclose(np.stack(steps, 1), teacher_forced, atol=1e-5)
    np.testing.assert_allclose(np.stack(step_attention, 1), attention, atol=1e-5)
    np.testing.assert_allclose(model(inputs), teacher_forced, atol=1e-5)
