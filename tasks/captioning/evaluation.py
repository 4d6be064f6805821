"""Caption metrics: corpus BLEU-1..4 over all references, and attention localisation on the shapes data.

BLEU follows the captioning literature (Xu et al., 2015; Karpathy and Fei-Fei, 2015): corpus
BLEU (Papineni et al., 2002) with every reference caption of an image, on lowercased
captions with punctuation removed, BLEU-n with uniform weights over 1..n-grams, computed by
nltk's `corpus_bleu`, reported on a 0-1 scale.

CIDEr-D (Vedantam et al., 2015), the COCO caption leaderboard's main metric, is computed by
the COCO toolkit's own code (pycocoevalcap, installed with `pip install seq2seq[coco]`), on the
same lowercased, punctuation-free words as BLEU: the toolkit's PTB tokenizer, METEOR and SPICE
need Java and are not run. Its IDF weights come from the references of the images scored.

Attention localisation (synthetic shapes only): for every generated colour or shape word
that names one object of the scene (`shapes.object_for_word`), take the attention cell with
the highest weight at that step, map it from the h x w grid to the pixels it covers (cell
(i, j) covers rows [i H / h, (i + 1) H / h) and columns [j W / w, (j + 1) W / w)), and
count a hit when the centre of that pixel rectangle lies inside the object's bounding box.
The metric is the fraction of hits.
"""

import re
import warnings

import numpy as np

from seq2seq.tasks.captioning import shapes

BLEU_WEIGHTS = {
    "bleu_1": (1.0,),
    "bleu_2": (0.5, 0.5),
    "bleu_3": (1 / 3, 1 / 3, 1 / 3),
    "bleu_4": (0.25, 0.25, 0.25, 0.25),
}
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
LOCALISED_WORDS = frozenset(shapes.COLOURS) | frozenset(shapes.SHAPES)


def caption_words(caption):
    """'A red circle, left of...' -> ['a', 'red', 'circle', 'left', 'of']: lowercase, punctuation dropped."""
    return _WORD.findall(caption.lower())


def corpus_bleu_scores(hypotheses, references):
    """hypotheses: [N] strings; references: [N] lists of strings (all captions of each image).

    Returns {"bleu_1": ..., "bleu_4": ..., "images": N}, BLEU on a 0-1 scale."""
    from nltk.translate.bleu_score import corpus_bleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no captions to score")
    hyps = [caption_words(h) for h in hypotheses]
    refs = [[caption_words(r) for r in refs] for refs in references]
    if any(not r for r in refs):
        raise ValueError("every image needs at least one reference caption")
    with warnings.catch_warnings():  # nltk warns when an n-gram order has no match at all (BLEU is then 0)
        warnings.simplefilter("ignore", UserWarning)
        scores = {name: float(corpus_bleu(refs, hyps, weights=weights)) for name, weights in BLEU_WEIGHTS.items()}
    scores["images"] = len(hypotheses)
    return scores


def cider_d(hypotheses, references):
    """Corpus CIDEr-D of `hypotheses` ([N] strings) against `references` ([N] lists of strings),
    on the COCO scale (10 for a perfect match of captions of four words or more); None when
    pycocoevalcap is not installed."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return None
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    candidates = {i: [" ".join(caption_words(h))] for i, h in enumerate(hypotheses)}
    truth = {i: [" ".join(caption_words(r)) for r in refs] for i, refs in enumerate(references)}
    score, _ = Cider().compute_score(truth, candidates)
    return float(score)


def cell_centre(cell, grid_size, image_size):
    """(x, y) pixel centre of flat grid position `cell` on an image_size x image_size input."""
    height, width = grid_size
    row, column = divmod(int(cell), width)
    cell_height, cell_width = image_size / height, image_size / width
    return (column + 0.5) * cell_width, (row + 0.5) * cell_height


def attention_localisation(scenes, tokens, attention, grid_size, image_size, fit="squash"):
    """Fraction of generated colour/shape words whose most-attended cell lies on the named object.

    scenes: the shapes.Scene of each image (boxes in the scene's own pixels, mapped to the model
    input as `fit` made it when the scene image is not image_size; see images.IMAGE_FITS);
    tokens: [N, T] strings or bytes ("" after the end); attention: [N, T, h*w].
    Returns {"localisation": fraction or None, "words": counted, "hits": n}.
    """
    hits = counted = 0
    for scene, row_tokens, row_attention in zip(scenes, tokens, attention):
        height, width = scene.image.shape[:2]
        scale = width / image_size, height / image_size
        offset = 0.0, 0.0
        if fit == "pad":  # the input shows the square of side max(height, width), the scene centred
            side = max(height, width)
            scale = side / image_size, side / image_size
            offset = (side - width) // 2, (side - height) // 2
        for step, token in enumerate(row_tokens):
            word = token.decode("utf-8") if isinstance(token, bytes) else str(token)
            if word not in LOCALISED_WORDS:
                continue
            obj = shapes.object_for_word(scene, word)
            if obj is None:  # a hallucinated object: nothing to localise
                continue
            x, y = cell_centre(np.argmax(row_attention[step]), grid_size, image_size)
            x, y = x * scale[0] - offset[0], y * scale[1] - offset[1]
            x0, y0, x1, y1 = obj.box
            counted += 1
            hits += int(x0 <= x < x1 and y0 <= y < y1)
    return {"localisation": hits / counted if counted else None, "words": counted, "hits": hits}


def attention_heatmap(attention_row, grid_size, image_size):
    """One step's attention [h*w] -> [image_size, image_size] (each cell's weight over its pixels)."""
    height, width = grid_size
    grid = np.asarray(attention_row, dtype=np.float32).reshape(height, width)
    rows = (np.arange(image_size) * height) // image_size
    columns = (np.arange(image_size) * width) // image_size
    return grid[rows][:, columns]


def plot_caption_attention(image, tokens, attention, grid_size, path, title=None):
    """Writes a PNG: the image, then one panel per generated word with its attention over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    words = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in tokens]
    words = [w for w in words if w]
    size = image.shape[0]
    columns = min(6, len(words) + 1)
    rows = -(-(len(words) + 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title(title or "image", fontsize=8)
    for index, word in enumerate(words, start=1):
        axis = axes.flat[index]
        axis.imshow(image)
        axis.imshow(attention_heatmap(attention[index - 1], grid_size, size), cmap="jet", alpha=0.5, extent=(0, size, size, 0))
        axis.set_title(word, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
