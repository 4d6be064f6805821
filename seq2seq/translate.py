"""python -m seq2seq.translate {train,translate,evaluate,export}: machine translation from the terminal."""

import json
import sys
from pathlib import Path

from seq2seq import cli, runtime, streaming
from seq2seq.config import is_run_dir

SHIPPED_MODEL = cli.shipped_model("multi30k_en_de")
SENTENCES_PER_CHUNK = 2000  # read, sorted by length, translated and written at a time: memory stays flat


def resolve_model(path):
    """A translate function from a SavedModel dir, a TF Serving model dir (highest version) or a run dir."""
    runtime.register_text_ops()  # the SentencePiece op of subword exports
    path = cli.model_path(path, "translation")
    if (path / "saved_model.pb").is_file():
        model = cli.load_saved_model(path)
        if not hasattr(model, "translate"):
            raise cli.CommandError(f"{path}: not a translation SavedModel (no translate function)")
        return model
    if is_run_dir(path):
        from seq2seq.tasks.translation.pipeline import TranslationRun

        run = TranslationRun.load(path)
        return run.translator(run.load_model(), replace_unknown=False)
    raise cli.CommandError(f"{path}: neither a SavedModel nor a run directory")


def start_runtime(args):
    """TensorFlow without Keras for one SavedModel (`cli.start_runtime`); not for an ensemble."""
    paths = args.model or [str(SHIPPED_MODEL)]
    if len(paths) == 1:
        cli.start_runtime(args, paths[0], "translation")


def load_translator(args):
    """The translate function of --model, or the ensemble Translator of several --model, with
    its matrix products in the --precision asked for."""
    from seq2seq.products import use_bfloat16_products
    from seq2seq.tasks.translation.shortlist import use_shortlist

    translator = _load_translator(args)
    use_bfloat16_products(translator, args.precision)
    if args.no_shortlist:
        use_shortlist(translator, False)
    return translator


def _load_translator(args):
    paths = args.model or [str(SHIPPED_MODEL)]
    args.model = paths[0]  # what messages name
    if len(paths) > 1:
        cli.choose_length_penalty(args, None)
        return load_ensemble(args, paths)
    cli.choose_length_penalty(args, cli.model_path(args.model, "translation"))
    if args.replace_unknown or args.average_last or args.weights != "best":
        from seq2seq.tasks.translation.pipeline import TranslationRun

        if not is_run_dir(args.model):
            raise cli.CommandError("--replace-unknown, --average-last and --weights need --model to be a run directory")
        cli.check_model_task(args.model, "translation")
        run = TranslationRun.load(args.model)
        model = run.load_model(weights=args.weights, average_last=args.average_last)
        return run.translator(model, replace_unknown=args.replace_unknown)
    return resolve_model(args.model)


def load_run_and_model(args, path, kind=None):
    """(run, model) of a run dir (the weights --weights and --average-last choose) or of a
    SavedModel this toolkit exported (its own weights): what ensembles and exports are made of.
    kind: "run" or "export" when a flag says which (export --run-dir, --from-model), None to
    tell by what is at `path`."""
    from seq2seq.tasks.translation.pipeline import TranslationRun, load_export

    path = cli.model_path(path, "translation")
    if kind is None:
        kind = "export" if (path / "saved_model.pb").is_file() else "run" if is_run_dir(path) else None
    if kind is None:
        raise cli.CommandError(f"{path}: neither a SavedModel nor a run directory")
    if kind == "export":
        return load_export(path)
    run = TranslationRun.load(path)
    return run, run.load_model(weights=args.weights, average_last=args.average_last)


def load_ensemble(args, paths):
    """One in-process Translator of the models at `paths` (run dirs, or SavedModels this toolkit
    exported), decoding with the average of their distributions (--ensemble-combine). --weights
    and --average-last choose the weights of run dirs; SavedModels carry theirs."""
    members = []
    for path in paths:
        run, model = load_run_and_model(args, path)
        members.append(run.translator(model, replace_unknown=args.replace_unknown))
    return ensemble_of(members, args.ensemble_combine, " ".join(f"--model {path}" for path in paths))


def ensemble_of(translators, combine, members):
    """`Translator.ensemble`, its refusal of members over different target vocabularies one error
    line that starts with `members` (the flags that named them)."""
    from seq2seq.tasks.translation.translator import Translator

    try:
        return Translator.ensemble(translators, combine=combine)
    except ValueError as error:
        raise cli.CommandError(f"{members}: {error}") from None


def command_train(args):
    from seq2seq.tasks.translation.pipeline import train

    config = cli.train_config(train_config_class(), args)
    train(config, validation_bleu=not args.no_validation_bleu)
    print(f"trained: {config.training.output_dir}")


