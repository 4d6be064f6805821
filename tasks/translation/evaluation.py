"""Translation metrics: sacreBLEU and chrF with their signatures."""

import sacrebleu


def corpus_scores(hypotheses, references):
    """sacreBLEU (cased, 13a) and chrF with their signatures; a ValueError when there is nothing
    to score (sacreBLEU itself fails with an IndexError on empty lists)."""
    if not hypotheses:
        raise ValueError("no sentences to score")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_detail": str(bleu_score),
        "sentences": len(hypotheses),
    }
