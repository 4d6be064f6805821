"""The encoder-decoder model: any encoder, a bridge, and a decoder with the step contract."""

import warnings

import keras
import tensorflow as tf
from keras import ops

from seq2seq import decoding
from seq2seq.decoders import restricted_step
from seq2seq.products import prepared


@keras.saving.register_keras_serializable(package="seq2seq")
class Seq2SeqModel(keras.Model):
    """Encoder + bridge + decoder, trained with teacher forcing and decoded with `generate`.

    Training inputs are a dict {"source": ..., "target_in": [batch, time] ids}; `call` returns
    logits [batch, time, vocab] in float32. The encoder is any layer returning
    {"memory", "memory_mask", "final_states"} (RNNEncoder for text, an image encoder for
    captioning); the decoder is any layer with `prepare_context`, `initial_state`, `step`
    and a teacher-forced `call` (AttentionDecoder, or a Transformer decoder).

    `share_embeddings`: the decoder takes the encoder's embedding layer as its own
    (`decoder.share_embedding`), so both are one variable; kept in the config, so a loaded
    model shares it again.
    """

    def __init__(
        self, encoder, decoder, bridge, source_shape=(None,), start_id=2, end_id=3, attention_regularizer=0.0,
        share_embeddings=False, **kwargs
    ):
        super().__init__(**kwargs)
        if share_embeddings:
            if not hasattr(decoder, "share_embedding") or getattr(encoder, "embedding", None) is None:
                raise ValueError(
                    "share_embeddings needs an encoder over token ids with an `embedding` layer and a decoder "
                    f"with `share_embedding`, got {type(encoder).__name__} and {type(decoder).__name__}"
                )
            decoder.share_embedding(encoder.embedding)
        self.share_embeddings = share_embeddings
        self.encoder = encoder
        self.decoder = decoder
        self.bridge = bridge
        self.source_shape = tuple(source_shape)
        self.start_id = start_id
        self.end_id = end_id
        self.attention_regularizer = attention_regularizer

    def build(self, input_shape=None):
        """Builds every weight from the configs, so a loaded model needs no sample input."""
        # Keras's loader may have built some parts already; a layer is built only once.
        if not self.encoder.built:
            self.encoder.build((None, *self.source_shape))
        if not self.decoder.built:
            self.decoder.build(self.encoder.output_size)
        if not self.bridge.built:
            self.bridge.build(self.encoder.final_state_size)
        self.built = True

    def encode(self, source, training=False):
        """source -> (context for the decoder steps, initial decoder state, memory mask)."""
        encoded = self.encoder(source, training=training)
        batch_size = ops.shape(encoded["memory"])[0]
        cell_states = self.bridge(encoded["final_states"], batch_size=batch_size)
        state = self.decoder.initial_state(cell_states, batch_size, dtype=encoded["memory"].dtype)
        context = self.decoder.prepare_context(encoded["memory"], encoded["memory_mask"])
        return context, state

    def call(self, inputs, training=False):
        context, state = self.encode(inputs["source"], training=training)
        logits, attention = self.decoder(inputs["target_in"], state, context, training=training)
        if training and self.attention_regularizer:
            self.add_loss(self.attention_regularizer * doubly_stochastic_penalty(attention, inputs["target_in"]))
        return logits

    def generate(
        self,
        source,
        search="greedy",
        max_length=100,
        beam_size=4,
        length_penalty=0.0,
        length_normalize=False,
        n_best=1,
        temperature=1.0,
        top_k=0,
        seed=None,
        prefix=None,
        output_ids=None,
    ):
        """Decodes a batch of sources. max_length: an int, or an int tensor [batch] per row
        (see `decoding.max_length_from_source`). prefix: None, or (ids [batch, P], lengths
        [batch]), the target tokens each row must start with (see `decoding`). output_ids:
        None, or a shortlist [V'] of the target vocabulary the search chooses from (sorted,
        holding the reserved tokens and every prefix token; see `shortlisted_search`).
        Returns a `decoding.DecodingResult`."""
        with prepared(self):
            context, state = self.encode(source, training=False)
            batch_size = tf.shape(context["memory"])[0]
            return shortlisted_search(
                lambda steps, prefix: decoding.run_search(
                    steps[0], state, context, batch_size, self.start_id, self.end_id, max_length, search=search,
                    beam_size=beam_size, length_penalty=length_penalty, length_normalize=length_normalize,
                    n_best=n_best, temperature=temperature, top_k=top_k, seed=seed, prefix=prefix,
                ),
                [self.decoder], prefix, output_ids,
            )

    def get_config(self):
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "bridge": keras.saving.serialize_keras_object(self.bridge),
            "source_shape": list(self.source_shape),
            "start_id": self.start_id,
            "end_id": self.end_id,
            "attention_regularizer": self.attention_regularizer,
            "share_embeddings": self.share_embeddings,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "decoder", "bridge"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

    def get_build_config(self):
        return {"built": True}

    def build_from_config(self, config):
        self.build()


def shortlisted_search(search, decoders, prefix=None, output_ids=None):
    """search(steps, prefix) -> DecodingResult, run with the steps of `decoders` (a model's one,
    or an ensemble's members', which `search` combines) over the whole vocabulary, or, with
    `output_ids` [V'] (sorted, the reserved tokens first at their own positions, every prefix
    token included), over those entries only (`restricted_step`): the search's tokens are then
    positions in `output_ids`, mapped back to ids here. The decoding module is the same either
    way."""
    if output_ids is None:
        return search([decoder.step for decoder in decoders], prefix)
    steps = [restricted_step(decoder, output_ids) for decoder in decoders]
    if prefix is not None:
        ids, lengths = prefix
        prefix = (tf.reshape(tf.searchsorted(output_ids, tf.reshape(ids, [-1])), tf.shape(ids)), lengths)
    result = search(steps, prefix)
    return result._replace(ids=tf.gather(output_ids, result.ids))


