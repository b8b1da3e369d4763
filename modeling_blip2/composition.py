"""BLIP-2 composed from unimodal Hugging Face checkpoints: any vision model, any LLM, a BERT Q-Former.

The paper's thesis is that BLIP-2 harvests whatever frozen unimodal models are best. `compose_from_unimodal` builds
a model of this package from a vision checkpoint (a vision model, or a dual encoder such as `CLIPModel` /
`SiglipModel`, whose vision tower is taken), an LLM checkpoint (causal or encoder-decoder) and optionally a BERT
checkpoint for the Q-Former, the way `VisionEncoderDecoderModel.from_encoder_decoder_pretrained` does for its parts.
The model classes expose it as `from_unimodal_pretrained`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from .configuration import Blip2Config, Blip2QFormerConfig, resolve_vision_config, vision_feature_width
from .initialization import init_qformer_from_bert, qformer_config_from_bert
from .processing import IMAGE_TOKEN

# The Q-Former of the paper when no BERT is given: BERT-base dimensions, its vocabulary plus `[DEC]`.
DEFAULT_QFORMER_VOCAB_SIZE = 30523
DEFAULT_QFORMER_START_TOKEN_ID = 30522


def load_vision_tower(vision_model_name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """The vision model of a checkpoint, with its pretrained weights: a vision model as it is, a dual encoder's
    (`CLIPModel`, `SiglipModel` ...) vision tower as the matching stand-alone vision model (`CLIPVisionModel` ...)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    vision_config = resolve_vision_config(AutoConfig.from_pretrained(vision_model_name_or_path, **kwargs))
    model_class = MODEL_MAPPING[type(vision_config)]
    model, info = model_class.from_pretrained(
        vision_model_name_or_path, config=vision_config, output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        raise ValueError(
            f"{vision_model_name_or_path} does not hold the weights of a {model_class.__name__}: missing "
            f"{sorted(info['missing_keys'])[:6]}"
        )
    return model


def load_language_model(language_model_name_or_path: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, Any]:
    """The LLM (causal or encoder-decoder, with its LM head) and its tokenizer with `<image>` added; the LLM's
    embeddings grow when `<image>` falls outside them (never shrink: vocabularies are often padded)."""
    config = AutoConfig.from_pretrained(language_model_name_or_path, **kwargs)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = model_class.from_pretrained(language_model_name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(language_model_name_or_path)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(image_token_id + 1)
    return model, tokenizer


def compose_from_unimodal(
    model_class: type,
    vision_model_name_or_path: str | os.PathLike,
    language_model_name_or_path: str | os.PathLike | None = None,
    qformer_name_or_path: str | os.PathLike | None = None,
    num_query_tokens: int = 32,
    **config_overrides: Any,
) -> nn.Module:
    """Builds `model_class` (a BLIP-2 model of this package) from unimodal checkpoints.

    - Vision: `load_vision_tower`; its weights are copied exactly; frozen (eval mode, no gradients) but for the
      paper's post-encoder LayerNorm, which is new and trainable.
    - LLM (classes with one): `load_language_model`, copied exactly, frozen; `<image>` gets an id
      (`config.image_token_index`), the same that `Blip2ImageTextProcessor.from_unimodal_pretrained` gives it.
    - Q-Former: BERT's dimensions and weights (`init_qformer_from_bert`: self-attention and feed-forward, also into
      the query path; cross-attention random, as in the paper), or BERT-base dimensions at random without one. It
      reads text (`use_qformer_text_input`) in the stage-1 classes, and in the others only when
      `config_overrides["qformer_config"]` asks for it.

    `config_overrides` are `Blip2Config` fields (`vision_feature_layer=-2`, `vision_feature_select_strategy`, ...);
    a `qformer_config` dict there updates the Q-Former's fields.
    """
    has_language_model = hasattr(model_class, "freeze_language_model")
    if has_language_model and language_model_name_or_path is None:
        raise ValueError(f"{model_class.__name__} needs a language model: pass language_model_name_or_path")
    if not has_language_model and language_model_name_or_path is not None:
        raise ValueError(f"{model_class.__name__} has no language model: leave language_model_name_or_path None")
    vision_tower = load_vision_tower(vision_model_name_or_path)
    vision_config = vision_tower.config
    feature_layer = config_overrides.get("vision_feature_layer", Blip2Config.vision_feature_layer)
    width = vision_feature_width(vision_config, feature_layer)

    qformer_fields = dict(config_overrides.pop("qformer_config", None) or {})
    qformer_fields.setdefault("use_qformer_text_input", not has_language_model)
    if qformer_name_or_path is not None:
        qformer_config = qformer_config_from_bert(qformer_name_or_path, encoder_hidden_size=width, **qformer_fields)
    else:
        defaults = {"vocab_size": DEFAULT_QFORMER_VOCAB_SIZE, "bos_token_id": DEFAULT_QFORMER_START_TOKEN_ID}
        qformer_config = Blip2QFormerConfig(**{**defaults, "encoder_hidden_size": width, **qformer_fields})

    language_model = tokenizer = None
    fields: dict[str, Any] = {}
    if has_language_model:
        language_model, tokenizer = load_language_model(language_model_name_or_path)
        fields = {
            "text_config": language_model.config,
            "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        }
    config = Blip2Config(
        vision_config=vision_config,
        qformer_config=qformer_config,
        num_query_tokens=num_query_tokens,
        **{**fields, **config_overrides},
    )
    if language_model is None:
        model = model_class(config)
    else:  # the LLM goes in as loaded: never built at random first (for a 7B LLM, minutes and twice the memory)
        model = build_around_language_model(model_class, config, language_model, initialise=True)
        model.config.text_config = language_model.config
    _copy_weights(model.vision_model.backbone, vision_tower, "vision")
    if qformer_name_or_path is not None:
        init_qformer_from_bert(model, qformer_name_or_path)
    model.tie_weights()
    model.freeze_vision_encoder()
    if language_model is not None:
        model.freeze_language_model()
    return model


def build_around_language_model(
    model_class: type, config: Blip2Config, language_model: nn.Module, initialise: bool = False
) -> nn.Module:
    """`model_class(config)` around an already loaded LLM, without building (and discarding) a random one first.

    The model is built on the meta device, the LLM put in as is (not copied), and the other parts materialised on the
    device of its input embeddings: another family's vision tower is built for real (it may hold buffers that no
    checkpoint restores, e.g. SigLIP's position ids); the language projection starts as the model would start it.
    The queries, Q-Former (and our own vision encoder) are left for the caller to fill (stage-1 weights), or
    initialised as the model would initialise them with `initialise=True`.
    """
    from .modeling import build_vision_model

    with torch.device("meta"):
        model = model_class(config)
    model.language_model = language_model
    device = language_model.get_input_embeddings().weight.device
    parts = ["qformer", "language_projection"] + (["embeddings"] if model.has_qformer_text_input else [])
    if config.has_own_vision_encoder:
        parts.append("vision_model")
    else:
        model.vision_model = build_vision_model(config).to(device)
    for name in parts:
        model.get_submodule(name).to_empty(device=device)
    model.query_tokens = nn.Parameter(torch.empty_like(model.query_tokens, device=device))
    with torch.no_grad():
        nn.init.normal_(model.language_projection.weight, mean=0.0, std=config.initializer_range)
        nn.init.zeros_(model.language_projection.bias)
        if initialise:
            for name in parts:
                if name != "language_projection":
                    model.get_submodule(name).apply(model._init_weights)
            model._init_weights(model)  # the query tokens
    left_on_meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left_on_meta:
        raise RuntimeError(f"tensors left unmaterialised: {left_on_meta}")
    return model


def _copy_weights(target: nn.Module, source: nn.Module, what: str) -> None:
    result = target.load_state_dict(source.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the {what} checkpoint does not fit the model built from its config: missing {result.missing_keys[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}"
        )
