"""Training on `keras.Model.fit` with exact resumption.

The data order is a pure function of (seed, epoch): each epoch's batch plan is computed in
NumPy (`seq2seq.batching.plan_batches`), so a run killed at any moment (even `kill -9`)
restarts from its last checkpoint at the same position of the same stream, and ends with
the same weights as a run that was never interrupted.

A Keras "epoch" here is a checkpoint interval of `steps_per_checkpoint` optimizer steps:
at its end the validation loss is computed, the interval's logs are added to
training_summary.json (which holds every checkpoint of the run, resumed ones too), a
checkpoint (model, optimizer, step, early stopping state) is written, and early stopping
decides whether to go on. A NaN loss, or a loss that stays far above where it started
(`_Divergence`), stops the run with an error that names the likely cause.

Under a `tf.distribute` strategy (`TrainingConfig.distribution`, see `seq2seq.distribute`)
the batch size is the global batch, split over the replicas; only the chief writes the
output dir, and every worker restores from the chief's checkpoints.
"""

import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from seq2seq import distribute, keras_compat
from seq2seq.cli import log
from seq2seq.config import check_choices, option
from seq2seq.errors import TrainingError  # noqa: F401  (raised here; imported from here by callers)
from seq2seq.losses import MaskedCrossEntropy, WarmupDecay
from seq2seq.optimizers import FusedAdam
from seq2seq.precision import CHOICES as PRECISION_CHOICES
from seq2seq.precision import set_precision  # noqa: F401  (part of this module's API)
# Metrics early stopping can follow, and whether lower (-1) or higher (+1) is better.
METRIC_MODES = {"val_loss": -1, "loss": -1, "val_bleu": 1}
SUMMARY_FILE = "training_summary.json"
# What a Trainer writes into its output dir (seq2seq.run.open_run removes a failed start's).
TRAINER_FILES = ("checkpoints", "best.weights.h5", "logs", SUMMARY_FILE)


@dataclasses.dataclass
class TrainingConfig:
    """Everything that decides how a model is trained (not what the model is). Each number
    declares its bounds; the fields that may change on resume say so (`may_change_on_resume`)."""

    output_dir: str = option(
        dataclasses.MISSING, "run directory: config, vocabularies, checkpoints and logs; training resumes from it"
    )
    epochs: int = option(
        10, "passes over the training data, unless max_steps is set", bounds="[0, inf)", may_change_on_resume=True
    )
    max_steps: int | None = option(
        None, "optimizer steps to train for, instead of epochs", if_none="epochs decide", bounds="[1, inf)",
        may_change_on_resume=True,
    )
    steps_per_checkpoint: int | None = option(
        None, "optimizer steps between checkpoints, each with a validation", if_none="one epoch", bounds="[1, inf)",
        may_change_on_resume=True,
    )
    learning_rate: float = option(1e-3, "peak learning rate (after warm-up)", bounds="(0, inf)")
    warmup_steps: int = option(0, "steps over which the learning rate rises linearly to its peak", bounds="[0, inf)")
    decay: str = option(
        "constant", "learning-rate schedule after warm-up (cosine needs max_steps)", choices=WarmupDecay.DECAYS
    )
    clip_norm: float = option(5.0, "global norm the gradients are clipped to; 0: no clipping", bounds="[0, inf)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy loss; 0: none", bounds="[0, 1)")
    seed: int = option(1234, "random seed of the initial weights and of the data order", bounds="[0, inf)")
    keep_checkpoints: int = option(
        5, "checkpoints kept in the run directory; older ones are deleted", bounds="[1, inf)", may_change_on_resume=True
    )
    early_stopping_patience: int | None = option(
        None, "stop after this many checkpoints without improvement of early_stopping_metric",
        if_none="never stop early", bounds="[1, inf)", may_change_on_resume=True,
    )
    early_stopping_metric: str = option(
        "val_loss", "metric that picks the best weights and decides early stopping", choices=METRIC_MODES
    )
    precision: str = option(
        "auto", "numeric precision; auto: bf16 on CPUs with bfloat16 matrix units, float32 elsewhere",
        choices=PRECISION_CHOICES, may_change_on_resume=True,
    )
    jit_compile: bool = option(False, "compile the training step with XLA", may_change_on_resume=True)
    tensorboard: bool = option(True, "write TensorBoard logs to logs/ in the run directory", may_change_on_resume=True)
    verbose: int = option(
        1, "progress output: 0 none, 1 a progress bar, 2 one line per checkpoint", choices=(0, 1, 2),
        may_change_on_resume=True,
    )
    distribution: str = option(
        "none", "tf.distribute strategy: mirrored over the local GPUs, multi_worker over the TF_CONFIG cluster",
        choices=distribute.STRATEGIES, may_change_on_resume=True,
    )

    def __post_init__(self):
        check_choices(self)
        if self.epochs < 1 and not self.max_steps:
            raise ValueError("train for at least one epoch or give max_steps")


