"""Quality per minute of CPU: train for a fixed wall-clock budget, then score the test set.
Run by hand, never as a timed test.

    python bench/time_to_bleu.py [--recipe bench/configs/time_to_bleu.yaml] [--minutes 35]
        [--output-dir runs/time_to_bleu] [--average-last 5] [--beam-size 5]

Trains the recipe (a `train --config` YAML: model, precision, batching, schedule,
tokenization) with this project's `train` pipeline until the budget is spent (counted from
the start of training, vocabulary and SentencePiece training included), writes a last
checkpoint, averages the last checkpoints (up to --average-last, as many as the budget
left), translates the test set with beam search and prints cased sacreBLEU (13a) with the
minutes of training. The default recipe is a reference-size model (about 8.5M parameters)
and the default test set Multi30k test_2016_flickr; data paths in the recipe are relative to
the project root.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from seq2seq.cli import prefer_onednn_products  # noqa: E402

prefer_onednn_products()  # as the train command does
import keras  # noqa: E402
import yaml  # noqa: E402

DATA = PROJECT_ROOT.parent / "shared" / "data" / "multi30k"


class WallClockBudget(keras.callbacks.Callback):
    """Stops training after the step that ends past `seconds` from `start`; Keras then still
    runs the end of the checkpoint interval (validation loss and a checkpoint)."""

    def __init__(self, seconds, start):
        super().__init__()
        self.seconds = seconds
        self.start = start
        self.stopped_at = None

    def on_train_batch_end(self, batch, logs=None):
        if self.stopped_at is None and time.perf_counter() - self.start >= self.seconds:
            self.stopped_at = int(self.model.optimizer.iterations.numpy())
            self.model.stop_training = True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(PROJECT_ROOT / "bench" / "configs" / "time_to_bleu.yaml"),
                        help="a train --config YAML (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=35.0, help="training budget in minutes (default: 35)")
    parser.add_argument("--output-dir", default="runs/time_to_bleu", help="a new run directory (default: %(default)s)")
    parser.add_argument("--test-source", default=str(DATA / "test_2016_flickr.en.gz"))
    parser.add_argument("--test-references", default=str(DATA / "test_2016_flickr.de.gz"))
    parser.add_argument("--average-last", type=int, default=5, help="checkpoints averaged for the test (default: 5)")
    parser.add_argument("--beam-size", type=int, default=5)
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir).resolve()
    if output_dir.exists() and any(output_dir.iterdir()):
        sys.exit(f"error: {output_dir} is not empty; the budget is measured on a fresh run, give a new --output-dir")
    for path in (args.recipe, args.test_source, args.test_references):
        if not Path(path).is_file():
            sys.exit(f"error: {path} not found")

    from seq2seq.run import checkpoint_paths
    from seq2seq.tasks.translation import data
    from seq2seq.tasks.translation.config import TranslationConfig
    from seq2seq.tasks.translation.evaluation import corpus_scores
    from seq2seq.tasks.translation.inference import translate_lines
    from seq2seq.tasks.translation.pipeline import TranslationRun, train

    values = yaml.safe_load(Path(args.recipe).read_text()) or {}
    values.setdefault("training", {})["output_dir"] = str(output_dir)
    os.chdir(PROJECT_ROOT)  # the recipe's data paths are relative to the project root
    config = TranslationConfig.from_dict(values)
    start = time.perf_counter()
    budget = WallClockBudget(args.minutes * 60, start)
    _, model = train(config, validation_bleu=False, callbacks=[budget])
    minutes = (time.perf_counter() - start) / 60
    run = TranslationRun.load(output_dir)
    kept = len(checkpoint_paths(output_dir))
    average_last = max(1, min(args.average_last, kept))
    if average_last < args.average_last:
        print(f"note: the budget left {kept} checkpoint(s); averaging {average_last} instead of {args.average_last}")
    model = run.load_model(average_last=average_last)
    sources = data.read_lines(args.test_source)
    references = data.read_lines(args.test_references)
    hypotheses = translate_lines(run.translator(model), sources, beam_size=args.beam_size)
    scores = corpus_scores(hypotheses, references)
    print(f"recipe: {args.recipe}; {model.count_params():,} parameters; precision {run.config.training.precision}")
    print(f"trained {minutes:.1f} minutes ({budget.stopped_at or 'all'} steps; budget {args.minutes:g} minutes)")
    print(f"test sacreBLEU (beam {args.beam_size}, average of the last {average_last} checkpoints): "
          f"{scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  ({scores['bleu_signature']})")
    return scores


if __name__ == "__main__":
    main()
