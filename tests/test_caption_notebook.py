"""notebooks/caption_images.ipynb runs top to bottom against the shipped captioner, with this venv's Python."""

import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from seq2seq.quiet import is_native_log_line

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "caption_images.ipynb"
SHIPPED = ROOT / "saved_models" / "shapes_captioner"


def test_shipped_captioner_is_there_and_small():
    versions = [p for p in SHIPPED.iterdir() if p.name.isdigit()]
    assert versions and all((p / "saved_model.pb").is_file() for p in versions)
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 20 * 1024 * 1024
    assert "python -m seq2seq.caption train" in (SHIPPED / "COMMAND.md").read_text()


def test_shipped_captioner_meets_its_targets(tmp_path, capsys):
    """Its targets on test-seed images (1,000 in COMMAND.md: BLEU-4 0.934, localisation 93.4%; 200
    here to stay fast, so with some margin): BLEU-4 >= 0.90 and the most-attended cell on the
    named object for >= 85% of colour and shape words."""
    from seq2seq import caption

    scores = tmp_path / "scores.json"
    argv = ["evaluate", "--model", str(SHIPPED), "--shapes-test", "200", "--shapes-seed", "1000", "--beam-size", "3", "--json", str(scores)]
    assert caption.main(argv) == 0
    capsys.readouterr()
    for search in ("greedy", "beam 3"):
        result = json.loads(scores.read_text())["searches"][search]
        assert result["bleu_4"] >= 0.90, (search, result)
        assert result["localisation"] >= 0.85 and result["words"] > 500, (search, result)


def test_shipped_captioner_holds_up_on_jpeg_and_other_sizes(tmp_path, capsys):
    """bench/caption_robustness.py in a smoke size (100 scenes a form; 1,000 in COMMAND.md): JPEG
    q75 copies captioned about as well as the PNGs, both localised, scenes of other sizes and
    aspect ratios (squashed by the serving graph) still captioned well."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("caption_robustness", ROOT / "bench" / "caption_robustness.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = tmp_path / "robustness.json"
    bench.main(["--model", str(SHIPPED), "--images", "100", "--json", str(figures)])
    capsys.readouterr()
    results = json.loads(figures.read_text())
    png, jpeg = results["PNG 64x64"], results["JPEG q75 64x64"]
    assert png["bleu_4"] >= 0.90 and jpeg["bleu_4"] >= 0.90, results
    assert abs(png["bleu_4"] - jpeg["bleu_4"]) <= 0.03, results
    assert png["localisation"] >= 0.85 and jpeg["localisation"] >= 0.85, results
    assert results["PNG 96x96"]["bleu_4"] >= 0.88 and results["PNG 64x96"]["bleu_4"] >= 0.87, results


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # A private "python3" kernelspec that runs this interpreter: JUPYTER_PATH comes before the
    # user and system kernel folders, so no other Python can be picked up.
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (seq2seq venv)", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.delenv("CAPTIONER_MODEL", raising=False)  # the shipped model, always
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # the notebook itself keeps TensorFlow quiet
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "loaded " in text and "shapes_captioner" in text and text.count("model:") == 4
    native = [line for line in text.splitlines(keepends=True) if is_native_log_line(line.encode())]
    assert not native, native
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(figures) == 4
    assert elapsed < 90, f"the notebook took {elapsed:.0f} s"
    assert os.environ.get("JUPYTER_PATH") == str(tmp_path)