class PlannedBatches:
    """Training batches from a per-epoch plan of example indices.

    plan_fn(epoch) -> list of int index arrays (deterministic for the epoch);
    make_batch(indices) -> (inputs, targets): a TensorFlow function gathering and padding
    the examples (it runs inside tf.data, so it is fast and needs no Python per example);
    target_lengths: optional int array [num_examples], each example's target tokens with
    `</s>`, from which training reports its throughput.
    """

    def __init__(self, plan_fn, make_batch, target_lengths=None):
        self.plan_fn = plan_fn
        self.make_batch = make_batch
        self.target_lengths = None if target_lengths is None else np.asarray(target_lengths)
        if self.target_lengths is not None and not np.issubdtype(self.target_lengths.dtype, np.integer):
            self.target_lengths = self.target_lengths.astype(np.int64)
        self._plans = {}
        self._epoch_lengths = {}
        self._token_counts = {}

    def target_tokens(self, start_step, end_step):
        """Target tokens (`</s>` included, padding not) of the batches global steps
        start_step .. end_step - 1 train on; None without `target_lengths`."""
        if self.target_lengths is None:
            return None
        total = 0
        epoch, batch = self.position(start_step)
        remaining = end_step - start_step
        while remaining > 0:
            counts = self._batch_tokens(epoch)
            taken = counts[batch : batch + remaining]
            total += int(taken.sum())
            remaining -= len(taken)
            epoch, batch = epoch + 1, 0
        return total

    def _batch_tokens(self, epoch):
        """Target tokens of every batch of the epoch's plan: an int per batch, kept for this
        and the next epoch only (the plan itself is not kept for it)."""
        if epoch not in self._token_counts:
            plan = self._plans.get(epoch) or self.plan_fn(epoch)
            self._token_counts = {e: c for e, c in self._token_counts.items() if e >= epoch - 1}
            self._token_counts[epoch] = np.array([self.target_lengths[b].sum() for b in plan], np.int64)
        return self._token_counts[epoch]

    def plan(self, epoch):
        if epoch not in self._plans:
            self._plans[epoch] = self.plan_fn(epoch)
        return self._plans[epoch]

    def position(self, step):
        """The (epoch, batch index) that global step `step` trains on."""
        epoch = 0
        while step >= self._epoch_length(epoch):
            step -= self._epoch_length(epoch)
            epoch += 1
        return epoch, step

    def _epoch_length(self, epoch):
        """Batches in the epoch's plan, remembered as a number: finding a position does not
        keep the plans of past epochs in memory."""
        if epoch not in self._epoch_lengths:
            self._epoch_lengths[epoch] = len(self._plans[epoch] if epoch in self._plans else self.plan_fn(epoch))
        return self._epoch_lengths[epoch]

    def epoch_dataset(self, epoch=0, input_context=None):
        """The batches of one epoch, once (e.g. for validation with an unshuffled plan).

        With a `tf.distribute.InputContext`, this input pipeline's replica slices of every
        batch instead (see `stream`)."""
        if input_context is not None:
            slices = [s for batch in self.plan(epoch) for s in _replica_elements(batch, input_context)]
            # A known length, as without a strategy: Keras then knows when an evaluation ends.
            return self._per_replica_dataset(lambda: iter(slices)).apply(
                tf.data.experimental.assert_cardinality(len(slices))
            )
        plan = tf.ragged.constant([list(batch) for batch in self.plan(epoch)], dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices(plan).map(self.make_batch).prefetch(tf.data.AUTOTUNE)

    def stream(self, start_step, input_context=None):
        """An endless tf.data stream of batches from global step `start_step` on.

        With a `tf.distribute.InputContext` (from `strategy.distribute_datasets_from_function`),
        the batches of the plan are global batches: this input pipeline makes only its own
        replicas' slices of each (`seq2seq.distribute.replica_slices`), one element per replica
        and step, so the workers together train on exactly the batches of one worker."""
        start_epoch, start_batch = self.position(start_step)

        def indices():
            epoch, batch = start_epoch, start_batch
            while True:
                plan = self.plan(epoch)
                for index in plan[batch:]:
                    if input_context is None:
                        yield np.asarray(index, dtype=np.int64)
                    else:
                        yield from _replica_elements(index, input_context)
                self._plans.pop(epoch, None)
                epoch, batch = epoch + 1, 0

        if input_context is not None:
            return self._per_replica_dataset(indices)
        dataset = tf.data.Dataset.from_generator(indices, output_signature=tf.TensorSpec([None], tf.int64))
        return dataset.map(self.make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
            tf.data.AUTOTUNE
        )

    def _per_replica_dataset(self, elements):
        """Batches of the (indices, real) pairs `elements()` yields, one per replica, sharded by
        hand (auto-shard OFF). A stand-in batch (real False) gets all-padding targets."""

        def make_batch(indices, real):
            inputs, targets = self.make_batch(indices)
            return inputs, tf.nest.map_structure(lambda t: t * tf.cast(real, t.dtype), targets)

        signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.bool))
        dataset = tf.data.Dataset.from_generator(elements, output_signature=signature)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.with_options(options)
        return dataset.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
            tf.data.AUTOTUNE
        )


