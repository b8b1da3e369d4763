"""Model cards for checkpoints of this package: Hub metadata plus a usage snippet that runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, get_token

from .configuration import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

DEFAULT_LICENSE = "mit"  # the license of the official Salesforce BLIP-2 checkpoints
PACKAGE_TAGS = ["blip-2", "modeling-blip2", "vision-language", "image-captioning", "visual-question-answering"]

_PIPELINE_TAGS = {
    "Blip2ForConditionalGeneration": "image-to-text",
    "Blip2Model": "image-to-text",
    "Blip2ForImageTextRetrieval": "zero-shot-image-classification",
    "Blip2ForPretraining": "zero-shot-image-classification",
    "Blip2VisionModel": "image-feature-extraction",
    "Blip2QFormerModel": "feature-extraction",
}


def require_hub_token(token: str | None) -> str:
    """The token to push with: the one given, else the stored / `HF_TOKEN` one; a clear error when there is none."""
    token = token or get_token()
    if not token:
        raise ValueError(
            "pushing to the Hub needs a token: pass token=..., set the HF_TOKEN environment variable or run "
            "`hf auth login`"
        )
    return token


def build_model_card(
    config: Blip2Config | Blip2VisionConfig | Blip2QFormerConfig,
    architecture: str,
    repo_id: str,
    *,
    license: str | None = DEFAULT_LICENSE,
    base_model: str | Sequence[str] | None = None,
    datasets: str | Sequence[str] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    training_hyperparameters: Mapping[str, Any] | None = None,
    tags: Sequence[str] | None = None,
    description: str | None = None,
) -> ModelCard:
    """A model card (README.md) for a checkpoint of this package.

    Args:
        config: The model's config.
        architecture: Class name of the model (sets the `pipeline_tag` and the usage snippet).
        repo_id: Where the card will live; the usage snippet loads from there.
        license: Hub license id.
        base_model: Hub ids of the frozen parts (image encoder, LLM); defaults to the LLM config's `_name_or_path`
            when it looks like a Hub id.
        datasets: Hub ids of the training data, when known.
        eval_results: `huggingface_hub.EvalResult`s, when known (written to the `model-index`).
        training_hyperparameters: Name -> value, when known.
        tags: Extra tags.
        description: A paragraph about the model; a factual summary of the architecture is always added.
    """
    base_models = _as_list(base_model) or _guess_base_models(config)
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag=_PIPELINE_TAGS.get(architecture),
        tags=[*PACKAGE_TAGS, *(tags or ())],
        base_model=base_models or None,
        datasets=_as_list(datasets) or None,
        eval_results=list(eval_results) if eval_results else None,
        model_name=repo_id.split("/")[-1],
    )
    sections = [
        f"# {repo_id.split('/')[-1]}",
        description or "",
        _architecture_summary(config, architecture),
        "## Usage\n\n" + usage_snippet(repo_id, config, architecture),
    ]
    if datasets:
        sections.append(
            "## Training data\n\n"
            + "\n".join(f"- [{name}](https://huggingface.co/datasets/{name})" for name in _as_list(datasets))
        )
    if eval_results:
        rows = "\n".join(
            f"| {result.dataset_name} | {result.metric_name or result.metric_type} | {result.metric_value} |"
            for result in eval_results
        )
        sections.append("## Evaluation results\n\n| dataset | metric | value |\n|---|---|---|\n" + rows)
    if training_hyperparameters:
        rows = "\n".join(f"| {name} | {value} |" for name, value in training_hyperparameters.items())
        sections.append("## Training hyper-parameters\n\n| name | value |\n|---|---|\n" + rows)
    body = "\n\n".join(section for section in sections if section) + "\n"
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def usage_snippet(repo_id: str, config: Any, architecture: str) -> str:
    """A Python snippet (in a fenced block) that loads the checkpoint from `repo_id` and runs it."""
    if architecture not in ("Blip2ForConditionalGeneration", "Blip2Model"):
        return (
            "```python\n"
            "import modeling_blip2  # registers the BLIP-2 classes with the transformers Auto classes\n"
            f"model = modeling_blip2.{architecture}.from_pretrained({json.dumps(repo_id)})\n"
            "```"
        )
    image_size = getattr(config.vision_config, "image_size", None) or 224  # any size: the processor resizes
    return (
        "```python\n"
        "import modeling_blip2  # registers the BLIP-2 classes with the transformers Auto classes\n"
        "from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        f"processor = AutoProcessor.from_pretrained({json.dumps(repo_id)})\n"
        f"model = AutoModelForImageTextToText.from_pretrained({json.dumps(repo_id)})\n"
        f'image = Image.new("RGB", ({image_size}, {image_size}), "white")  # or Image.open("photo.jpg")\n'
        'inputs = processor(images=image, text="a photo of", return_tensors="pt")\n'
        "generated = model.generate(**inputs, max_new_tokens=20)\n"
        "print(processor.decode_generated(generated)[0])\n"
        "```\n\n"
        "Or as a pipeline (its code ships with the checkpoint):\n\n"
        "```python\n"
        "from transformers import pipeline\n\n"
        f'captioner = pipeline("image-to-text", model={json.dumps(repo_id)}, trust_remote_code=True)\n'
        "```"
    )


def _architecture_summary(config: Any, architecture: str) -> str:
    lines = [
        f"## Model\n\n`{architecture}` from [modeling-blip2](https://pypi.org/project/modeling-blip2/), "
        "a BLIP-2 implementation (Li et al., 2023: frozen image encoder + Q-Former + frozen LLM)."
    ]
    vision = getattr(config, "vision_config", config if isinstance(config, Blip2VisionConfig) else None)
    qformer = getattr(config, "qformer_config", config if isinstance(config, Blip2QFormerConfig) else None)
    if isinstance(vision, Blip2VisionConfig):
        kind = "EVA ViT" if vision.vision_architecture == "eva" else "CLIP ViT"
        lines.append(
            f"- Image encoder: {kind}, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
            f"{vision.image_size}x{vision.image_size} images, patch {vision.patch_size}."
        )
    elif vision is not None:  # another transformers vision model (issue 12)
        name = getattr(vision, "_name_or_path", "") or vision.model_type
        layer = getattr(config, "vision_feature_layer", -1)
        lines.append(f"- Image encoder: {name} (`{vision.model_type}`), frozen; features of hidden state {layer}.")
    if qformer is not None:
        queries = getattr(config, "num_query_tokens", None)
        lines.append(
            f"- Q-Former: {qformer.num_hidden_layers} layers, width {qformer.hidden_size}"
            + (f", {queries} learned queries." if queries else ".")
        )
    text = getattr(config, "text_config", None)
    if text is not None and architecture in ("Blip2ForConditionalGeneration", "Blip2Model"):
        kind = "encoder-decoder" if text.is_encoder_decoder else "decoder-only"
        lines.append(f"- LLM: {text.model_type} ({kind}), width {getattr(text, 'hidden_size', '?')}.")
    return "\n".join(lines)


def _guess_base_models(config: Any) -> list[str]:
    text = getattr(config, "text_config", None)
    name = getattr(text, "_name_or_path", "") if text is not None else ""
    return [name] if name and name.count("/") == 1 and not name.startswith((".", "/")) else []


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
