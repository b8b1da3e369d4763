"""Image-text collation for training: the paper's augmentation, stage-1 (`Blip2ImageTextCollator`) and stage-2 /
fine-tuning (`Blip2CaptionCollator`) batches."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .columns import (
    WEBDATASET_KEY,
    caption_values,
    column_value,
    has_column,
    image_id_value,
    sample_rng,
)
from .end_token import EndTokenFromModel
from .processing import QFORMER_START_TOKEN, to_rgb_image

IGNORE_LABEL = -100


# -- augmentation ---------------------------------------------------------------------------------------------------


@dataclass
class RandomResizedCropFlip:
    """The paper's training augmentation without torchvision: random resized crop (area scale 0.5-1.0, aspect ratio
    3/4-4/3, bicubic) to `size` x `size`, then a horizontal flip with probability `flip_probability`."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    rng: random.Random = field(default_factory=random.Random)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Image.Image:
        """Augments `image` with the draws of `rng` (default: this transform's own generator)."""
        rng = self.rng if rng is None else rng
        width, height = image.size
        area = width * height
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                left = rng.randint(0, width - crop_width)
                top = rng.randint(0, height - crop_height)
                break
        else:  # no admissible crop in 10 draws (extreme aspect ratios): keep the whole image
            crop_width, crop_height = width, height
            left, top = 0, 0
        box = (left, top, left + crop_width, top + crop_height)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if rng.random() < self.flip_probability:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


class Blip2ImageTextCollator:
    """Batches image-text examples (dicts from a `datasets` dataset or any sequence) for stage-1 training.

    Each example has an image (PIL / array / path) under `image_column` (or cached `frozen_image_features`, see
    `FrozenFeatureDataset`), a caption under `text_column` and optionally an image id under `image_id_column`
    (captions of one image are positives of each other). Captions are tokenized with the Q-Former tokenizer (BERT
    WordPiece with `[DEC]`), right-truncated to `max_length` (32 in the paper) and padded to it (a fixed length, which
    cross-rank gathering needs).

    Column names may be dotted to read nested values: a webdataset sample `{"__key__", "jpg", "txt", "json"}` trains
    with `image_column="jpg"` and `text_column="txt"` or `"json.captions"`. A caption column may hold a list of
    captions (CapFilt's kept captions, COCO's five): one is drawn per example at each step (see
    `columns.caption_values`; seeded, different every epoch, repeated by a resumed run); the examples of one image
    then share its image id, so that ITC treats the captions of an image that meet in a batch as positives.

    Args:
        image_processor: The BLIP-2 image processor (`blip2_image_processor(image_size)`).
        qformer_tokenizer: BERT tokenizer with `[DEC]` (`load_qformer_tokenizer`).
        augment: Apply `RandomResizedCropFlip` (the paper's training augmentation) before the image processor.
        seed: Seed of the augmentation and of the caption draws. Under `Blip2Trainer` each example's draws are a
            function of (seed, epoch, example index), so a run resumed from a checkpoint draws exactly as the
            uninterrupted one.
        image_id_column: Image ids (captions of one image are positives of each other), used when the examples have
            the column: integers, or strings (file names, keys), which become a stable 63-bit hash. Webdataset
            samples without it use their `__key__` (hashed) as the image id. None: no image ids.
    """

    def __init__(
        self,
        image_processor: Any,
        qformer_tokenizer: Any,
        max_length: int = 32,
        augment: bool = False,
        image_column: str = "image",
        text_column: str = "text",
        image_id_column: str | None = "image_id",
        seed: int = 0,
    ) -> None:
        if QFORMER_START_TOKEN not in qformer_tokenizer.get_vocab():
            raise ValueError(
                f"the Q-Former tokenizer has no {QFORMER_START_TOKEN} token (the start of image-grounded generation); "
                "load it with modeling_blip2.load_qformer_tokenizer"
            )
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and text, got {max_length}")
        self.image_processor = image_processor
        self.qformer_tokenizer = qformer_tokenizer
        self.max_length = max_length
        self.image_column, self.text_column, self.image_id_column = image_column, text_column, image_id_column
        self.seed = seed
        self.augmentation = _augmentation(image_processor, seed) if augment else None
        self.caption_rng = random.Random(seed)  # caption draws of examples that Blip2Trainer did not key
        self.draws_per_sample = True  # caption lists are drawn from per example, whatever the augmentation

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = caption_values(examples, self.text_column, self.seed, self.caption_rng)
        encoded = self.qformer_tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if "frozen_image_features" in examples[0]:
            if self.augmentation is not None:
                raise ValueError("cached image features cannot be augmented: turn off augment or the feature cache")
            batch["frozen_image_features"] = torch.stack([example["frozen_image_features"] for example in examples])
        else:
            batch["pixel_values"] = _pixel_values(examples, self.image_column, self.image_processor, self)
        ids = batch_image_ids(examples, self.image_id_column)
        if ids is not None:
            batch["image_ids"] = ids
        return batch


