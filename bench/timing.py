"""Shared by the benchmark scripts: per-step wall time of Keras `fit`, the per-op profile table."""

import json
import re
import time
from pathlib import Path

import keras


class StepTimer(keras.callbacks.Callback):
    """Records the wall time of every training step (the first ones include tracing)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def op_table(logdir, top, top_names=0):
    """Prints the TensorFlow ops of a profile by self time, grouped by op type, and with
    `top_names` the single ops (by name: the layer that owns them) that took the most."""
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        print("(per-op table skipped: pip install xprof)")
        return
    paths = sorted(str(p) for p in Path(logdir).rglob("*.xplane.pb"))
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "framework_op_stats", {})
    table = json.loads(data)
    table = table[0] if isinstance(table, list) else table
    columns = [c["id"] if c.get("id") else c["label"] for c in table["cols"]]
    rows = [[cell["v"] if cell else None for cell in row["c"]] for row in table["rows"]]
    col = {name: i for i, name in enumerate(columns)}
    type_key = "type" if "type" in col else columns[2]
    name_key = "operation" if "operation" in col else columns[3]
    self_key = next(k for k in ("total_self_time", "self_time") if k in col)
    by_type, by_name = {}, {}
    for row in rows:
        micros = float(row[col[self_key]])
        by_type[row[col[type_key]]] = by_type.get(row[col[type_key]], 0.0) + micros
        by_name[row[col[name_key]]] = by_name.get(row[col[name_key]], 0.0) + micros
    total = sum(by_type.values())
    print(f"\nTensorFlow ops by self time ({total / 1000:.0f} ms in all over the profiled steps):")
    for op_type, micros in sorted(by_type.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {op_type:<34} {micros / 1000:9.1f} ms  {100 * micros / total:5.1f}%")
    parts = {}
    for name, micros in by_name.items():
        part = model_part(str(name))
        parts[part] = parts.get(part, 0.0) + micros
    print("\nBy part of the model:")
    for part, micros in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:<34} {micros / 1000:9.1f} ms  {100 * micros / total:5.1f}%")
    if top_names:
        print("\nSingle ops by self time:")
        for name, micros in sorted(by_name.items(), key=lambda kv: -kv[1])[:top_names]:
            print(f"  {str(name)[-90:]:<90} {micros / 1000:9.1f} ms  {100 * micros / total:5.1f}%")


_PARTS = (
    ("decoder time loop, backward", r"decoder.*/while.*(grad|gradients)|decoder_gradient"),
    ("decoder time loop, forward", r"decoder.*/while"),
    ("encoder time loops, backward", r"encoder.*/while.*(grad|gradients)"),
    ("encoder time loops, forward", r"encoder.*/while"),
    ("output layer and loss", r"output_layer|compile_loss|cross_entropy"),
    ("optimizer and clipping", r"(?i)adam|clip|global_norm|optimizer"),
    ("idle threads", r"^IDLE$"),
)


def model_part(op_name):
    """The part of a seq2seq training step an op (by its name) belongs to."""
    return next((part for part, pattern in _PARTS if re.search(pattern, op_name)), "other")