def _replica_elements(batch, input_context):
    """(indices, real) for each of this input pipeline's replica slices of a global batch.

    A replica left without examples (fewer examples than replicas, e.g. a max_tokens batch of
    one long sentence) gets the batch's first example with its targets masked out: it adds
    nothing to the loss or the gradients, and no replica computes on an empty batch."""
    for piece in distribute.replica_slices(batch, input_context):
        if len(piece):
            yield piece, True
        else:
            yield np.asarray(batch[:1], dtype=np.int64), False


class _Throughput(keras.callbacks.Callback):
    """Target tokens per second of training at every checkpoint, as OpenNMT-tf reports it.

    Counts the target tokens (`</s>` included) of the steps since the previous checkpoint,
    over the wall time of those steps only (validation and checkpoint writing are outside
    it). The first `skip_steps` steps of a `fit` call, which trace the train function, are
    left out. The figure goes into the logs (`target_tokens_per_second`: history, TensorBoard,
    training_summary.json) and, with `verbose`, onto a line `target tokens/s: N`.
    """

    def __init__(self, batches, skip_steps=3, verbose=1):
        super().__init__()
        self.batches = batches
        self.skip_steps = skip_steps
        self.verbose = verbose
        self.steps_done = 0

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.start_time = self.start_step = None
        if self.steps_done >= self.skip_steps:
            self.start_time, self.start_step = time.perf_counter(), self._step()

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done += 1
        self.end_time = time.perf_counter()
        if self.start_time is None and self.steps_done >= self.skip_steps:
            self.start_time, self.start_step = self.end_time, self._step()

    def on_epoch_end(self, epoch, logs=None):
        end_step = self._step()
        if self.start_step is None or end_step <= self.start_step or self.end_time <= self.start_time:
            return
        tokens = self.batches.target_tokens(self.start_step, end_step)
        rate = tokens / (self.end_time - self.start_time)
        if logs is not None:
            logs["target_tokens_per_second"] = rate
        if self.verbose:
            log(
                f"step {end_step}: target tokens/s: {rate:.0f} "
                f"({tokens} target tokens in {end_step - self.start_step} steps, {self.end_time - self.start_time:.1f} s)"
            )


class ValidationScore(keras.callbacks.Callback):
    """At every checkpoint computes a validation score with `score()` -> (value, message),
    prints the message and logs the value as `name` (what `monitor` can choose the best
    weights and stop early on). Each task supplies its own score (sacreBLEU, BLEU-4)."""

    def __init__(self, score, name="val_bleu"):
        super().__init__()
        self.score = score
        self.name = name

    def on_epoch_end(self, epoch, logs=None):
        value, message = self.score()
        if logs is not None:
            logs[self.name] = value
        log(message)


class _CheckpointLine(keras.callbacks.Callback):
    """One line a checkpoint, for logs that are files or pipes (where a progress bar would
    write thousands of `\r` updates): step, losses, validation metrics, throughput, elapsed time."""

    NAMES = {"target_tokens_per_second": "target tokens/s"}

    def __init__(self, num_checkpoints):
        super().__init__()
        self.num_checkpoints = num_checkpoints
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        parts = [f"checkpoint {epoch + 1}/{self.num_checkpoints}", f"step {step}"]
        for name, value in (logs or {}).items():
            if name == "learning_rate":
                continue
            shown = f"{value:.0f}" if name == "target_tokens_per_second" else f"{value:.4g}"
            parts.append(f"{self.NAMES.get(name, name)}: {shown}")
        elapsed = int(time.perf_counter() - self.start)
        parts.append(f"elapsed {elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}")
        log(", ".join(parts))


class _StopAtStep(keras.callbacks.Callback):
    """Ends training at exactly `last_step`: the last checkpoint interval is shorter when
    `max_steps` is not a multiple of it (Keras still ends that interval: validation, checkpoint)."""

    def __init__(self, last_step):
        super().__init__()
        self.last_step = last_step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.last_step:
            self.model.stop_training = True


class _History:
    """Every checkpoint's logs of a run, resumed parts included, kept in training_summary.json
    (written at every checkpoint, so that a killed run keeps its history too): `history` maps
    "step" and each metric to one entry a checkpoint (null where a checkpoint logged no value).

    A resumed run reads the history from `read_path` (the chief's, which every worker sees, so
    that all workers judge divergence alike) up to `up_to_step`, the checkpoint it restarts
    from: later entries are trained again. It writes to `path` (its own write dir)."""

    def __init__(self, path, read_path, up_to_step):
        self.path = Path(path)
        self.records = []
        history = {}
        read_path = Path(read_path)
        if up_to_step and read_path.is_file():
            try:
                history = json.loads(read_path.read_text()).get("history") or {}
            except (OSError, ValueError, AttributeError) as error:
                log(f"warning: {read_path} is unreadable ({error}); the history starts again at step {up_to_step}")
        if history and "step" not in history:
            log(f"warning: {read_path} predates per-checkpoint steps; the history starts again at step {up_to_step}")
        for index, step in enumerate(history.get("step") or []):
            if step <= up_to_step:
                record = {name: values[index] for name, values in history.items() if index < len(values)}
                self.records.append({name: value for name, value in record.items() if value is not None})

    def append(self, step, logs):
        self.records.append({"step": step, **{name: float(value) for name, value in logs.items()}})

    def values(self, name):
        return [record[name] for record in self.records if name in record]

    def write(self, best_name, best_value):
        names = list(dict.fromkeys(name for record in self.records for name in record))
        summary = {
            "step": self.records[-1]["step"] if self.records else 0,
            best_name: best_value,
            "history": {name: [record.get(name) for record in self.records] for name in names},
        }
        rates = self.values("target_tokens_per_second")
        if rates:
            summary["target_tokens_per_second"] = float(np.mean(rates))
        self.path.write_text(json.dumps(summary, indent=2))


class _Divergence:
    """Tells a diverging run: its training loss above `limit` at CHECKPOINTS checkpoints in a row.

    The limit is twice the smaller of the first checkpoint's loss and ln(vocabulary), the loss
    of a model that guesses every token uniformly (which a learning model stays below), and at
    least 1: a healthy run's loss falls from its first checkpoint on, and a loss far above
    uniform guessing means the weights are wrecked, typically by too high a learning rate."""

    CHECKPOINTS = 2

    def __init__(self, vocab_size=None, losses=()):
        self.uniform_loss = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
        self.first = None
        self.in_a_row = 0
        for loss in losses:
            self.update(loss)

    @property
    def limit(self):
        reference = self.first if self.uniform_loss is None else min(self.first, self.uniform_loss)
        return max(1.0, 2 * reference)

    def update(self, loss):
        """Counts the checkpoint's loss; True when it is above the limit."""
        if loss is None or not math.isfinite(loss):
            return False
        if self.first is None:
            self.first = loss
        bad = loss > self.limit
        self.in_a_row = self.in_a_row + 1 if bad else 0
        return bad

    @property
    def diverged(self):
        return self.in_a_row >= self.CHECKPOINTS

    def message(self, loss, step, learning_rate):
        uniform = (
            "" if self.uniform_loss is None
            else f"; a model guessing uniformly among {round(math.exp(self.uniform_loss))} tokens has loss "
            f"{self.uniform_loss:.3g}"
        )
        return (
            f"training diverged: loss {loss:.4g} at step {step} is above {self.limit:.4g} for {self.CHECKPOINTS} "
            f"checkpoints in a row (first checkpoint loss {self.first:.4g}{uniform}); lower --learning-rate "
            f"(now {learning_rate:g}) and start a new run with another --output-dir"
        )


