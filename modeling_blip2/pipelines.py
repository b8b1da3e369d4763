"""`image-to-text` and `visual-question-answering` pipelines for BLIP-2.

transformers 5 redirects `"image-to-text"` to `"image-text-to-text"` (which requires a text) and has removed
`"visual-question-answering"`. A checkpoint's `config.custom_pipelines` is consulted before either happens, so
checkpoints saved by this package name these classes there and carry this file: `pipeline("image-to-text",
model=checkpoint, trust_remote_code=True)` then captions with no text argument. Without remote code, pass the class:
`pipeline("image-to-text", model=checkpoint, pipeline_class=Blip2ImageToTextPipeline)`.

This module imports only transformers and `.processing`, so it also runs from a checkpoint folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import ImageTextToTextPipeline

from .processing import VQA_PROMPT_DECODER_ONLY, VQA_PROMPT_ENCODER_DECODER, to_rgb_images

# Zero-shot VQA settings of the paper.
VQA_GENERATION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 10}


class Blip2ImageToTextPipeline(ImageTextToTextPipeline):
    """Captions images: `pipe(image)` or `pipe([image, ...])` -> `[{"generated_text": ...}]` per image.

    `text=` (or `prompt=`) gives a prompt the caption continues (e.g. "a photo of"); `max_new_tokens=`,
    `generate_kwargs=` and `batch_size=` work as in every transformers pipeline.
    """

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
        **kwargs: Any,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        if text is not None and prompt is not None:
            raise ValueError("give the prompt as text= or prompt=, not both")
        text = text if text is not None else prompt
        if images is None:
            raise ValueError("expected one or more images (PIL images, arrays, paths or URLs), got None")
        single = not isinstance(images, (list, tuple))
        rgb_images = to_rgb_images(images, timeout=kwargs.get("timeout", 10.0))
        if text is None:
            text = [""] * len(rgb_images)
        elif isinstance(text, str):
            text = [text] * len(rgb_images)
        elif len(text) != len(rgb_images):
            raise ValueError(f"got {len(rgb_images)} images but {len(text)} texts: pass one text per image")
        inputs = [{"images": image, "text": prompt_text} for image, prompt_text in zip(rgb_images, text, strict=True)]
        if qformer_text is not None:
            qformer_texts = [qformer_text] * len(inputs) if isinstance(qformer_text, str) else list(qformer_text)
            if len(qformer_texts) != len(inputs):
                raise ValueError(f"got {len(inputs)} images but {len(qformer_texts)} Q-Former texts")
            for item, question in zip(inputs, qformer_texts, strict=True):
                item["qformer_text"] = question
        # Straight to `Pipeline.__call__` (ImageTextToTextPipeline would read a list of dicts as a chat): each
        # {"images", "text"} dict is one input, batched by `batch_size=`.
        outputs = super(ImageTextToTextPipeline, self).__call__(inputs, **kwargs)
        return outputs[0] if single else outputs

    def preprocess(self, inputs: Any = None, timeout: float | None = None, **kwargs: Any) -> Any:
        qformer_text = inputs.pop("qformer_text", None) if isinstance(inputs, dict) else None
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

    `pipe(image, question="what is in the picture?")` -> `[{"answer": ...}]`; a list of images with a list of
    questions gives one list per image. The prompt is "Question: {} Answer:" for decoder-only LLMs and
    "Question: {} Short answer:" for encoder-decoder LLMs; beam search with 5 beams and 10 new tokens by default.
    """

    def __call__(  # type: ignore[override]
        self,
        images: Any = None,
        question: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, str]] | list[list[dict[str, str]]]:
        if question is None:
            raise ValueError("expected question= (a string or one per image), got None")
        questions = [question] if isinstance(question, str) else list(question)
        for index, text in enumerate(questions):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"question {index} is empty; expected a non-empty string")
        template = (
            VQA_PROMPT_DECODER_ONLY
            if getattr(self.model.config, "use_decoder_only_language_model", True)
            else VQA_PROMPT_ENCODER_DECODER
        )
        prompts = [template.format(text.strip()) for text in questions]
        generate_kwargs = {**VQA_GENERATION_DEFAULTS, **kwargs.pop("generate_kwargs", {})}
        if "max_new_tokens" in kwargs:
            generate_kwargs["max_new_tokens"] = kwargs.pop("max_new_tokens")
        outputs = super().__call__(
            images,
            text=prompts[0] if isinstance(question, str) else prompts,
            qformer_text=questions[0] if isinstance(question, str) else questions,
            generate_kwargs=generate_kwargs,
            return_full_text=False,
            **kwargs,
        )
        if not isinstance(images, (list, tuple)):
            return [{"answer": output["generated_text"].strip()} for output in outputs]
        return [[{"answer": output["generated_text"].strip()} for output in per_image] for per_image in outputs]