def batch_image_ids(examples: Sequence[Mapping[str, Any]], column: str | None) -> torch.Tensor | None:
    """The (B,) image ids of a batch: from `column` when the first example has it (then every example must), else
    from the webdataset `__key__` (hashed) when the examples have one; None without `column` or either source."""
    if column is None or not examples:
        return None
    if not has_column(examples[0], column):
        if not has_column(examples[0], WEBDATASET_KEY):
            return None
        column = WEBDATASET_KEY
    values = [
        image_id_value(column_value(example, i, column, "image id"), i, column) for i, example in enumerate(examples)
    ]
    return torch.tensor(values, dtype=torch.long)


def _pixel_values(examples: Sequence[Mapping[str, Any]], column: str, image_processor: Any, collator: Any) -> Any:
    """The processed images of `column` (augmented when the collator augments), naming a missing column."""
    images = []
    for index, example in enumerate(examples):
        value = column_value(example, index, column, "image")
        try:
            image = to_rgb_image(value)
        except ValueError as error:
            raise ValueError(f"example {index}, column {column!r}: {error}") from error
        if collator.augmentation is not None:
            image = collator.augmentation(image, sample_rng(collator.seed, example, collator.augmentation.rng))
        images.append(image)
    return image_processor(images, return_tensors="pt")["pixel_values"]


def _augmentation(image_processor: Any, seed: int) -> RandomResizedCropFlip:
    """The paper's augmentation, cropping to the side of the images the image processor makes."""
    return RandomResizedCropFlip(image_input_side(image_processor), rng=random.Random(seed))


def image_input_side(image_processor: Any) -> int:
    """Side of the images `image_processor` hands the encoder: its crop size when it center-crops, else its `size`
    (height, or shortest edge). Works for BLIP, CLIP, SigLIP, DINOv2 (Bit), ViT and ConvNeXt image processors."""
    candidates = []
    if getattr(image_processor, "do_center_crop", False):
        candidates.append(getattr(image_processor, "crop_size", None))
    candidates.append(getattr(image_processor, "size", None))
    for size in candidates:
        if isinstance(size, int):
            return size
        for key in ("height", "shortest_edge"):
            value = size.get(key) if hasattr(size, "get") else None
            if value:
                return int(value)
    raise ValueError(
        f"cannot tell the image size {type(image_processor).__name__} produces (no crop_size, size height or "
        "shortest_edge): the augmentation needs it"
    )


