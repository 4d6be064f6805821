"""Caption metrics: corpus BLEU over all references, attention localisation with hand-made attention."""

import numpy as np
import pytest

from seq2seq.tasks.captioning import shapes
from seq2seq.tasks.captioning.evaluation import (
    attention_heatmap,
    attention_localisation,
    caption_words,
    cell_centre,
    cider_d,
    corpus_bleu_scores,
)


def test_caption_words_lowercase_without_punctuation():
    assert caption_words("A red circle, left of a BLUE square.") == ["a", "red", "circle", "left", "of", "a", "blue", "square"]


def test_bleu_uses_every_reference_and_standard_weights():
    references = [["a large red circle", "there is a large red circle"], ["a small blue square left of a green triangle"]]
    perfect = corpus_bleu_scores(["there is a large red circle", "a small blue square left of a green triangle"], references)
    assert perfect["bleu_1"] == pytest.approx(1.0) and perfect["bleu_4"] == pytest.approx(1.0) and perfect["images"] == 2
    partial = corpus_bleu_scores(["a large red circle", "a small blue square above a green circle"], references)
    assert 0 < partial["bleu_4"] < partial["bleu_3"] < partial["bleu_2"] < partial["bleu_1"] < 1
    from nltk.translate.bleu_score import corpus_bleu

    refs = [[r.split() for r in refs] for refs in references]
    hyps = ["a large red circle".split(), "a small blue square above a green circle".split()]
    assert partial["bleu_2"] == pytest.approx(corpus_bleu(refs, hyps, weights=(0.5, 0.5)))


def test_bleu_input_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        corpus_bleu_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no captions"):
        corpus_bleu_scores([], [])


def test_cell_centre_and_heatmap_map_grid_cells_to_pixels():
    assert cell_centre(0, (8, 8), 64) == (4.0, 4.0)
    assert cell_centre(8 * 2 + 5, (8, 8), 64) == (44.0, 20.0)  # row 2, column 5
    row = np.zeros(4)
    row[3] = 1.0  # cell (1, 1) of a 2x2 grid
    heat = attention_heatmap(row, (2, 2), 4)
    assert heat.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_attention_localisation_counts_colour_and_shape_words():
    scene = shapes.Scene(
        image=np.zeros((64, 64, 3), np.uint8),
        captions=[],
        objects=[
            shapes.ShapeObject("circle", "red", "large", (0, 0, 22, 22)),
            shapes.ShapeObject("square", "blue", "small", (40, 40, 53, 53)),
        ],
    )
    tokens = [["a", "large", "red", "circle", "left", "of", "a", "blue", "square", "green", ""]]
    attention = np.zeros((1, len(tokens[0]), 64), np.float32)
    attention[0, :, 0] = 1.0  # everything on cell (0, 0): centre (4, 4), on the red circle
    attention[0, 7, 5 * 8 + 5] = 2.0  # "blue" on cell (5, 5): centre (44, 44), on the blue square
    attention[0, 8, 7 * 8 + 0] = 2.0  # "square" on cell (7, 0): centre (4, 60), a miss
    result = attention_localisation([scene], tokens, attention, (8, 8), 64)
    # red, circle, blue hit; square misses; "green" names no object and "large"/"of" are not counted
    assert result == {"localisation": 0.75, "words": 4, "hits": 3}
    # boxes of a scene drawn at 128 px are scaled to the 64 px model input
    big = shapes.Scene(np.zeros((128, 128, 3), np.uint8), [], [shapes.ShapeObject("circle", "red", "large", (0, 0, 10, 10))])
    assert attention_localisation([big], [[b"circle"]], np.eye(64)[None, :1], (8, 8), 64)["hits"] == 1
    assert attention_localisation([scene], [["a"]], np.zeros((1, 1, 64)), (8, 8), 64)["localisation"] is None


def test_attention_localisation_maps_cells_as_the_image_was_fitted():
    """A 64x128 (width x height) scene padded to a 128 square: its 64 columns sit at input columns
    16-48 of 64, so cell (0, 2) (centre x 20, y 4) is at scene x (20 * 2 - 32) = 8, y 8; squashed,
    that cell's centre is at scene x 20, y 8."""
    tall = shapes.Scene(np.zeros((128, 64, 3), np.uint8), [], [shapes.ShapeObject("circle", "red", "large", (0, 0, 12, 12))])
    attention = np.zeros((1, 1, 64), np.float32)
    attention[0, 0, 2] = 1.0
    padded = attention_localisation([tall], [["circle"]], attention, (8, 8), 64, fit="pad")
    squashed = attention_localisation([tall], [["circle"]], attention, (8, 8), 64, fit="squash")
    assert padded["hits"] == 1 and squashed["hits"] == 0


def test_cider_d_of_a_hand_checked_example():
    """Two images, disjoint words, so every n-gram's IDF is ln 2 (it occurs in one image of two).
    Image 1: "A." against "a b": unigram cosine 1/sqrt(2) (clipped), no bigram, and the length
    penalty exp(-1/72) for its bigram count 0 against 1; the four n-gram orders averaged, x10:
    10 * exp(-1/72) / (4 sqrt 2) = 1.7434. Image 2: "C d" against "c d": cosine 1 for uni- and
    bigrams, 0 for the orders the captions are too short for: 10 * 2/4 = 5. Corpus: the mean."""
    import math

    pytest.importorskip("pycocoevalcap")
    expected = (10 * math.exp(-1 / 72) / (4 * math.sqrt(2)) + 5) / 2
    assert cider_d(["A.", "C d"], [["a b"], ["c d"]]) == pytest.approx(expected, rel=1e-9)
    assert cider_d(["x y", "z"], [["a b"], ["c d"]]) == 0.0
    with pytest.raises(ValueError, match="1 hypotheses for 2 reference lists"):
        cider_d(["a"], [["a b"], ["c d"]])
