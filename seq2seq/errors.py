"""The error both tasks raise for bad input data, in a module that imports nothing heavy,
so that data readers without TensorFlow (the caption file readers) share it."""


class DataError(ValueError):
    """Bad input data (corpus, caption or vocabulary files, images); the message names the
    file (and line, where there is one) and what to fix."""