class Blip2CaptionCollator(EndTokenFromModel):
    """Batches image-caption pairs for stage 2 and caption fine-tuning (`Blip2ForConditionalGeneration`).

    Decoder-only LLMs (LM loss): `[<image> x Q] + prompt + caption + end token`, labels -100 on the image tokens, the
    prompt and padding, right padding. The end token is the one `generate` stops at, the model's
    `generation_config.eos_token_id` ("\\n" in the official OPT checkpoints, not the tokenizer's `</s>`), appended by
    id: `Blip2Trainer` takes it from the model (`bind_model`), or pass it. Encoder-decoder LLMs (prefix LM): the
    encoder reads `[<image> x Q] + prompt`, and with `prefix_lm=True` also a random leading part of the caption
    (split at a word boundary, at least one word left); the decoder target is the rest of the caption.

    Args:
        processor: A `Blip2ImageTextProcessor` (image processor, LLM tokenizer, `num_query_tokens`).
        is_encoder_decoder: The LLM family (`model.config.is_encoder_decoder`).
        eos_token_id: End of caption for decoder-only LLMs; None takes `model.generation_config.eos_token_id` when
            the collator meets the model (`Blip2Trainer`, `bind_model`). An id the model does not stop at is refused.
        prompt: Text before the caption (the paper's fine-tuning prompt is "a photo of").
        max_length: Longest encoder / decoder-only sequence, image tokens included; captions are truncated (the end
            token is kept).
        prefix_lm: Split captions for the encoder-decoder prefix-LM objective (stage 2).
        augment: The paper's random resized crop + flip.
        image_column, text_column: The columns of the images and captions; dotted names read nested values
            (`"json.captions"` in a webdataset sample). A caption column may hold a list of captions: one is drawn
            per example at each step (`columns.caption_values`).
        seed: Seed of the augmentation, the caption draws and the prefix split; under `Blip2Trainer` each example's
            draws are a function of (seed, epoch, example index), so resuming reproduces the uninterrupted run.
        pad_to_max_length: Pad every batch to `max_length` (fixed shapes) instead of to its longest row; needed when
            several processes train from a stream with accelerate's default `dispatch_batches`, which concatenates
            the batches of the processes.
    """

    def __init__(
        self,
        processor: Any,
        is_encoder_decoder: bool,
        eos_token_id: int | None = None,
        prompt: str = "",
        max_length: int = 64,
        prefix_lm: bool = False,
        augment: bool = False,
        image_column: str = "image",
        text_column: str = "text",
        seed: int = 0,
        pad_to_max_length: bool = False,
    ) -> None:
        tokenizer = processor.tokenizer
        if processor.num_query_tokens is None:
            raise ValueError("the processor's num_query_tokens is not set")
        if max_length <= processor.num_query_tokens + 1:
            raise ValueError(
                f"max_length ({max_length}) leaves no room after {processor.num_query_tokens} image tokens"
            )
        self.processor, self.tokenizer = processor, tokenizer
        self.is_encoder_decoder, self.eos_token_id = is_encoder_decoder, eos_token_id
        self.prompt, self.max_length, self.prefix_lm = prompt, max_length, prefix_lm
        self.image_column, self.text_column = image_column, text_column
        self.seed, self.rng = seed, random.Random(seed)
        self.caption_rng = random.Random(seed)  # caption draws of examples that Blip2Trainer did not key
        self.augmentation = _augmentation(processor.image_processor, seed) if augment else None
        self.draws_per_sample = True  # caption lists are drawn from per example (and augmentation, prefix split)
        self.pad_to_max_length = pad_to_max_length
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        captions = caption_values(examples, self.text_column, self.seed, self.caption_rng)
        end_token = None if self.is_encoder_decoder else self._end_token()
        if "frozen_image_features" in examples[0]:  # from FrozenFeatureDataset: the encoder already ran
            if self.augmentation is not None:
                raise ValueError("cached image features cannot be augmented: turn off augment or the feature cache")
            batch = {"frozen_image_features": torch.stack([example["frozen_image_features"] for example in examples])}
        else:
            batch = {"pixel_values": _pixel_values(examples, self.image_column, self.processor.image_processor, self)}
        rows = [
            self._encoder_decoder_row(caption, sample_rng(self.seed, example, self.rng))
            if self.is_encoder_decoder
            else self._decoder_only_row(caption, end_token)
            for caption, example in zip(captions, examples, strict=True)
        ]
        image_ids = [self.processor.image_token_id] * self.processor.num_query_tokens
        encoder_rows = [image_ids + row[0] for row in rows]
        width = self.max_length if self.pad_to_max_length else None
        batch["input_ids"], batch["attention_mask"] = _right_pad(encoder_rows, self.pad_id, width)
        if self.is_encoder_decoder:
            batch["labels"], _ = _right_pad([row[1] for row in rows], IGNORE_LABEL, width)
        else:
            labels = [[IGNORE_LABEL] * len(image_ids) + row[1] for row in rows]
            batch["labels"], _ = _right_pad(labels, IGNORE_LABEL, width)
        return batch

    def _decoder_only_row(self, caption: str, end_token: int) -> tuple[list[int], list[int]]:
        prompt_ids = self.tokenizer(self.prompt, add_special_tokens=True).input_ids if self.prompt else []
        if not prompt_ids and self.tokenizer.bos_token_id is not None and _adds_bos(self.tokenizer):
            prompt_ids = [self.tokenizer.bos_token_id]
        text = f" {caption}" if self.prompt else caption
        caption_ids = self.tokenizer(text, add_special_tokens=False).input_ids
        room = self.max_length - self.processor.num_query_tokens - len(prompt_ids) - 1
        if room < 1:
            raise ValueError(f"max_length ({self.max_length}) leaves no room for a caption after the prompt")
        caption_ids = caption_ids[:room] + [end_token]
        return prompt_ids + caption_ids, [IGNORE_LABEL] * len(prompt_ids) + caption_ids

    def _encoder_decoder_row(self, caption: str, rng: random.Random) -> tuple[list[int], list[int]]:
        words = caption.split()
        split = rng.randint(0, len(words) - 1) if self.prefix_lm else 0
        encoder_text = " ".join(part for part in (self.prompt, " ".join(words[:split])) if part)
        room = self.max_length - self.processor.num_query_tokens
        encoder_ids = self.tokenizer(encoder_text, truncation=True, max_length=room).input_ids
        target_ids = self.tokenizer(" ".join(words[split:]), truncation=True, max_length=self.max_length).input_ids
        return encoder_ids, target_ids


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _right_pad(rows: list[list[int]], pad_value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows) if width is None else width
    ids = torch.tensor([row + [pad_value] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask
