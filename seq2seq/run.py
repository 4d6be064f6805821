"""The run lifecycle both tasks go through: the precision, who writes the run directory, the
trained weights a run or an export holds, and writing an export.

A task's `train(config)` is `train_under_precision(config, its_train)`; its own training
function makes the `tf.distribute` strategy first thing (a multi-worker strategy must exist
before TensorFlow runs any op), then trains inside `with open_run(...) as run:`: builds,
fits and returns the model. Only the chief writes the run directory, and it holds the
directory's lock meanwhile (one train process a directory); the other workers read it once
the chief has written it. A run directory counts as a run from its first checkpoint on: a
start that failed before it is started again, and a resumed run keeps its saved data,
tokenization, model and optimisation settings (`resumed_config`).
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

import keras
import tensorflow as tf

from seq2seq import distribute
from seq2seq.cli import SEARCH_FILE, load_saved_model, log
from seq2seq.config import RUN_CONFIG, may_change_on_resume
from seq2seq.errors import DataError
from seq2seq.model import build_in_bfloat16, quantize_weights
from seq2seq.precision import describe_precision, precision_scope
from seq2seq.training import TRAINER_FILES, TrainingError, average_checkpoints, restore_model_weights

LOCK_FILE = "train.lock"  # held by the train process that writes the run directory (`run_lock`)


def train_under_precision(config, train):
    """Resolves `config.training.precision` ("auto" becomes what this CPU or GPU runs best),
    records the choice in the config and calls `train(config, precision_note)` under it;
    the note says in the log which precision and why."""
    requested = config.training.precision
    with precision_scope(requested, verbose=False) as precision:
        config.training.precision = precision
        return train(config, describe_precision(requested, precision))


@contextlib.contextmanager
def open_run(config, strategy, load, create, holds="vocabularies", prepare=None, files=()):
    """The run in `config.training.output_dir` for this process, for the `with` block that trains it.

    Only the chief writes the run directory, and it holds the directory's lock (`run_lock`)
    for the whole block. A directory whose run reached its first checkpoint is resumed
    (`resumed_config`: its saved config, with the settings given now that may change on resume);
    any other is a new run, `create()`, after removing what a start that never reached its
    first checkpoint left behind (config.yaml, the task's `files`, the Trainer's files). Then
    `prepare(run)` writes any further file the workers need. The other workers wait for the
    chief, check that it wrote the run, and `load(run_dir)` it. The random seeds are set to the
    run's seed before the run is loaded or created (before any tokenizer exists: seeding
    clears TensorFlow's kernel cache, which would free a SentencePiece op's model).
    `holds` names what a resumed run keeps besides its config, for the log line.
    """
    chief = distribute.is_chief(strategy)
    run_dir = Path(config.training.output_dir)
    with run_lock(run_dir) if chief else contextlib.nullcontext():
        if chief:
            run = _open_on_chief(config, run_dir, load, create, holds, files)
            if prepare is not None:
                prepare(run)
        distribute.barrier(strategy)
        if not chief:
            if not (run_dir / RUN_CONFIG).is_file():
                raise DataError(
                    f"{run_dir}: the chief's run directory is not visible here; the output dir must be on storage "
                    "every worker sees (e.g. NFS or GCS)"
                )
            run, _ = _resume(config, run_dir, load)
        yield run


def _open_on_chief(config, run_dir, load, create, holds, files):
    has_checkpoint = tf.train.latest_checkpoint(str(run_dir / "checkpoints")) is not None
    if (run_dir / RUN_CONFIG).is_file() and has_checkpoint:
        run, changes = _resume(config, run_dir, load)
        if changes:
            run.config.save(run_dir / RUN_CONFIG)
        changed = f"; changed: {', '.join(changes)}" if changes else ""
        log(f"{run_dir} holds a run: continuing it with its saved config and {holds}{changed}")
        return run
    if has_checkpoint:
        raise DataError(
            f"{run_dir} holds checkpoints but no {RUN_CONFIG}: put the run's {RUN_CONFIG} back to resume it, "
            "or choose another --output-dir"
        )
    left = [name for name in (RUN_CONFIG, *files, *TRAINER_FILES) if (run_dir / name).exists()]
    if left:
        log(
            f"{run_dir} holds a start that never reached its first checkpoint (it failed or was stopped): "
            f"starting the run again, without its {', '.join(left)}"
        )
        for name in left:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    keras.utils.set_random_seed(config.training.seed)
    return create()


def _resume(config, run_dir, load):
    """The run saved in `run_dir`, with the config it continues with, and the changes to its
    saved config (`resumed_config`)."""
    run_config, changes = resumed_config(type(config).load(run_dir / RUN_CONFIG), config, run_dir)
    keras.utils.set_random_seed(run_config.training.seed)
    run = load(run_dir)
    run.config = run_config
    return run, changes


def resumed_config(saved, config, run_dir):
    """The config a resumed run trains with, and its changes ("training.max_steps 30 -> 60").

    It is `saved` (the run's config.yaml) with the settings `config` gives (its `given` fields,
    which the user set in a config file or a flag; every field of a config not made by
    `from_dict`) that may change on resume (`option(..., may_change_on_resume=True)`: how long
    and how visibly the run trains, its validation data, the devices), the output dir, and the
    precision this process trains in (`train_under_precision` resolved it). A given setting
    that differs from the saved one and may not change (the data, tokenization, model,
    batching or how it learns) is a DataError naming each with both values. A path that
    names the same file as the saved one counts as the same, spelled as given now.
    """
    values = saved.to_dict()
    refused, changes = [], []
    for name, section_class in type(saved).SECTIONS.items():
        given = None if config.given is None else config.given.get(name, set())
        for field in dataclasses.fields(section_class):
            always = (name, field.name) == ("training", "precision")
            if field.name == "output_dir" or (given is not None and field.name not in given and not always):
                continue
            old, new = getattr(getattr(saved, name), field.name), getattr(getattr(config, name), field.name)
            if old == new:
                continue
            if _same_file(old, new):
                values[name][field.name] = new
            elif may_change_on_resume(field):
                values[name][field.name] = new
                changes.append(f"{name}.{field.name} {old!r} -> {new!r}")
            else:
                refused.append(f"{name}.{field.name} {old!r} (now {new!r})")
    if refused:
        raise DataError(
            f"{run_dir} holds a run trained with other settings, which a resumed run keeps: {', '.join(refused)}; "
            f"give its own (see {run_dir / RUN_CONFIG}) to continue it, or choose another --output-dir for a new run"
        )
    values["training"]["output_dir"] = config.training.output_dir
    return type(saved).from_dict(values), changes


def _same_file(old, new):
    """Whether two settings are paths of the same existing file (spelled from different folders)."""
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    try:
        return os.path.samefile(old, new)
    except OSError:
        return False


@contextlib.contextmanager
def run_lock(run_dir):
    """Holds the lock of the run directory (its train.lock file) for the block, so that one
    train process at a time writes it: another gets a one-line TrainingError naming the holder
    (the pid and host it wrote into the file). The lock is the kernel's (flock), released
    when its process ends however it ends (kill -9 too): a lock file left behind blocks no
    one. On a file system without locks, a warning says that nothing guards the directory.
    A directory this call created is removed again if the block leaves nothing but the lock
    in it (a start that failed its checks leaves no empty run directory behind)."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        with _held(run_dir, path):
            yield
    finally:
        if created and [entry.name for entry in run_dir.iterdir()] == [LOCK_FILE]:
            path.unlink()
            run_dir.rmdir()


