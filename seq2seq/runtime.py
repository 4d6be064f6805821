"""TensorFlow for a command that only runs exported SavedModels: started without Keras.

`import tensorflow` imports Keras too (TensorFlow loads `keras.src.optimizers` at import, and
Keras then imports matplotlib when it is installed), and `import tensorflow_text`, which a
SavedModel with subword tokenizers needs for its ops, reaches for `tf.keras` as well. A SavedModel
needs neither: only TensorFlow Text's op kernels, which `tf.load_op_library` registers from the
package's own libraries. Started so, the imports of a one-sentence `translate` before its model
loads took 3.2-5.2 s instead of 5.4-6.0 s (`python -X importtime`, three runs each, 2026-12-07,
a slow hour on this 2-core machine; README, Speed, Decoding).

The price: in such a process `tf.keras` and `import tensorflow_text` fail (TensorFlow was told
to use the legacy Keras package, which is absent), so only a command's own process, whose model
is a SavedModel, starts this way; Keras 3 itself (`import keras`) still works.
"""

import importlib.util
import os
import sys
from pathlib import Path

_LEGACY_KERAS = "TF_USE_LEGACY_KERAS"  # TensorFlow's documented switch: read once, at import
_STARTED_WITHOUT_KERAS = [False]


def text_op_libraries():
    """The op libraries (.so) of the installed tensorflow-text package, found without importing
    it; [] when it is not installed or lays its files out differently."""
    spec = importlib.util.find_spec("tensorflow_text")
    if spec is None or not spec.submodule_search_locations:
        return []
    ops_dir = Path(list(spec.submodule_search_locations)[0]) / "python" / "ops"
    return sorted(ops_dir.glob("_*.so"))


def start_without_keras():
    """Imports TensorFlow without Keras and registers TensorFlow Text's ops from its libraries.
    Does nothing (returns False) once TensorFlow or Keras is imported, when the user set
    TF_USE_LEGACY_KERAS, or when tensorflow-text's libraries are not where this expects them;
    then `register_text_ops` imports tensorflow_text as usual."""
    if "tensorflow" in sys.modules or "keras" in sys.modules or _LEGACY_KERAS in os.environ:
        return False
    libraries = text_op_libraries()
    if not libraries:
        return False
    os.environ[_LEGACY_KERAS] = "1"
    try:
        import tensorflow as tf
    finally:
        del os.environ[_LEGACY_KERAS]
    for library in libraries:
        try:
            tf.load_op_library(str(library))
        except (tf.errors.NotFoundError, OSError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise RuntimeError(
                f"cannot load TensorFlow Text's ops from {library} ({reason[:200]}); "
                "reinstall tensorflow-text at the version setup.cfg names"
            ) from None
    _STARTED_WITHOUT_KERAS[0] = True
    return True


def started_without_keras():
    """Whether this process started TensorFlow with `start_without_keras`."""
    return _STARTED_WITHOUT_KERAS[0]


def register_text_ops():
    """Makes TensorFlow Text's ops (SentencePiece and the other tokenizers of subword exports)
    known to TensorFlow, before a SavedModel that uses them is loaded."""
    if not started_without_keras():
        import tensorflow_text  # noqa: F401
