"""Shared command-line plumbing: quiet TensorFlow, flags from config dataclasses, one-line errors."""

import argparse
import dataclasses
import json
import math
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from seq2seq.config import RUN_CONFIG, field_bounds, field_choices, field_default, field_doc
from seq2seq.quiet import native_logs_filtered

USER_TF_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")  # the user's own choice, which we leave alone
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # what TensorFlow logs after its start-up

EXIT_USAGE = 2
# The widest beam the decoding commands take: time and memory grow in proportion to the beam
# (beam 1000 took 127 s and 4.7 GB for 16 sentences), and beams past a few dozen decode no better.
MAX_BEAM_SIZE = 64
# Each task's model as the user reads it, and the command that runs it.
TASK_MODELS = {"translation": "a translation model", "captioning": "an image-captioning model"}
TASK_COMMANDS = {"translation": "python -m seq2seq.translate", "captioning": "python -m seq2seq.caption"}


def prefer_onednn_products():
    """Turns on TensorFlow's oneDNN kernels for a training process, unless the user set
    TF_ENABLE_ONEDNN_OPTS. TensorFlow enables them by itself only on CPUs with AVX512-VNNI or
    newer units; on an AVX2-only CPU (AMD EPYC, 2 cores, 2026-12-08) they trained config A in
    float32 10-15% faster than Eigen's kernels (`bench/profile_training.py --no-profile`, 60
    steps, two rounds each: 604 / 665 against 698 / 718 ms a step). `main` calls it for
    `train`; it must run before TensorFlow is imported, and afterwards changes nothing."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def log(message):
    """A progress or warning line for the user, on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


class CommandError(Exception):
    """An error to show the user as one line, with a non-zero exit code."""


