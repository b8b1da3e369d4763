"""CapFilt: the caption bootstrapping BLIP-2 pre-trains with (synthetic captions ranked with the web caption).

BLIP-2 (section 3.4) bootstraps the captions of its 129M web images with BLIP's CapFilt: a captioning model samples
10 captions per image with nucleus sampling, an image-text similarity model (CLIP ViT-L/14) ranks them together with
the image's own web caption, and the top two are kept; at each pre-training step one of them is sampled.

Captioners (`load_captioner` builds one from a model folder):
- `Blip2LanguageModelCaptioner`: a stage-2 `Blip2ForConditionalGeneration` with its processor;
- `Blip2ItgCaptioner`: the stage-1 `Blip2ForPretraining`'s image-grounded text generation head (no LLM).

Scorers (`ImageTextScorer`, `load_scorer`): the stage-1 model's ITC similarity (the best-matching query's cosine
similarity, as retrieval scores) or any CLIP-style dual encoder of transformers (`get_image_features` /
`get_text_features`: CLIP, SigLIP, ...), cosine similarity of the normalised embeddings.

`run_capfilt` runs over webdataset `.tar` or parquet shards and writes one output shard per input shard (same name),
atomically (a `.partial` file renamed once complete). A run that stops is restarted with the same call: finished shards
are skipped, an unfinished one is redone. Sampling is seeded per shard from `seed` and the shard's file name, so a
shard's output is the same whichever shards a run processes and however often it was restarted (for one batch size).

Each output record holds the image (its original bytes), `captions` (the kept ones, best first), `scores`,
`original_caption` and `original_score` (None when the image had no caption), the passthrough metadata of the input
(a webdataset sample's `.json` fields, or a parquet file's other columns; CapFilt's fields replace same-named
ones) and, with `save_candidates`, every ranked candidate with its score. Webdataset output: `{key}.{image extension}`,
`{key}.txt` (the best caption) and `{key}.json`; parquet output: columns `key`, `image`, `text` (the best caption) and
the fields above. Both read back with `datasets.load_dataset("webdataset" | "parquet", data_files=...)`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer
from transformers.utils import logging

from .configuration import COMPOSITE_MODEL_TYPES, Blip2VisionConfig
from .modeling import Blip2ForConditionalGeneration
from .pretraining import Blip2ForImageTextRetrieval, Blip2ForPretraining, _Blip2Stage1Model
from .processing import (
    blip2_image_processor,
    fixed_resolution_image_processor,
    load_qformer_tokenizer,
    to_rgb_image,
)

logger = logging.get_logger(__name__)

INPUT_FORMATS = {".tar": "webdataset", ".parquet": "parquet"}
OUTPUT_FORMATS = {"webdataset": ".tar", "parquet": ".parquet"}
REPORT_FILE = "capfilt_report.json"
PARTIAL_SUFFIX = ".partial"
# Columns tried, in order, when none is named: webdataset members are named by extension.
TEXT_COLUMNS = ("txt", "text", "caption")
KEY_COLUMNS = ("__key__", "key")
# The paper's Q-Former reads at most 32 text tokens.
QFORMER_MAX_TEXT_LENGTH = 32
# CapFilt's own fields (and the output's key / image / text) replace same-named metadata of the input.
_RESERVED = (
    *("captions", "scores", "original_caption", "original_score", "candidates", "candidate_scores"),
    *("key", "image", "text", "extension"),
)
_PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


# -- captioners and scorers -----------------------------------------------------------------------------------------


class Captioner(Protocol):
    """Samples captions: `captioner(images, num_captions)` -> `num_captions` strings per image."""

    def __call__(self, images: Sequence[Image.Image], num_captions: int) -> list[list[str]]: ...


class Scorer(Protocol):
    """Scores texts against images: `scorer(images, texts)` -> one `(len(texts[i]),)` float tensor per image."""

    def __call__(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]) -> list[torch.Tensor]: ...


@dataclass
class SamplingOptions:
    """Nucleus sampling of the captions (BLIP's CapFilt: `top_p` 0.9, at most 30 tokens).

    Args:
        top_p: Nucleus mass in (0, 1]; 1 turns the nucleus filter off.
        temperature: Logits are divided by it (> 0).
        top_k: Also keep only the `top_k` most likely tokens (None: no top-k filter; transformers' default of 50 is
            not applied).
        max_new_tokens: Longest caption, in tokens.
    """

    top_p: float = 0.9
    temperature: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 30

    def __post_init__(self) -> None:
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _pixel_values(image_processor: Any, images: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
    return image_processor(list(images), return_tensors="pt")["pixel_values"].to(device)


class Blip2ItgCaptioner:
    """Captions with a stage-1 `Blip2ForPretraining`'s ITG head (`generate` with nucleus sampling and
    `num_return_sequences`: the encoder and the query pass run once per image)."""

    def __init__(
        self,
        model: Blip2ForPretraining,
        tokenizer: Any,
        image_processor: Any,
        sampling: SamplingOptions | None = None,
    ) -> None:
        if not isinstance(model, Blip2ForPretraining):
            raise TypeError(f"Blip2ItgCaptioner needs a Blip2ForPretraining (ITG head), got {type(model).__name__}")
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.sampling = sampling or SamplingOptions()
        if tokenizer.sep_token_id is None:
            raise ValueError("the Q-Former tokenizer has no [SEP] token, which ends an ITG caption")

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], num_captions: int) -> list[list[str]]:
        ids = self.model.generate(
            pixel_values=_pixel_values(self.image_processor, images, self.model.device),
            num_return_sequences=num_captions,  # each image's samples side by side
            max_new_tokens=self.sampling.max_new_tokens,
            eos_token_id=self.tokenizer.sep_token_id,
            do_sample=True,
            temperature=self.sampling.temperature,
            top_k=self.sampling.top_k,
            top_p=self.sampling.top_p,
        )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [texts[start : start + num_captions] for start in range(0, len(texts), num_captions)]


class Blip2LanguageModelCaptioner:
    """Captions with a stage-2 `Blip2ForConditionalGeneration` (`generate` with `do_sample`, `top_p` and
    `num_return_sequences`): the images are encoded once, the LLM samples `num_captions` continuations of `prompt`.

    A caption is the generated continuation, without the prompt (as BLIP's captioner gives it).
    """

    def __init__(
        self,
        model: Blip2ForConditionalGeneration,
        processor: Any,
        sampling: SamplingOptions | None = None,
        prompt: str = "",
    ) -> None:
        if not isinstance(model, Blip2ForConditionalGeneration):
            raise TypeError(
                f"Blip2LanguageModelCaptioner needs a Blip2ForConditionalGeneration, got {type(model).__name__}"
            )
        self.model, self.processor, self.prompt = model.eval(), processor, prompt
        self.sampling = sampling or SamplingOptions()

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], num_captions: int) -> list[list[str]]:
        inputs = self.processor(images=list(images), text=[self.prompt] * len(images), return_tensors="pt")
        inputs = {name: value.to(self.model.device) for name, value in inputs.items()}
        sequences = self.model.generate(
            **inputs,
            do_sample=True,
            top_p=self.sampling.top_p,
            top_k=self.sampling.top_k or 0,  # 0: no top-k filter (transformers' generation default is 50)
            temperature=self.sampling.temperature,
            max_new_tokens=self.sampling.max_new_tokens,
            num_beams=1,
            num_return_sequences=num_captions,
        )  # (B * n, L): each image's samples side by side
        if self.model.config.use_decoder_only_language_model:
            sequences = sequences[:, inputs["input_ids"].shape[1] :]  # the prompt as given, then the new tokens
        texts = self.processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [texts[start : start + num_captions] for start in range(0, len(texts), num_captions)]


class ImageTextScorer:
    """Image-text similarity for ranking captions: cosine similarity of L2-normalised embeddings.

    `model` is a stage-1 BLIP-2 model (`Blip2ForPretraining` / `Blip2ForImageTextRetrieval`: ITC, the best-matching
    query's similarity, as retrieval ranks) or a CLIP-style dual encoder with `get_image_features` and
    `get_text_features` (CLIP, SigLIP, ...: every output of the image processor goes to `get_image_features`).

    Args:
        max_text_length: Texts are truncated to it. Default: 32 for the Q-Former (the paper's), otherwise the text
            model's `max_position_embeddings` (capped by the tokenizer's `model_max_length`).
        text_padding: `"longest"`, or `"max_length"` (default for SigLIP, which was trained on texts padded to
            `max_text_length`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        max_text_length: int | None = None,
        text_padding: str | None = None,
    ) -> None:
        self.is_blip2 = isinstance(model, _Blip2Stage1Model)
        if not self.is_blip2 and not all(
            callable(getattr(model, name, None)) for name in ("get_image_features", "get_text_features")
        ):
            raise TypeError(
                "the scorer must be a stage-1 BLIP-2 model (Blip2ForPretraining, Blip2ForImageTextRetrieval) or a "
                "dual encoder with get_image_features and get_text_features (CLIP, SigLIP); got "
                f"{type(model).__name__}"
            )
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.max_text_length = max_text_length or self._default_max_text_length()
        model_type = getattr(model.config, "model_type", "")
        self.text_padding = text_padding or ("max_length" if model_type.startswith("siglip") else "longest")
        if self.max_text_length < 2:
            raise ValueError(f"max_text_length must be >= 2, got {self.max_text_length}")

    def _default_max_text_length(self) -> int:
        if self.is_blip2:
            return QFORMER_MAX_TEXT_LENGTH
        text_config = getattr(self.model.config, "text_config", self.model.config)
        limits = [getattr(text_config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        limits = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
        return min(limits) if limits else 77

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`(B, E)` normalised image embeddings, or `(B, num_query_tokens, E)` for a stage-1 BLIP-2 model."""
        device = self.model.device
        if self.is_blip2:
            image_embeds = self.model.image_embeddings(_pixel_values(self.image_processor, images, device))
            return self.model.project_image(self.model.query_outputs(image_embeds).last_hidden_state)
        inputs = self.image_processor(list(images), return_tensors="pt")
        inputs = {
            name: value.to(device, self.model.dtype) if value.is_floating_point() else value.to(device)
            for name, value in inputs.items()
        }
        return F.normalize(_features(self.model.get_image_features(**inputs)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """`(N, E)` normalised text embeddings."""
        tokens = self.tokenizer(
            list(texts),
            padding=self.text_padding,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(self.model.device)
        attention_mask = tokens.get("attention_mask")
        attention_mask = None if attention_mask is None else attention_mask.to(self.model.device)
        if self.is_blip2:
            return self.model.project_text(self.model.text_outputs(input_ids, attention_mask).last_hidden_state)
        outputs = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(_features(outputs).float(), dim=-1)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        if len(images) != len(texts):
            raise ValueError(f"expected one list of texts per image, got {len(images)} images, {len(texts)} lists")
        counts = [len(group) for group in texts]
        flat = [text for group in texts for text in group]
        if not flat:
            return [torch.empty(0) for _ in texts]
        image_features = self.encode_images(images).float()  # (B, E) or (B, Q, E)
        text_features = self.encode_texts(flat).float()  # (N, E)
        owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor(counts)).to(image_features.device)
        # (N, [Q,] E) . (N, E) -> (N, [Q]): each text against its own image only.
        similarity = torch.einsum("n...e,ne->n...", image_features[owner], text_features.to(image_features.device))
        if similarity.dim() == 2:
            similarity = similarity.max(dim=1).values  # the best-matching query decides
        return list(similarity.cpu().split(counts))


def _features(output: Any) -> torch.Tensor:
    """A `get_*_features` result: a tensor (transformers 4) or an output whose `pooler_output` is the projection."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"expected get_*_features to give a tensor or an output with pooler_output, got {output!r}")
    return pooled


# -- loading from model folders -------------------------------------------------------------------------------------


def _load_config(path: str | os.PathLike, role: str) -> Any:
    text = str(path)
    local = os.path.isabs(text) or text.startswith(".") or os.path.exists(text) or text.count("/") > 1
    if local and not os.path.isdir(text):
        raise FileNotFoundError(
            f"{role}: expected a model folder (holding config.json), got {text!r}, which is not a folder"
        )
    if local and not os.path.isfile(os.path.join(text, "config.json")):
        raise FileNotFoundError(
            f"{role}: expected a model folder holding config.json, got {text!r} with {sorted(os.listdir(text))[:10]}"
        )
    return AutoConfig.from_pretrained(text)


def _is_blip2(config: Any) -> bool:
    return getattr(config, "model_type", None) in COMPOSITE_MODEL_TYPES


def _architectures(config: Any) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def _stage1_parts(path: str | os.PathLike, model_class: type, dtype: torch.dtype | None, device: Any) -> tuple:
    """A stage-1 model with the Q-Former tokenizer and the image processor saved beside it (`pretrain_stage1.py`
    saves both); BLIP-2's image transform for an EVA encoder saved without one."""
    model = model_class.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = load_qformer_tokenizer(path)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path)
    except OSError:
        if not isinstance(model.config.vision_config, Blip2VisionConfig):
            raise ValueError(
                f"{path} holds no image processor and its encoder is a {type(model.config.vision_config).__name__}: "
                "save its vision checkpoint's image processor there"
            ) from None
        image_processor = blip2_image_processor(model.config.vision_config.image_size)
    return model, tokenizer, fixed_resolution_image_processor(image_processor)


def load_captioner(
    path: str | os.PathLike,
    sampling: SamplingOptions | None = None,
    prompt: str = "",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Blip2ItgCaptioner | Blip2LanguageModelCaptioner:
    """A captioner from a model folder: a stage-1 `Blip2ForPretraining` folder (its ITG head; `prompt` must be
    empty) or a stage-2 BLIP-2 folder (ours or the official layout) with its processor."""
    config = _load_config(path, "captioner")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not _is_blip2(config):
        raise ValueError(
            "captioner: expected a BLIP-2 folder (a stage-2 Blip2ForConditionalGeneration, or a stage-1 "
            f"Blip2ForPretraining for its ITG head); {path} holds a {getattr(config, 'model_type', None)!r} model"
        )
    architectures = _architectures(config)
    if "Blip2ForPretraining" in architectures:
        if prompt:
            raise ValueError("a prompt needs a stage-2 captioner: the stage-1 ITG head captions from [DEC] alone")
        model, tokenizer, image_processor = _stage1_parts(path, Blip2ForPretraining, dtype, device)
        return Blip2ItgCaptioner(model, tokenizer, image_processor, sampling)
    if "Blip2ForImageTextRetrieval" in architectures:
        raise ValueError(
            f"captioner: {path} is a Blip2ForImageTextRetrieval, which has no text generation head: pass a "
            "Blip2ForPretraining (ITG) or Blip2ForConditionalGeneration folder"
        )
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
    return Blip2LanguageModelCaptioner(model, AutoProcessor.from_pretrained(path), sampling, prompt)


def load_scorer(
    path: str | os.PathLike,
    max_text_length: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ImageTextScorer:
    """A scorer from a model folder: a stage-1 BLIP-2 folder (`Blip2ForPretraining` or `Blip2ForImageTextRetrieval`,
    ITC) or a CLIP-style dual encoder of transformers (`AutoModel` with `get_image_features` / `get_text_features`,
    its tokenizer and image processor)."""
    config = _load_config(path, "scorer")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_blip2(config):
        architectures = _architectures(config)
        model_class = Blip2ForImageTextRetrieval if "Blip2ForImageTextRetrieval" in architectures else None
        model_class = Blip2ForPretraining if "Blip2ForPretraining" in architectures else model_class
        if model_class is None:
            raise ValueError(
                f"scorer: {path} is a BLIP-2 {architectures or 'model'} without the contrastive (ITC) heads: pass a "
                "stage-1 folder (Blip2ForPretraining / Blip2ForImageTextRetrieval) or a CLIP-style dual encoder"
            )
        model, tokenizer, image_processor = _stage1_parts(path, model_class, dtype, device)
        return ImageTextScorer(model, tokenizer, image_processor, max_text_length)
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device)
    if not all(callable(getattr(model, name, None)) for name in ("get_image_features", "get_text_features")):
        raise ValueError(
            f"scorer: {path} holds a {type(model).__name__}, not an image-text dual encoder (get_image_features and "
            "get_text_features): pass a CLIP-style model or a stage-1 BLIP-2 folder"
        )
    return ImageTextScorer(
        model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path), max_text_length
    )


def load_captioner_and_scorer(
    captioner: str | os.PathLike,
    scorer: str | os.PathLike,
    sampling: SamplingOptions | None = None,
    prompt: str = "",
    max_text_length: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Blip2ItgCaptioner | Blip2LanguageModelCaptioner, ImageTextScorer]:
    """`load_captioner` and `load_scorer`; one stage-1 folder given as both is loaded once (ITG captions, ITC
    ranks)."""
    loaded = load_captioner(captioner, sampling, prompt, device, dtype)
    same = os.path.isdir(captioner) and os.path.isdir(scorer) and os.path.samefile(captioner, scorer)
    if same and isinstance(loaded, Blip2ItgCaptioner):
        return loaded, ImageTextScorer(loaded.model, loaded.tokenizer, loaded.image_processor, max_text_length)
    return loaded, load_scorer(scorer, max_text_length, device, dtype)


# -- ranking ----------------------------------------------------------------------------------------------------------


@dataclass
class CapFiltResult:
    """CapFilt's outcome for one image.

    Args:
        captions: The kept captions, best first (at most `keep`; fewer when fewer distinct captions were found).
        scores: Their similarity to the image.
        original_caption: The image's own (web) caption, whitespace-normalised; None when it had none.
        original_score: Its similarity (None without one); it competes with the synthetic captions.
        candidates: Every distinct non-empty candidate, the original first, then the synthetic captions in order.
        candidate_scores: Their similarities.
    """

    captions: list[str]
    scores: list[float]
    original_caption: str | None
    original_score: float | None
    candidates: list[str] = field(default_factory=list)
    candidate_scores: list[float] = field(default_factory=list)


def candidate_captions(original: str | None, synthetic: Sequence[str]) -> list[str]:
    """The captions to rank: the original (if any) then the synthetic ones, whitespace-normalised, without empty
    captions and repeats (a synthetic caption equal to the original counts as the original)."""
    seen: dict[str, None] = {}
    for caption in ([original] if original else []) + list(synthetic):
        normalised = " ".join(caption.split())
        if normalised:
            seen.setdefault(normalised)
    return list(seen)


def rank_captions(
    candidates: Sequence[str], scores: torch.Tensor | Sequence[float], keep: int
) -> tuple[list[str], list[float]]:
    """The `keep` best-scoring candidates and their scores, best first (ties keep the earlier candidate)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if scores.numel() != len(candidates):
        raise ValueError(f"expected one score per candidate, got {scores.numel()} scores for {len(candidates)}")
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return [candidates[index] for index in order.tolist()], [float(scores[index]) for index in order.tolist()]


def check_capfilt_counts(num_captions: int, keep: int) -> None:
    """`num_captions` synthetic captions plus the original can fill `keep` places."""
    if num_captions < 1:
        raise ValueError(f"num_captions must be >= 1, got {num_captions}")
    if not 1 <= keep <= num_captions + 1:
        raise ValueError(
            f"keep must be between 1 and num_captions + 1 = {num_captions + 1} (the synthetic captions and the "
            f"original are ranked), got keep={keep}"
        )


def capfilt_images(
    images: Sequence[Image.Image],
    original_captions: Sequence[str | None],
    captioner: Captioner,
    scorer: Scorer,
    num_captions: int = 10,
    keep: int = 2,
) -> list[CapFiltResult]:
    """CapFilt on one batch: `num_captions` sampled captions per image, ranked with the original caption by `scorer`,
    the top `keep` kept."""
    check_capfilt_counts(num_captions, keep)
    if len(images) != len(original_captions):
        raise ValueError(
            f"expected one original caption per image, got {len(images)} images and {len(original_captions)} captions"
        )
    if not images:
        return []
    synthetic = captioner(images, num_captions)
    if len(synthetic) != len(images):
        raise ValueError(f"the captioner gave {len(synthetic)} caption lists for {len(images)} images")
    candidates = [
        candidate_captions(original, sampled) for original, sampled in zip(original_captions, synthetic, strict=True)
    ]
    scores = scorer(images, candidates)
    results = []
    for original, texts, text_scores in zip(original_captions, candidates, scores, strict=True):
        captions, kept_scores = rank_captions(texts, text_scores, keep)
        original = " ".join(original.split()) if original else ""
        results.append(
            CapFiltResult(
                captions=captions,
                scores=kept_scores,
                original_caption=original or None,
                original_score=float(text_scores[0]) if original else None,
                candidates=texts,
                candidate_scores=[float(score) for score in text_scores],
            )
        )
    return results


# -- shards -------------------------------------------------------------------------------------------------------


def resolve_data_files(data_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Input shards from paths, glob patterns and folders (their `.tar` and `.parquet` files), sorted by name."""
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not patterns:
        raise ValueError("data_files is empty: pass webdataset .tar or .parquet shards (paths, globs or folders)")
    found: dict[Path, None] = {}
    for pattern in map(str, patterns):
        if os.path.isdir(pattern):
            matches = [str(path) for path in Path(pattern).iterdir() if path.suffix in INPUT_FORMATS]
        else:
            matches = glob(pattern) or ([pattern] if os.path.isfile(pattern) else [])
        if not matches:
            raise FileNotFoundError(f"data_files: nothing matches {pattern!r}")
        for match in sorted(matches):
            path = Path(match)
            if path.suffix not in INPUT_FORMATS:
                raise ValueError(f"data_files: {path} is not a webdataset .tar or a .parquet shard")
            found.setdefault(path)
    shards = sorted(found, key=lambda path: (path.name, str(path)))
    names = [path.stem for path in shards]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"data_files: several shards are named {repeated}; output shards are named after inputs")
    return shards


@dataclass
class _Sample:
    key: str
    image: bytes
    extension: str
    caption: str | None
    metadata: dict[str, Any]


def _is_empty(path: Path) -> bool:
    if path.suffix == ".tar":
        with tarfile.open(path) as archive:
            return archive.next() is None
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows == 0


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format=value.format or "PNG")
        return buffer.getvalue()
    raise ValueError(f"expected an encoded image (bytes, or a dict with bytes or path), got {type(value).__name__}")


def _read_shard(path: Path, image_column: str | None, text_column: str | None) -> Iterator[_Sample]:
    """The samples of one shard, images as their encoded bytes (decoded later, once, for the models)."""
    import datasets

    builder = INPUT_FORMATS[path.suffix]
    dataset = datasets.load_dataset(builder, data_files={"train": [str(path)]}, split="train", streaming=True)
    features = dataset.features or {}
    columns = list(features)
    if image_column is None:
        images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if len(images) != 1:
            raise ValueError(
                f"{path}: expected one image column, found {images or 'none'} among {columns}: name it (image_column)"
            )
        image_column = images[0]
    elif image_column not in columns:
        raise ValueError(f"{path}: no image column {image_column!r}; the shard has {columns}")
    if text_column is None:
        text_column = next((name for name in TEXT_COLUMNS if name in columns), None)
        if text_column is None:
            raise ValueError(
                f"{path}: no caption column among {columns} (looked for {list(TEXT_COLUMNS)}): name it (text_column)"
            )
    elif text_column not in columns:
        raise ValueError(f"{path}: no caption column {text_column!r}; the shard has {columns}")
    key_column = next((name for name in KEY_COLUMNS if name in columns), None)
    skipped = {image_column, text_column, key_column, "__url__"}
    safe_stem = re.sub(r"[^\w-]", "_", path.stem)
    for index, row in enumerate(dataset.decode(False)):
        caption = row[text_column]
        if caption is not None and not isinstance(caption, str):
            raise ValueError(
                f"{path}: the caption column {text_column!r} holds {type(caption).__name__}, expected one string per "
                "image: name the column holding the web caption (text_column)"
            )
        if builder == "webdataset":
            metadata = dict(row.get("json") or {})
            extension = image_column.rsplit(".", 1)[-1].lower()
        else:
            metadata = {name: value for name, value in row.items() if name not in skipped}
            extension = ""
        yield _Sample(
            key=str(row[key_column]) if key_column else f"{safe_stem}_{index:08d}",
            image=_image_bytes(row[image_column]),
            extension=extension,
            caption=caption,
            metadata=metadata,
        )


class _WebDatasetWriter:
    def __init__(self, path: Path) -> None:
        self.archive = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed by close())

    def _add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(payload), 0  # byte-identical reruns
        self.archive.addfile(info, io.BytesIO(payload))

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            key = row.pop("key")
            self._add(f"{key}.{row.pop('extension')}", row.pop("image"))
            self._add(f"{key}.txt", (row["captions"][0] if row["captions"] else "").encode())
            self._add(f"{key}.json", json.dumps(row, default=str).encode())

    def close(self) -> None:
        self.archive.close()


