"""Captioning many images or cached features in batches, with a Captioner or a loaded SavedModel."""

import numpy as np
import tensorflow as tf


def caption_sources(captioner, sources, beam_size=1, length_penalty=0.0, batch_size=64, function=None):
    """Runs `captioner.generate` over model sources in batches; returns the concatenated numpy outputs."""
    function = function or tf.function(captioner.generate)
    outputs = []
    for start in range(0, len(sources), batch_size):
        out = function(tf.constant(sources[start : start + batch_size]), tf.constant(beam_size), tf.constant(length_penalty, tf.float32))
        outputs.append({key: value.numpy() for key, value in out.items()})
    return concat_outputs(outputs)


def concat_outputs(outputs):
    """Concatenates per-batch output dicts along the batch axis, padding the time axis."""
    if not outputs:
        return {}
    merged = {}
    for key in outputs[0]:
        values = [o[key] for o in outputs]
        if values[0].ndim >= 2:
            time = max(v.shape[1] for v in values)
            fill = b"" if values[0].dtype.kind in "SO" else 0
            values = [
                np.pad(v, [(0, 0), (0, time - v.shape[1])] + [(0, 0)] * (v.ndim - 2), constant_values=fill) for v in values
            ]
            if values[0].ndim == 3:
                positions = max(v.shape[2] for v in values)
                values = [np.pad(v, [(0, 0), (0, 0), (0, positions - v.shape[2])]) for v in values]
        merged[key] = np.concatenate(values, axis=0)
    return merged


def caption_images(model, pixels, beam_size=3, length_penalty=0.0, batch_size=32):
    """Captions pixels [N, H, W, 3] uint8 with a Captioner or a loaded SavedModel (both have `caption`).

    Returns the concatenated numpy outputs (captions as bytes)."""
    outputs = []
    for start in range(0, len(pixels), batch_size):
        out = model.caption(
            tf.constant(pixels[start : start + batch_size]), tf.constant(beam_size), tf.constant(length_penalty, tf.float32)
        )
        outputs.append({key: value.numpy() for key, value in out.items()})
    return concat_outputs(outputs)
