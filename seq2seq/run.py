"""The run lifecycle both tasks go through: the precision, who writes the run directory, the
trained weights a run or an export holds, and writing an export.

A task's `train(config)` is `train_under_precision(config, its_train)`; its own training
function makes the `tf.distribute` strategy first thing (a multi-worker strategy must exist
before TensorFlow runs any op), then gets its run from `open_run`, and builds, fits and
returns the model. Only the chief writes the run directory; the other workers read it once
the chief has written it.
"""

from pathlib import Path

import tensorflow as tf

from seq2seq import distribute
from seq2seq.cli import log
from seq2seq.config import RUN_CONFIG
from seq2seq.errors import DataError
from seq2seq.model import quantize_weights
from seq2seq.precision import describe_precision, precision_scope
from seq2seq.training import average_checkpoints, restore_model_weights


def train_under_precision(config, train):
    """Resolves `config.training.precision` ("auto" becomes what this CPU or GPU runs best),
    records the choice in the config and calls `train(config, precision_note)` under it;
    the note says in the log which precision and why."""
    requested = config.training.precision
    with precision_scope(requested, verbose=False) as precision:
        config.training.precision = precision
        return train(config, describe_precision(requested, precision))


def open_run(config, strategy, load, create, holds="vocabularies", prepare=None):
    """The run in `config.training.output_dir` for this process.

    On the chief: the run already there (resumed, with this config's training section) or
    `create()` (a new one), then `prepare(run)` for any further file the workers need. The
    other workers wait for the chief, check that it wrote the run, and `load(run_dir)` it.
    `holds` names what a resumed run keeps besides its config, for the log line.
    """
    chief = distribute.is_chief(strategy)
    run_dir = Path(config.training.output_dir)
    run_config = run_dir / RUN_CONFIG

    def resumed():
        run = load(run_dir)
        run.config.training = config.training
        return run

    if chief:
        if run_config.is_file():
            log(f"{run_dir} holds a run: continuing it with its saved config and {holds}")
            run = resumed()
        else:
            run = create()
        if prepare is not None:
            prepare(run)
    distribute.barrier(strategy)
    if not chief:
        if not run_config.is_file():
            raise DataError(
                f"{run_dir}: the chief's run directory is not visible here; the output dir must be on storage "
                "every worker sees (e.g. NFS or GCS)"
            )
        run = resumed()
    return run


def load_trained_weights(model, run_dir, weights="best", average_last=None):
    """Loads a run's trained weights into `model`: "best" (best.weights.h5, else the last
    checkpoint), "last" (the last checkpoint), or the average of the last `average_last`."""
    run_dir = Path(run_dir)
    checkpoints = tf.train.get_checkpoint_state(str(run_dir / "checkpoints"))
    paths = list(checkpoints.all_model_checkpoint_paths) if checkpoints else []
    if average_last:
        if not paths:
            raise DataError(f"{run_dir}: no checkpoints to average")
        average_checkpoints(model, paths[-average_last:])
    elif weights == "best" and (run_dir / "best.weights.h5").is_file():
        model.load_weights(run_dir / "best.weights.h5")
    elif paths:
        restore_model_weights(model, paths[-1])
    else:
        raise DataError(f"{run_dir}: no trained weights yet (no best.weights.h5 and no checkpoint)")
    return model


def save_export(module, export_dir, signatures, config):
    """Writes `module` as a SavedModel with `signatures` into the new or empty `export_dir`,
    with the run's config in assets.extra/config.yaml; returns assets.extra for the task's
    own files (vocabularies, tokenizer models)."""
    export_dir = Path(export_dir)
    if export_dir.exists() and any(export_dir.iterdir()):
        raise DataError(f"{export_dir} exists and is not empty; choose a new version number")
    tf.saved_model.save(module, str(export_dir), signatures=signatures)
    extra = export_dir / "assets.extra"
    extra.mkdir(exist_ok=True)
    config.save(extra / RUN_CONFIG)
    return extra


def restore_exported_weights(model, export_dir):
    """Assigns the weights of a SavedModel this toolkit exported (its `model_variables`) to
    `model`, built from the export's config, checking that every weight's shape and dtype
    match. An int8 export's values go to a quantized model unchanged."""
    saved = _weights(tf.saved_model.load(str(export_dir)).model_variables)
    if any(variable.dtype == tf.int8 for variable in saved):
        quantize_weights(model)
    variables = _weights(model.variables)
    if len(saved) != len(variables):
        raise DataError(f"{export_dir}: {len(saved)} weights, but its config builds a model with {len(variables)}")
    for variable, value in zip(variables, saved):
        if tuple(variable.shape) != tuple(value.shape) or variable.dtype != value.dtype.name:
            raise DataError(
                f"{export_dir}: weight {variable.path} is {value.dtype.name}{list(value.shape)} in the export, "
                f"{variable.dtype}{list(variable.shape)} in the model its config builds"
            )
        variable.assign(value)
    return model


def _weights(variables):
    """The variables that hold weights: random-generator states (of dropout layers, which
    differ between versions and do nothing at inference) left out."""
    return [variable for variable in variables if "seed_generator_state" not in variable.name]
