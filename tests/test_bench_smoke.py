"""The benchmark scripts run end to end in a smoke mode (tiny data, seconds of budget); no
speed is asserted: the figures are measured by hand (see bench/)."""

import re
import sys

import yaml

from conftest import PROJECT_ROOT, Background, user_stderr


def test_time_to_bleu_stops_at_its_budget_and_scores_the_test_set(tmp_path, toy_corpus):
    recipe = {
        "data": {
            "train_source": str(toy_corpus / "train.en"), "train_target": str(toy_corpus / "train.de"),
            "valid_source": str(toy_corpus / "valid.en"), "valid_target": str(toy_corpus / "valid.de"),
        },
        "model": {"units": 16, "dropout": 0.0},
        "batching": {"batch_size": 16},
        "training": {"epochs": 10000, "steps_per_checkpoint": 5, "keep_checkpoints": 3, "learning_rate": 0.02,
                     "precision": "float32", "tensorboard": False, "verbose": 0},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    command = [
        sys.executable, PROJECT_ROOT / "bench" / "time_to_bleu.py", "--recipe", tmp_path / "recipe.yaml",
        "--minutes", "0.2", "--output-dir", tmp_path / "run", "--average-last", "2", "--beam-size", "2",
        "--test-source", toy_corpus / "valid.en", "--test-references", toy_corpus / "valid.de",
    ]
    result = Background(command, tmp_path / "out", timeout=300).result()
    output = result.stdout.decode()
    assert result.returncode == 0, user_stderr(result.stderr.decode())
    steps = int(re.search(r"trained [\d.]+ minutes \((\d+) steps; budget 0.2 minutes\)", output).group(1))
    assert 0 < steps < 10000 * 19  # the budget, not the epochs, ended the run
    averaged = int(re.search(r"test sacreBLEU \(beam 2, average of the last (\d) checkpoints\): \d+\.\d\d  chrF",
                             output).group(1))
    kept = len(list((tmp_path / "run" / "checkpoints").glob("ckpt-*.index")))
    assert averaged == min(2, kept)  # a budget too short for two checkpoints averages the one it left
    assert (averaged < 2) == ("averaging 1 instead of 2" in output)
    # A budget is measured on a fresh run: an existing run directory is refused.
    again = Background(command, tmp_path / "again", timeout=300).result()
    assert again.returncode != 0 and "is not empty" in again.stderr.decode()


def test_data_scale_bench_times_a_first_run_that_encodes_and_a_restart_that_reads_the_shards(tmp_path):
    import gzip
    import json

    from conftest import toy_pairs, write_lines

    data = tmp_path / "data"
    data.mkdir()
    sources, targets = toy_pairs(60)
    write_lines(data / "train.en", sources[:50])
    (data / "train.de.gz").write_bytes(gzip.compress("".join(t + "\n" for t in targets[:50]).encode()))
    command = [sys.executable, PROJECT_ROOT / "bench" / "data_scale_bench.py", "--smoke", "--data-dir", data,
               "--json", tmp_path / "report.json"]
    result = Background(command, tmp_path / "out", timeout=300).result()
    assert result.returncode == 0, user_stderr(result.stderr.decode())
    report = json.loads((tmp_path / "report.json").read_text())
    first, restart = report["first_run"], report["restart"]
    assert not first["resumed"] and restart["resumed"]
    assert first["encoding_seconds"] is not None and restart["encoding_seconds"] is None  # the restart reads the shards
    assert 0 < first["model_seconds"] < first["first_step_seconds"] < first["wall_seconds"]
    assert restart["peak_rss_mib"] > 100 and report["shards_bytes"] > 0
    assert report["corpus"]["pairs"] == 200
    assert "to first step" in result.stdout.decode()