class ExportedModel:
    """A Keras model held by an exported tf.Module (Translator, Captioner) for its tf.functions.

    TF's object tracking does not see this holder; the module tracks `variables` instead, the
    model's backing tf.Variables. So the SavedModel holds every weight exactly once: tracking
    the Keras variables as well stores each weight a second time, and tracking the Keras model
    alone misses the weights of layers kept in nested lists.
    """

    def __init__(self, model):
        self.model = model
        self.variables = [variable.value for variable in model.variables]


def quantize_weights(model):
    """Stores the kernels of the model's Dense and Embedding layers as int8, with one float
    scale per output channel, for a ~4x smaller export; activations stay float (weight-only,
    so inference speed is nearly unchanged). The model is then for inference only.

    A decoder embedding tied to the output projection stays float: the projection reads its
    matrix directly, which would see the int8 values without their scales. With shared
    embeddings that layer is the encoder's embedding too, so the one matrix stays float in
    both uses (and is stored once)."""
    decoder = model.decoder
    tied = decoder.embedding if getattr(decoder, "tie_embeddings", False) else None
    with warnings.catch_warnings():
        # Every other layer (RNN cells, dropout, ...) keeps float weights, as intended.
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        model.quantize(
            config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None),
            filters=lambda layer: layer is not tied,
        )
    return model


def float_weights(model):
    """{variable path inside the model: float32 value} of `model`'s weights, int8 ones
    dequantized (Keras keeps `q / scale` with one scale per output channel, per row for an
    Embedding). The model's own name is left out of the paths: Keras numbers it per process."""
    values = {_path_in_model(variable): variable for variable in model.variables
              if "seed_generator_state" not in variable.path}
    weights = {}
    for path, variable in values.items():
        if path.endswith("_scale") and path[: -len("_scale")] in values:
            continue
        value = tf.cast(variable, tf.float32)
        scale = values.get(path + "_scale")
        if variable.dtype == "int8" and scale is not None:
            scale = tf.cast(scale, tf.float32)
            if path.endswith("embeddings"):
                scale = scale[:, None]
            value = tf.reshape(value / scale, variable.shape)
        weights[path] = value
    return weights


def build_in_bfloat16(build_model):
    """`build_model()` under Keras's "bfloat16" policy, for inference: weights stored and matrix
    products run in bfloat16, which the bfloat16 units of AMX and AVX512-BF16 CPUs run fastest
    (elsewhere they are emulated, slower than float32). Layer normalization statistics,
    attention scores and softmax, recurrent states and the logits stay float32, as under
    mixed precision."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("bfloat16")
    try:
        return build_model()
    finally:
        keras.config.set_dtype_policy(previous)


def bfloat16_model(model, build_model):
    """A bfloat16 copy (`build_in_bfloat16`) of `model`, whose weights may be float32 or int8."""
    weights = float_weights(model)
    copy = build_in_bfloat16(build_model)
    targets = {_path_in_model(variable): variable for variable in copy.variables
               if "seed_generator_state" not in variable.path}
    unmatched = sorted(set(targets) ^ set(weights))
    if unmatched:
        raise ValueError(f"the bfloat16 copy's weights do not match the model's: {', '.join(unmatched[:3])}")
    for path, variable in targets.items():
        variable.assign(tf.cast(weights[path], variable.dtype))
    return copy


def _path_in_model(variable):
    return variable.path.split("/", 1)[-1]


def doubly_stochastic_penalty(attention, target_in):
    """Show, Attend and Tell's regularizer: sum_i (1 - sum_t alpha_ti)^2, averaged over the batch.

    attention [batch, time, src_len]; target padding (id 0) does not count.
    """
    mask = ops.cast(ops.not_equal(target_in, 0), attention.dtype)[:, :, None]
    coverage = ops.sum(attention * mask, axis=1)  # [batch, src_len]
    return ops.mean(ops.sum(ops.square(1.0 - coverage), axis=-1))


def build_rnn_model(
    source_vocab_size,
    target_vocab_size,
    cell_type="lstm",
    units=256,
    embedding_dim=None,
    encoder_layers=1,
    decoder_layers=1,
    bidirectional=True,
    merge_mode="concat",
    attention="luong",
    attention_score="general",
    attention_normalize=False,
    input_feeding=True,
    tie_embeddings=False,
    dropout=0.0,
    bridge="dense",
    encoder_units=None,
    start_id=2,
    end_id=3,
):
    """An RNN encoder-decoder with attention for token-id sources: `factory.build_model` with
    an rnn encoder (`encoder_units`, default units) and an rnn decoder (`units`)."""
    from seq2seq.factory import ModelSpec, build_model

    spec = ModelSpec(
        cell_type=cell_type, units=units, encoder_units=encoder_units, embedding_dim=embedding_dim,
        encoder_layers=encoder_layers, decoder_layers=decoder_layers, bidirectional=bidirectional,
        merge_mode=merge_mode, attention=attention, attention_score=attention_score,
        attention_normalize=attention_normalize, input_feeding=input_feeding, tie_embeddings=tie_embeddings,
        dropout=dropout, bridge=bridge,
    )
    return build_model(spec, target_vocab_size, source_vocab_size, start_id=start_id, end_id=end_id)
