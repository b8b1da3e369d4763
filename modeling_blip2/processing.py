"""Processor: images through the vision model's image processor, LLM prompts and chats with `<image>` tokens, and an
optional Q-Former tokenizer."""

from __future__ import annotations

import inspect
import io
import math
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, BlipImageProcessorPil, ProcessorMixin
from transformers.tokenization_utils_base import AddedToken

from .checkpoint_io import atomic_save, check_local_checkpoint, pop_hub_kwargs, push_files, relative_files
from .model_card import require_hub_token

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
QFORMER_START_TOKEN = "[DEC]"
QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"
IGNORE_INDEX = -100

# Paper templates for zero-shot VQA (section 5 of the reference): the LLM family decides the wording.
VQA_PROMPT_DECODER_ONLY = "Question: {} Answer:"
VQA_PROMPT_ENCODER_DECODER = "Question: {} Short answer:"
CAPTION_PROMPT = "a photo of"

ImageLike = Any  # PIL image, numpy array, torch tensor, file path or http(s) URL


def blip2_image_processor(image_size: int = 224) -> BlipImageProcessorPil:
    """The BLIP-2 image transform: RGB, bicubic resize to a square, rescale to [0, 1], OpenAI CLIP normalisation."""
    return BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


# Image processors of encoders that read patch sequences (NaFlex) rather than images; the package passes `(B, C, H, W)`
# images everywhere, so these are replaced by the same transform at a fixed size (`fixed_resolution_image_processor`).
PATCH_SEQUENCE_IMAGE_PROCESSORS = ("Siglip2ImageProcessor", "Siglip2ImageProcessorPil")


def fixed_resolution_image_processor(image_processor: Any) -> Any:
    """`image_processor` as one that makes `(B, C, H, W)` images, the input of every path into BLIP-2's encoder.

    SigLIP2's NaFlex image processor (`Siglip2ImageProcessor`) resizes each image to its own aspect ratio and gives
    patch sequences with `pixel_attention_mask` and `spatial_shapes`. It becomes a `SiglipImageProcessor` (same
    backend) with its resampling, rescaling and normalisation at the square side `isqrt(max_num_patches) *
    patch_size`: the image a square picture becomes inside the NaFlex processor, whose patches the encoder backbone
    cuts again (`backbones.images_to_patch_sequence`). Pictures of another aspect ratio are stretched to the square,
    as the fixed-resolution SigLIP2 checkpoints do. Any other image processor is returned as it is.
    """
    if type(image_processor).__name__ not in PATCH_SEQUENCE_IMAGE_PROCESSORS:
        return image_processor
    import transformers

    side = math.isqrt(image_processor.max_num_patches) * image_processor.patch_size
    pil = type(image_processor).__name__.endswith("Pil")
    fixed_class = transformers.SiglipImageProcessorPil if pil else transformers.SiglipImageProcessor
    return fixed_class(
        size={"height": side, "width": side},
        resample=image_processor.resample,
        do_rescale=image_processor.do_rescale,
        rescale_factor=image_processor.rescale_factor,
        do_normalize=image_processor.do_normalize,
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        do_convert_rgb=True,
    )