class _CheckpointAndStop(keras.callbacks.Callback):
    """At the end of every interval: tracks the best value of the monitored metric, writes
    training_summary.json and a checkpoint, stops early, and stops with a clear error on a NaN
    loss or a diverging one (`_Divergence`; a diverging checkpoint is never the best, and the
    one that ends the run is not saved).

    `best` holds the best value times the metric's sign, so that higher is always better."""

    def __init__(
        self, manager, chunk, best, bad_chunks, patience, best_path, monitor, verbose, history, divergence, learning_rate
    ):
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
        self.history = history
        self.divergence = divergence
        self.learning_rate = learning_rate

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
        step = int(self.model.optimizer.iterations.numpy())
        loss = float(logs["loss"]) if "loss" in logs else None
        diverging = self.divergence.update(loss)
        self.chunk.assign(epoch + 1)
        monitored = logs.get(self.monitor, logs.get("loss") if self.monitor == "val_loss" else None)
        if not diverging and monitored is not None and self.sign * monitored > float(self.best.numpy()):
            self.best.assign(self.sign * monitored)
            self.bad_chunks.assign(0)
            self.model.save_weights(self.best_path)
        else:
            self.bad_chunks.assign_add(1)
        self.history.append(step, logs)
        self.history.write("best_" + self.monitor, self.sign * float(self.best.numpy()))
        if self.divergence.diverged:
            self.model.stop_training = True
            raise TrainingError(self.divergence.message(loss, step, self.learning_rate))
        self.manager.save(checkpoint_number=step)
        if self.patience and int(self.bad_chunks.numpy()) >= self.patience:
            if self.verbose:
                print(f"early stopping: no better {self.monitor} for {self.patience} checkpoints")
            self.model.stop_training = True


