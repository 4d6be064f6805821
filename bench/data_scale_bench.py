"""Training-data preparation at scale (issue 17): start-up time, peak memory and shard size of
`python -m seq2seq.translate train` on a large corpus. Run by hand, on a quiet machine.

    python bench/make_synthetic_corpus.py --pairs 1000000 --output-dir /work/runs/corpus1m
    python bench/data_scale_bench.py --corpus-dir /work/runs/corpus1m --scheme word --json word1m.json

It runs the real command line twice as subprocesses, on one run directory: a first run of
--steps steps, then a restart to 2 x --steps steps, which must resume the run. For each it
measures
  - wall: the whole process, start to exit;
  - to model: from process start to the log line "model: ..." (written once the data are
    prepared and the model is built, just before training starts);
  - to first step: from process start to the first "checkpoint N/M, step S" line: the runs
    checkpoint every step and have no validation data, so this is the first step trained
    (traced, run and saved);
  - peak RSS: the kernel's high-water mark of the train process (os.wait4's ru_maxrss, as
    /usr/bin/time -f %M reports it), its own memory only;
  - tree RSS: the largest sum of RSS over the process and its children, sampled every 0.2 s
    with psutil (counts worker processes; pages they share are counted in each); "-" without psutil;
then the size on disk of RUN/corpus/ (the encoded shards, "absent" if there is none) and of the
whole run directory. It prints a table and, with --json, writes every figure, the command
lines, their timed log lines, the corpus, the scheme, the date and os.cpu_count().
With --smoke it checks the plumbing in seconds: a 200-pair corpus made by the generator, 2 + 2
steps of a 16-unit model.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from make_synthetic_corpus import DATA, MANIFEST, corpus_file_name, write_synthetic_corpus  # bench/ is on sys.path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_LINE = re.compile(r"^model: ")  # tasks/translation/pipeline.py logs it just before training
FIRST_STEP_LINE = re.compile(r"^checkpoint \d+/\d+, step \d+")  # the Trainer's line after each checkpoint
ENCODED_LINE = re.compile(r"^encoded [\d,]+ pairs .* in (\d+) s$")  # tasks/translation/pipeline.py, after encoding
RESUMED_LINE = re.compile(r"holds a run: continuing it|^resuming from ")
# What TensorFlow's C++ runtime writes to stderr whatever TF_CPP_MIN_LOG_LEVEL says (as in tests/conftest.py).
TF_NOISE = re.compile(r"^([IWEF]\d{4} \S+ +\d+ \S+:\d+\]|WARNING: All log messages before absl|To enable the following instructions:)")
SHARDS_DIR = "corpus"
SAMPLE_SECONDS = 0.2
SMOKE_PAIRS = 200


class BenchError(Exception):
    """A benchmark that cannot run or whose run failed: shown as one `error:` line."""


def find_corpus_file(directory, lang):
    for plain in (False, True):
        path = Path(directory) / corpus_file_name(lang, plain)
        if path.is_file():
            return path
    raise BenchError(f"{directory} has no train.{lang}.gz or train.{lang} (make one with bench/make_synthetic_corpus.py)")


def count_lines(path):
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        return sum(block.count(b"\n") for block in iter(lambda: file.read(1 << 24), b""))


def corpus_pairs(directory, source_file):
    """Pairs of the corpus: from the generator's corpus.json, else by counting lines."""
    manifest = Path(directory) / MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text())["pairs"]
    return count_lines(source_file)


def directory_bytes(path):
    path = Path(path)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


