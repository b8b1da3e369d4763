"""BLEU-4 and CIDEr-D for captioning, computed as the COCO caption evaluation does (no Java, no downloads).

Captions are lower-cased, punctuation is dropped and words are split on whitespace (the COCO toolkit's PTB
tokenizer does the same for plain captions). BLEU is corpus-level with the "closest reference length" brevity
penalty; CIDEr-D uses n-grams 1-4, document frequencies from the references of the evaluated set, a Gaussian length
penalty (sigma 6), clipped hypothesis counts and the factor 10.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

_PUNCTUATION = re.compile(r"[^\w\s]")


def tokenize_caption(caption: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace."""
    return _PUNCTUATION.sub(" ", caption.lower()).split()


def _ngrams(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _check(predictions: Mapping, references: Mapping) -> None:
    if set(predictions) != set(references):
        missing = sorted(set(references) - set(predictions), key=str)[:5]
        extra = sorted(set(predictions) - set(references), key=str)[:5]
        raise ValueError(f"predictions and references need the same ids; missing {missing}, unexpected {extra}")
    if not predictions:
        raise ValueError("nothing to evaluate: no predictions")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of captions")


def bleu(predictions: Mapping[object, str], references: Mapping[object, Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..`max_n` (fractions in [0, 1]); `predictions[id]` is one caption, `references[id]` a list."""
    _check(predictions, references)
    guesses, corrects = [0] * max_n, [0] * max_n
    hypothesis_length = reference_length = 0
    for key, prediction in predictions.items():
        words = tokenize_caption(prediction)
        refs = [tokenize_caption(ref) for ref in references[key]]
        max_counts: Counter = Counter()
        for ref in refs:
            max_counts |= _ngrams(ref, max_n)  # elementwise max
        counts = _ngrams(words, max_n)
        for n in range(max_n):
            guesses[n] += max(len(words) - n, 0)
            corrects[n] += sum(min(c, max_counts[g]) for g, c in counts.items() if len(g) == n + 1)
        hypothesis_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in refs)[1]
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (corrects[n] + 1e-15) / (guesses[n] + 1e-9)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (hypothesis_length + 1e-15) / (reference_length + 1e-9)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def cider(predictions: Mapping[object, str], references: Mapping[object, Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D of the set (the COCO evaluation's "CIDEr", e.g. 1.458 for the paper's 145.8)."""
    _check(predictions, references)
    max_n = 4
    reference_counts = {
        key: [_ngrams(tokenize_caption(ref), max_n) for ref in refs] for key, refs in references.items()
    }
    document_frequency: Counter = Counter()
    for counts in reference_counts.values():
        document_frequency.update(set().union(*counts))
    log_images = math.log(len(references))

    def vectors(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(max_n)]
        norms = [0.0] * max_n
        length = 0
        for gram, term_frequency in counts.items():
            n = len(gram) - 1
            weight = term_frequency * (log_images - math.log(max(1.0, document_frequency[gram])))
            vec[n][gram] = weight
            norms[n] += weight * weight
            if n == 1:  # the toolkit measures caption length in bigrams
                length += term_frequency
        return vec, [math.sqrt(norm) for norm in norms], length

    total = 0.0
    for key, prediction in predictions.items():
        hyp_vec, hyp_norm, hyp_length = vectors(_ngrams(tokenize_caption(prediction), max_n))
        score = 0.0
        for counts in reference_counts[key]:
            ref_vec, ref_norm, ref_length = vectors(counts)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma**2))
            per_n = []
            for n in range(max_n):
                value = sum(
                    min(weight, ref_vec[n].get(gram, 0.0)) * ref_vec[n].get(gram, 0.0)
                    for gram, weight in hyp_vec[n].items()
                )
                if hyp_norm[n] and ref_norm[n]:
                    value /= hyp_norm[n] * ref_norm[n]
                per_n.append(value * penalty)
            score += sum(per_n) / max_n
        total += 10.0 * score / len(reference_counts[key])
    return total / len(predictions)


def caption_scores(predictions: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> dict[str, float]:
    """`{"bleu4": ..., "cider": ...}` in the papers' units (x100)."""
    return {"bleu4": 100 * bleu(predictions, references)[3], "cider": 100 * cider(predictions, references)}


class CaptionMetrics:
    """A `compute_metrics` for `Blip2Trainer(predict_with_generate=True)`: BLEU-4 and CIDEr of the generated captions.

    `Blip2Trainer` hands it decoded text: `EvalPrediction.predictions` the generated captions and `label_ids` the
    target captions, in evaluation-set order. Each caption is scored against `references[i]` (all reference
    captions of evaluation example `i`, e.g. COCO's five) when given, else against its single decoded target.

    Args:
        references: One list of reference captions per evaluation example, in the evaluation dataset's order.
    """

    def __init__(self, references: Sequence[Sequence[str]] | None = None) -> None:
        if references is not None:
            for index, captions in enumerate(references):
                if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
                    raise ValueError(f"references[{index}] must be a non-empty list of captions, got {captions!r}")
        self.references = references

    def __call__(self, prediction: Any) -> dict[str, float]:
        captions = list(prediction.predictions)
        if not all(isinstance(caption, str) for caption in captions):
            raise ValueError(
                "CaptionMetrics scores decoded captions: use it with Blip2Trainer and predict_with_generate=True"
            )
        if self.references is None:
            if prediction.label_ids is None:
                raise ValueError("no references: the evaluation batches have no labels and none were given")
            references = [[target] for target in prediction.label_ids]
        else:
            references = [list(captions) for captions in self.references]
        if len(references) != len(captions):
            raise ValueError(f"{len(captions)} generated captions but {len(references)} reference lists")
        return caption_scores(dict(enumerate(captions)), dict(enumerate(references)))
