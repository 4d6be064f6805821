"""Training on several GPUs or machines with `tf.distribute`, with the results of one device.

`TrainingConfig.distribution` picks the strategy (`make_strategy`):
  "none"          no strategy (the default; the code path of a plain `model.fit`),
  "mirrored"      `MirroredStrategy`: every local GPU, or the CPU when there is none,
  "multi_worker"  `MultiWorkerMirroredStrategy`: the cluster is read from `TF_CONFIG`;
                  it must be created before TensorFlow runs any op.

The batch size in the config is the GLOBAL batch: every global batch of the plan
(`PlannedBatches`) is cut into `num_replicas_in_sync` slices, and each worker's input
pipeline makes only the slices of its own replicas (`replica_slices`), so there is no
auto-sharding (policy OFF): the workers together train on exactly the batches a single
worker would. Two further pieces make the update that of one device:
  - the loss of a replica is its share of the global batch's token mean (its token sum
    over the tokens of the whole global batch, `DistributedCrossEntropy`), so the replicas'
    gradients add up to the single-device gradient whatever their token counts;
  - gradients are summed over replicas before being clipped by their global norm
    (`AllReduceThenClipAdam`); Keras clips each replica's share first.

Only the chief writes to the output dir; the other workers write their checkpoints, logs and
best weights to a temporary dir (`Trainer.write_dir`), as TensorFlow's multi-worker guide does, and
all restore from the chief's checkpoints, so the output dir must be on storage every worker
sees (NFS, GCS).
"""

import contextlib
import json
import os
import re

import keras
import numpy as np
import tensorflow as tf

from seq2seq import keras_compat
from seq2seq.losses import MaskedCrossEntropy
from seq2seq.optimizers import FusedAdam

STRATEGIES = ("none", "mirrored", "multi_worker")

# Errors a surviving worker gets when a peer dies or hangs in a collective op.
CLUSTER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)


def make_strategy(name):
    """The tf.distribute strategy for `name` (one of STRATEGIES); None for "none"."""
    if name not in STRATEGIES:
        raise ValueError(f"distribution must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "none":
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if not os.environ.get("TF_CONFIG"):
        raise ValueError(
            "distribution 'multi_worker' reads the cluster from the TF_CONFIG environment variable, which is not "
            "set; give every worker its TF_CONFIG (see the README), or use 'mirrored' for the GPUs of one machine"
        )
    try:
        cluster = json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from None
    if not cluster.get("cluster") or not cluster.get("task"):
        raise ValueError('TF_CONFIG needs "cluster" and "task", e.g. {"cluster": {"worker": ["host1:port", '
                         '"host2:port"]}, "task": {"type": "worker", "index": 0}}')
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:
        if "program startup" not in str(error) and "initialized" not in str(error):
            raise
        raise RuntimeError(
            "distribution 'multi_worker' must be set up before TensorFlow runs any op: call "
            "seq2seq.distribute.make_strategy first thing in the program"
        ) from error


def scope(strategy):
    """`strategy.scope()`, or a no-op context for no strategy."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def is_multi_worker(strategy):
    return strategy is not None and keras_compat.in_multi_worker_mode(strategy)


def worker_id(strategy):
    """(task type, task index) of this process; ("chief", 0) without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None or not resolver.task_type:
        return "chief", 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy):
    """True in the one process that writes the output dir (worker 0, or the "chief" task)."""
    if not is_multi_worker(strategy):
        return True
    return strategy.extended.should_checkpoint


def barrier(strategy):
    """Waits until every worker gets here (an all-reduce of a dummy value)."""
    if is_multi_worker(strategy):
        ones = strategy.run(lambda: tf.ones([]))
        strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None).numpy()


def replica_slices(indices, input_context=None):
    """The slices of one global batch `indices` that this input pipeline makes, in replica order.

    The global batch is cut into `num_replicas_in_sync` contiguous slices of sizes differing by
    at most one (contiguous: the plan sorts by length within a batch, so each slice pads
    little); pipeline p of P feeds the replicas p * R/P ... (p + 1) * R/P - 1. A slice is empty
    when the batch has fewer examples than there are replicas."""
    if input_context is None:
        return [indices]
    pieces = np.array_split(np.asarray(indices, dtype=np.int64), input_context.num_replicas_in_sync)
    local = input_context.num_replicas_in_sync // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * local
    return pieces[first : first + local]