class Trainer:
    """Compiles, restores and fits a model; `fit` can be called again on the same output
    dir after any interruption and continues where the last checkpoint left off.

    With a `tf.distribute` strategy (given, or the one whose scope is active), the model must
    have been built under `strategy.scope()`; the optimizer, loss, metrics and checkpoint
    variables are created under it here. The chief writes `output_dir`; other workers write
    to a temporary dir (`write_dir`) and restore from the chief's checkpoints.
    """

    def __init__(self, model, config: TrainingConfig, strategy=None):
        keras_compat.check(TrainingError)
        self.model = model
        self.config = config
        if strategy is None and tf.distribute.has_strategy():
            strategy = tf.distribute.get_strategy()
        self.strategy = strategy
        self.chief = distribute.is_chief(strategy)
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.write_dir = self.output_dir
        if not self.chief:
            task_type, task_id = distribute.worker_id(strategy)
            self.write_dir = Path(tempfile.mkdtemp(prefix=f"seq2seq-{task_type}{task_id}-"))
            weakref.finalize(self, shutil.rmtree, str(self.write_dir), ignore_errors=True)
        self.schedule = WarmupDecay(
            config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay=config.decay,
            total_steps=config.max_steps,
        )
        if strategy is None:
            optimizer_class, loss_class = FusedAdam, MaskedCrossEntropy
        else:
            self._check_built_under(strategy)
            distribute.patch_keras_trainer(model, strategy)
            optimizer_class, loss_class = distribute.AllReduceThenClipAdam, distribute.DistributedCrossEntropy
        with distribute.scope(strategy):
            optimizer = optimizer_class(self.schedule, global_clipnorm=config.clip_norm or None)
            model.compile(
                optimizer=optimizer,
                loss=loss_class(label_smoothing=config.label_smoothing),
                jit_compile=config.jit_compile,
            )
            optimizer.build(model.trainable_variables)
            self.chunk = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.best = tf.Variable(-float("inf"), dtype=tf.float64, trainable=False)
            self.bad_chunks = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=model,
            optimizer=optimizer,
            model_variables=_all_variables(model),
            chunk=self.chunk,
            best=self.best,
            bad_chunks=self.bad_chunks,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.write_dir / "checkpoints"), max_to_keep=config.keep_checkpoints
        )

    def _check_built_under(self, strategy):
        if not self.model.weights:
            return
        variable = self.model.weights[0]
        if not strategy.extended.variable_created_in_scope(getattr(variable, "value", variable)):
            raise ValueError(
                f"distribution {self.config.distribution!r}: build the model under the strategy's scope "
                "(with seq2seq.distribute.scope(strategy): model = ...; trainer = Trainer(model, config, strategy))"
            )

    @property
    def latest_checkpoint(self):
        """The chief's latest checkpoint, which every worker restores."""
        if self.chief:
            return self.manager.latest_checkpoint
        return tf.train.latest_checkpoint(str(self.output_dir / "checkpoints"))

    @property
    def step(self):
        return int(self.model.optimizer.iterations.numpy())

    def restore(self):
        """Restores the latest checkpoint, if any; returns its path or None."""
        latest = self.latest_checkpoint
        if not latest:
            return None
        if any(name.startswith("model_variables/") for name, _ in tf.train.list_variables(latest)):
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            return latest
        # A checkpoint from before the full variable list: weights, optimizer and counters only.
        legacy = tf.train.Checkpoint(
            model=self.model, optimizer=self.model.optimizer, chunk=self.chunk, best=self.best, bad_chunks=self.bad_chunks
        )
        legacy.restore(latest).assert_existing_objects_matched()
        log(
            f"warning: {latest} predates full-variable checkpoints: dropout random state and "
            "normalization statistics start afresh"
        )
        return latest

    def fit(self, batches: PlannedBatches, validation=None, callbacks=()):
        """Trains until `epochs` passes over the data (or `max_steps`), or early stopping.

        validation: a tf.data dataset of batches, or PlannedBatches (its epoch-0 plan, once;
        under a strategy each global batch is split over the replicas like training batches)."""
        config = self.config
        resumed_from = self.restore()
        steps_per_chunk = config.steps_per_checkpoint or len(batches.plan(0))
        total_steps = config.max_steps or sum(len(batches.plan(e)) for e in range(config.epochs))
        # The intervals left are counted from the step reached, so that a resumed run may
        # change max_steps, epochs or steps_per_checkpoint.
        start_chunk = int(self.chunk.numpy())
        num_chunks = start_chunk + max(0, math.ceil((total_steps - self.step) / steps_per_chunk))
        if resumed_from and config.verbose:
            print(f"resuming from {resumed_from} (step {self.step}, checkpoint {start_chunk} of {num_chunks})")
        if start_chunk >= num_chunks or (config.early_stopping_patience and int(self.bad_chunks.numpy()) >= config.early_stopping_patience):
            if config.verbose:
                print("training already finished for this output dir")
            return None
        # Callbacks that add metrics (e.g. validation BLEU) run before the checkpoint reads them.
        # A progress bar on a terminal; in a log file or pipe one line per checkpoint instead.
        interactive = sys.stdout.isatty()
        throughput = (
            [_Throughput(batches, verbose=config.verbose and interactive)] if batches.target_lengths is not None else []
        )
        checkpoint_lines = [] if interactive or not config.verbose else [_CheckpointLine(num_chunks)]
        history = _History(self.write_dir / SUMMARY_FILE, self.output_dir / SUMMARY_FILE, up_to_step=self.step)
        vocab_size = getattr(getattr(self.model, "decoder", None), "vocab_size", None)
        all_callbacks = [
            _StopAtStep(total_steps),
            *throughput,
            *callbacks,
            *checkpoint_lines,
            _CheckpointAndStop(
                self.manager, self.chunk, self.best, self.bad_chunks, config.early_stopping_patience,
                str(self.write_dir / "best.weights.h5"), config.early_stopping_metric, config.verbose, history,
                _Divergence(vocab_size, history.values("loss")), config.learning_rate,
            ),
        ]
        if config.tensorboard:
            all_callbacks.append(keras.callbacks.TensorBoard(str(self.write_dir / "logs"), update_freq=50))
        try:
            fitted = self.model.fit(
                self._training_data(batches),
                validation_data=self._validation_data(validation),
                epochs=num_chunks,
                initial_epoch=start_chunk,
                steps_per_epoch=steps_per_chunk,
                callbacks=all_callbacks,
                shuffle=False,
                verbose=config.verbose if interactive else 0,
            )
        except distribute.CLUSTER_ERRORS as error:
            if not distribute.is_multi_worker(self.strategy):
                raise
            raise TrainingError(
                distribute.cluster_error_message(error, distribute.worker_id(self.strategy), self.step, self.latest_checkpoint)
            ) from error
        return fitted

    def _training_data(self, batches):
        start = self.step
        if self.strategy is None:
            return batches.stream(start)
        return distribute.distribute_batches(self.strategy, lambda context: batches.stream(start, context))

    def _validation_data(self, validation):
        if not isinstance(validation, PlannedBatches):
            return validation
        if self.strategy is None:
            return validation.epoch_dataset(0)
        return distribute.distribute_batches(self.strategy, lambda context: validation.epoch_dataset(0, context))


