"""Retrieval evaluation (ITC + ITM rerank) against a brute-force reference, recall on hand-made scores, zero-shot."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_SIZE, TINY_RANDOM, pixels, randomise_, stage1_config_dict, tiny_qformer_tokenizer
from transformers import AutoTokenizer, pipeline

from modeling_blip2 import Blip2Config, Blip2ForImageTextRetrieval, Blip2ImageTextProcessor, blip2_image_processor
from modeling_blip2.retrieval import (
    EncodedImages,
    encode_images,
    encode_texts,
    evaluate_retrieval,
    recall_at_k,
    zero_shot_classify,
    zero_shot_classify_texts,
)

NUM_IMAGES, CAPTIONS_PER_IMAGE = 4, 2
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2, 3, 3]
KS = (1, 5, 10)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matrices gain nothing from intra-op threads, and on a shared, busy CPU their spin-waits cost seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> Blip2ForImageTextRetrieval:
    # std 0.5: similarities and ITM logits spread enough that reranking reorders candidates, with no near-ties.
    return randomise_(Blip2ForImageTextRetrieval(Blip2Config(**stage1_config_dict())), std=0.5, seed=0).eval()


def _captions(count: int = NUM_IMAGES * CAPTIONS_PER_IMAGE, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 90, (count, length), generator=generator)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    for row, padding in ((1, 2), (4, 3), (6, 1)):
        if row < count:
            ids[row, -padding:], mask[row, -padding:] = 0, 0
    return ids, mask


def _brute_force(model, images, ids, mask, k: int) -> dict:
    """ITC from the ITC forward, ITM pair by pair, rerank and recall with explicit loops."""
    with torch.no_grad():
        similarity = model(images, ids, mask).logits_per_image  # (N, M)
        itm = [
            [
                float(
                    model(
                        images[i : i + 1], ids[j : j + 1], mask[j : j + 1], use_image_text_matching_head=True
                    ).logits_per_image[0, 1]
                )
                for j in range(ids.shape[0])
            ]
            for i in range(images.shape[0])
        ]
    num_images, num_texts = similarity.shape
    sim = similarity.tolist()

    def rerank(candidates: list[int], score) -> list[int]:
        top = sorted(candidates, key=lambda c: -score(c, itc=True))[:k]
        return sorted(top, key=lambda c: -score(c, itc=False))

    text_rankings = [
        rerank(list(range(num_texts)), lambda j, itc, i=i: sim[i][j] + (0.0 if itc else itm[i][j]))
        for i in range(num_images)
    ]
    image_rankings = [
        rerank(list(range(num_images)), lambda i, itc, j=j: sim[i][j] + (0.0 if itc else itm[i][j]))
        for j in range(num_texts)
    ]
    itc_text_rankings = [sorted(range(num_texts), key=lambda j, i=i: -sim[i][j]) for i in range(num_images)]
    itc_image_rankings = [sorted(range(num_images), key=lambda i, j=j: -sim[i][j]) for j in range(num_texts)]

    def recalls(by_image: list[list[int]], by_text: list[list[int]]) -> dict[str, float]:
        out = {}
        for cut in KS:
            hits = sum(any(TEXT_TO_IMAGE[j] == i for j in ranking[:cut]) for i, ranking in enumerate(by_image))
            out[f"tr@{cut}"] = 100.0 * hits / num_images
            hits = sum(TEXT_TO_IMAGE[j] in ranking[:cut] for j, ranking in enumerate(by_text))
            out[f"ir@{cut}"] = 100.0 * hits / num_texts
        return out

    final = [[sim[i][j] + itm[i][j] for j in range(num_texts)] for i in range(num_images)]
    return {
        "similarity": similarity,
        "final": final,
        "text_rankings": text_rankings,
        "image_rankings": image_rankings,
        "itc_text_rankings": itc_text_rankings,
        "metrics": recalls(text_rankings, image_rankings),
        "itc_metrics": recalls(itc_text_rankings, itc_image_rankings),
    }


def test_evaluate_retrieval_matches_a_brute_force_reference(model) -> None:
    images = pixels(batch=NUM_IMAGES, seed=2)
    ids, mask = _captions()
    reference = _brute_force(model, images, ids, mask, k=2)
    final, expected, expected_itc = reference["final"], reference["metrics"], reference["itc_metrics"]
    result = evaluate_retrieval(model, images, ids, mask, TEXT_TO_IMAGE, k=2, batch_size=3, progress=False)

    assert torch.allclose(result.similarity, reference["similarity"], atol=1e-5)
    reranked = zip(reference["text_rankings"], reference["itc_text_rankings"], strict=True)
    assert any(ranking != itc_ranking[:2] for ranking, itc_ranking in reranked), "ITM reordered nothing: weak test"
    for i, ranking in enumerate(reference["text_rankings"]):
        row = result.scores_image_to_text[i]
        assert torch.isfinite(row).sum() == 2
        assert row.argsort(descending=True)[:2].tolist() == ranking
        for j in ranking:
            assert math.isclose(float(row[j]), final[i][j], abs_tol=1e-4)
    for j, ranking in enumerate(reference["image_rankings"]):
        row = result.scores_text_to_image[j]
        assert torch.isfinite(row).sum() == 2
        assert row.argsort(descending=True)[:2].tolist() == ranking
        for i in ranking:
            assert math.isclose(float(row[i]), final[i][j], abs_tol=1e-4)
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value), name
    for name, value in expected_itc.items():
        assert result.itc_metrics[name] == pytest.approx(value), name
    assert result.metrics["tr_mean"] == pytest.approx(sum(expected[f"tr@{cut}"] for cut in KS) / 3)
    assert result.metrics["r_mean"] == pytest.approx(sum(expected.values()) / 6)


def test_batch_size_and_precomputed_encodings_do_not_change_the_result(model) -> None:
    images = pixels(batch=NUM_IMAGES, seed=2)
    ids, mask = _captions()
    one = evaluate_retrieval(model, images, ids, mask, TEXT_TO_IMAGE, k=3, batch_size=1, progress=False)
    three = evaluate_retrieval(model, images, ids, mask, TEXT_TO_IMAGE, k=3, batch_size=3, progress=False)
    encoded = encode_images(model, [images[:3], {"pixel_values": images[3:]}], progress=False)
    cached = evaluate_retrieval(model, encoded, ids, mask, torch.tensor(TEXT_TO_IMAGE), k=3, progress=False)
    for other in (three, cached):
        assert other.metrics == one.metrics and other.itc_metrics == one.itc_metrics
        assert torch.allclose(other.similarity, one.similarity, atol=1e-5)
        for name in ("scores_image_to_text", "scores_text_to_image"):
            a, b = getattr(one, name), getattr(other, name)
            assert torch.equal(torch.isinf(a), torch.isinf(b)), name
            assert torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-4), name


def test_k_is_clamped_and_encoders_restore_the_training_mode(model) -> None:
    images = pixels(batch=NUM_IMAGES, seed=2)
    ids, mask = _captions()
    model.train()
    try:
        result = evaluate_retrieval(model, images, ids, mask, TEXT_TO_IMAGE, k=1000, progress=False)
        assert model.training
    finally:
        model.eval()
    assert bool(torch.isfinite(result.scores_image_to_text).all() & torch.isfinite(result.scores_text_to_image).all())
    encoded_images = encode_images(model, images, batch_size=3, progress=False, embeds_dtype=torch.float16)
    encoded_texts = encode_texts(model, ids, mask, batch_size=5, progress=False)
    assert encoded_images.image_embeds.shape == (NUM_IMAGES, 1 + (IMAGE_SIZE // 7) ** 2, 32)
    assert encoded_images.image_embeds.dtype == torch.float16 and encoded_images.image_embeds.device.type == "cpu"
    assert encoded_images.image_features.shape == (NUM_IMAGES, 4, 16)
    assert encoded_texts.text_features.shape == (8, 16)
    with torch.no_grad():
        text_features = model.get_text_embeddings(ids, mask).pooler_output
        assert torch.allclose(encoded_texts.text_features, text_features, atol=1e-6)
        assert torch.allclose(encoded_images.image_features, model.get_image_features(images).pooler_output, atol=1e-6)


def test_recall_at_k_on_hand_made_scores() -> None:
    text_to_image = [0, 0, 1, 1, 2, 2]
    positive = torch.tensor(text_to_image)[None, :] == torch.arange(3)[:, None]  # (3, 6)
    perfect = positive.float()
    assert set(recall_at_k(perfect, perfect.t(), text_to_image).values()) == {100.0}

    # Reversed: each image ranks its captions last, each text ranks its image last.
    reversed_ = 1.0 - perfect
    metrics = recall_at_k(reversed_, reversed_.t(), text_to_image, ks=(1, 2, 4, 5, 6))
    assert [metrics[f"tr@{cut}"] for cut in (1, 2, 4, 5, 6)] == [0.0, 0.0, 0.0, 100.0, 100.0]
    assert [metrics[f"ir@{cut}"] for cut in (1, 2, 4)] == [0.0, 0.0, 100.0]

    # Image 0's second caption alone is top-1: a hit. Text 1 puts image 2 first: an IR@1 miss, IR@2 hit.
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.2, 0.3, 0.0],
            [0.0, 0.1, 0.2, 0.3, 0.9, 0.8],  # image 1: its captions (2, 3) rank 4th and 3rd
            [0.0, 0.0, 0.0, 0.0, 0.7, 0.6],
        ]
    )
    by_text = torch.tensor(
        [[0.9, 0.1, 0.2], [0.5, 0.1, 0.6], [0.0, 1.0, 0.5], [0.2, 0.1, 0.3], [0, 0, 1.0], [0, 0, 1.0]]
    )
    metrics = recall_at_k(scores, by_text, text_to_image, ks=(1, 2, 3))
    assert metrics["tr@1"] == pytest.approx(200 / 3) and metrics["tr@3"] == 100.0
    assert metrics["ir@1"] == pytest.approx(100 * 4 / 6) and metrics["ir@2"] == pytest.approx(100 * 5 / 6)
    assert metrics["ir@3"] == 100.0
    assert metrics["r_mean"] == pytest.approx((metrics["tr_mean"] + metrics["ir_mean"]) / 2)

    # -inf means "not retrieved": never a hit, even when the cut-off exceeds the candidates.
    truncated = scores.masked_fill(scores < 0.5, float("-inf"))
    metrics = recall_at_k(truncated, by_text, text_to_image, ks=(6,))
    assert metrics["tr@6"] == pytest.approx(200 / 3)
    # Ties go to the lower index (stable sort).
    tied = torch.zeros(3, 6)
    assert recall_at_k(tied, tied.t(), text_to_image, ks=(1,))["tr@1"] == pytest.approx(100 / 3)


def test_retrieval_bad_input(model) -> None:
    images = pixels(batch=NUM_IMAGES, seed=2)
    ids, mask = _captions()
    with pytest.raises(ValueError, match=r"one image index per text \(8\)"):
        evaluate_retrieval(model, images, ids, mask, TEXT_TO_IMAGE[:-1], progress=False)
    with pytest.raises(ValueError, match=r"text_to_image\[7\] = 4 is out of range"):
        evaluate_retrieval(model, images, ids, mask, TEXT_TO_IMAGE[:-1] + [4], progress=False)
    with pytest.raises(ValueError, match="image 3 has no text"):
        evaluate_retrieval(model, images, ids, mask, [0, 0, 1, 1, 2, 2, 2, 2], progress=False)
    with pytest.raises(ValueError, match="k .* must be >= 1"):
        evaluate_retrieval(model, images, ids, mask, TEXT_TO_IMAGE, k=0, progress=False)
    with pytest.raises(ValueError, match="num_images >= 1"):
        evaluate_retrieval(model, images[:0], ids, mask, TEXT_TO_IMAGE, progress=False)
    with pytest.raises(ValueError, match="num_texts >= 1"):
        evaluate_retrieval(model, images, ids[:0], mask[:0], [], progress=False)
    with pytest.raises(ValueError, match="attention_mask must match"):
        evaluate_retrieval(model, images, ids, mask[:, :3], TEXT_TO_IMAGE, progress=False)
    with pytest.raises(ValueError, match="integer image indices"):
        evaluate_retrieval(model, images, ids, mask, [float(i) for i in TEXT_TO_IMAGE], progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_retrieval(model, images, ids, mask, TEXT_TO_IMAGE, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="stage-1 model"):
        evaluate_retrieval(torch.nn.Linear(2, 2), images, ids, mask, TEXT_TO_IMAGE, progress=False)
    with pytest.raises(ValueError, match="scores_text_to_image must be"):
        recall_at_k(torch.zeros(2, 4), torch.zeros(2, 4), [0, 0, 1, 1])


def test_zero_shot_classify_follows_itc_and_adds_itm(model) -> None:
    images = pixels(batch=3, seed=4)
    ids, mask = _captions(count=5)
    logits = zero_shot_classify(model, images, ids, mask)
    with torch.no_grad():
        itc = model(images, ids, mask).logits_per_image
        itm = model(images[1:2], ids[3:4], mask[3:4], use_image_text_matching_head=True).logits_per_image[0, 1]
    assert logits.shape == (3, 5)
    assert torch.allclose(logits, itc, atol=1e-5)
    assert torch.equal(logits.argmax(dim=1), itc.argmax(dim=1))
    projected_rows: list[int] = []  # images projected to the first cross-attention layer's keys
    cross_attention = next(layer for layer in model.qformer.encoder.layer if layer.has_cross_attention)
    hook = cross_attention.crossattention.attention.key.register_forward_hook(
        lambda module, args, output: projected_rows.append(len(args[0]))
    )
    try:
        with_itm = zero_shot_classify(model, images, ids, mask, use_itm=True, batch_size=4)
    finally:
        hook.remove()
    # The ITC encoding of the 3 images, then 15 pairs, image by image, 4 per batch: each batch projects its
    # distinct images once (1 + 2 + 2 + 1), not once per pair
    assert projected_rows == [3, 1, 2, 2, 1]
    assert with_itm.shape == (3, 5)
    assert float(with_itm[1, 3]) == pytest.approx(float(itc[1, 3] + itm), abs=1e-4)


def test_zero_shot_classify_texts_output_and_the_transformers_pipeline(model) -> None:
    tokenizer = tiny_qformer_tokenizer()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(2)]
    labels = ["cat", "dog", "square"]
    results = zero_shot_classify_texts(model, tokenizer, images, labels, template="a photo of a {}.")
    assert len(results) == 2
    for per_image in results:
        assert sorted(item["label"] for item in per_image) == sorted(labels)
        scores = [item["score"] for item in per_image]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0)
    single = zero_shot_classify_texts(model, tokenizer, np.asarray(images[0]), labels, use_itm=True, temperature=0.1)
    assert isinstance(single, list) and isinstance(single[0], dict) and set(single[0]) == {"label", "score"}

    processor = Blip2ImageTextProcessor(
        blip2_image_processor(IMAGE_SIZE), AutoTokenizer.from_pretrained(TINY_RANDOM), num_query_tokens=4
    )
    with pytest.raises(ValueError, match="no qformer_tokenizer"):
        zero_shot_classify_texts(model, processor, images, labels)
    processor.qformer_tokenizer = tokenizer
    assert zero_shot_classify_texts(model, processor, images, labels) == results

    classifier = pipeline(
        "zero-shot-image-classification",
        model=model,
        tokenizer=tokenizer,
        image_processor=blip2_image_processor(IMAGE_SIZE),
    )
    from_pipeline = classifier(images, candidate_labels=labels, hypothesis_template="a photo of a {}.")
    for ours, theirs in zip(results, from_pipeline, strict=True):
        assert [item["label"] for item in ours] == [item["label"] for item in theirs]
        assert [item["score"] for item in ours] == pytest.approx([item["score"] for item in theirs], abs=1e-5)

    with pytest.raises(ValueError, match="labels must be a non-empty list"):
        zero_shot_classify_texts(model, tokenizer, images, [])
    with pytest.raises(ValueError, match="template must contain"):
        zero_shot_classify_texts(model, tokenizer, images, labels, template="a photo")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        zero_shot_classify_texts(model, tokenizer, images, labels, temperature=0)
    with pytest.raises(ValueError, match="pixel_values must be"):
        zero_shot_classify(model, torch.zeros(3, 28, 28), *_captions(count=2))
    assert isinstance(encode_images(model, pixels(), progress=False), EncodedImages)