class TreeRssSampler(threading.Thread):
    """The largest sum of RSS over a process and its descendants, sampled until it ends."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_bytes, self.available = pid, 0, True
        self.stopped = threading.Event()

    def run(self):
        try:
            import psutil
        except ImportError:
            self.available = False
            return
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stopped.is_set():
            total = 0
            try:
                for process in [root, *root.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak_bytes = max(self.peak_bytes, total)
            self.stopped.wait(SAMPLE_SECONDS)


def timed_run(command, workdir, name):
    """Runs `command`, returns its figures: wall and first-step seconds, peak and tree RSS,
    exit code and its stderr lines with their times (stdout, the progress bar, goes to a file)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    stdout_path = Path(workdir) / f"{name}.stdout"
    lines = []
    with open(stdout_path, "wb") as stdout:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                                   cwd=PROJECT_ROOT, env=env)
        sampler = TreeRssSampler(process.pid)
        sampler.start()
        for raw in process.stderr:
            now = time.perf_counter() - start
            for line in raw.decode("utf-8", "replace").replace("\r", "\n").splitlines():
                if line.strip():
                    lines.append((round(now, 2), line))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        process.stderr.close()
        sampler.stopped.set()
        sampler.join()
    stdout_text = stdout_path.read_text(encoding="utf-8", errors="replace")
    model_built = next((t for t, line in lines if MODEL_LINE.search(line)), None)
    first_step = next((t for t, line in lines if FIRST_STEP_LINE.search(line)), None)
    return {
        "command": command,
        "exit_code": process.returncode,
        "wall_seconds": round(wall, 2),
        "model_seconds": model_built,
        "encoding_seconds": next((int(m.group(1)) for _, line in lines if (m := ENCODED_LINE.search(line))), None),
        "first_step_seconds": first_step,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "tree_rss_mib": round(sampler.peak_bytes / 2**20, 1) if sampler.available and sampler.peak_bytes else None,
        "resumed": any(RESUMED_LINE.search(line) for _, line in lines)
        or any(RESUMED_LINE.search(line) for line in stdout_text.splitlines()),
        "log": [[t, line] for t, line in lines if not TF_NOISE.match(line)][-200:],
    }


def train_command(args, files, run_dir, max_steps):
    return [str(part) for part in (
        args.python, "-m", "seq2seq.translate", "train",
        "--train-source", files["train_source"], "--train-target", files["train_target"],
        "--scheme", args.scheme, "--source-vocab-size", args.vocab_size, "--target-vocab-size", args.vocab_size,
        "--units", args.units, "--batch-size", args.batch_size,
        "--max-steps", max_steps, "--steps-per-checkpoint", 1,
        "--keep-checkpoints", "1", "--no-tensorboard", "--verbose", "1", "--output-dir", run_dir,
    )]


def check_run(result, name, must_resume):
    if result["exit_code"] != 0:
        last = result["log"][-1][1] if result["log"] else "no output"
        raise BenchError(f"the {name} failed (exit {result['exit_code']}): {last}")
    if result["resumed"] != must_resume:
        what = "did not say it continues the run" if must_resume else "continued an existing run"
        raise BenchError(f"the {name} {what}: the measurement would be of the wrong thing")
    if result["first_step_seconds"] is None:
        print(f"warning: the {name} logged no 'checkpoint ..., step' line; time to first step unknown", file=sys.stderr)


def mib(value):
    return "-" if value is None else f"{value:,.0f} MiB"


def seconds(value):
    return "-" if value is None else f"{value:,.1f} s"


def print_table(report):
    corpus = report["corpus"]
    sizes = ", ".join(f"{Path(p).name} {b / 1e6:,.1f} MB" for p, b in corpus["files"].items())
    print(f"corpus {corpus['dir']}: {corpus['pairs']:,} pairs ({sizes}); scheme {report['scheme']}, "
          f"{report['units']} units, {os.cpu_count()} CPUs, {report['date']}")
    print(f"{'':<22}{'wall':>10}{'to model':>10}{'to first step':>15}{'peak RSS':>13}{'tree RSS':>13}")
    for key, label in (("first_run", f"first run ({report['steps'][0]} steps)"),
                       ("restart", f"restart (to {report['steps'][1]})")):
        run = report[key]
        print(f"{label:<22}{seconds(run['wall_seconds']):>10}{seconds(run['model_seconds']):>10}"
              f"{seconds(run['first_step_seconds']):>15}"
              f"{mib(run['peak_rss_mib']):>13}{mib(run['tree_rss_mib']):>13}")
    for key in ("first_run", "restart"):
        if report[key]["encoding_seconds"] is not None:
            print(f"{key.replace('_', ' ')}: encoded the training data in {report[key]['encoding_seconds']} s")
    shards = report["shards_bytes"]
    shards_text = "absent" if shards is None else f"{shards / 1e6:,.1f} MB"
    print(f"shards ({SHARDS_DIR}/): {shards_text}; run directory: {report['run_dir_bytes'] / 1e6:,.1f} MB")
    print("peak RSS: the train process's own high-water mark (os.wait4 ru_maxrss); "
          f"tree RSS: sum over it and its children, sampled every {SAMPLE_SECONDS} s (psutil)")


