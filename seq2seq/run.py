"""The run lifecycle both tasks train through: the precision, and who writes the run directory.

A task's `train(config)` is `train_under_precision(config, its_train)`; its own training
function makes the `tf.distribute` strategy first thing (a multi-worker strategy must exist
before TensorFlow runs any op), then gets its run from `open_run`, and builds, fits and
returns the model. Only the chief writes the run directory; the other workers read it once
the chief has written it.
"""

from pathlib import Path

from seq2seq import distribute
from seq2seq.cli import log
from seq2seq.precision import describe_precision, precision_scope


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

    def resumed():
        run = load(run_dir)
        run.config.training = config.training
        return run

    if chief:
        if (run_dir / "config.yaml").is_file():
            log(f"{run_dir} holds a run: continuing it with its saved config and {holds}")
            run = resumed()
        else:
            run = create()
        if prepare is not None:
            prepare(run)
    distribute.barrier(strategy)
    if not chief:
        distribute.check_chief_wrote(run_dir)
        run = resumed()
    return run
