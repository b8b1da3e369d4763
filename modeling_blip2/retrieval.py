"""Image-text retrieval evaluation and zero-shot image classification with the stage-1 (Q-Former) models.

Retrieval follows the paper's recipe (BLIP-2 section 4.3, LAVIS `compute_sim_matrix`): ITC cosine similarity for all
image-text pairs (the best-matching query decides), the top `k` candidates of each query reranked by the ITM head,
final score = ITM positive-class logit + ITC similarity. Works with `Blip2ForImageTextRetrieval` and
`Blip2ForPretraining`, with the model's own building blocks (`image_embeddings`, `query_outputs`, `project_image`,
`text_outputs`, `project_text`, `matching_outputs`).

Zero-shot classification scores each image against one prompt per class ("a photo of a {label}.").
transformers' own `pipeline("zero-shot-image-classification", model=retrieval_model, tokenizer=qformer_tokenizer,
image_processor=blip2_image_processor(image_size))` also works with `Blip2ForImageTextRetrieval`: the model is
registered for `AutoModelForZeroShotImageClassification` and its ITC forward returns `logits_per_image`. That
pipeline needs the BERT (Q-Former) tokenizer and the image processor passed separately (our processor's `tokenizer`
is the LLM's) and applies softmax to raw cosine similarities, which gives flat probabilities with the right order;
`zero_shot_classify_texts(..., temperature=1.0)` returns the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .pretraining import _Blip2Stage1Model
from .processing import Blip2ImageTextProcessor, ImageLike, blip2_image_processor, to_rgb_images

RERANK_K = 128  # candidates per query reranked by ITM (the paper's k)
RECALL_KS = (1, 5, 10)
ZERO_SHOT_TEMPLATE = "a photo of a {}."
# Rows of the score matrices ranked at a time by `recall_at_k`: bounds the (rows, columns) int64 rank buffer.
_RANK_CHUNK = 512


@dataclass
class EncodedImages:
    """Images encoded once for retrieval.

    Args:
        image_embeds: `(N, 1 + num_patches, vision_hidden)` post-LayerNorm image features, kept for the ITM head
            (on `storage_device`, CPU by default).
        image_features: `(N, num_query_tokens, embed_dim)` L2-normalised ITC query embeddings, float32.
    """

    image_embeds: torch.Tensor
    image_features: torch.Tensor

    def __len__(self) -> int:
        return self.image_features.shape[0]


@dataclass
class EncodedTexts:
    """Texts encoded once for retrieval.

    Args:
        input_ids: `(M, T)` Q-Former (BERT) token ids, kept for the ITM head.
        attention_mask: `(M, T)` padding mask.
        text_features: `(M, embed_dim)` L2-normalised ITC `[CLS]` embeddings, float32.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_features: torch.Tensor

    def __len__(self) -> int:
        return self.text_features.shape[0]


@dataclass
class RetrievalResult:
    """Output of `evaluate_retrieval`.

    Args:
        metrics: Recall after ITM reranking, in percent: `tr@1`, `tr@5`, `tr@10` (image -> text; an image is a hit if
            any of its captions is in the top K), `ir@1`, `ir@5`, `ir@10` (text -> image), `tr_mean`, `ir_mean` and
            `r_mean` (the mean of the six).
        itc_metrics: The same recalls ranked by ITC similarity alone (no reranking), for reference.
        similarity: `(N, M)` ITC cosine similarities of every image with every text (max over queries).
        scores_image_to_text: `(N, M)` final scores (ITM positive logit + ITC similarity) of each image's top-k texts;
            texts outside an image's top k are `-inf`.
        scores_text_to_image: `(M, N)` likewise for each text's top-k images; `-inf` outside the top k.
        k: The requested candidates per query; each direction reranks `min(k, number of candidates)`.
    """

    metrics: dict[str, float]
    itc_metrics: dict[str, float]
    similarity: torch.Tensor
    scores_image_to_text: torch.Tensor
    scores_text_to_image: torch.Tensor
    k: int


# -- encoding ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(
    model: _Blip2Stage1Model,
    pixel_values_or_batches: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 32,
    progress: bool = True,
    embeds_dtype: torch.dtype | None = None,
    storage_device: str | torch.device = "cpu",
) -> EncodedImages:
    """Encodes images for retrieval: post-LayerNorm features for ITM and normalised query embeddings for ITC.

    Args:
        model: A `Blip2ForImageTextRetrieval` or `Blip2ForPretraining`; run in eval mode, its mode restored after.
        pixel_values_or_batches: `(N, 3, H, W)` pixels (split into `batch_size` chunks), or an iterable of such
            batches (e.g. a DataLoader yielding tensors or dicts with `pixel_values`).
        batch_size: Images per forward pass when a single tensor is given.
        progress: Show a tqdm progress bar.
        embeds_dtype: Storage dtype of `image_embeds` (e.g. `model.vision_model.dtype` or `torch.float16` halves the
            memory of a large gallery); None keeps the post-LayerNorm dtype.
        storage_device: Where the encodings are kept (CPU by default: ViT-g features of 5k images are ~7 GB).
    """
    _check_model(model)
    _check_batch_size(batch_size)
    batches, total = _image_batches(pixel_values_or_batches, batch_size)
    embeds, features = [], []
    with _eval_mode(model):
        for batch in tqdm(batches, total=total, desc="Encoding images", unit="batch", disable=not progress):
            image_embeds = model.image_embeddings(batch.to(model.device))  # (B, S, Dv)
            image_features = model.project_image(model.query_outputs(image_embeds).last_hidden_state)  # (B, Q, E)
            embeds.append(image_embeds.to(storage_device, embeds_dtype or image_embeds.dtype))
            features.append(image_features.to(storage_device, torch.float32))
    if not features:
        raise ValueError("expected at least one image, got none")
    return EncodedImages(image_embeds=torch.cat(embeds), image_features=torch.cat(features))


@torch.no_grad()
def encode_texts(
    model: _Blip2Stage1Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: bool = True,
    storage_device: str | torch.device = "cpu",
) -> EncodedTexts:
    """Encodes texts for retrieval: normalised `[CLS]` embeddings for ITC; ids and mask are kept for ITM.

    Args:
        model: A `Blip2ForImageTextRetrieval` or `Blip2ForPretraining`; run in eval mode, its mode restored after.
        input_ids: `(M, T)` Q-Former (BERT) token ids starting with `[CLS]`.
        attention_mask: `(M, T)` padding mask (all ones when None).
        batch_size: Texts per forward pass.
        progress: Show a tqdm progress bar.
        storage_device: Where the encodings are kept.
    """
    _check_model(model)
    _check_batch_size(batch_size)
    input_ids, attention_mask = _check_texts(input_ids, attention_mask)
    features = []
    with _eval_mode(model):
        starts = range(0, input_ids.shape[0], batch_size)
        for start in tqdm(starts, desc="Encoding texts", unit="batch", disable=not progress):
            ids = input_ids[start : start + batch_size].to(model.device)
            mask = attention_mask[start : start + batch_size].to(model.device)
            text_features = model.project_text(model.text_outputs(ids, mask).last_hidden_state)  # (B, E)
            features.append(text_features.to(storage_device, torch.float32))
    return EncodedTexts(
        input_ids=input_ids.to(storage_device),
        attention_mask=attention_mask.to(storage_device),
        text_features=torch.cat(features),
    )


@torch.no_grad()
def itc_similarity(
    model: _Blip2Stage1Model, images: EncodedImages, texts: EncodedTexts, batch_size: int = 32
) -> torch.Tensor:
    """`(N, M)` float32 ITC cosine similarity of every image with every text (the best-matching query decides)."""
    _check_batch_size(batch_size)
    text_features = texts.text_features.to(model.device, torch.float32)
    rows = []
    # Chunked over images: the (N, Q, M) intermediate of a 5k x 25k gallery would not fit in memory at once.
    for start in range(0, len(images), batch_size):
        image_features = images.image_features[start : start + batch_size].to(model.device, torch.float32)
        rows.append((image_features @ text_features.t()).max(dim=1).values.cpu())  # (B, Q, M) -> (B, M)
    return torch.cat(rows)


@torch.no_grad()
def itm_scores(
    model: _Blip2Stage1Model,
    images: EncodedImages,
    texts: EncodedTexts,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """ITM positive-class logits `(P,)` of the pairs `(image_index[p], text_index[p])`, float32 on CPU.

    Pairs sorted by image (as `evaluate_retrieval` and `zero_shot_classify` pass them) move each image's features to
    the device, and project them to the Q-Former's cross-attention keys and values, about once per batch rather than
    once per pair.
    """
    _check_batch_size(batch_size)
    logits = []
    with _eval_mode(model):
        starts = range(0, image_index.shape[0], batch_size)
        for start in tqdm(starts, desc="Reranking with ITM", unit="batch", disable=not progress):
            batch_images, batch_pairs = image_index[start : start + batch_size].unique(return_inverse=True)
            texts_batch = text_index[start : start + batch_size]
            image_embeds = images.image_embeds[batch_images.to(images.image_embeds.device)].to(model.device)
            # Each distinct image's cross-attention keys and values are computed once and shared by its pairs.
            image_key_values = model.qformer.image_key_values(image_embeds)
            pair_logits, _ = model.matching_outputs(
                image_key_values.select(batch_pairs.to(model.device)),
                texts.input_ids[texts_batch].to(model.device),
                texts.attention_mask[texts_batch].to(model.device),
            )  # (B, 2): (no match, match)
            logits.append(pair_logits[:, 1].float().cpu())
    return torch.cat(logits) if logits else torch.empty(0)


# -- retrieval ------------------------------------------------------------------------------------------------------


def evaluate_retrieval(
    model: _Blip2Stage1Model,
    pixel_values: torch.Tensor | Iterable[torch.Tensor] | EncodedImages,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    text_to_image: Sequence[int] | torch.Tensor,
    k: int = RERANK_K,
    batch_size: int = 32,
    progress: bool = True,
) -> RetrievalResult:
    """Image-text retrieval as in the paper: ITC over all pairs, top-k reranked by ITM, recall at 1/5/10.

    Each image's `k` most ITC-similar texts, and each text's `k` most similar images, are scored by the ITM head;
    the final score of a candidate is its ITM positive logit plus its ITC similarity, and candidates outside the top
    k get `-inf` (they never count as hits, also at a recall@K with K > k). The ITM head runs once per distinct
    (image, text) pair of the two directions, `batch_size` pairs at a time. `k` is clamped to the number of candidates.

    Args:
        model: A `Blip2ForImageTextRetrieval` or `Blip2ForPretraining`.
        pixel_values: `(N, 3, H, W)` images, an iterable of pixel batches, or `encode_images`' output.
        input_ids: `(M, T)` Q-Former (BERT) token ids of the captions.
        attention_mask: `(M, T)` padding mask (all ones when None).
        text_to_image: `M` ints: the index of caption `j`'s image (several captions per image are the norm).
        k: Candidates reranked per query (128 in the paper).
        batch_size: Images, texts or ITM pairs per forward pass.
        progress: Show tqdm progress bars.
    """
    _check_model(model)
    if k < 1:
        raise ValueError(f"k (candidates reranked per query) must be >= 1, got {k}")
    _check_batch_size(batch_size)
    input_ids, attention_mask = _check_texts(input_ids, attention_mask)
    if not isinstance(pixel_values, EncodedImages):
        pixel_values = encode_images(model, pixel_values, batch_size=batch_size, progress=progress)
    images = pixel_values
    num_images, num_texts = len(images), input_ids.shape[0]
    text_to_image = _check_text_to_image(text_to_image, num_images, num_texts)
    texts = encode_texts(model, input_ids, attention_mask, batch_size=batch_size, progress=progress)

    similarity = itc_similarity(model, images, texts, batch_size)  # (N, M)
    k_texts, k_images = min(k, num_texts), min(k, num_images)
    top_texts = similarity.topk(k_texts, dim=1).indices  # (N, k_texts)
    top_images = similarity.t().topk(k_images, dim=1).indices  # (M, k_images)

    # Pairs wanted by either direction, each scored once: pair id = image * M + text.
    image_rows = torch.arange(num_images)[:, None].expand_as(top_texts)
    text_rows = torch.arange(num_texts)[:, None].expand_as(top_images)
    pair_ids = torch.cat(
        [(image_rows * num_texts + top_texts).flatten(), (top_images * num_texts + text_rows).flatten()]
    )
    pair_ids = pair_ids.unique()
    final = torch.full((num_images, num_texts), float("-inf"))  # -inf wherever ITM does not run
    final.view(-1)[pair_ids] = itm_scores(
        model, images, texts, pair_ids // num_texts, pair_ids % num_texts, batch_size, progress
    )
    final += similarity  # in place: a 5k x 25k gallery's matrix is 0.5 GB

    scores_image_to_text = torch.full((num_images, num_texts), float("-inf"))
    scores_image_to_text.scatter_(1, top_texts, final.gather(1, top_texts))
    scores_text_to_image = torch.full((num_texts, num_images), float("-inf"))
    scores_text_to_image.scatter_(1, top_images, final.t().gather(1, top_images))
    return RetrievalResult(
        metrics=recall_at_k(scores_image_to_text, scores_text_to_image, text_to_image),
        itc_metrics=recall_at_k(similarity, similarity.t(), text_to_image),
        similarity=similarity,
        scores_image_to_text=scores_image_to_text,
        scores_text_to_image=scores_text_to_image,
        k=k,
    )


def recall_at_k(
    scores_image_to_text: torch.Tensor,
    scores_text_to_image: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Retrieval recall in percent from score matrices (higher is better).

    Text retrieval `tr@K`: an image is a hit if any of its captions ranks in its top K. Image retrieval `ir@K`: a
    text is a hit if its image ranks in its top K. Ranks come from a stable descending sort (ties go to the lower
    index); `-inf` marks a candidate that was not retrieved and never counts as a hit. Also returns `tr_mean`,
    `ir_mean` and `r_mean` (over both directions).

    Args:
        scores_image_to_text: `(N, M)` scores of every text for each image.
        scores_text_to_image: `(M, N)` scores of every image for each text.
        text_to_image: `M` ints, the image index of each text.
        ks: The cut-offs K.
    """
    if scores_image_to_text.dim() != 2 or scores_text_to_image.dim() != 2:
        raise ValueError(
            f"expected 2-D score matrices, got {tuple(scores_image_to_text.shape)} and "
            f"{tuple(scores_text_to_image.shape)}"
        )
    num_images, num_texts = scores_image_to_text.shape
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"expected at least one image and one text, got scores of shape {(num_images, num_texts)}")
    if tuple(scores_text_to_image.shape) != (num_texts, num_images):
        raise ValueError(
            f"scores_text_to_image must be (num_texts, num_images) = ({num_texts}, {num_images}), "
            f"got {tuple(scores_text_to_image.shape)}"
        )
    if not ks or any(cut < 1 for cut in ks):
        raise ValueError(f"ks must be a non-empty sequence of cut-offs >= 1, got {tuple(ks)}")
    text_to_image = _check_text_to_image(text_to_image, num_images, num_texts)
    image_positive = text_to_image[None, :] == torch.arange(num_images)[:, None]  # (N, M)
    text_positive = image_positive.t()  # (M, N)
    image_ranks = _best_positive_rank(scores_image_to_text, image_positive)  # (N,)
    text_ranks = _best_positive_rank(scores_text_to_image, text_positive)  # (M,)
    metrics: dict[str, float] = {}
    for prefix, ranks in (("tr", image_ranks), ("ir", text_ranks)):
        values = [100.0 * int((ranks < cut).sum()) / ranks.shape[0] for cut in ks]
        metrics.update({f"{prefix}@{cut}": value for cut, value in zip(ks, values, strict=True)})
        metrics[f"{prefix}_mean"] = sum(values) / len(values)
    metrics["r_mean"] = (metrics["tr_mean"] + metrics["ir_mean"]) / 2
    return metrics


def _best_positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each row, the 0-based rank of its best-ranked positive column (`inf` if none was retrieved)."""
    best = []
    for start in range(0, scores.shape[0], _RANK_CHUNK):
        chunk = scores[start : start + _RANK_CHUNK].float()
        order = chunk.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(chunk.shape[1]).expand_as(order)).float()
        ranks = ranks.masked_fill(chunk == float("-inf"), math.inf)
        ranks = ranks.masked_fill(~positive[start : start + _RANK_CHUNK], math.inf)
        best.append(ranks.min(dim=1).values)
    return torch.cat(best)


# -- zero-shot classification ---------------------------------------------------------------------------------------


@torch.no_grad()
def zero_shot_classify(
    model: _Blip2Stage1Model,
    pixel_values: torch.Tensor,
    class_prompts_input_ids: torch.Tensor,
    class_prompts_attention_mask: torch.Tensor | None = None,
    use_itm: bool = False,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """`(num_images, num_classes)` zero-shot logits: ITC cosine similarity of each image with each class prompt.

    With `use_itm=True` the ITM positive logit of every image-prompt pair is added (the retrieval score with every
    class as a candidate). That costs one Q-Former pass per pair, `num_images * num_classes` of them (1000 ImageNet
    classes make 1000 passes per image), against one pass per image and per prompt for ITC alone.

    Args:
        model: A `Blip2ForImageTextRetrieval` or `Blip2ForPretraining`.
        pixel_values: `(num_images, 3, H, W)`.
        class_prompts_input_ids: `(num_classes, T)` Q-Former (BERT) ids of one prompt per class, e.g. "a photo of a
            {label}.".
        class_prompts_attention_mask: `(num_classes, T)` padding mask (all ones when None).
        use_itm: Add the ITM positive logit.
        batch_size: Images, prompts or ITM pairs per forward pass.
        progress: Show tqdm progress bars.
    """
    images = encode_images(model, pixel_values, batch_size=batch_size, progress=progress)
    texts = encode_texts(
        model, class_prompts_input_ids, class_prompts_attention_mask, batch_size=batch_size, progress=progress
    )
    logits = itc_similarity(model, images, texts, batch_size)  # (N, C)
    if use_itm:
        num_images, num_classes = logits.shape
        image_index = torch.arange(num_images).repeat_interleave(num_classes)
        text_index = torch.arange(num_classes).repeat(num_images)
        itm = itm_scores(model, images, texts, image_index, text_index, batch_size, progress)
        logits = logits + itm.view(num_images, num_classes)
    return logits


def zero_shot_classify_texts(
    model: _Blip2Stage1Model,
    processor_or_tokenizer: Blip2ImageTextProcessor | Any,
    images: ImageLike | Sequence[ImageLike],
    labels: Sequence[str],
    template: str = ZERO_SHOT_TEMPLATE,
    use_itm: bool = False,
    temperature: float = 1.0,
    batch_size: int = 32,
    max_length: int = 35,
) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
    """Classifies images among free-text labels; output as transformers' zero-shot-image-classification pipeline.

    Returns `[{"label": ..., "score": ...}, ...]` sorted by decreasing score (softmax over the labels of
    `zero_shot_classify`'s logits / `temperature`) for a single image, a list of those for a list of images.
    `temperature=1.0` matches the transformers pipeline, whose softmax over raw cosine similarities is flat but
    ordered right; a Blip2ForPretraining's learnt `model.temperature` gives the probabilities it was trained with.

    Args:
        model: A `Blip2ForImageTextRetrieval` or `Blip2ForPretraining`.
        processor_or_tokenizer: A `Blip2ImageTextProcessor` with a `qformer_tokenizer` (its image processor is used),
            or the Q-Former's BERT tokenizer itself (images then go through
            `blip2_image_processor(model.config.vision_config.image_size)`).
        images: One image or a list (PIL, numpy, torch, path or URL).
        labels: The candidate class names.
        template: The prompt, with `{}` where the label goes.
        use_itm: Add the ITM positive logit (one Q-Former pass per image-label pair).
        temperature: Divides the logits before the softmax.
        batch_size: Images, prompts or ITM pairs per forward pass.
        max_length: Longest prompt in tokens (35 in LAVIS).
    """
    _check_model(model)
    if isinstance(labels, str) or not labels or not all(isinstance(label, str) and label for label in labels):
        raise ValueError(f"labels must be a non-empty list of non-empty strings, got {labels!r}")
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the label goes, got {template!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(processor_or_tokenizer, Blip2ImageTextProcessor):
        tokenizer = processor_or_tokenizer.qformer_tokenizer
        if tokenizer is None:
            raise ValueError(
                "the processor has no qformer_tokenizer: zero-shot classification tokenizes the prompts with the "
                "Q-Former's BERT tokenizer (set processor.qformer_tokenizer or pass the tokenizer itself)"
            )
        image_processor = processor_or_tokenizer.image_processor
    else:
        tokenizer = processor_or_tokenizer
        if not model.config.has_own_vision_encoder:
            raise ValueError(
                f"the model's image encoder is a {type(model.config.vision_config).__name__}, whose images need its "
                "own image processor: pass a processor (Blip2ImageTextProcessor.from_unimodal_pretrained), not a "
                "bare tokenizer"
            )
        image_processor = blip2_image_processor(model.config.vision_config.image_size)
    single = not isinstance(images, (list, tuple))
    pil_images = to_rgb_images(images)
    pixel_values = image_processor(pil_images, return_tensors="pt")["pixel_values"]
    prompts = tokenizer(
        [template.format(label) for label in labels],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    logits = zero_shot_classify(
        model, pixel_values, prompts["input_ids"], prompts["attention_mask"], use_itm=use_itm, batch_size=batch_size
    )
    probabilities = (logits / temperature).softmax(dim=-1)
    results = [
        sorted(
            ({"label": label, "score": float(score)} for label, score in zip(labels, row.tolist(), strict=True)),
            key=lambda item: -item["score"],
        )
        for row in probabilities
    ]
    return results[0] if single else results


# -- helpers --------------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the model's previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_model(model: Any) -> None:
    if not isinstance(model, _Blip2Stage1Model):
        raise TypeError(
            "expected a stage-1 model with a Q-Former text path and ITM head (Blip2ForImageTextRetrieval or "
            f"Blip2ForPretraining), got {type(model).__name__}"
        )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _image_batches(
    pixel_values_or_batches: torch.Tensor | Iterable[Any], batch_size: int
) -> tuple[Iterable[torch.Tensor], int | None]:
    if isinstance(pixel_values_or_batches, torch.Tensor):
        pixel_values = pixel_values_or_batches
        if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
            raise ValueError(
                f"pixel_values must be (num_images >= 1, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        return pixel_values.split(batch_size), math.ceil(pixel_values.shape[0] / batch_size)
    total = len(pixel_values_or_batches) if hasattr(pixel_values_or_batches, "__len__") else None
    return (_pixels_of(batch) for batch in pixel_values_or_batches), total


def _pixels_of(batch: Any) -> torch.Tensor:
    pixel_values = batch["pixel_values"] if isinstance(batch, dict) or hasattr(batch, "keys") else batch
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"each image batch must be a (batch, channels, height, width) tensor, got {shape}")
    return pixel_values


def _check_texts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (num_texts >= 1, length >= 1) tensor, got {shape}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    return input_ids, attention_mask


def _check_text_to_image(text_to_image: Sequence[int] | torch.Tensor, num_images: int, num_texts: int) -> torch.Tensor:
    """`text_to_image` as a `(M,)` long tensor; every index valid and every image with at least one text."""
    mapping = torch.as_tensor(text_to_image)
    if mapping.dim() != 1 or mapping.shape[0] != num_texts:
        raise ValueError(
            f"text_to_image must hold one image index per text ({num_texts}), got shape {tuple(mapping.shape)}"
        )
    if mapping.is_floating_point() or mapping.is_complex() or mapping.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {mapping.dtype}")
    mapping = mapping.long().cpu()
    out_of_range = (mapping < 0) | (mapping >= num_images)
    if bool(out_of_range.any()):
        text = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"text_to_image[{text}] = {int(mapping[text])} is out of range: expected 0..{num_images - 1} "
            f"({num_images} images)"
        )
    captions = torch.bincount(mapping, minlength=num_images)
    if bool((captions == 0).any()):
        image = int((captions == 0).nonzero()[0, 0])
        raise ValueError(f"image {image} has no text in text_to_image: every image needs at least one caption")
    return mapping
