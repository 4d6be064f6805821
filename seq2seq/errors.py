"""The errors commands turn into one line, in a module that imports nothing heavy, so that
data readers without TensorFlow (the caption file readers) and a command's error handling
(`cli.run_main`, before TensorFlow is imported) share them."""


class DataError(ValueError):
    """Bad input data (corpus, caption or vocabulary files, images); the message names the
    file (and line, where there is one) and what to fix."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""
