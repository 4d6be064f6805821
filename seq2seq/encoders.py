"""RNN encoder: stacked, optionally bidirectional vanilla RNN, LSTM or GRU."""

import keras
from keras import ops

from seq2seq.precision import Dense, Dropout
from seq2seq.rnn import RecurrentCell, check_cell_type, run_cell

MERGE_MODES = ("concat", "sum", "average")


@keras.saving.register_keras_serializable(package="seq2seq")
class RNNEncoder(keras.layers.Layer):
    """Encodes a padded batch into attention memory and final states.

    With `vocab_size`, inputs are token ids [batch, time] (id 0 is padding, and masked);
    without it, inputs are pre-computed vectors [batch, time, dim] (e.g. image features)
    with an optional boolean mask [batch, time].

    Returns a dict:
      memory:       [batch, time, units * (2 if bidirectional and merge_mode == "concat" else 1)]
      memory_mask:  [batch, time] bool
      final_states: one entry per layer, each a list of state tuples, one per direction
                    (forward first); a state tuple is (h,) or (h, c) for LSTM.
    Padded positions never change any output: their memory vectors are zero and they
    do not reach the final states.
    """

    def __init__(
        self,
        cell_type="lstm",
        units=256,
        num_layers=1,
        bidirectional=False,
        merge_mode="concat",
        dropout=0.0,
        vocab_size=None,
        embedding_dim=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cell_type = check_cell_type(cell_type)
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.units = units
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.merge_mode = merge_mode
        self.dropout = dropout
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim or units
        self.supports_masking = True
        if vocab_size:
            self.embedding = keras.layers.Embedding(vocab_size, self.embedding_dim, name="embedding")
        directions = ("forward", "backward") if bidirectional else ("forward",)
        self.cells = [
            [RecurrentCell(cell_type, units, name=f"layer{i}_{d}") for d in directions]
            for i in range(num_layers)
        ]
        self.dropout_layer = Dropout(dropout)

    @property
    def output_size(self):
        if self.bidirectional and self.merge_mode == "concat":
            return 2 * self.units
        return self.units

    @property
    def final_state_size(self):
        """Size of one final state part (h or c) with the directions concatenated, for a Bridge."""
        return self.units * (2 if self.bidirectional else 1)

    def build(self, input_shape):
        if self.vocab_size:
            self.embedding.build(input_shape)
            input_dim = self.embedding_dim
        else:
            input_dim = input_shape[-1]
        for layer_cells in self.cells:
            for cell in layer_cells:
                cell.build(input_dim)
            input_dim = self.output_size

    def call(self, inputs, mask=None, training=False):
        if self.vocab_size:
            if mask is None:
                mask = ops.not_equal(inputs, 0)
            x = self.embedding(inputs)
        else:
            x = inputs
            if mask is None:
                mask = ops.ones(ops.shape(x)[:2], dtype="bool")
        mask = ops.cast(mask, "bool")
        batch_size = ops.shape(x)[0]
        final_states = []
        for layer_cells in self.cells:
            x = self.dropout_layer(x, training=training)
            outputs, states = [], []
            for direction, cell in enumerate(layer_cells):
                projected = cell.project_inputs(x)  # [batch, time, gates*units], all steps at once
                out, state = run_cell(
                    cell, projected, mask, cell.initial_state(batch_size), reverse=direction == 1, training=training
                )
                outputs.append(out)
                states.append(state)
            x = self._merge(outputs)
            final_states.append(states)
        return {"memory": x, "memory_mask": mask, "final_states": final_states}

    def _merge(self, outputs):
        if len(outputs) == 1:
            return outputs[0]
        if self.merge_mode == "concat":
            return ops.concatenate(outputs, axis=-1)
        merged = outputs[0] + outputs[1]
        return merged * 0.5 if self.merge_mode == "average" else merged

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "cell_type": self.cell_type,
            "units": self.units,
            "num_layers": self.num_layers,
            "bidirectional": self.bidirectional,
            "merge_mode": self.merge_mode,
            "dropout": self.dropout,
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
        }


@keras.saving.register_keras_serializable(package="seq2seq")
class Bridge(keras.layers.Layer):
    """Maps encoder final states to a decoder's initial state.

    kind="dense": decoder and encoder layers are aligned at the top (the top decoder layer
    takes the top encoder layer, and so on down; decoder layers below the bottom encoder
    layer take the bottom one), concatenates the directions of
    each state part and projects it to the decoder size (tanh for h, linear for c). This
    handles bidirectional to unidirectional, different sizes, different layer counts and
    different cell types (an LSTM decoder after a GRU encoder gets its c from h).
    kind="zero": the decoder starts from zeros.
    """

    KINDS = ("dense", "zero")

    def __init__(self, cell_type, units, num_layers, kind="dense", **kwargs):
        super().__init__(**kwargs)
        if kind not in self.KINDS:
            raise ValueError(f"bridge kind must be one of {self.KINDS}, got {kind!r}")
        self.cell_type = check_cell_type(cell_type)
        self.units = units
        self.num_layers = num_layers
        self.kind = kind
        self.parts = 2 if cell_type == "lstm" else 1
        if kind == "dense":
            self.projections = [
                [
                    Dense(units, activation="tanh" if p == 0 else None, name=f"layer{i}_part{p}")
                    for p in range(self.parts)
                ]
                for i in range(num_layers)
            ]

    def build(self, encoder_state_size):
        """encoder_state_size: size of one encoder state part, directions concatenated."""
        if self.kind == "dense":
            for layer_projections in self.projections:
                for projection in layer_projections:
                    projection.build((None, encoder_state_size))

    def call(self, encoder_states, batch_size=None):
        """encoder_states: per-layer lists of per-direction state tuples (see RNNEncoder)."""
        if self.kind == "zero":
            if batch_size is None:
                batch_size = ops.shape(encoder_states[-1][0][0])[0]
            dtype = encoder_states[-1][0][0].dtype if encoder_states else self.compute_dtype
            return tuple(
                tuple(ops.zeros((batch_size, self.units), dtype=dtype) for _ in range(self.parts))
                for _ in range(self.num_layers)
            )
        num_encoder_layers = len(encoder_states)
        decoder_state = []
        for i in range(self.num_layers):
            source_layer = max(0, num_encoder_layers - self.num_layers + i)
            directions = encoder_states[min(source_layer, num_encoder_layers - 1)]
            layer_state = []
            for p in range(self.parts):
                part = [state[p] if p < len(state) else state[0] for state in directions]
                layer_state.append(self.projections[i][p](ops.concatenate(part, axis=-1)))
            decoder_state.append(tuple(layer_state))
        return tuple(decoder_state)

    def get_config(self):
        return {
            **super().get_config(),
            "cell_type": self.cell_type,
            "units": self.units,
            "num_layers": self.num_layers,
            "kind": self.kind,
        }