def benchmark(args, workdir):
    data_dir = Path(args.data_dir)
    if args.smoke:
        corpus_dir = Path(workdir) / "smoke_corpus"
        write_synthetic_corpus(
            find_corpus_file(data_dir, args.source_lang), find_corpus_file(data_dir, args.target_lang),
            corpus_dir, SMOKE_PAIRS, source_lang=args.source_lang, target_lang=args.target_lang,
        )
    else:
        corpus_dir = Path(args.corpus_dir)
    files = {"train_source": find_corpus_file(corpus_dir, args.source_lang),
             "train_target": find_corpus_file(corpus_dir, args.target_lang)}
    run_dir = Path(args.run_dir) if args.run_dir else Path(workdir) / "run"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise BenchError(f"{run_dir} is not empty: the first run is measured on a fresh run directory")
    first = timed_run(train_command(args, files, run_dir, args.steps), workdir, "first_run")
    check_run(first, "first run", must_resume=False)
    restart = timed_run(train_command(args, files, run_dir, 2 * args.steps), workdir, "restart")
    check_run(restart, "restart", must_resume=True)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "scheme": args.scheme, "units": args.units, "vocab_size": args.vocab_size, "batch_size": args.batch_size,
        "steps": [args.steps, 2 * args.steps], "smoke": args.smoke,
        "corpus": {"dir": str(corpus_dir), "pairs": corpus_pairs(corpus_dir, files["train_source"]),
                   "files": {str(files[k]): files[k].stat().st_size for k in ("train_source", "train_target")}},
        "run_dir": str(run_dir),
        "first_run": first, "restart": restart,
        "shards_bytes": directory_bytes(run_dir / SHARDS_DIR),
        "run_dir_bytes": directory_bytes(run_dir),
        "rss_methods": {"peak_rss_mib": "os.wait4 ru_maxrss of the train process (its own high-water mark)",
                        "tree_rss_mib": f"psutil: max sum of RSS over the process tree, sampled every {SAMPLE_SECONDS} s"},
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python bench/data_scale_bench.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus-dir", help="corpus made by bench/make_synthetic_corpus.py (train.SRC.gz, train.TGT.gz)")
    parser.add_argument("--scheme", default="word", choices=("word", "sentencepiece"), help="tokenization (default: word)")
    parser.add_argument("--steps", type=int, help="steps of the first run; the restart trains as many more (default: 20)")
    parser.add_argument("--units", type=int, help="model size (default: 128)")
    parser.add_argument("--vocab-size", type=int, help="source and target vocabulary size (default: 8000)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentence pairs per batch (default: %(default)s)")
    parser.add_argument("--run-dir", help="run directory, empty or new (default: a temporary one, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directory (and logs); print where")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the CLI (default: this one)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--data-dir", default=str(DATA),
                        help="with --smoke, the directory of the pairs the tiny corpus joins, train.SRC(.gz) and "
                             "train.TGT(.gz) (default: %(default)s)")
    parser.add_argument("--source-lang", default="en", help="source language of the file names (default: %(default)s)")
    parser.add_argument("--target-lang", default="de", help="target language of the file names (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"plumbing check: a {SMOKE_PAIRS}-pair generated corpus, 2 + 2 steps, 16 units, vocabularies of 100")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (2 if smoke else 20)
    args.units = args.units or (16 if smoke else 128)
    args.vocab_size = args.vocab_size or (100 if smoke else 8000)
    if not smoke and not args.corpus_dir:
        parser.error("--corpus-dir is required (or --smoke)")
    if smoke and args.corpus_dir:
        parser.error("--smoke makes its own corpus: drop --corpus-dir")
    for name in ("steps", "units", "vocab_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="data_scale_bench_")
    try:
        report = benchmark(args, workdir)
    except (BenchError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir} (logs; and the run, unless --run-dir)", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