def check_n_best(args):
    """Rejects an --n-best the beam cannot give with a one-line error (each number's own range
    is checked by its argparse type)."""
    if args.n_best > args.beam_size:
        raise cli.CommandError(f"--n-best must be between 1 and --beam-size ({args.beam_size}), got {args.n_best}")


def print_translation(result, n_best, flush=False):
    print(result if n_best == 1 else "\t".join(result), flush=flush)


def translate_interactively(args, translator):
    """A terminal on stdin: every line is translated as soon as it is entered."""
    from seq2seq.tasks.translation.inference import translate_lines

    for number, raw in enumerate(sys.stdin.buffer, start=1):
        line = cli.decode_lines([raw], "<stdin>", first_line=number)[0]
        [result] = translate_lines(translator, [line], beam_size=args.beam_size, n_best=args.n_best,
                                   length_penalty=args.length_penalty, batch_size=1)
        print_translation(result, args.n_best, flush=True)


def command_translate(args):
    check_n_best(args)
    start_runtime(args)
    # (With --plot-alignment or --prefix-file, even a terminal on stdin is read in chunks.)
    interactive = (
        not args.texts and args.input is None and not args.plot_alignment and args.prefix_file is None
        and sys.stdin.isatty()
    )
    if interactive:
        return translate_interactively(args, load_translator(args))
    lines = args.texts if args.texts else streaming.input_lines(args.input)
    if args.prefix_file is not None:
        lines = streaming.paired_lines(lines, streaming.input_lines(args.prefix_file), args.prefix_file, "prefix")
    # Read no further ahead than the first chunk, which is read before any output anyway.
    lines, small = streaming.ends_within(lines, min(cli.QUICK_START_LIMIT, SENTENCES_PER_CHUNK - 1))
    streams = cli.decoding_process(args.own_process, small)
    translator = load_translator(args)
    if args.prefix_file is not None and not hasattr(translator, "translate_with_prefix"):
        raise cli.CommandError(
            f"{args.model}: exported before target prefixes existed (no translate_with_prefix signature); "
            f"write it again with: python -m seq2seq.translate export --from-model {args.model} --output DIR"
        )
    try:
        translate_in_chunks(args, translator, lines, streams, total=input_size(args))
    except BrokenPipeError:
        return streaming.output_closed()


def input_size(args):
    """How many sentences `translate` will read, when a progress display wants it and it is cheap to know."""
    if args.texts:
        return len(args.texts)
    if args.input is not None and streaming.progress_wanted():
        return streaming.count_lines(args.input)
    return None


def translate_in_chunks(args, translator, lines, streams, total=None):
    """Translates `lines` (any iterable) SENTENCES_PER_CHUNK at a time, each chunk sorted by length
    for speed and decoded `streams` batches side by side, and writes each chunk's translations in
    input order as soon as it is done."""
    from seq2seq.tasks.translation.inference import translate_lines

    with streaming.Progress("sentences", total) as progress:
        first_line = 1
        for chunk in streaming.chunks(lines, SENTENCES_PER_CHUNK):
            prefixes = None
            if args.prefix_file is not None:
                chunk, prefixes = [line for line, _ in chunk], [prefix for _, prefix in chunk]
            outputs = [] if args.plot_alignment and first_line == 1 else None
            results = translate_lines(
                translator, chunk, beam_size=args.beam_size, n_best=args.n_best, length_penalty=args.length_penalty,
                batch_size=args.batch_size, outputs=outputs, first_line=first_line, warn=progress.write,
                prefixes=prefixes, concurrent_batches=streams,
            )
            streaming.write_lines(result if args.n_best == 1 else "\t".join(result) for result in results)
            progress.update(len(chunk))
            if outputs:
                plot_first_alignment(outputs[0][1], args.plot_alignment, progress.write)
            first_line += len(chunk)


def plot_first_alignment(output, path, note):
    """The attention alignment of one raw output (the first sentence's) written to a PNG."""
    from seq2seq.plotting import plot_alignment

    plot_alignment(output["source_tokens"], output["target_tokens"], output["attention"], path)
    note(f"alignment of the first sentence written to {path}")


