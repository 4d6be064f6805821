"""Training on `keras.Model.fit` with exact resumption.

The data order is a pure function of (seed, epoch): each epoch's batch plan is computed in
NumPy (`seq2seq.batching.plan_batches`), so a run killed at any moment (even `kill -9`)
restarts from its last checkpoint at the same position of the same stream, and ends with
the same weights as a run that was never interrupted.

A Keras "epoch" here is a checkpoint interval of `steps_per_checkpoint` optimizer steps:
at its end the validation loss is computed, a checkpoint (model, optimizer, step, early
stopping state) is written, and early stopping decides whether to go on.
"""

import dataclasses
import json
import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from seq2seq.losses import MaskedCrossEntropy, WarmupDecay

PRECISIONS = {"float32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
# Metrics early stopping can follow, and whether lower (-1) or higher (+1) is better.
METRIC_MODES = {"val_loss": -1, "loss": -1, "val_bleu": 1}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


@dataclasses.dataclass
class TrainingConfig:
    """Everything that decides how a model is trained (not what the model is)."""

    output_dir: str
    epochs: int = 10
    max_steps: int | None = None
    steps_per_checkpoint: int | None = None
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    decay: str = "constant"
    clip_norm: float = 5.0
    label_smoothing: float = 0.1
    seed: int = 1234
    keep_checkpoints: int = 5
    early_stopping_patience: int | None = None
    early_stopping_metric: str = "val_loss"
    precision: str = "float32"
    jit_compile: bool = False
    tensorboard: bool = True
    verbose: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1 and not self.max_steps:
            raise ValueError("train for at least one epoch or give max_steps")
        if self.early_stopping_metric not in METRIC_MODES:
            raise ValueError(f"early_stopping_metric must be one of {sorted(METRIC_MODES)}, got {self.early_stopping_metric!r}")


def set_precision(precision):
    """Sets the global Keras dtype policy; call it before building the model.

    "bf16" (mixed_bfloat16) suits CPUs with bfloat16 units (AMX, AVX512-BF16); "fp16"
    (mixed_float16) suits GPUs. Logits, softmax and the loss stay in float32 either way.
    """
    keras.config.set_dtype_policy(PRECISIONS[precision])


class PlannedBatches:
    """Training batches from a per-epoch plan of example indices.

    plan_fn(epoch) -> list of int index arrays (deterministic for the epoch);
    make_batch(indices) -> (inputs, targets): a TensorFlow function gathering and padding
    the examples (it runs inside tf.data, so it is fast and needs no Python per example).
    """

    def __init__(self, plan_fn, make_batch):
        self.plan_fn = plan_fn
        self.make_batch = make_batch
        self._plans = {}

    def plan(self, epoch):
        if epoch not in self._plans:
            self._plans[epoch] = self.plan_fn(epoch)
        return self._plans[epoch]

    def position(self, step):
        """The (epoch, batch index) that global step `step` trains on."""
        epoch = 0
        while step >= len(self.plan(epoch)):
            step -= len(self.plan(epoch))
            epoch += 1
        return epoch, step

    def epoch_dataset(self, epoch=0):
        """The batches of one epoch, once (e.g. for validation with an unshuffled plan)."""
        plan = tf.ragged.constant([list(batch) for batch in self.plan(epoch)], dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices(plan).map(self.make_batch).prefetch(tf.data.AUTOTUNE)

    def stream(self, start_step):
        """An endless tf.data stream of batches from global step `start_step` on."""
        start_epoch, start_batch = self.position(start_step)

        def indices():
            epoch, batch = start_epoch, start_batch
            while True:
                plan = self.plan(epoch)
                for index in plan[batch:]:
                    yield np.asarray(index, dtype=np.int64)
                self._plans.pop(epoch, None)
                epoch, batch = epoch + 1, 0

        dataset = tf.data.Dataset.from_generator(indices, output_signature=tf.TensorSpec([None], tf.int64))
        return dataset.map(self.make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
            tf.data.AUTOTUNE
        )


class _CheckpointAndStop(keras.callbacks.Callback):
    """Writes a checkpoint at the end of every interval, tracks the best value of the
    monitored metric, stops early, and stops with a clear error on a NaN loss.

    `best` holds the best value times the metric's sign, so that higher is always better."""

    def __init__(self, manager, chunk, best, bad_chunks, patience, best_path, monitor, verbose):
        super().__init__()
        self.manager = manager
        self.monitor = monitor
        self.sign = METRIC_MODES[monitor]
        self.chunk = chunk
        self.best = best
        self.bad_chunks = bad_chunks
        self.patience = patience
        self.best_path = best_path
        self.verbose = verbose

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(self.model.optimizer.iterations.numpy())
            self.model.stop_training = True
            raise TrainingError(
                f"the training loss became {float(loss)} at step {step}; lower the learning rate, "
                f"clip gradients harder (clip_norm) or check the data. The last good checkpoint is "
                f"{self.manager.latest_checkpoint}"
            )

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.chunk.assign(epoch + 1)
        monitored = logs.get(self.monitor, logs.get("loss") if self.monitor == "val_loss" else None)
        if monitored is not None and self.sign * monitored > float(self.best.numpy()):
            self.best.assign(self.sign * monitored)
            self.bad_chunks.assign(0)
            self.model.save_weights(self.best_path)
        else:
            self.bad_chunks.assign_add(1)
        self.manager.save(checkpoint_number=int(self.model.optimizer.iterations.numpy()))
        if self.patience and int(self.bad_chunks.numpy()) >= self.patience:
            if self.verbose:
                print(f"early stopping: no better {self.monitor} for {self.patience} checkpoints")
            self.model.stop_training = True


class Trainer:
    """Compiles, restores and fits a model; `fit` can be called again on the same output
    dir after any interruption and continues where the last checkpoint left off."""

    def __init__(self, model, config: TrainingConfig):
        self.model = model
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.schedule = WarmupDecay(
            config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay=config.decay,
            total_steps=config.max_steps,
        )
        optimizer = keras.optimizers.Adam(self.schedule, global_clipnorm=config.clip_norm or None)
        model.compile(
            optimizer=optimizer,
            loss=MaskedCrossEntropy(label_smoothing=config.label_smoothing),
            jit_compile=config.jit_compile,
        )
        optimizer.build(model.trainable_variables)
        self.chunk = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best = tf.Variable(-float("inf"), dtype=tf.float64, trainable=False)
        self.bad_chunks = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, chunk=self.chunk, best=self.best, bad_chunks=self.bad_chunks
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.output_dir / "checkpoints"), max_to_keep=config.keep_checkpoints
        )

    @property
    def step(self):
        return int(self.model.optimizer.iterations.numpy())

    def restore(self):
        """Restores the latest checkpoint, if any; returns its path or None."""
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return latest

    def fit(self, batches: PlannedBatches, validation=None, callbacks=()):
        """Trains until `epochs` passes over the data (or `max_steps`), or early stopping."""
        config = self.config
        resumed_from = self.restore()
        steps_per_chunk = config.steps_per_checkpoint or len(batches.plan(0))
        total_steps = config.max_steps or sum(len(batches.plan(e)) for e in range(config.epochs))
        num_chunks = max(1, math.ceil(total_steps / steps_per_chunk))
        start_chunk = int(self.chunk.numpy())
        if resumed_from and config.verbose:
            print(f"resuming from {resumed_from} (step {self.step}, checkpoint {start_chunk} of {num_chunks})")
        if start_chunk >= num_chunks or (config.early_stopping_patience and int(self.bad_chunks.numpy()) >= config.early_stopping_patience):
            if config.verbose:
                print("training already finished for this output dir")
            return None
        # Callbacks that add metrics (e.g. validation BLEU) run before the checkpoint reads them.
        all_callbacks = [
            *callbacks,
            _CheckpointAndStop(
                self.manager, self.chunk, self.best, self.bad_chunks, config.early_stopping_patience,
                str(self.output_dir / "best.weights.h5"), config.early_stopping_metric, config.verbose,
            ),
        ]
        if config.tensorboard:
            all_callbacks.append(keras.callbacks.TensorBoard(str(self.output_dir / "logs"), update_freq=50))
        history = self.model.fit(
            batches.stream(self.step),
            validation_data=validation,
            epochs=num_chunks,
            initial_epoch=start_chunk,
            steps_per_epoch=steps_per_chunk,
            callbacks=all_callbacks,
            shuffle=False,
            verbose=config.verbose,
        )
        self._write_summary(history)
        return history

    def _write_summary(self, history):
        summary = {
            "step": self.step,
            "best_" + self.config.early_stopping_metric: METRIC_MODES[self.config.early_stopping_metric] * float(self.best.numpy()),
            "history": {key: [float(v) for v in values] for key, values in history.history.items()},
        }
        (self.output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))


