"""A synthetic parallel corpus of any size, for the data-scale benchmark (issue 17). Run by hand.

    python bench/make_synthetic_corpus.py --pairs 1000000 --output-dir /work/runs/corpus1m

Each output pair is two random pairs of a small parallel corpus (Multi30k train by default)
joined by a space: source line = source[i] + " " + source[j], target line = target[i] + " " +
target[j], with the same i and j, drawn with a fixed seed (the same seed gives the same bytes).
From Multi30k that is about 24 words a side; 10M pairs are about 2.7 GB of text a side.

It streams: pairs are drawn and written in blocks, so memory stays flat whatever --pairs is.
The files are written as train.SRC.gz / train.TGT.gz (gzip level 1, for speed) or, with
--plain, train.SRC / train.TGT, each under a temporary name renamed when complete, plus
corpus.json (pairs, seed, the files it was made from), which the benchmark reads.
"""

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
# Pairs drawn and written at a time: large enough for speed, small enough for flat memory
# (about 15 MB of text a side). Part of the output's definition: the draws depend on it.
BLOCK_PAIRS = 100_000
MANIFEST = "corpus.json"


def read_lines(path):
    """The lines of a text file (gzip if its name ends in .gz), without their newlines."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as file:
            return [line.rstrip("\r\n") for line in file]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def corpus_file_name(lang, plain):
    return f"train.{lang}" if plain else f"train.{lang}.gz"


def _open_output(path, plain):
    if plain:
        return open(path, "wb")
    # No file name or time in the gzip header: the same seed gives the same bytes.
    return gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=open(path, "wb"), mtime=0)


def write_synthetic_corpus(source_file, target_file, output_dir, pairs, seed=0, source_lang="en",
                           target_lang="de", plain=False, progress=None):
    """Writes `pairs` joined pairs of (source_file, target_file) into output_dir; returns the
    summary also saved as corpus.json. `progress(message)`, if given, hears about every ~10%."""
    if pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {pairs}")
    if source_lang == target_lang:
        raise ValueError(f"the source and target languages must differ (both {source_lang!r}): they name the files")
    sources, targets = read_lines(source_file), read_lines(target_file)
    if not sources:
        raise ValueError(f"{source_file} is empty")
    if len(sources) != len(targets):
        raise ValueError(f"{source_file} has {len(sources)} lines but {target_file} has {len(targets)}: not parallel")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sides = [(sources, output_dir / corpus_file_name(source_lang, plain)),
             (targets, output_dir / corpus_file_name(target_lang, plain))]
    partial = [path.with_name(path.name + ".partial") for _, path in sides]
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    next_report = 1
    outputs = [_open_output(path, plain) for path in partial]
    try:
        for first in range(0, pairs, BLOCK_PAIRS):
            count = min(BLOCK_PAIRS, pairs - first)
            drawn = rng.integers(0, len(sources), size=(count, 2)).tolist()
            for (lines, _), output in zip(sides, outputs):
                output.write("".join(f"{lines[i]} {lines[j]}\n" for i, j in drawn).encode("utf-8"))
            done = first + count
            if progress is not None and done * 10 >= next_report * pairs:
                next_report = done * 10 // pairs + 1
                progress(f"{done:,} of {pairs:,} pairs ({100 * done // pairs}%) in {time.perf_counter() - start:.1f} s")
    except BaseException:
        for output, temporary in zip(outputs, partial):
            output.close()
            temporary.unlink(missing_ok=True)
        raise
    for output in outputs:
        output.close()
    for temporary, (_, path) in zip(partial, sides):
        temporary.replace(path)
    summary = {
        "pairs": pairs, "seed": seed, "block_pairs": BLOCK_PAIRS,
        "made_from": {"source": str(Path(source_file).resolve()), "target": str(Path(target_file).resolve()),
                      "pairs": len(sources)},
        "files": {lang: {"name": path.name, "bytes": path.stat().st_size}
                  for lang, (_, path) in zip((source_lang, target_lang), sides)},
        "seconds": round(time.perf_counter() - start, 2),
    }
    (output_dir / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python bench/make_synthetic_corpus.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=1_000_000, help="pairs to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random pair indices (default: %(default)s)")
    parser.add_argument("--output-dir", required=True, help="directory to write the corpus into (created if missing)")
    parser.add_argument("--source-lang", default="en", help="source language, in the file names (default: %(default)s)")
    parser.add_argument("--target-lang", default="de", help="target language, in the file names (default: %(default)s)")
    parser.add_argument("--source-file", help=f"pairs to join, source side (default: {DATA}/train.SRC.gz)")
    parser.add_argument("--target-file", help=f"pairs to join, target side (default: {DATA}/train.TGT.gz)")
    parser.add_argument("--plain", action="store_true", help="write plain text instead of gzip (level 1)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    source_file = args.source_file or DATA / f"train.{args.source_lang}.gz"
    target_file = args.target_file or DATA / f"train.{args.target_lang}.gz"
    try:
        summary = write_synthetic_corpus(
            source_file, target_file, args.output_dir, args.pairs, seed=args.seed, source_lang=args.source_lang,
            target_lang=args.target_lang, plain=args.plain, progress=lambda message: print(message, file=sys.stderr),
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{side['name']} {side['bytes'] / 1e6:,.1f} MB" for side in summary["files"].values())
    print(f"wrote {summary['pairs']:,} pairs to {args.output_dir} in {summary['seconds']:.1f} s: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