def command_evaluate(args):
    if args.source and not args.hypotheses:
        start_runtime(args)
    from seq2seq.tasks.translation.inference import translate_lines
    from seq2seq.tasks.translation.evaluation import corpus_scores

    references = cli.read_input_lines(args.references)
    if not references:
        raise cli.CommandError(f"{args.references}: no references to score (the file is empty)")
    if args.hypotheses:
        hypotheses = cli.read_input_lines(args.hypotheses)
    elif args.source:
        sources = cli.read_input_lines(args.source)
        streams = cli.decoding_process(args.own_process, len(sources) <= cli.QUICK_START_LIMIT)
        translator = load_translator(args)  # sets the model's own length penalty unless one was given
        hypotheses = translate_lines(
            translator, sources, beam_size=args.beam_size, length_penalty=args.length_penalty,
            batch_size=args.batch_size, concurrent_batches=streams,
        )
    else:
        raise cli.CommandError("give --hypotheses FILE, or --source FILE to translate with --model")
    if len(hypotheses) != len(references):
        raise cli.CommandError(f"{len(hypotheses)} hypotheses but {len(references)} references in {args.references}")
    scores = corpus_scores(hypotheses, references)
    print(f"BLEU = {scores['bleu']:.2f}  chrF = {scores['chrf']:.2f}  ({scores['sentences']} sentences)")
    print(f"  {scores['bleu_detail']}")
    print(f"  BLEU signature: {scores['bleu_signature']}")
    print(f"  chrF signature: {scores['chrf_signature']}")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")


def command_export(args):
    from seq2seq.tasks.translation.pipeline import export

    run_dirs, from_models = args.run_dir or [], args.from_model or []
    if not run_dirs and not from_models:
        raise cli.CommandError("give --run-dir (a training run) or --from-model (a SavedModel to export again); "
                               "repeat them to export an ensemble")
    if from_models and (args.average_last or args.weights != "best" or args.quantize == "int8"):
        raise cli.CommandError("--from-model keeps the export's weights as they are (or makes them bf16): "
                               "drop --average-last, --weights and --quantize int8")
    named = " ".join([*(f"--run-dir {path}" for path in run_dirs), *(f"--from-model {path}" for path in from_models)])
    members = [export_member(args, path, "run") for path in run_dirs]
    members += [export_member(args, path, "export") for path in from_models]
    (run, model), others = members[0], members[1:]
    only_export = len(from_models) == 1 and not run_dirs
    cli.choose_length_penalty(args, cli.model_path(from_models[0], "translation") if only_export else None)
    if others:  # members over different target vocabularies: one error line naming them, before anything is written
        ensemble_of([member_run.translator(member) for member_run, member in members], args.ensemble_combine, named)
    shortlist = export_shortlist(args, run, from_models[0] if only_export else None)
    if shortlist is not None and others:
        raise cli.CommandError("--shortlist is for single-model exports, not ensembles: drop it")
    cli.write_export(
        lambda path: export(run, model, path, args.beam_size, args.length_penalty, args.replace_unknown,
                            ensemble=others, combine=args.ensemble_combine, bf16_products=args.bf16_products,
                            shortlist=shortlist),
        args.output, args.version,
    )


def export_shortlist(args, run, from_model=None):
    """The vocabulary shortlist to export: built from the run's training data with --shortlist N,
    none with --shortlist 0, else the one the --from-model export carries (if any)."""
    from seq2seq.tasks.translation.pipeline import exported_shortlist, run_shortlist

    if args.shortlist is None:
        return None if from_model is None else exported_shortlist(cli.model_path(from_model, "translation"))
    if args.shortlist == 0:
        return None
    try:
        return run_shortlist(run, args.shortlist, args.shortlist_frequent)
    except (OSError, ValueError) as error:
        raise cli.CommandError(f"--shortlist reads the training data the model's config names, and failed: {error}") from error


def export_member(args, path, kind):
    """(run, model) of one model to export (`load_run_and_model`), quantized as --quantize says."""
    run, model = load_run_and_model(args, path, kind)
    if args.quantize == "int8":
        from seq2seq.model import quantize_weights

        quantize_weights(model)
    elif args.quantize == "bf16":
        from seq2seq.model import bfloat16_model

        model = bfloat16_model(model, run.build_model)
    return run, model


def add_model_flags(parser):
    cli.add_search_flags(parser, SHIPPED_MODEL, "Multi30k En->De model", beam_size=5, length_penalty=0.6, batch_size=64,
                         items="sentences", ensembles=True)
    parser.add_argument("--replace-unknown", action="store_true",
                        help="replace <unk> outputs by the most attended source word (run dirs only; default: off)")
    parser.add_argument("--average-last", type=cli.positive_int, metavar="N",
                        help="average the last N checkpoints of a run dir, N at least 1 and at most the run's "
                             "checkpoints (default: no averaging)")
    parser.add_argument("--precision", choices=("auto", "float32", "bf16"), default="auto",
                        help="matrix products of the search: bf16 is about 1.3x faster on CPUs with AMX or "
                             "AVX512-BF16 and slower elsewhere; auto takes it where the CPU has them (default: auto; "
                             "SavedModels exported before 2026-12-07 always use float32)")
    parser.add_argument("--no-shortlist", action="store_true",
                        help="decode over the whole target vocabulary even if the model was exported with a "
                             "vocabulary shortlist (export --shortlist) (default: the model's shortlist, if any)")


def train_config_class():
    from seq2seq.tasks.translation.config import TranslationConfig

    return TranslationConfig