def average_checkpoints(model, checkpoint_paths):
    """Sets the model weights to the mean of the given checkpoints' model weights.

    Averaging the last few checkpoints is a cheap, reliable gain in BLEU (e.g. Vaswani et al., 2017).
    """
    if not checkpoint_paths:
        raise ValueError("no checkpoints to average")
    totals = None
    for path in checkpoint_paths:
        tf.train.Checkpoint(model=model).restore(path).expect_partial()
        values = [np.array(v.numpy(), dtype=np.float64) for v in model.trainable_weights]
        totals = values if totals is None else [t + v for t, v in zip(totals, values)]
    for variable, total in zip(model.trainable_weights, totals):
        variable.assign((total / len(checkpoint_paths)).astype(variable.dtype))
    return model



def _pad_time(x, multiple):
    """Pads axis 1 of a dense [batch, time, ...] tensor to a multiple of `multiple` (fewer XLA shapes)."""
    if multiple <= 1:
        return x
    extra = (-tf.shape(x)[1]) % multiple
    paddings = [[0, 0], [0, extra]] + [[0, 0]] * (len(x.shape) - 2)
    return tf.pad(x, paddings)


def sequence_batches(sources, targets, plan_fn, start_id=2, end_id=3, pad_to_multiple=1):
    """PlannedBatches for teacher forcing.

    sources: a tf.RaggedTensor of token ids [num_examples, None] (padded with 0 in a batch),
    or a dense tensor [num_examples, ...] (e.g. image features); targets: a tf.RaggedTensor
    of token ids [num_examples, None] without start/end tokens. Batches are
    ({"source", "target_in": <s> y}, target_out: y </s>).
    """
    targets = tf.cast(targets, tf.int32)

    def make_batch(indices):
        target = tf.gather(targets, indices)  # ragged [batch, None]
        starts = tf.fill([tf.shape(indices)[0], 1], start_id)
        ends = tf.fill([tf.shape(indices)[0], 1], end_id)
        target_in = _pad_time(tf.concat([starts, target], axis=1).to_tensor(0), pad_to_multiple)
        target_out = _pad_time(tf.concat([target, ends], axis=1).to_tensor(0), pad_to_multiple)
        source = tf.gather(sources, indices)
        if isinstance(source, tf.RaggedTensor):
            source = _pad_time(source.to_tensor(0), pad_to_multiple)
        return {"source": source, "target_in": target_in}, target_out

    return PlannedBatches(plan_fn, make_batch)
