"""`image-to-text` and `visual-question-answering` pipelines for BLIP-2.

transformers 5 redirects `"image-to-text"` to `"image-text-to-text"` (which requires a text) and has removed
`"visual-question-answering"`. A checkpoint's `config.custom_pipelines` is consulted before either happens, so
checkpoints saved by this package name these classes there and carry this file: `pipeline("image-to-text",
model=checkpoint, trust_remote_code=True)` then captions with no text argument. Without remote code, pass the class:
`pipeline("image-to-text", model=checkpoint, pipeline_class=Blip2ImageToTextPipeline)`.

Both take the call forms of transformers' image-to-text and VQA pipelines: an image (PIL, array, tensor, path, URL)
or a list of them, `image=` / `images=` keywords, a dict input (`{"image": ..., "question": ...}`, `{"images": ...,
"text": ...}`) or a list of dicts, a generator or dataset of either (answered as an iterator), and generation options
(`max_new_tokens`, `num_beams`, `do_sample`, ...) as call arguments or in `generate_kwargs`.

This module imports only transformers, torch, numpy and `.processing`, so it also runs from a checkpoint folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, ImageTextToTextPipeline

from .processing import VQA_PROMPT_DECODER_ONLY, VQA_PROMPT_ENCODER_DECODER, to_rgb_image

# Zero-shot VQA settings of the paper.
VQA_GENERATION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 10}
# Caption length when neither the call nor the model's generation config sets one (the official checkpoints' 30;
# transformers' image-text-to-text default of 256 new tokens overruns the positions of small LLMs).
DEFAULT_MAX_NEW_TOKENS = 30
# `generate` arguments that are not `GenerationConfig` fields but may be passed to the pipeline call all the same.
GENERATE_ARGUMENTS = (
    "generation_config",
    "streamer",
    "stopping_criteria",
    "logits_processor",
    "prefix_allowed_tokens_fn",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "share_prompt_cache",
)
IMAGE_KEYS = ("image", "images")


class Blip2ImageToTextPipeline(ImageTextToTextPipeline):
    """Captions images: `pipe(image)` -> `[{"generated_text": ...}]`; `pipe([image, ...])` -> one such list per image.

    Inputs: an image, a list of images, `image=` / `images=`, a dict `{"image": ..., "text": ...}` (or `"images"`,
    `"prompt"`, `"qformer_text"` keys), a list of dicts, or a generator / dataset of either (the results then come as
    an iterator). `text=` (or `prompt=`) gives a prompt the caption continues (e.g. "a photo of"): one for all images
    or one per image. Generation options (`max_new_tokens`, `num_beams`, `do_sample`, ...) go straight into the call
    or into `generate_kwargs=`; `batch_size=` works as in every transformers pipeline.
    """

    _default_generation_config = GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    # Per-input fields a dict input may hold besides the image, with the aliases they may go by.
    _input_fields: dict[str, tuple[str, ...]] = {"text": ("text", "prompt"), "qformer_text": ("qformer_text",)}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        processor_queries = getattr(self.processor, "num_query_tokens", None)
        model_queries = getattr(self.model.config, "num_query_tokens", None)
        if processor_queries is not None and model_queries is not None and processor_queries != model_queries:
            raise ValueError(
                f"the processor inserts {processor_queries} image tokens per prompt but the model has "
                f"num_query_tokens={model_queries}; load the processor saved with this model"
            )

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        prompt: str | Sequence[str] | None = None,
        qformer_text: str | Sequence[str] | None = None,
        *,
        image: Any = None,
        inputs: Any = None,
        **kwargs: Any,
    ) -> Any:
        images = _one_of("images", images=images, image=image, inputs=inputs)
        fields = {"text": _one_of("text", text=text, prompt=prompt), "qformer_text": qformer_text}
        return self._run(images, fields, kwargs)

    # -- inputs -> one {"images", "text"[, "qformer_text"]} dict per image -----------------------------------------
    def _run(self, images: Any, fields: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        if images is None:
            raise ValueError("expected one or more images (PIL images, arrays, paths or URLs), got None")
        timeout = kwargs.get("timeout", 10.0)
        # Straight to `Pipeline.__call__` (ImageTextToTextPipeline would read a list of dicts as a chat): each
        # prepared dict is one input, batched by `batch_size=`.
        run = super(ImageTextToTextPipeline, self).__call__
        if _is_stream(images):
            listed = [name for name, value in fields.items() if isinstance(value, (list, tuple))]
            if listed:
                raise ValueError(
                    f"{listed[0]} is a list but the images come from a generator or dataset: give each input as a "
                    f"dict holding its own {listed[0]!r}"
                )
            return run((self._item(value, fields, None, timeout) for value in images), **kwargs)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)  # a (batch, ...) array is a batch of images
        batched = isinstance(images, (list, tuple))
        values = list(images) if batched else [images]
        if not values:
            raise ValueError("expected one or more images, got an empty list")
        lengths = {name: len(value) for name, value in fields.items() if isinstance(value, (list, tuple))}
        if lengths and not batched:
            # One image, several texts (or questions): that image with each of them, as transformers' VQA does.
            values, batched = values * max(lengths.values()), True
        for name, length in lengths.items():
            if length != len(values):
                what = "texts" if name == "text" else f"{name} values"
                raise ValueError(
                    f"got {len(values)} images but {length} {what}: pass one {name} per image (or one for all)"
                )
        items = [
            self._item(
                value,
                {name: field[index] if isinstance(field, (list, tuple)) else field for name, field in fields.items()},
                index if batched else None,
                timeout,
            )
            for index, value in enumerate(values)
        ]
        outputs = run(items if batched else items[0], **kwargs)
        return outputs

    def _item(self, value: Any, fields: dict[str, Any], index: int | None, timeout: float | None) -> dict[str, Any]:
        """One input (an image or a dict) with the call's `fields` -> the dict `preprocess` reads."""
        where = "images" if index is None else f"images[{index}]"
        if isinstance(value, dict):
            value, fields = self._fields_of_dict(value, fields, where)
        try:
            rgb = to_rgb_image(value, timeout)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        return {"images": rgb, **self._prompt_fields(fields, index or 0)}

    def _fields_of_dict(self, value: dict, fields: dict[str, Any], where: str) -> tuple[Any, dict[str, Any]]:
        """The image of a dict input and its fields (its own keys over the call's)."""
        accepted = {alias: name for name, aliases in self._input_fields.items() for alias in aliases}
        unknown = sorted(key for key in value if key not in accepted and key not in IMAGE_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown} in a dict input; expected an image under {list(IMAGE_KEYS)} and "
                f"optionally {sorted(accepted)}"
            )
        given_images = [key for key in IMAGE_KEYS if key in value]
        if len(given_images) != 1:
            raise ValueError(
                f"{where}: a dict input needs its image under exactly one of {list(IMAGE_KEYS)}, got keys "
                f"{sorted(value)}"
            )
        fields = dict(fields)
        for key, name in accepted.items():
            if key in value:
                fields[name] = value[key]
        return value[given_images[0]], fields

    def _prompt_fields(self, fields: dict[str, Any], index: int) -> dict[str, Any]:
        """The prompt (and Q-Former text) of input `index` from its fields."""
        text = fields.get("text")
        if text is None:
            text = ""  # captioning: the prompt is the tokenizer's BOS alone
        elif not isinstance(text, str):
            raise ValueError(f"text {index} must be a string, got {type(text).__name__} ({text!r})")
        prepared = {"text": text}
        if fields.get("qformer_text") is not None:
            prepared["qformer_text"] = fields["qformer_text"]
        return prepared

    # -- call arguments ---------------------------------------------------------------------------------------------
    def _sanitize_parameters(self, generate_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> tuple:
        """Generation options given as call arguments go to `generate`, as in transformers' text-generation pipeline;
        the rest is handled by `ImageTextToTextPipeline` (processor options, `return_full_text`, `timeout` ...)."""
        generation = dict(generate_kwargs or {})
        for key in [key for key in kwargs if key in self._generation_argument_names()]:
            if key in generation:
                raise ValueError(f"{key!r} was given twice, as a call argument and in generate_kwargs; pass it once")
            generation[key] = kwargs.pop(key)
        return super()._sanitize_parameters(generate_kwargs=generation or None, **kwargs)

    def _generation_argument_names(self) -> set[str]:
        names = {key for key in vars(GenerationConfig()) if not key.startswith("_")}
        names.difference_update(self._non_generation_params)
        # ImageTextToTextPipeline takes max_new_tokens itself (and refuses it twice).
        names.discard("max_new_tokens")
        return names | set(GENERATE_ARGUMENTS)

    # -- pipeline steps ---------------------------------------------------------------------------------------------
    def preprocess(self, inputs: Any = None, timeout: float | None = None, **kwargs: Any) -> Any:
        if not (isinstance(inputs, dict) and isinstance(inputs.get("images"), Image.Image)):
            inputs = self._item(inputs, {}, None, timeout)  # an input that did not come through __call__
        inputs = dict(inputs)
        qformer_text = inputs.pop("qformer_text", None)
        model_inputs = super().preprocess(inputs, timeout=timeout, **kwargs)
        # A question-conditioned Q-Former also reads the question (the paper's VQA fine-tuning).
        if qformer_text is not None and self._qformer_reads_text():
            encoded = self.processor(qformer_text=qformer_text, return_tensors="pt")
            model_inputs["qformer_input_ids"] = encoded["qformer_input_ids"]
            model_inputs["qformer_attention_mask"] = encoded["qformer_attention_mask"]
        return model_inputs

    def _qformer_reads_text(self) -> bool:
        model_reads_text = bool(getattr(self.model, "has_qformer_text_input", False))
        return model_reads_text and getattr(self.processor, "qformer_tokenizer", None) is not None


class Blip2VisualQuestionAnsweringPipeline(Blip2ImageToTextPipeline):
    """Answers questions about images with the paper's zero-shot prompt.

    `pipe(image, question="what is in the picture?")` -> `[{"answer": ...}]`. Inputs as for the captioning pipeline,
    with `question=` (one for all images, or one per image: a list of images with a list of questions pairs them
    up; one image with a list of questions asks each of them) or dicts `{"image": ..., "question": ...}`; a batch
    gives one list per input. The prompt is "Question: {} Answer:" for decoder-only LLMs and "Question: {} Short
    answer:" for encoder-decoder LLMs; beam search with 5 beams and 10 new tokens unless the call (or the pipeline's
    construction) says otherwise.
    """

    _input_fields: dict[str, tuple[str, ...]] = {"question": ("question",)}

    def __call__(  # type: ignore[override]
        self,
        images: Any = None,
        question: str | Sequence[str] | None = None,
        *,
        image: Any = None,
        inputs: Any = None,
        **kwargs: Any,
    ) -> Any:
        images = _one_of("images", images=images, image=image, inputs=inputs)
        return self._run(images, {"question": question}, kwargs)

    def _prompt_fields(self, fields: dict[str, Any], index: int) -> dict[str, Any]:
        question = fields.get("question")
        if question is None:
            raise ValueError(
                f"question {index} is missing: pass question= (one for all images or one per image) or a "
                "'question' key in each dict input"
            )
        if not isinstance(question, str):
            raise ValueError(f"question {index} must be a non-empty string, got {type(question).__name__}")
        if not question.strip():
            raise ValueError(f"question {index} is empty; expected a non-empty string")
        template = (
            VQA_PROMPT_DECODER_ONLY
            if getattr(self.model.config, "use_decoder_only_language_model", True)
            else VQA_PROMPT_ENCODER_DECODER
        )
        return {"text": template.format(question.strip()), "qformer_text": question.strip()}

    def _sanitize_parameters(self, **kwargs: Any) -> tuple:
        if not {"return_full_text", "return_tensors", "return_type"} & set(kwargs):
            kwargs["return_full_text"] = False  # the answer, without the prompt
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        generation = forward.get("generate_kwargs") or {}
        if "generation_config" not in generation:
            # The paper's settings, under what the call and the pipeline's construction set.
            already_set = {**getattr(self, "_generate_kwargs", {}), **generation}
            defaults = {key: value for key, value in VQA_GENERATION_DEFAULTS.items() if key not in already_set}
            if defaults.get("max_new_tokens") is not None and "max_length" in already_set:
                del defaults["max_new_tokens"]
            generation = {**defaults, **generation}
        forward["generate_kwargs"] = generation
        return preprocess, forward, postprocess

    def postprocess(self, model_outputs: Any, **kwargs: Any) -> list[dict[str, Any]]:
        records = super().postprocess(model_outputs, **kwargs)
        return [
            {"answer": record["generated_text"].strip()} if "generated_text" in record else record
            for record in records
        ]


def _one_of(name: str, **given: Any) -> Any:
    """The one argument given among aliases (`images=` / `image=` / `inputs=`); two of them is an error."""
    set_names = [key for key, value in given.items() if value is not None]
    if len(set_names) > 1:
        raise ValueError(f"give {name} once: got {' and '.join(f'{key}=' for key in set_names)}")
    return given[set_names[0]] if set_names else None


def _is_stream(images: Any) -> bool:
    """A generator, iterator or dataset of inputs (answered lazily), as opposed to one input or a list of them."""
    atomic = (str, bytes, os.PathLike, dict, list, tuple, Image.Image, np.ndarray, torch.Tensor)
    return not isinstance(images, atomic) and isinstance(images, (Iterable, torch.utils.data.Dataset))