def positive_int(text, least=1):
    """argparse type: an integer of at least `least`, 1 unless told (a count: checkpoints,
    hypotheses, batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def non_negative_int(text):
    """argparse type: an integer of at least 0 (a count where 0 means none)."""
    return positive_int(text, least=0)


def beam_width(text):
    """argparse type: a beam width from 1 (greedy search) to MAX_BEAM_SIZE."""
    value = positive_int(text)
    if value > MAX_BEAM_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_BEAM_SIZE}, got {value} (decoding time and memory grow with the beam)"
        )
    return value


def finite_float(text):
    """argparse type: a number other than nan or infinity (the search scores with it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


def _base_type(annotation):
    """int | None -> int; bool -> bool; str -> str."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"int": int, "float": float, "str": str, "bool": bool, "None": None})
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def add_dataclass_flags(parser, section_name, section_class, skip=()):
    """Adds one flag per field of a config dataclass, its help made of the field's doc, choices and
    default (`seq2seq.config.option`); unset flags stay None (the config file or default wins)."""
    group = parser.add_argument_group(f"{section_name} options (override the config file)")
    for field in dataclasses.fields(section_class):
        if field.name in skip:
            continue
        kind = _base_type(field.type)
        dest = f"{section_name}.{field.name}"
        help_text = flag_help(field)
        if kind is bool:
            group.add_argument(flag_name(field.name), dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = field_choices(section_class, field)
        # Shown, not enforced here: the config checks them, with the one-line error a YAML file gets.
        metavar = "{" + ",".join(str(c) for c in choices if c is not None) + "}" if choices else kind.__name__.upper()
        group.add_argument(flag_name(field.name), dest=dest, type=kind, default=None, metavar=metavar, help=help_text)


def flag_help(field):
    """`doc; BOUNDS (default: X)` of a config field, e.g. "...; in [0, 1) (default: 0.2)";
    argparse's % formatting escaped."""
    if field.default is dataclasses.MISSING:
        default = "required, here or in the config file"
    else:
        default = f"default: {field_default(field)}"
    bounds = field_bounds(field)
    allowed = f"; {bounds}" if bounds is not None else ""
    return f"{field_doc(field)}{allowed} ({default})".replace("%", "%%")


def command_parser(prog, description):
    """A command's parser (with the global flags) and its subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_global_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do; COMMAND --help lists its flags")
    return parser, commands


def add_export_command(commands, description, task, beam_size, length_penalty, handler):
    """The `export` subcommand with the flags every task's export has; returns it for the task's own."""
    export = commands.add_parser("export", help="write a SavedModel for TF Serving",
                                 description="Export a run as a SavedModel in TF Serving's <model>/<version>/ layout. "
                                 + description)
    export.add_argument("--output", default=str(Path("saved_models") / task),
                        help=f"model dir; the version folder goes inside (default: saved_models/{task} in the current directory)")
    export.add_argument("--version", type=int, help="version number (default: the next free one)")
    export.add_argument("--beam-size", type=beam_width, default=beam_size,
                        help=f"beam width of serving_default, 1 to {MAX_BEAM_SIZE} (default: {beam_size})")
    export.add_argument("--length-penalty", type=finite_float,
                        help="GNMT alpha of the exported searches (default: with one --from-model, the one it was "
                             f"exported with; else {length_penalty})")
    export.set_defaults(fallback_length_penalty=length_penalty)
    export.add_argument("--weights", choices=("best", "last"), default="best", help="which weights (default: best)")
    export.set_defaults(handler=handler)
    return export


def add_train_command(commands, load_config_class, description, handler, metric):
    """The `train` subcommand of a task: --config YAML, --no-validation-bleu, and one flag per
    field of every section of the config class `load_config_class()` returns (a SectionedConfig).
    Importing that class imports Keras and TensorFlow, so when `main` parses another subcommand
    the flags are left out and the class is not imported."""
    train = commands.add_parser("train", help="train a model (resumes when the output dir holds a run)",
                                description=f"{description} Started again on the same --output-dir, it resumes from "
                                "the last checkpoint.")
    train.set_defaults(handler=handler, tears_down=True)
    if _COMMAND_BEING_PARSED[0] not in (None, "train"):
        return train
    config_class = load_config_class()
    train.add_argument("--config", help=f"YAML config with sections {', '.join(config_class.SECTIONS)}; flags "
                       "override it (default: none, the flags and built-in defaults only)")
    train.add_argument("--no-validation-bleu", action="store_true",
                       help=f"skip the greedy validation {metric} at each checkpoint (default: computed)")
    for name, section in config_class.SECTIONS.items():
        add_dataclass_flags(train, name, section)
    return train


_COMMAND_BEING_PARSED = [None]  # set by `main` while it builds its parser: the subcommand argv names


def requested_command(argv):
    """The subcommand argv names (its first word that is not a flag; the global flags take no
    value), or None."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def flag_overrides(args):
    """{"section": {"field": value}} for every flag the user set."""
    overrides = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, field = key.split(".", 1)
            overrides.setdefault(section, {})[field] = value
    return overrides


def train_config(config_class, args):
    """The training config of a `train` command: `--config` YAML (if given) with the flags set
    on top; one config path for every task. Refuses a config without an output directory."""
    values = config_class.values_with_overrides(args.config, flag_overrides(args))
    if not (values.get("training") or {}).get("output_dir"):
        raise CommandError("give an output directory: --output-dir DIR (or training.output_dir in the config)")
    return config_class.from_dict(values)


def add_global_flags(parser):
    """The flags every command has before its subcommand: --version and --tf-logs."""
    from seq2seq import TESTED_WITH, __version__

    parser.add_argument("--version", action="version", version=f"seq2seq {__version__} (verified with {TESTED_WITH})",
                        help="print the version and exit")
    parser.add_argument("--tf-logs", action="store_true",
                        help="show TensorFlow's native log lines on stderr (hidden by default; with "
                             "TF_CPP_MIN_LOG_LEVEL set in the environment, TensorFlow's own filtering applies)")


def main(build_parser, argv=None, exit_process=False):
    """A command's `main`: parses argv and runs its subcommand, with TensorFlow's native log
    lines kept off stderr throughout (building `train`'s parser already imports TensorFlow)
    unless --tf-logs or the user's own TF_CPP_MIN_LOG_LEVEL asks for them.

    exit_process (the console commands): ends the process when the subcommand is done, and,
    except after `train` (whose background threads may still write), without Python's and
    TensorFlow's teardown, which took 1.3 s after a one-sentence `translate` of the
    Transformer export; every file is closed and the output flushed by then."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    with native_logs_filtered("--tf-logs" not in argv and USER_TF_LOG_LEVEL is None):
        _COMMAND_BEING_PARSED[0] = requested_command(argv)
        if _COMMAND_BEING_PARSED[0] == "train":
            prefer_onednn_products()  # before the parser, which imports TensorFlow
        try:
            args = build_parser().parse_args(argv)
        finally:
            _COMMAND_BEING_PARSED[0] = None
        args.own_process = exit_process
        code = run_main(args.handler, args)
    if not exit_process:
        return code
    if not getattr(args, "tears_down", False):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        else:
            os._exit(code)
    sys.exit(code)


def run_main(handler, args):
    """Runs a subcommand, turning expected errors into one line on stderr and exit code 2."""
    from seq2seq.errors import DataError, TrainingError

    try:
        return handler(args) or 0
    except (CommandError, DataError, TrainingError, ValueError, FileNotFoundError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_model(name):
    """A shipped model's folder: inside the installed package (a wheel install puts
    saved_models/ there) or in the checkout's saved_models/ (an editable install)."""
    for root in (PACKAGE_DIR / "saved_models", PACKAGE_DIR.parent / "saved_models"):
        if (root / name).is_dir():
            return root / name
    return PACKAGE_DIR / "saved_models" / name