def build_parser():
    parser, commands = cli.command_parser("python -m seq2seq.translate", __doc__)
    cli.add_train_command(
        commands, train_config_class, "Train a translation model from a YAML config and/or flags.", command_train, "BLEU"
    )

    translate = commands.add_parser("translate", help="translate texts given as arguments, a file, or stdin",
                                    description="Translate sentences: arguments, --input FILE, or stdin to stdout, one output line per input line.")
    sources = translate.add_mutually_exclusive_group()
    sources.add_argument("texts", nargs="*", default=[],
                         help="sentences to translate, or --input FILE, not both (default: read lines from stdin)")
    sources.add_argument("--input", help="file of sentences, one a line (default: stdin, unless sentences are given)")
    translate.add_argument("--n-best", type=cli.positive_int, default=1,
                           help="hypotheses per sentence, tab-separated, at most --beam-size (default: 1)")
    translate.add_argument("--prefix-file", metavar="FILE",
                           help="target-language prefixes, one a line: line N's words start the translation of "
                                "input line N, and the search continues after them; an empty line means none "
                                "(default: no prefixes)")
    translate.add_argument("--plot-alignment", metavar="PNG",
                           help="write the attention alignment of the first sentence to a PNG (default: no plot)")
    add_model_flags(translate)
    translate.set_defaults(handler=command_translate)

    evaluate = commands.add_parser("evaluate", help="sacreBLEU and chrF against references",
                                   description="Score hypotheses (or translate --source first) against a reference file with sacreBLEU (cased, 13a) and chrF.")
    evaluate.add_argument("--references", required=True, help="reference translations, one a line (required)")
    evaluate.add_argument("--hypotheses", help="system output, one a line (default: none, translate --source instead)")
    evaluate.add_argument("--source", help="source sentences to translate with --model instead of --hypotheses (default: none)")
    evaluate.add_argument("--json", help="also write the scores and signatures to this JSON file (default: not written)")
    add_model_flags(evaluate)
    evaluate.set_defaults(handler=command_evaluate)

    export = cli.add_export_command(
        commands, "serving_default: texts -> translations, scores (beam search in the graph).", "translation",
        beam_size=5, length_penalty=0.6, handler=command_export,
    )
    export.add_argument("--run-dir", action="append",
                        help="the training run to export; repeated (or with --from-model), the ensemble of the "
                             "models, run dirs first, in one SavedModel (default: none, give it or --from-model)")
    export.add_argument("--from-model", metavar="SAVEDMODEL", action="append",
                        help="instead of a run: a SavedModel this toolkit exported, written again with the current "
                             "(faster) graph; same weights, int8 stays int8 (default: none)")
    export.add_argument("--ensemble-combine", choices=("probabilities", "log_probabilities"), default="probabilities",
                        help="how an exported ensemble averages its members' next-token distributions "
                             "(default: probabilities)")
    export.add_argument("--replace-unknown", action="store_true",
                        help="replace <unk> outputs by the most attended source word (default: off)")
    export.add_argument("--average-last", type=cli.positive_int, metavar="N",
                        help="export the average of the last N checkpoints, N at least 1 and at most the run's "
                             "checkpoints (default: no averaging)")
    export.add_argument("--quantize", choices=("none", "int8", "bf16"), default="none",
                        help="int8: Dense and Embedding weights stored as int8 with per-channel scales, "
                             "about 4x smaller; bf16: every weight stored and every matrix product run in "
                             "bfloat16, 2x smaller and the fastest on CPUs with AMX or AVX512-BF16 (slower on "
                             "others); with --from-model, bf16 converts a float32 or int8 export (default: none)")
    export.add_argument("--shortlist", type=cli.non_negative_int, metavar="N",
                        help="vocabulary shortlist: each batch decodes over the N target tokens most associated "
                             "with each of its source tokens in the training data (read again from the paths in "
                             "the model's config), the --shortlist-frequent most frequent ones and the reserved "
                             "ones, not the whole vocabulary (faster; translate --no-shortlist turns it off); 0: "
                             "none (default: none, or with --from-model the one the export carries)")
    export.add_argument("--shortlist-frequent", type=cli.non_negative_int, default=300, metavar="F",
                        help="the most frequent target tokens every shortlist holds (default: 300)")
    export.add_argument("--bf16-products", action="store_true",
                        help="the export's searches start with bfloat16 matrix products (weights kept as they are): "
                             "for TF Serving on CPUs with AMX or AVX512-BF16; translate and evaluate choose per CPU "
                             "whatever this says (default: float32 products, right on every CPU)")
    return parser


def main(argv=None):
    return cli.main(build_parser, argv)


def run():
    """The console command: `main`, then the process ends (see `cli.main`)."""
    cli.main(build_parser, exit_process=True)


if __name__ == "__main__":
    run()