def distribute_batches(strategy, dataset_fn):
    """A distributed dataset from `dataset_fn(input_context)`, which makes per-replica batches."""
    return strategy.distribute_datasets_from_function(dataset_fn)


def patch_keras_trainer(model, strategy):
    """Works around two bugs of Keras 3's TensorFlow trainer under a strategy, on this model only.

    1. fit and evaluate build the compiled loss and metrics from the first distributed batch
       reduced across replicas with `strategy.reduce("MEAN", ...)` (`_maybe_symbolic_build`),
       which fails for dict inputs (keras-team/keras#20329) and for replica batches of
       different shapes (ours are padded per replica). Only shapes and dtypes matter for the
       build, so this worker's first replica batch is used.
    2. Under MultiWorkerMirroredStrategy the scalar metric results of every step are reduced
       with `strategy.reduce("MEAN", value, axis=0)`, which fails for scalars
       (tensorflow/tensorflow#72388); the steps return them with shape [1] instead. The
       per-batch logs are then the mean over replicas of their running means; the logs at
       the end of an interval (checkpoint, early stopping, history) read the metrics
       aggregated over all replicas.
    """
    if is_multi_worker(strategy):
        for name in ("train_step", "test_step"):
            setattr(model, name, _with_rank_1_outputs(getattr(model, name)))

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local, next(batches))
                break
        with strategy.scope():
            keras_compat.symbolic_build(model, data_batch)

    keras_compat.replace_symbolic_build(model, maybe_symbolic_build)


def _with_rank_1_outputs(step):
    def step_with_rank_1_outputs(data):
        outputs = step(data)
        return tf.nest.map_structure(lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v, outputs)

    return step_with_rank_1_outputs


@keras.saving.register_keras_serializable(package="seq2seq")
class DistributedCrossEntropy(MaskedCrossEntropy):
    """MaskedCrossEntropy whose value on a replica is that replica's share of the global
    batch's mean: mean over its tokens * its tokens / all replicas' tokens.

    The shares add up to the token mean of the whole global batch, so gradients summed over
    replicas equal those of one device however unevenly the tokens fall. (Keras divides a
    loss by the number of replicas only when it reduces a per-example loss; this one is a
    scalar.) Outside a replica context, or with one replica, it is MaskedCrossEntropy."""

    def call(self, y_true, y_pred):
        mean = super().call(y_true, y_pred)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return mean
        tokens = tf.reduce_sum(tf.cast(tf.not_equal(tf.cast(y_true, tf.int32), self.pad_id), tf.float32))
        all_tokens = context.all_reduce(tf.distribute.ReduceOp.SUM, tokens)
        return mean * tf.maximum(tokens, 1.0) / tf.maximum(all_tokens, 1.0)


@keras.saving.register_keras_serializable(package="seq2seq")
class AllReduceThenClipAdam(FusedAdam):
    """Adam that sums the replicas' gradients before clipping them by global norm.

    Keras clips each replica's gradients and then sums them, which clips the shares of the
    gradient rather than the gradient, so a clipped step would differ from a single device's.
    Here `_clip_gradients` does the all-reduce and `_all_reduce_sum_gradients` (called
    afterwards by Keras's TensorFlow optimizer) passes the summed gradients through: private
    methods, listed in `keras_compat.OPTIMIZER_OVERRIDES`, which checks that they exist."""

    def _clip_gradients(self, grads):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            present = [i for i, g in enumerate(grads) if g is not None]
            summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
            grads = list(grads)
            for i, g in zip(present, summed):
                grads[i] = g
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def cluster_error_message(error, worker, step, latest_checkpoint):
    """A one-paragraph explanation of a collective-op failure (a worker died or hung)."""
    text = str(error)
    unhealthy = sorted(set(re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text.split("unhealthy", 1)[1]))) if "unhealthy" in text else []
    if unhealthy:
        cause = ", ".join(f"{job} {task}" for job, task in unhealthy) + " stopped (no heartbeats)"
    else:
        detail = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text.strip().splitlines()[0] if text.strip() else "")
        cause = f"another worker stopped or is unreachable ({type(error).__name__}: {detail[:200]})"
    resume = (
        f"training resumes from the last checkpoint, {latest_checkpoint}"
        if latest_checkpoint
        else "no checkpoint was written yet, so training starts again from the beginning"
    )
    return (
        f"{worker[0]} {worker[1]} lost contact with the cluster at step {step}: {cause}. Restart every worker "
        f"with the same command and TF_CONFIG; {resume}"
    )
