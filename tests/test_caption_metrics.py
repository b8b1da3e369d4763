"""BLEU-4 and CIDEr-D: hand-checkable cases and agreement with the COCO caption toolkit (pycocoevalcap)."""

from __future__ import annotations

import math
import random

import pytest

from modeling_blip2.caption_metrics import bleu, caption_scores, cider, tokenize_caption


def test_tokenization_and_trivial_cases() -> None:
    assert tokenize_caption("A Dog, on the LEFT!") == ["a", "dog", "on", "the", "left"]
    refs = {0: ["a dog sits on the red mat"], 1: ["two cats play with a ball"]}
    perfect = {0: "A dog sits on the red mat.", 1: "two cats play with a ball"}
    assert bleu(perfect, refs)[3] == pytest.approx(1.0)
    wrong = {0: "zebra zebra zebra zebra", 1: "giraffe giraffe giraffe giraffe"}
    assert bleu(wrong, refs)[0] < 1e-6 and cider(wrong, refs) == pytest.approx(0.0)
    short = {0: "a dog sits", 1: "two cats play"}  # precise but short: the brevity penalty bites
    assert bleu(short, refs)[0] == pytest.approx(math.exp(1 - 13 / 6), rel=1e-9)  # 6 words vs 7 + 6
    assert set(caption_scores(perfect, refs)) == {"bleu4", "cider"}


def test_mismatched_ids_and_empty_references_are_refused() -> None:
    with pytest.raises(ValueError, match="same ids"):
        bleu({0: "a"}, {1: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        cider({0: "a"}, {0: []})


def test_agrees_with_the_coco_caption_toolkit() -> None:
    bleu_reference = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_reference = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = random.Random(0)
    words = [
        "a",
        "man",
        "dog",
        "cat",
        "on",
        "the",
        "left",
        "right",
        "red",
        "blue",
        "sits",
        "near",
        "table",
        "with",
        "two",
        "small",
        "big",
    ]

    def caption() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))

    references = {i: [caption() for _ in range(5)] for i in range(40)}
    predictions = {i: references[i][0] if i % 3 == 0 else caption() for i in range(40)}
    tokenized_refs = {i: [" ".join(tokenize_caption(r)) for r in refs] for i, refs in references.items()}
    tokenized_preds = {i: [" ".join(tokenize_caption(p))] for i, p in predictions.items()}
    expected_bleu, _ = bleu_reference.Bleu(4).compute_score(tokenized_refs, tokenized_preds, verbose=0)
    expected_cider, _ = cider_reference.Cider().compute_score(tokenized_refs, tokenized_preds)
    assert bleu(predictions, references) == pytest.approx(expected_bleu, rel=1e-9)
    assert cider(predictions, references) == pytest.approx(expected_cider, rel=1e-9)