def versions(model_dir):
    """(number, folder) of the SavedModel versions in a TF Serving model dir, lowest first."""
    found = [(int(p.name), p) for p in Path(model_dir).glob("*") if p.name.isdigit()]
    return sorted((number, folder) for number, folder in found if (folder / "saved_model.pb").is_file())


def next_version(model_dir):
    """The next free integer version folder under a TF Serving model directory."""
    numbers = [int(p.name) for p in Path(model_dir).glob("*") if p.name.isdigit()]
    return max(numbers, default=0) + 1


def add_search_flags(parser, default_model, model_name, beam_size, length_penalty, batch_size, items, ensembles=False):
    """The flags of the commands that decode with a model: which model and weights, the
    search, and the batch of `items` ("sentences", "images") decoded at once. With `ensembles`,
    --model may be repeated (args.model is then a list, None when not given)."""
    if ensembles:
        parser.add_argument("--model", action="append",
                            help=f"SavedModel, TF Serving model dir or run dir; repeat it to decode with the ensemble "
                                 f"of the models (one target vocabulary) (default: the shipped {model_name})")
        parser.add_argument("--ensemble-combine", choices=("probabilities", "log_probabilities"),
                            default="probabilities",
                            help="how an ensemble averages its members' next-token distributions: the "
                                 "probabilities, or the log-probabilities (default: probabilities)")
    else:
        parser.add_argument("--model", default=str(default_model),
                            help=f"SavedModel, TF Serving model dir or run dir (default: the shipped {model_name})")
    parser.add_argument("--beam-size", type=beam_width, default=beam_size,
                        help=f"beam width, 1 to {MAX_BEAM_SIZE}; 1 is greedy search (default: {beam_size})")
    parser.add_argument("--length-penalty", type=finite_float, default=None,
                        help=f"GNMT length penalty alpha (default: the one a SavedModel was exported with, else "
                             f"{length_penalty})")
    parser.set_defaults(fallback_length_penalty=length_penalty)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"{items} per batch (default: {batch_size})")
    parser.add_argument("--weights", choices=("best", "last"), default="best", help="which weights of a run dir (default: best)")


SEARCH_FILE = "search.json"  # in an export's assets.extra: the search its serving_default runs


def choose_length_penalty(args, path):
    """Sets args.length_penalty, when --length-penalty was not given, to the one the SavedModel
    at `path` was exported with (its assets.extra/search.json: what its recipe chose on
    validation data), or else (a run dir, an in-process ensemble: path None) to the command's default."""
    if args.length_penalty is not None:
        return
    args.length_penalty = args.fallback_length_penalty
    search = None if path is None else Path(path) / "assets.extra" / SEARCH_FILE
    if search is not None and search.is_file():
        try:
            args.length_penalty = float(json.loads(search.read_text())["length_penalty"])
        except (ValueError, KeyError, TypeError) as error:
            raise CommandError(f"{search}: not a search settings file ({error}); delete it or export again") from None


def write_export(write, model_dir, version=None):
    """Calls write(path) for `model_dir/<version>` (default: the next free version) and
    prints where the export went."""
    model_dir = Path(model_dir)
    path = write(model_dir / str(version or next_version(model_dir)))
    print(f"exported: {path}")


def model_path(path, task=None):
    """`path` itself, or for a TF Serving model dir its highest SavedModel version; an error
    when nothing is there, or when it holds a model of another task than `task`."""
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{path}: model not found (give a SavedModel, a TF Serving model dir or a run dir)")
    found = [] if (path / "saved_model.pb").is_file() else versions(path)
    path = found[-1][1] if found else path
    if task is not None:
        check_model_task(path, task)
    return path


def recorded_task(path):
    """The task ("translation" or "captioning") of a run dir or of a SavedModel this toolkit
    exported, told by the config.yaml it holds (only a translation config has a tokenization
    section, only a captioning one a model backbone); None when it holds no readable one."""
    for config in (Path(path) / RUN_CONFIG, Path(path) / "assets.extra" / RUN_CONFIG):
        try:
            values = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if not isinstance(values, dict):
            continue
        if "tokenization" in values:
            return "translation"
        if "backbone" in (values.get("model") or {}):
            return "captioning"
    return None


