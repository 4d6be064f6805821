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
        "training": {"epochs": 10000, "steps_per_checkpoint": 20, "keep_checkpoints": 3, "learning_rate": 0.02,
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
    assert re.search(r"test sacreBLEU \(beam 2, average of the last 2 checkpoints\): \d+\.\d\d  chrF", output)
    assert len(list((tmp_path / "run" / "checkpoints").glob("ckpt-*.index"))) >= 2
    # A budget is measured on a fresh run: an existing run directory is refused.
    again = Background(command, tmp_path / "again", timeout=300).result()
    assert again.returncode != 0 and "is not empty" in again.stderr.decode()