@contextlib.contextmanager
def _held(run_dir, path):
    """The flock on `path` for the block (`run_lock`)."""
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise TrainingError(
                f"run directory {run_dir} is in use by another train process ({_lock_holder(file.read())}); "
                "wait for it to end or choose another --output-dir"
            ) from None
        except OSError as error:
            log(f"warning: cannot lock {path} ({error.strerror}); make sure no other train process writes {run_dir}")
            locked = False
        if locked:
            file.truncate()
            file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
            file.flush()
        yield


def _lock_holder(text):
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}"
    except (ValueError, TypeError, KeyError):
        return "its pid is unknown"


def checkpoint_paths(run_dir):
    """The checkpoints a run keeps, oldest first ([] before its first)."""
    checkpoints = tf.train.get_checkpoint_state(str(Path(run_dir) / "checkpoints"))
    return list(checkpoints.all_model_checkpoint_paths) if checkpoints else []


def load_trained_weights(model, run_dir, weights="best", average_last=None):
    """Loads a run's trained weights into `model`: "best" (best.weights.h5, else the last
    checkpoint), "last" (the last checkpoint), or the average of the last `average_last`
    (at least 1, and no more than the run keeps: an error says how many it has)."""
    run_dir = Path(run_dir)
    paths = checkpoint_paths(run_dir)
    if average_last is not None:
        if average_last < 1:
            raise ValueError(f"average_last must be at least 1, got {average_last}")
        if not paths:
            raise DataError(f"{run_dir}: no checkpoints to average")
        if average_last > len(paths):
            raise DataError(f"{run_dir}: cannot average the last {average_last} checkpoints, "
                            f"the run has only {len(paths)}")
        average_checkpoints(model, paths[-average_last:])
    elif weights == "best" and (run_dir / "best.weights.h5").is_file():
        model.load_weights(run_dir / "best.weights.h5")
    elif paths:
        restore_model_weights(model, paths[-1])
    else:
        raise DataError(f"{run_dir}: no trained weights yet (no best.weights.h5 and no checkpoint)")
    return model


def save_export(module, export_dir, signatures, config, beam_size, length_penalty):
    """Writes `module` as a SavedModel with `signatures` into the new or empty `export_dir`,
    with the run's config in assets.extra/config.yaml and the search serving_default runs
    (beam_size, length_penalty) in assets.extra/search.json, which the commands take as their
    defaults for this model; returns assets.extra for the task's own files (vocabularies,
    tokenizer models)."""
    export_dir = Path(export_dir)
    if export_dir.exists() and any(export_dir.iterdir()):
        raise DataError(f"{export_dir} exists and is not empty; choose a new version number")
    tf.saved_model.save(module, str(export_dir), signatures=signatures)
    extra = export_dir / "assets.extra"
    extra.mkdir(exist_ok=True)
    config.save(extra / RUN_CONFIG)
    (extra / SEARCH_FILE).write_text(json.dumps({"beam_size": beam_size, "length_penalty": length_penalty}) + "\n")
    return extra


def restore_exported_weights(build_model, export_dir):
    """A model built by `build_model()` (from the export's config) with the weights of a
    SavedModel this toolkit exported (its `model_variables`), checking that every weight's
    shape and dtype match. An int8 export's values go to a quantized model unchanged; a
    bfloat16 export's to a model built in bfloat16 (`build_in_bfloat16`)."""
    saved = _weights(load_saved_model(export_dir).model_variables)
    bfloat16 = any(variable.dtype == tf.bfloat16 for variable in saved)
    model = build_in_bfloat16(build_model) if bfloat16 else build_model()
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