def check_model_task(path, task):
    """An error naming the right command when the run dir or export `path` holds a model of another task."""
    found = recorded_task(path)
    if found is not None and found != task:
        raise CommandError(f"{path} is {TASK_MODELS[found]}; use {TASK_COMMANDS[found]}")


QUICK_START_LIMIT = 2000  # inputs (sentences) up to which `quick_start` pays


def quick_start():
    """Turns TensorFlow's graph optimizer (Grappler) off for this process, for a command that
    decodes at most QUICK_START_LIMIT inputs: its pass over an export's decoding graph (both
    product precisions, every search) made the first call of the Transformer export take 8-10 s
    instead of 3-4 s, while warm calls gain about 0.5 s per 1,000 sentences with beam 5 from it
    (one intra-op thread, two batches at a time; measured 2026-12-07), which pays only over
    several thousand sentences. Call it before loading a model, and only in a process of the
    command's own (`args.own_process`): the setting holds for the whole process."""
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def decoding_streams(own_process):
    """How many batches a translation command decodes side by side (`translate_lines`).

    In a process of the command's own, one a core, each on one thread: TensorFlow's intra-op
    pool is cut to one thread before the runtime starts. A decoding step is a chain of small ops
    that the pool splits between the cores, leaving one idle about half the time; one batch a
    core keeps both busy (measured on 2 cores, 1,000 sentences, two batches at a time either way,
    bf16 products: Transformer beam 5 8.97 -> 6.91 s, greedy 3.22 -> 1.93 s; RNN beam 5 6.13 ->
    5.93 s, greedy 2.04 -> 1.53 s; `bench/decode_bench.py --cli-threads`). Left as
    TensorFlow has it when TF_NUM_INTRAOP_THREADS is set, or in a process that is not the
    command's own (a notebook, tests), or once the runtime has started: then two at a time."""
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not own_process or "TF_NUM_INTRAOP_THREADS" in os.environ or cores < 2:
        return 2
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # the runtime has started: the setting can no longer change
        return 2
    return cores


def decoding_process(own_process, small_input):
    """Sets up a decoding command's process before it loads a model: Grappler off for an input
    of at most QUICK_START_LIMIT sentences (`quick_start`) and one intra-op thread a batch
    (`decoding_streams`), both only in a process of the command's own. Returns how many
    batches to decode side by side."""
    if own_process and small_input:
        quick_start()
    return decoding_streams(own_process)


def start_runtime(args, model, task):
    """In the command's own process (`args.own_process`), when `model` is a SavedModel (not a
    run dir), TensorFlow starts without Keras (`runtime.start_without_keras`): about a second
    sooner. Call it before anything imports TensorFlow; a bad path is reported where the model
    is loaded."""
    from seq2seq import runtime

    if not args.own_process:
        return
    try:
        path = model_path(model, task)
    except CommandError:
        return
    if (path / "saved_model.pb").is_file():
        try:
            runtime.start_without_keras()
        except RuntimeError as error:  # a TensorFlow Text library that does not load
            raise CommandError(str(error)) from None


def load_saved_model(path):
    """`tf.saved_model.load(path)`, with a truncated or damaged saved_model.pb or variables/ as
    one error line (TensorFlow raises OSError, ValueError, IndexError or an OpError for them)."""
    import tensorflow as tf

    try:
        return tf.saved_model.load(str(path))
    except (OSError, ValueError, IndexError, tf.errors.OpError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CommandError(
            f"{path}: cannot load this SavedModel; saved_model.pb or variables/ may be truncated or damaged, "
            f"export it again ({reason[:200]})"
        ) from None


def check_input_file(path):
    """An error now, before reading, when `path` is missing or a directory."""
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a directory, not a file")
    if not os.path.isfile(path):
        raise CommandError(f"{path}: file not found")


def read_input_lines(path=None):
    """Lines of a file (or of stdin), decoded as UTF-8, with a clear error naming the bad line."""
    if path is None:
        return decode_lines(sys.stdin.buffer, "<stdin>")
    check_input_file(path)
    with open(path, "rb") as stream:
        return decode_lines(stream, path)


def decode_lines(stream, name, first_line=1):
    lines = []
    for number, raw in enumerate(stream, start=first_line):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as error:
            raise CommandError(f"{name}:{number}: not valid UTF-8 ({error.reason})") from None
    return lines