def load_qformer_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Loads a BERT WordPiece tokenizer for the Q-Former and adds `[DEC]` (the ITG start token) as its BOS token."""
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return with_qformer_start_token(tokenizer)


def with_qformer_start_token(tokenizer: Any) -> Any:
    """Adds `[DEC]` as the BOS token of a BERT tokenizer (as LAVIS does) unless it is there already."""
    if tokenizer.bos_token != QFORMER_START_TOKEN:
        tokenizer.add_special_tokens({"bos_token": QFORMER_START_TOKEN})
    return tokenizer


# -- images ---------------------------------------------------------------------------------------------------------


def to_rgb_image(image: ImageLike, timeout: float | None = 10.0) -> Image.Image:
    """Turns any supported image input into an RGB PIL image, or raises a `ValueError` that says what was wrong.

    Grayscale, palette, RGBA (composited over white), CMYK and 16/32-bit integer or float images are converted;
    paths and http(s) URLs are loaded. Empty (0-sized) images are refused; a 1x1 image is fine.
    """
    if image is None:
        raise ValueError("expected an image (PIL image, array, path or URL), got None")
    if isinstance(image, (str, os.PathLike)):
        image = _open_image_source(str(image), timeout)
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        # numpy has no bfloat16 (and float16 arrays are fine, but one float path is simpler).
        image = _array_to_image((image.float() if image.is_floating_point() else image).numpy())
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected an image (PIL image, array, tensor, path or URL), got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"expected a non-empty image, got one of size {image.width}x{image.height}")
    image = ImageOps.exif_transpose(image)
    return _pil_to_rgb(image)


def _open_image_source(source: str, timeout: float | None) -> Image.Image:
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:  # noqa: S310 (http(s) only)
                data = response.read()
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise ValueError(f"could not fetch the image at {source}: {error}") from error
        return _decode_image(io.BytesIO(data), source)
    if not os.path.isfile(source):
        raise ValueError(f"expected an image file path or an http(s) URL, got {source!r} (no such file)")
    return _decode_image(source, source)


def _decode_image(file: Any, name: str) -> Image.Image:
    try:
        image = Image.open(file)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{name} is not a readable image: {error}") from error
    return image


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.size == 0:
        raise ValueError(f"expected a non-empty image array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        _check_finite_array(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels-first -> channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image array of shape (H, W), (H, W, C) or (C, H, W), got {array.shape}")
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if float(array.max()) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _check_finite_array(array: np.ndarray) -> None:
    # NaN / inf pixels have no colour: turning them into black (or white) would hide a broken image.
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(
            f"expected an image of finite pixel values, got a {array.dtype} array of shape {array.shape} with "
            f"{int((~finite).sum())} NaN or inf value(s)"
        )


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit and 32-bit images: PIL's own conversion would clip them to white; scale them down instead.
        return _pil_to_rgb(_array_to_image(_high_bit_depth_to_uint8(image)))
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_uint8(image: Image.Image) -> np.ndarray:
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        _check_finite_array(array)
        peak = 1.0 if float(array.max()) <= 1.0 else 255.0
    else:
        peak = 65535.0 if image.mode.startswith("I;16") or float(array.max()) > 255 else 255.0
    return np.clip(np.nan_to_num(array) / peak * 255.0, 0, 255).round().astype(np.uint8)


def to_rgb_images(images: ImageLike | Sequence[ImageLike], timeout: float | None = 10.0) -> list[Image.Image]:
    """A single image or a list of them -> list of RGB PIL images (see `to_rgb_image`)."""
    if images is None:
        raise ValueError("expected one or more images, got None")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("expected one or more images, got an empty list")
        return [_indexed_rgb_image(images, index, timeout) for index in range(len(images))]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [_indexed_rgb_image(images, index, timeout) for index in range(len(images))]
    return [_indexed_rgb_image(images, None, timeout)]


def _indexed_rgb_image(images: Any, index: int | None, timeout: float | None) -> Image.Image:
    """`to_rgb_image(images[index])` (`images` itself when `index` is None), its error naming the argument and the
    image of the batch that was wrong."""
    try:
        return to_rgb_image(images if index is None else images[index], timeout)
    except ValueError as error:
        raise ValueError(f"images{'' if index is None else f'[{index}]'}: {error}") from error


# -- the processor ------------------------------------------------------------------------------------------------


class Blip2ImageTextProcessor(ProcessorMixin):
    """Prepares images and text for the BLIP-2 models of this package.

    - Images: any PIL mode, arrays, tensors, paths or URLs -> RGB -> `image_processor`: the BLIP-2 transform
      (`blip2_image_processor`) for the BLIP-2 checkpoints, the vision model's own image processor (CLIP, SigLIP,
      DINOv2, ViT, ConvNeXt ...) for a model composed with `from_unimodal_pretrained`.
    - Prompts: tokenized by the LLM tokenizer. One `<image>` placeholder in a prompt is expanded in place to
      `num_query_tokens` `<image>` tokens; a prompt without one (given with images) is prefixed with them. Image tokens
      are never truncated; `max_length` counts them. Left padding for generation, right padding (and `labels`) for
      training.
    - Chat: `apply_chat_template` renders messages holding `{"type": "image"}` through the LLM tokenizer's chat
      template, the image becoming the placeholder.
    - Optional `qformer_tokenizer` (BERT WordPiece + `[DEC]`): `qformer_text` -> `qformer_input_ids` /
      `qformer_attention_mask`, right-padded.

    Args:
        image_processor: Any transformers image processor (`blip2_image_processor()` builds the BLIP-2 one).
        tokenizer: The LLM tokenizer; `<image>` is added as a special token if missing (resize the LLM's
            embeddings after adding it).
        num_query_tokens: Image tokens per prompt; must equal the model's `num_query_tokens`.
        qformer_tokenizer: Optional Q-Former tokenizer, saved in the `qformer_tokenizer/` subfolder.
        image_token: The placeholder token string.
    """

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        num_query_tokens: int | None = None,
        qformer_tokenizer: Any = None,
        image_token: str = IMAGE_TOKEN,
        **kwargs: Any,
    ) -> None:
        if num_query_tokens is not None and num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {num_query_tokens}")
        if type(image_processor).__name__ in PATCH_SEQUENCE_IMAGE_PROCESSORS:
            raise ValueError(
                f"image_processor is a {type(image_processor).__name__}, which makes NaFlex patch sequences "
                "(pixel_values, pixel_attention_mask, spatial_shapes); BLIP-2's models take (batch, channels, height, "
                "width) images: pass fixed_resolution_image_processor(image_processor) (the same transform at a "
                "fixed size), which Blip2ImageTextProcessor.from_unimodal_pretrained builds itself"
            )
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, normalized=False, special=True)], special_tokens=True)
        self.num_query_tokens = num_query_tokens
        self.image_token = image_token
        # Kept out of ProcessorMixin's attribute handling (it is optional); saved in its own subfolder.
        self._qformer_tokenizer = qformer_tokenizer
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_unimodal_pretrained(
        cls,
        vision_model_name_or_path: str | os.PathLike,
        language_model_name_or_path: str | os.PathLike,
        qformer_name_or_path: str | os.PathLike | None = None,
        num_query_tokens: int = 32,
        *,
        image_processor_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        qformer_tokenizer_kwargs: dict[str, Any] | None = None,
    ) -> Blip2ImageTextProcessor:
        """The processor of a BLIP-2 composed from unimodal checkpoints
        (`Blip2ForConditionalGeneration.from_unimodal_pretrained` with the same paths).

        - Image processor: the vision checkpoint's own (`AutoImageProcessor`), so images are prepared as its encoder
          saw them in training. transformers picks its PIL implementation unless torchvision is installed;
          `image_processor_kwargs={"backend": "pil"}` pins it. SigLIP2's NaFlex processor becomes the same transform
          at a fixed square size (`fixed_resolution_image_processor`), as the model takes images, not patches.
        - Tokenizer: the LLM's (`AutoTokenizer`), with `<image>` added as a special token if missing, which gives the
          id the model composed from the same folder takes as `image_token_index`.
        - Q-Former tokenizer: the BERT tokenizer of `qformer_name_or_path` with `[DEC]` added, if given.

        Args:
            vision_model_name_or_path: Vision checkpoint (folder or Hub id) holding its image processor config.
            language_model_name_or_path: LLM checkpoint holding its tokenizer.
            qformer_name_or_path: BERT checkpoint the Q-Former starts from, or None (no Q-Former tokenizer).
            num_query_tokens: Image tokens per prompt (the model's `num_query_tokens`).
            image_processor_kwargs, tokenizer_kwargs, qformer_tokenizer_kwargs: Passed to the respective
                `from_pretrained` (e.g. `revision=`, or `gguf_file=` for an LLM stored as GGUF).
        """
        check_local_checkpoint(
            vision_model_name_or_path,
            f"{cls.__name__}.from_unimodal_pretrained (the vision model's image processor)",
            ("preprocessor_config.json", "processor_config.json"),
        )
        image_processor = fixed_resolution_image_processor(
            AutoImageProcessor.from_pretrained(vision_model_name_or_path, **(image_processor_kwargs or {}))
        )
        tokenizer = AutoTokenizer.from_pretrained(language_model_name_or_path, **(tokenizer_kwargs or {}))
        qformer_tokenizer = None
        if qformer_name_or_path is not None:
            qformer_tokenizer = load_qformer_tokenizer(qformer_name_or_path, **(qformer_tokenizer_kwargs or {}))
        return cls(image_processor, tokenizer, num_query_tokens=num_query_tokens, qformer_tokenizer=qformer_tokenizer)

    @property
    def qformer_tokenizer(self) -> Any:
        """The Q-Former's BERT tokenizer (with `[DEC]`), or None."""
        return self._qformer_tokenizer

    @qformer_tokenizer.setter
    def qformer_tokenizer(self, tokenizer: Any) -> None:
        self._qformer_tokenizer = tokenizer

    @classmethod
    def get_attributes(cls) -> list[str]:
        # The Q-Former tokenizer is optional, so it is saved and loaded here rather than by ProcessorMixin.
        return ["image_processor", "tokenizer"]

    @property
    def image_token_id(self) -> int:
        """Id of `<image>` in the LLM tokenizer."""
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        # Some image processors give more than pixel_values (a NaFlex one would: it is refused in __init__).
        image_names = list(getattr(self.image_processor, "model_input_names", None) or ["pixel_values"])
        names = image_names + ["input_ids", "attention_mask"]
        return names + (["qformer_input_ids", "qformer_attention_mask"] if self.qformer_tokenizer is not None else [])

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        text: str | Sequence[str] | None = None,
        qformer_text: str | Sequence[str] | None = None,
        for_training: bool = False,
        padding: bool | str = True,
        truncation: bool | None = None,
        max_length: int | None = None,
        qformer_max_length: int = 32,
        return_tensors: str | None = "pt",
        timeout: float | None = 10.0,
        add_special_tokens: bool = True,
        **kwargs: Any,
    ) -> BatchFeature:
        """Processes a batch.

        Args:
            images: One image or a list (PIL, numpy, torch, path, URL).
            text: One prompt or a list, as many as images. A prompt may hold one `<image>` placeholder where the
                image goes (expanded there to `num_query_tokens` tokens, also without `images`); prompts without
                one get the image tokens first when images are given. With images and no text, every image gets an
                empty prompt (the tokenizer's BOS, if it adds one): the captioning input.
            qformer_text: Text for the Q-Former (e.g. the question), needs `qformer_tokenizer`.
            for_training: Right padding and `labels` (prompt ids, -100 on image tokens, BOS and padding). Otherwise
                left padding, as batched generation needs.
            padding: `True`/`"longest"`, `"max_length"` (needs `max_length`) or `False` (one row only).
            truncation: Truncate text to `max_length` (defaults to True when `max_length` is given).
            max_length: Longest row including the `num_query_tokens` image tokens.
            qformer_max_length: Longest Q-Former text (32 in the paper).
            return_tensors: `"pt"` (default) or None for lists.
            add_special_tokens: Let the LLM tokenizer add its special tokens (BOS ...); `apply_chat_template` turns
                it off, as the chat template writes them.
            kwargs: Passed to the image processor.
        """
        if images is None and text is None and qformer_text is None:
            raise ValueError("expected images, text or both; got neither")
        data: dict[str, Any] = {}
        pil_images = None
        if images is not None:
            pil_images = to_rgb_images(images, timeout)
            data.update(self.image_processor(pil_images, return_tensors=return_tensors, **kwargs))
        if text is None and pil_images is not None:
            text = [""] * len(pil_images)
        if text is not None:
            texts = _as_text_list(text, "text")
            if pil_images is not None and len(texts) != len(pil_images):
                raise ValueError(f"got {len(pil_images)} images but {len(texts)} texts: pass one text per image")
            data.update(
                self._encode_prompts(
                    texts,
                    with_images=pil_images is not None,
                    for_training=for_training,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    add_special_tokens=add_special_tokens,
                )
            )
        if qformer_text is not None:
            data.update(self._encode_qformer_text(qformer_text, qformer_max_length, len(pil_images or [])))
        return BatchFeature(data, tensor_type=return_tensors)

    def _encode_prompts(
        self,
        texts: list[str],
        with_images: bool,
        for_training: bool,
        padding: bool | str,
        truncation: bool | None,
        max_length: int | None,
        add_special_tokens: bool = True,
    ) -> dict[str, list[list[int]]]:
        placeholders = [self._count_placeholder(text, index) for index, text in enumerate(texts)]
        num_queries = 0
        if with_images or any(placeholders):
            if self.num_query_tokens is None:
                raise ValueError("num_query_tokens is not set: the processor cannot place the image tokens")
            num_queries = self.num_query_tokens
        if max_length is not None and max_length <= num_queries:
            raise ValueError(f"max_length ({max_length}) must exceed the {num_queries} image tokens of every prompt")
        if truncation is None:
            truncation = max_length is not None
        token_rows = self._tokenize_prompts(
            texts, placeholders, with_images, num_queries, truncation, max_length, add_special_tokens
        )
        image_id = self.image_token_id
        rows: list[list[int]] = []
        image_starts: list[int | None] = []  # where each row's block of image tokens begins (None: no image)
        for index, ids in enumerate(token_rows):
            if placeholders[index]:
                found = ids.count(image_id)
                if found != 1:
                    cause = (
                        f"truncation to max_length={max_length} cut it off; raise max_length or put the image earlier"
                        if truncation and found == 0
                        else f"the tokenizer does not keep {self.image_token} as one token"
                    )
                    raise ValueError(
                        f"text[{index}] holds the {self.image_token} placeholder but its token ids hold {found} image "
                        f"tokens (id {image_id}): {cause}"
                    )
                start = ids.index(image_id)
                rows.append(ids[:start] + [image_id] * num_queries + ids[start + 1 :])
                image_starts.append(start)
            elif with_images:
                rows.append([image_id] * num_queries + ids)
                image_starts.append(0)
            else:
                rows.append(ids)
                image_starts.append(None)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        width = _padded_width(rows, padding, max_length)
        result: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        if for_training:
            result["labels"] = []
        for row, start in zip(rows, image_starts, strict=True):
            fill = width - len(row)
            # Right padding for training (labels line up with the text), left padding for generation.
            if for_training:
                result["input_ids"].append(row + [pad_id] * fill)
                result["attention_mask"].append([1] * len(row) + [0] * fill)
                result["labels"].append(self._labels(row, start, num_queries) + [IGNORE_INDEX] * fill)
            else:
                result["input_ids"].append([pad_id] * fill + row)
                result["attention_mask"].append([0] * fill + [1] * len(row))
        return result

    def _count_placeholder(self, text: str, index: int) -> bool:
        count = text.count(self.image_token)
        if count > 1:
            raise ValueError(
                f"text[{index}] holds {count} {self.image_token} placeholders; a BLIP-2 prompt takes one image (its "
                "num_query_tokens query outputs), so mark at most one place per prompt"
            )
        return count == 1

    def _tokenize_prompts(
        self,
        texts: list[str],
        placeholders: list[bool],
        with_images: bool,
        num_queries: int,
        truncation: bool,
        max_length: int | None,
        add_special_tokens: bool,
    ) -> list[list[int]]:
        """Token ids of each text, truncated so that the row fits `max_length` once its image tokens are in."""

        def text_budget(has_placeholder: bool) -> int | None:
            if max_length is None:
                return None
            if has_placeholder:  # the placeholder is one of the ids and becomes num_queries of them
                return max_length - num_queries + 1
            return max_length - num_queries if with_images else max_length

        groups: dict[int | None, list[int]] = {}
        for index, has_placeholder in enumerate(placeholders):
            groups.setdefault(text_budget(has_placeholder), []).append(index)
        token_rows: list[list[int]] = [[] for _ in texts]
        for budget, indices in groups.items():
            encoded = self.tokenizer(
                [texts[index] for index in indices],
                truncation=truncation,
                max_length=budget,
                padding=False,
                add_special_tokens=add_special_tokens,
            )
            for index, ids in zip(indices, encoded["input_ids"], strict=True):
                token_rows[index] = list(ids)
        return token_rows

    def _labels(self, row: list[int], image_start: int | None, num_queries: int) -> list[int]:
        """LM labels of one unpadded row, by position (never by pad id: the pad id may be the EOS to learn)."""
        labels = list(row)
        first_text = 0
        if image_start is not None:
            labels[image_start : image_start + num_queries] = [IGNORE_INDEX] * num_queries
            first_text = num_queries if image_start == 0 else 0
        if first_text < len(row) and row[first_text] == self.tokenizer.bos_token_id:
            labels[first_text] = IGNORE_INDEX  # BOS is given, not predicted
        return labels

    # -- chat ---------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        chat_template: str | None = None,
        tools: list[Any] | None = None,
        documents: list[dict[str, str]] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_tensors: str | None = "pt",
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str | list[str] | BatchFeature | Any:
        """Renders chat messages with the LLM tokenizer's chat template, the image where the messages put it.

        `conversation` is a list of `{"role": ..., "content": ...}` messages, or a list of such lists (a batch). A
        content is a string or a list of parts, `{"type": "text", "text": ...}` and at most one `{"type": "image"}`
        per conversation; the image part may carry the image as `"image"`, `"url"` or `"path"` (an OpenAI
        `{"type": "image_url", "image_url": {"url": ...}}` part works too). Each content list is joined into one
        string, the image part becoming the `<image>` placeholder, so any text chat template renders it. With
        `tokenize=True` the placeholder expands to `num_query_tokens` image tokens where it stands; the other ids
        are those of `tokenizer.apply_chat_template` (no special tokens are added beyond the template's own).

        Args:
            conversation: The messages (or a batch of conversations).
            chat_template: A Jinja template (or the name of one of the tokenizer's templates) to use instead of the
                processor's `chat_template` or, without one, the tokenizer's.
            tools, documents, add_generation_prompt, continue_final_message: As for `tokenizer.apply_chat_template`.
            tokenize: Return token ids instead of the rendered text.
            return_tensors: `"pt"` (default) or None for lists, with `tokenize=True`.
            return_dict: With `tokenize=True`, return the whole `BatchFeature` (`pixel_values` when the messages
                carry images or `images=` is given, `input_ids`, `attention_mask`), ready for `model.generate`.
            return_assistant_tokens_mask: Not supported (raises).
            processor_kwargs: Arguments for `__call__` (`images`, `padding`, `max_length`, `for_training` ...).
            kwargs: Arguments of `__call__` go to it; the others are template variables.

        Returns the rendered text (a list for a batch), or with `tokenize=True` the `input_ids` or the `BatchFeature`.
        """
        if return_assistant_tokens_mask:
            raise ValueError("return_assistant_tokens_mask is not supported by Blip2ImageTextProcessor")
        call_parameters = set(inspect.signature(self.__call__).parameters) - {"text", "return_tensors", "kwargs"}
        call_kwargs = {"add_special_tokens": False, **(processor_kwargs or {})}
        call_kwargs.update({key: value for key, value in kwargs.items() if key in call_parameters})
        template_kwargs = {key: value for key, value in kwargs.items() if key not in call_parameters}
        conversations, batched = _as_conversations(conversation)
        flat_conversations, carried_images = [], []
        for index, messages in enumerate(conversations):
            flat, images = self._flatten_messages(messages, index)
            flat_conversations.append(flat)
            carried_images.append(images)
        prompts = self.tokenizer.apply_chat_template(
            flat_conversations,
            chat_template=self._chat_template(chat_template),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **template_kwargs,
        )
        for index, prompt in enumerate(prompts):
            if prompt.count(self.image_token) > 1:
                raise ValueError(
                    f"conversation {index} holds {prompt.count(self.image_token)} images ({self.image_token} "
                    "placeholders once rendered); a BLIP-2 prompt is conditioned on one image"
                )
        if not tokenize:
            return prompts if batched else prompts[0]
        images = self._chat_images(carried_images, call_kwargs.pop("images", None))
        if images is not None and not batched:
            images = images[0]
        encoded = self(images=images, text=prompts, return_tensors=return_tensors, **call_kwargs)
        return encoded if return_dict else encoded["input_ids"]

    def _chat_template(self, chat_template: str | None) -> str | None:
        """The template to render with: the one given, else the processor's, else None (the tokenizer's own)."""
        if chat_template is not None:
            return chat_template
        own = self.chat_template.get("default") if isinstance(self.chat_template, dict) else self.chat_template
        if own is not None:
            return own
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"the LLM tokenizer ({type(self.tokenizer).__name__}) has no chat template and none was given: pass "
                "chat_template= (a Jinja template), set processor.tokenizer.chat_template, or write the prompt "
                f"yourself with one {self.image_token} where the image goes and call the processor with it"
            )
        return None

    def _flatten_messages(
        self, messages: Sequence[dict[str, Any]], conversation_index: int
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """Messages with each content list joined into one string (image -> placeholder), and the images they
        carry. Text chat templates concatenate `content` as a string, hence the joining."""
        flat, images = [], []
        for message_index, message in enumerate(messages):
            where = f"conversation {conversation_index}, message {message_index}"
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {message!r}")
            content = message.get("content")
            if isinstance(content, (list, tuple)):
                pieces = []
                for part_index, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text" and isinstance(part.get("text"), str):
                        pieces.append(part["text"])
                    elif kind in ("image", "image_url"):
                        pieces.append(self.image_token)
                        source = _image_part_source(part)
                        if source is not None:
                            images.append(source)
                    else:
                        raise ValueError(
                            f"{where}, part {part_index}: expected {{'type': 'text', 'text': str}} or "
                            f"{{'type': 'image'}}, got {part!r}"
                        )
                message = {**message, "content": "".join(pieces)}
            flat.append(message)
        return flat, images

    @staticmethod
    def _chat_images(carried: list[list[Any]], given: Any) -> list[Any] | None:
        """One image per conversation from the messages, or the `images=` argument; None when neither has any."""
        if not any(carried):
            return None if given is None else (list(given) if isinstance(given, (list, tuple)) else [given])
        if given is not None:
            raise ValueError("images were given both inside the messages and as images=; pass them one way")
        missing = [index for index, images in enumerate(carried) if not images]
        if missing:
            raise ValueError(
                f"conversation {missing[0]} carries no image while others do: give every conversation of a batch "
                "its image (or pass all of them as images=)"
            )
        return [images[0] for images in carried]

    def _encode_qformer_text(self, qformer_text: str | Sequence[str], max_length: int, num_images: int) -> dict:
        if self.qformer_tokenizer is None:
            raise ValueError(
                "qformer_text needs a qformer_tokenizer (BERT WordPiece + [DEC]); this processor has none"
            )
        texts = _as_text_list(qformer_text, "qformer_text")
        if num_images and len(texts) != num_images:
            raise ValueError(f"got {num_images} images but {len(texts)} Q-Former texts: pass one per image")
        encoded = self.qformer_tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_token_type_ids=False
        )
        return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}

    def decode_generated(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        """Decodes `generate` outputs, dropping image tokens, padding and other special tokens.

        `sequences` is the `(batch, length)` ids `generate` returns, or its output object
        (`return_dict_in_generate=True`), whose `sequences` are decoded.
        """
        if not isinstance(sequences, torch.Tensor) and hasattr(sequences, "sequences"):
            sequences = sequences.sequences
        if isinstance(sequences, torch.Tensor) and sequences.dim() != 2:
            raise ValueError(
                f"decode_generated expects (batch, length) token ids or a generate output, got shape "
                f"{tuple(sequences.shape)}"
            )
        return [
            text.strip() for text in self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)
        ]

    # -- saving and loading -------------------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, *, token: str | None = None, **kwargs: Any) -> Any:
        """Uploads the processor files (tokenizers, image processor config) to `repo_id`."""
        return super().push_to_hub(repo_id, token=require_hub_token(token), **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any
    ) -> list[str]:
        """Saves the tokenizer(s) and image processor config, atomically (see `checkpoint_io.atomic_save`).

        The files are written into a staging folder and moved into `save_directory` only once all are written: a
        failure leaves the folder as it was, and the files of a model saved there are kept. With `push_to_hub=True`
        the files written are then uploaded in one commit (`repo_id` defaults to the folder's name).
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        if push_to_hub:
            hub_kwargs["token"] = require_hub_token(hub_kwargs.get("token"))
        with atomic_save(save_directory) as staging:
            saved = super().save_pretrained(str(staging), **kwargs)
            if self.qformer_tokenizer is not None:
                self.qformer_tokenizer.save_pretrained(staging / QFORMER_TOKENIZER_FOLDER)
            written = relative_files(staging)
        saved = [os.path.join(save_directory, os.path.relpath(path, staging)) for path in saved]
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            push_files(
                save_directory,
                repo_id,
                written,
                commit_message=hub_kwargs.pop("commit_message", None) or "Upload processor",
                **hub_kwargs,
            )
        return saved

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> Blip2ImageTextProcessor:
        """`ProcessorMixin.from_pretrained`, plus the Q-Former tokenizer of a `qformer_tokenizer/` subfolder.

        A file given instead of a folder raises `NotADirectoryError`, a local folder holding neither
        `processor_config.json` nor `preprocessor_config.json` `FileNotFoundError`, both naming the path.
        """
        check_local_checkpoint(
            pretrained_model_name_or_path,
            f"{cls.__name__}.from_pretrained",
            ("processor_config.json", "preprocessor_config.json"),
            subfolder=kwargs.get("subfolder") or "",
        )
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        qformer_folder = os.path.join(str(pretrained_model_name_or_path), QFORMER_TOKENIZER_FOLDER)
        if os.path.isdir(qformer_folder):
            processor.qformer_tokenizer = with_qformer_start_token(AutoTokenizer.from_pretrained(qformer_folder))
        elif not os.path.isdir(str(pretrained_model_name_or_path)):
            processor.qformer_tokenizer = _try_hub_qformer_tokenizer(pretrained_model_name_or_path, kwargs)
        return processor


def _try_hub_qformer_tokenizer(repo_id: str | os.PathLike, kwargs: dict[str, Any]) -> Any:
    hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs}
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, subfolder=QFORMER_TOKENIZER_FOLDER, **hub_kwargs)
    except (OSError, ValueError):
        return None
    return with_qformer_start_token(tokenizer)


def _as_text_list(text: str | Sequence[str], name: str) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)):
        if not text:
            raise ValueError(f"{name} is an empty list")
        for index, item in enumerate(text):
            if not isinstance(item, str):
                raise ValueError(
                    f'{name}[{index}] must be a string, got {type(item).__name__} ({item!r}); pass "" for an '
                    "empty prompt"
                )
        return list(text)
    raise ValueError(f"{name} must be a string or a list of strings, got {type(text).__name__}")


def _padded_width(rows: list[list[int]], padding: bool | str, max_length: int | None) -> int:
    if padding == "max_length":
        if max_length is None:
            raise ValueError('padding="max_length" needs max_length')
        return max_length
    if padding in (True, "longest"):
        return max(len(row) for row in rows)
    if padding in (False, "do_not_pad"):
        if len({len(row) for row in rows}) > 1:
            raise ValueError("prompts of different lengths need padding (padding=True)")
        return len(rows[0])
    raise ValueError(f'padding must be True, "longest", "max_length" or False, got {padding!r}')


def _as_conversations(conversation: Any) -> tuple[list[Sequence[dict[str, Any]]], bool]:
    """(list of conversations, whether a batch was given)."""
    if isinstance(conversation, (list, tuple)) and conversation:
        if all(isinstance(item, (list, tuple)) for item in conversation):
            if not all(conversation):
                raise ValueError("every conversation of a batch needs at least one message")
            return list(conversation), True
        if all(isinstance(item, dict) for item in conversation):
            return [conversation], False
    raise ValueError(
        "conversation must be a non-empty list of messages ({'role': ..., 'content': ...}) or a list of such lists, "
        f"got {type(conversation).__name__}"
    )


def _image_part_source(part: dict[str, Any]) -> Any:
    """The image an image part carries (transformers' keys, or an OpenAI `image_url`), or None (a bare marker)."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None