def _parquet_features(with_candidates: bool) -> Any:
    import datasets

    caption_list, score_list = datasets.List(datasets.Value("string")), datasets.List(datasets.Value("float32"))
    features = {
        "key": datasets.Value("string"),
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "captions": caption_list,
        "scores": score_list,
        "original_caption": datasets.Value("string"),
        "original_score": datasets.Value("float32"),
    }
    if with_candidates:
        features.update(candidates=caption_list, candidate_scores=score_list)
    return datasets.Features(features)


class _ParquetWriter:
    """Rows written as they come (a shard's images need not fit in memory), with the `datasets` features in the
    schema so that `load_dataset("parquet")` gives the image column back as images. The metadata columns are those
    of the shard's first batch."""

    def __init__(self, path: Path) -> None:
        self.path, self.writer, self.features = path, None, None

    def _open(self, features: Any) -> None:
        import pyarrow.parquet as pq

        self.features = features
        self.writer = pq.ParquetWriter(self.path, features.arrow_schema)

    def write(self, rows: list[dict[str, Any]]) -> None:
        import datasets
        import pyarrow as pa

        rows = [
            {
                "key": row.pop("key"),
                "image": {"bytes": row.pop("image"), "path": None},
                "text": row["captions"][0] if row["captions"] else "",
                **{name: value for name, value in row.items() if name != "extension"},
            }
            for row in rows
        ]
        if self.writer is None:
            fixed = _parquet_features("candidates" in rows[0])
            metadata = [{name: value for name, value in row.items() if name not in fixed} for row in rows]
            inferred = (
                datasets.Features.from_arrow_schema(pa.Table.from_pylist(metadata).schema) if metadata[0] else {}
            )
            self._open(datasets.Features({**fixed, **inferred}))
        for row in rows:
            unknown = set(row) - set(self.features)
            if unknown:
                raise ValueError(
                    f"sample {row['key']} has metadata fields {sorted(unknown)} that the shard's first samples lack: "
                    "parquet output needs one set of columns per shard (write webdataset output instead)"
                )
        encoded = [self.features.encode_example(row) for row in rows]
        self.writer.write_table(pa.Table.from_pylist(encoded, schema=self.features.arrow_schema))

    def close(self) -> None:
        if self.writer is None:  # an empty shard: an empty file with the fixed columns
            self._open(_parquet_features(False))
        self.writer.close()


def _image_extension(image: Image.Image) -> str:
    return _PIL_EXTENSIONS.get(image.format or "", (image.format or "png").lower())


def shard_seed(seed: int, shard: str | os.PathLike) -> int:
    """The sampling seed of one shard: a function of `seed` and the shard's file name only."""
    return (seed * 1_000_003 + zlib.crc32(Path(shard).name.encode())) % (2**63)


# -- the run ----------------------------------------------------------------------------------------------------------


@dataclass
class CapFiltReport:
    """What one `run_capfilt` run did (also written to `capfilt_report.json` in the output folder).

    Args:
        shards_processed: Input shards captioned by this run.
        shards_skipped: Shards whose output existed already (a restarted run).
        images: Images captioned by this run.
        unreadable_images: Samples skipped because their image could not be decoded.
        seconds: Wall time of the captioning and ranking (model loading excluded).
        images_per_second: `images / seconds` (None when no image was processed).
        settings: The run's settings (counts, batch size, format, seed and what the caller adds).
    """

    shards_processed: int
    shards_skipped: int
    images: int
    unreadable_images: int
    seconds: float
    images_per_second: float | None
    settings: dict[str, Any] = field(default_factory=dict)


def run_capfilt(
    data_files: str | os.PathLike | Sequence[str | os.PathLike],
    captioner: Captioner,
    scorer: Scorer,
    output_dir: str | os.PathLike,
    num_captions: int = 10,
    keep: int = 2,
    batch_size: int = 16,
    output_format: str = "webdataset",
    image_column: str | None = None,
    text_column: str | None = None,
    seed: int = 0,
    save_candidates: bool = False,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> CapFiltReport:
    """CapFilt over webdataset `.tar` / `.parquet` shards: one output shard per input shard in `output_dir`.

    Args:
        data_files: Shards: paths, glob patterns or folders.
        captioner, scorer: See `load_captioner_and_scorer`.
        num_captions: Captions sampled per image (10 in the paper).
        keep: Captions kept per image, the original competing with the synthetic ones (2 in the paper).
        batch_size: Images per generation and scoring batch (the captioner samples `batch_size * num_captions`).
        output_format: `"webdataset"` (`.tar`) or `"parquet"`.
        image_column, text_column: The input's image and web caption columns (default: the image column, and the
            first of `txt`, `text`, `caption`).
        seed: Sampling seed; each shard's is `shard_seed(seed, shard)`, set with `torch.manual_seed` before the
            shard (the captioners sample from torch's global generator, as transformers' `generate` does).
        save_candidates: Also store every ranked candidate and its score.
        progress: Show tqdm progress bars.
        settings: Extra entries for the report (e.g. the model folders).
    """
    shards = check_capfilt_settings(data_files, num_captions, keep, batch_size, output_format)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs = [output_dir / f"{shard.stem}{OUTPUT_FORMATS[output_format]}" for shard in shards]
    todo = [(shard, output) for shard, output in zip(shards, outputs, strict=True) if not output.exists()]
    if not todo:
        logger.warning(f"every one of the {len(shards)} output shards exists in {output_dir}: nothing to do")
    elif len(todo) == len(shards) and all(_is_empty(shard) for shard in shards):
        raise ValueError(f"no images: the {len(shards)} input shard(s) hold no samples ({[str(s) for s in shards]})")
    images_done = unreadable = 0
    started = time.perf_counter()
    image_bar = tqdm(desc="CapFilt images", unit="img", disable=not progress)
    for shard, output in tqdm(todo, desc="CapFilt shards", unit="shard", disable=not progress or len(todo) < 2):
        done, bad = _capfilt_shard(
            shard,
            output,
            captioner,
            scorer,
            num_captions,
            keep,
            batch_size,
            output_format,
            image_column,
            text_column,
            shard_seed(seed, shard),
            save_candidates,
            image_bar,
        )
        images_done, unreadable = images_done + done, unreadable + bad
    image_bar.close()
    seconds = time.perf_counter() - started
    report = CapFiltReport(
        shards_processed=len(todo),
        shards_skipped=len(shards) - len(todo),
        images=images_done,
        unreadable_images=unreadable,
        seconds=round(seconds, 3),
        images_per_second=round(images_done / seconds, 3) if images_done and seconds > 0 else None,
        settings={
            "num_captions": num_captions,
            "keep": keep,
            "batch_size": batch_size,
            "output_format": output_format,
            "seed": seed,
            **(settings or {}),
        },
    )
    (output_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def check_capfilt_settings(
    data_files: str | os.PathLike | Sequence[str | os.PathLike],
    num_captions: int,
    keep: int,
    batch_size: int,
    output_format: str,
) -> list[Path]:
    """Checks `run_capfilt`'s settings before anything is loaded; returns the input shards (`resolve_data_files`)."""
    check_capfilt_counts(num_captions, keep)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {sorted(OUTPUT_FORMATS)}, got {output_format!r}")
    return resolve_data_files(data_files)


def _batches(samples: Iterator[_Sample], batch_size: int) -> Iterator[list[_Sample]]:
    batch: list[_Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _capfilt_shard(
    shard: Path,
    output: Path,
    captioner: Captioner,
    scorer: Scorer,
    num_captions: int,
    keep: int,
    batch_size: int,
    output_format: str,
    image_column: str | None,
    text_column: str | None,
    seed: int,
    save_candidates: bool,
    image_bar: tqdm,
) -> tuple[int, int]:
    """One shard into `output` through a `.partial` file renamed once complete: (images done, unreadable)."""
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    writer = _WebDatasetWriter(partial) if output_format == "webdataset" else _ParquetWriter(partial)
    done = unreadable = 0
    torch.manual_seed(seed)  # the captioners sample with torch's global generator (as transformers' generate does)
    try:
        samples = iter(()) if _is_empty(shard) else _read_shard(shard, image_column, text_column)
        for batch in _batches(samples, batch_size):
            images, readable = [], []
            for sample in batch:
                try:
                    image = Image.open(io.BytesIO(sample.image))
                    sample.extension = sample.extension or _image_extension(image)
                    images.append(to_rgb_image(image))
                except (OSError, ValueError, Image.DecompressionBombError) as error:  # web data has broken images
                    logger.warning(f"{shard}: skipping sample {sample.key}, whose image cannot be read ({error})")
                    unreadable += 1
                    continue
                readable.append(sample)
            if not readable:
                continue
            results = capfilt_images(images, [s.caption for s in readable], captioner, scorer, num_captions, keep)
            rows = []
            for sample, result in zip(readable, results, strict=True):
                fields = asdict(result)
                if not save_candidates:
                    del fields["candidates"], fields["candidate_scores"]
                metadata = {name: value for name, value in sample.metadata.items() if name not in _RESERVED}
                rows.append(
                    {"key": sample.key, "image": sample.image, "extension": sample.extension, **metadata, **fields}
                )
            writer.write(rows)
            done += len(readable)
            image_bar.update(len(readable))
        writer.close()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    return done, unreadable


__all__ = [
    "Blip2ItgCaptioner",
    "Blip2LanguageModelCaptioner",
    "CapFiltReport",
    "CapFiltResult",
    "Captioner",
    "ImageTextScorer",
    "SamplingOptions",
    "Scorer",
    "candidate_captions",
    "run_capfilt",
    "capfilt_images",
    "check_capfilt_counts",
    "check_capfilt_settings",
    "load_captioner",
    "load_captioner_and_scorer",
    "load_scorer",
    "rank_captions",
    "resolve_data_files",
    "shard_seed",
]