def _all_variables(model):
    """Every variable of the model (weights, BatchNorm statistics, dropout seed state).

    Keras 3 keeps layers held in nested lists out of TF's object graph, so `model=` alone
    reaches only part of them; listing the backing tf.Variables puts all in the checkpoint.
    """
    return [variable.value for variable in model.variables]


def restore_model_weights(model, checkpoint_path):
    """Loads a Trainer checkpoint's model weights into a freshly built model.

    Reads the full variable list, and for older checkpoints without it the trainable
    weights through the optimizer's variable list. Checks that every trainable weight was found.
    """
    before = [v.numpy().copy() for v in model.trainable_variables]
    # Only the optimizer's list of the weights it trains: a real optimizer would also match its
    # own slots by position, which differ with the learning-rate type.
    optimizer = keras_compat.optimizer_checkpoint_stub(v.value for v in model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, model_variables=_all_variables(model))
    try:
        checkpoint.restore(str(checkpoint_path)).expect_partial()
    except (ValueError, tf.errors.OpError) as error:
        raise TrainingError(f"{checkpoint_path}: does not fit this model ({error})") from None
    untouched = [
        v.path for v, old in zip(model.trainable_variables, before)
        if v.numpy().size > 1 and np.array_equal(v.numpy(), old)
    ]
    if untouched:
        raise TrainingError(f"{checkpoint_path}: does not hold weights for {untouched[:3]} (a different model?)")
    return model


def average_checkpoints(model, checkpoint_paths):
    """Sets the model weights to the mean of the given checkpoints' model weights.

    Averaging the last few checkpoints is a cheap, reliable gain in BLEU (e.g. Vaswani et al., 2017).
    """
    if not checkpoint_paths:
        raise ValueError("no checkpoints to average")
    totals = None
    for path in checkpoint_paths:
        restore_model_weights(model, path)
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


def sequence_batches(sources, targets, plan_fn, start_id=2, end_id=3, pad_to_multiple=1, source_index=None,
                     augment_sources=None):
    """PlannedBatches for teacher forcing.

    sources: a tf.RaggedTensor of token ids [num_sources, None] (padded with 0 in a batch),
    or a dense tensor [num_sources, ...] (e.g. images or image features); targets: a
    tf.RaggedTensor of token ids [num_examples, None] without start/end tokens; source_index:
    int [num_examples], the source row of each example (default: row i for example i), so
    that an image with five captions is stored once; augment_sources: None, or a function
    (batch sources, example indices) -> batch sources that changes them at random (training-time
    augmentation; drawing from the indices keeps a resumed run's batches exact). Batches are
    ({"source", "target_in": <s> y}, target_out: y </s>).
    """
    targets = tf.cast(targets, tf.int32)
    if source_index is not None:
        source_index = tf.constant(np.asarray(source_index, np.int64))

    def make_batch(indices):
        target = tf.gather(targets, indices)  # ragged [batch, None]
        starts = tf.fill([tf.shape(indices)[0], 1], start_id)
        ends = tf.fill([tf.shape(indices)[0], 1], end_id)
        target_in = _pad_time(tf.concat([starts, target], axis=1).to_tensor(0), pad_to_multiple)
        target_out = _pad_time(tf.concat([target, ends], axis=1).to_tensor(0), pad_to_multiple)
        source = tf.gather(sources, indices if source_index is None else tf.gather(source_index, indices))
        if isinstance(source, tf.RaggedTensor):
            source = _pad_time(source.to_tensor(0), pad_to_multiple)
        if augment_sources is not None:
            source = augment_sources(source, indices)
        return {"source": source, "target_in": target_in}, target_out

    return PlannedBatches(plan_fn, make_batch, target_lengths=targets.row_lengths().numpy() + 1)
