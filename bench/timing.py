"""Shared by the benchmark scripts: per-step wall time of Keras `fit`."""

import time

import keras


class StepTimer(keras.callbacks.Callback):
    """Records the wall time of every training step (the first ones include tracing)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)
