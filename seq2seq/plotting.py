"""Attention alignment plots (matplotlib, no display needed)."""

import numpy as np


def _strings(values):
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def plot_alignment(source_tokens, target_tokens, attention, path):
    """Heatmap of attention [target, source] with token labels, written to `path` (PNG).

    Empty (padding) tokens at the ends of source_tokens / target_tokens are cut off.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = [t for t in _strings(source_tokens) if t]
    target = [t for t in _strings(target_tokens) if t]
    weights = np.asarray(attention)[: len(target), : len(source)]
    figure, axes = plt.subplots(figsize=(max(4, 0.45 * len(source) + 2), max(3, 0.4 * len(target) + 1.5)))
    axes.imshow(weights, cmap="Greys", vmin=0.0, vmax=max(float(weights.max(initial=0.0)), 1e-6))
    axes.set_xticks(range(len(source)), source, rotation=60, ha="right")
    axes.set_yticks(range(len(target)), target)
    axes.set_xlabel("source")
    axes.set_ylabel("translation")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
