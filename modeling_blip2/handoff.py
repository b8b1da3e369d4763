"""Stage 1 -> stage 2: carry the trained Q-Former, queries and image encoder into a model with an LLM.

Stage 2 keeps what stage 1 trained for the queries: `query_tokens`, the Q-Former (less its text feed-forward when the
stage-2 Q-Former reads no text), and the vision model, whose post-encoder LayerNorm was trained in stage 1. A stage-2
Q-Former that reads text (question-conditioned queries) also keeps the Q-Former text embeddings (`embeddings.*`). The
other stage-1 parts (projections, ITM head, temperature, Q-Former LM head, and `embeddings` when stage 2 reads no
text) are dropped; the language projection and the LLM are stage 2's own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from .composition import build_around_language_model
from .configuration import Blip2Config, Blip2VisionConfig
from .conversion import expected_state_dict_shapes, load_safetensors
from .modeling import Blip2ForConditionalGeneration

# Stage-2 keys that stage 1 supplies, and those that stay stage 2's own.
_CARRIED = re.compile(r"query_tokens|qformer\..+|vision_model\..+")
_CARRIED_WITH_TEXT = re.compile(r"query_tokens|qformer\..+|vision_model\..+|embeddings\..+")
_STAGE2_OWN = re.compile(r"(language_projection|language_model)\..+")
# Stage-1 tensors stage 2 has no place for.
_STAGE1_ONLY = re.compile(r"embeddings\..+|(vision_projection|text_projection|itm_head|qformer_lm_head)\..+|temp")
_TEXT_FEED_FORWARD = re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..+")
_QFORMER_LAYER = re.compile(r"qformer\.encoder\.layer\.(\d+)\.")
# Config fields that shape what the carried weights compute without showing in their shapes.
_QFORMER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "cross_attention_frequency",
    "encoder_hidden_size",
)
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "resolved_post_layernorm_eps",
    "qkv_bias",
    "vision_architecture",
)

# Config entries that describe how a config was saved, not the architecture.
_BOOKKEEPING = (
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "architectures",
    "_attn_implementation",
)

Stage1Source = PreTrainedModel | str | os.PathLike | Mapping[str, torch.Tensor]


@dataclass
class HandoffReport:
    """What stage 2 takes from a stage-1 checkpoint.

    Args:
        state_dict: The carried tensors, keyed as in `Blip2ForConditionalGeneration`.
        carried_keys: Their keys: `query_tokens`, `qformer.*`, `vision_model.*` (and `embeddings.*` when the stage-2
            Q-Former reads text).
        dropped_keys: Stage-1 keys stage 2 has no place for: `vision_projection.*`, `text_projection.*`,
            `itm_head.*`, `temp`, `qformer_lm_head.*`, and, when the stage-2 Q-Former reads no text, `embeddings.*`
            and the Q-Former text feed-forward (`qformer.encoder.layer.{i}.intermediate.*` / `.output.*`).
        left_keys: Stage-2 keys stage 1 does not supply, left as they are: `language_projection.*`,
            `language_model.*`.
    """

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    carried_keys: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)
    left_keys: list[str] = field(default_factory=list)


def stage2_state_dict_from_stage1(stage1_state_dict: Mapping[str, torch.Tensor], config: Blip2Config) -> HandoffReport:
    """Selects the stage-2 part of a stage-1 state dict and accounts for every key on both sides.

    Args:
        stage1_state_dict: State dict of a `Blip2ForPretraining` or `Blip2ForImageTextRetrieval` (a model's, or read
            from its safetensors files).
        config: The stage-2 config.

    Raises:
        ValueError: The Q-Former width, its number of layers or the number of queries disagree with `config` (both
            numbers are named), a carried tensor has another shape, a stage-2 tensor is missing from stage 1, or the
            state dict holds keys that belong to neither stage.
    """
    if "query_tokens" not in stage1_state_dict:
        raise ValueError("not a stage-1 state dict: it has no query_tokens")
    qformer_config = config.qformer_config
    carried = _CARRIED_WITH_TEXT if qformer_config.use_qformer_text_input else _CARRIED
    _, num_queries, width = stage1_state_dict["query_tokens"].shape
    layers = {int(match.group(1)) for key in stage1_state_dict if (match := _QFORMER_LAYER.match(key))}
    for description, stage1_value, stage2_value in (
        ("Q-Former width (hidden_size)", width, qformer_config.hidden_size),
        ("number of Q-Former layers", len(layers), qformer_config.num_hidden_layers),
        ("number of query tokens", num_queries, config.num_query_tokens),
    ):
        if stage1_value != stage2_value:
            raise ValueError(
                f"the stage-1 checkpoint's {description} is {stage1_value}, the stage-2 config's is {stage2_value}; "
                "build the stage-2 config from the stage-1 one (build_stage2_from_stage1)"
            )

    expected = expected_state_dict_shapes(config, "conditional_generation")
    report = HandoffReport()
    unexpected, mismatched = [], []
    for key, tensor in stage1_state_dict.items():
        if key in expected and carried.fullmatch(key):
            if tuple(tensor.shape) != expected[key]:
                mismatched.append(f"{key}: stage 1 {tuple(tensor.shape)}, stage 2 {expected[key]}")
            report.state_dict[key] = tensor
            report.carried_keys.append(key)
        elif _STAGE1_ONLY.fullmatch(key) or (
            _TEXT_FEED_FORWARD.fullmatch(key) and not qformer_config.use_qformer_text_input
        ):
            report.dropped_keys.append(key)
        else:
            unexpected.append(key)
    missing = [key for key in expected if carried.fullmatch(key) and key not in stage1_state_dict]
    problems = [
        f"{what}: {_listed(keys)}"
        for what, keys in (
            ("shapes disagree", mismatched),
            ("stage-2 tensors missing from the stage-1 checkpoint", missing),
            ("keys of neither stage in the stage-1 checkpoint", unexpected),
        )
        if keys
    ]
    if problems:
        raise ValueError("cannot hand the stage-1 checkpoint to stage 2; " + "; ".join(problems))
    report.left_keys = [key for key in expected if not carried.fullmatch(key)]
    foreign = [key for key in report.left_keys if not _STAGE2_OWN.fullmatch(key)]
    if foreign:
        raise ValueError(f"stage-2 tensors neither carried from stage 1 nor stage 2's own: {_listed(foreign)}")
    return report


def load_stage1_into(model: Blip2ForConditionalGeneration, stage1_model_or_folder: Stage1Source) -> HandoffReport:
    """Loads the stage-1 queries, Q-Former and vision model into a stage-2 model, in place.

    Args:
        model: The stage-2 model; its `language_projection` and `language_model` are left as they are.
        stage1_model_or_folder: A stage-1 model, a folder it was saved to (safetensors), or its state dict. With a
            model or folder, the two configs are also compared field by field (activation, epsilons, attention
            heads, cross-attention frequency, vision geometry), which the tensor shapes alone do not reveal.

    Returns:
        The `HandoffReport` of what was loaded, dropped and left.
    """
    state_dict, stage1_config = _stage1_parts(stage1_model_or_folder)
    return _load(model, state_dict, stage1_config)


def build_stage2_from_stage1(
    stage1_folder_or_model: PreTrainedModel | str | os.PathLike,
    text_config: PreTrainedConfig | dict[str, Any] | None = None,
    image_token_index: int | None = None,
    *,
    language_model: PreTrainedModel | None = None,
    use_qformer_text_input: bool = False,
    **config_overrides: Any,
) -> Blip2ForConditionalGeneration:
    """A stage-2 `Blip2ForConditionalGeneration` carrying a stage-1 model's queries, Q-Former and vision model.

    The stage-2 config takes the vision and Q-Former configs, `num_query_tokens`, `image_text_hidden_size` and the
    initialiser settings from stage 1, and the LLM from `text_config`. Without `language_model` the LLM weights are
    random (load an LLM afterwards, e.g. `model.language_model.load_state_dict(...)`, or pass one in); the language
    projection is always freshly initialised.

    Args:
        stage1_folder_or_model: A stage-1 model (`Blip2ForPretraining`, `Blip2ForImageTextRetrieval`) or a folder it
            was saved to.
        text_config: The LLM config (or its dict with a `model_type`); not needed with `language_model`.
        image_token_index: Id of `<image>` in the LLM tokenizer (None: the queries are prepended to the prompt).
        language_model: A loaded LLM to plug in as is (not copied); its config becomes `text_config`. The other new
            parts go on the device of its input embeddings.
        use_qformer_text_input: Keep the Q-Former text feed-forward (for question-conditioned queries); by default it
            is dropped, as in the paper's stage 2 and the official OPT / Flan-T5 checkpoints.
        config_overrides: Further `Blip2Config` arguments.
    """
    state_dict, stage1_config = _stage1_parts(stage1_folder_or_model)
    if stage1_config is None:
        raise ValueError("build_stage2_from_stage1 needs the stage-1 config: pass a stage-1 model or its folder")
    if language_model is not None:
        if text_config is not None:
            raise ValueError("pass either text_config or language_model (whose config is used), not both")
        text_config = language_model.config
    if text_config is None:
        raise ValueError("the stage-2 model needs an LLM: pass text_config or language_model")
    qformer_config = {**stage1_config.qformer_config.to_dict(), "use_qformer_text_input": use_qformer_text_input}
    arguments = {
        "vision_config": stage1_config.vision_config.to_dict(),
        "qformer_config": qformer_config,
        "text_config": text_config,
        "num_query_tokens": stage1_config.num_query_tokens,
        "image_text_hidden_size": stage1_config.image_text_hidden_size,
        "image_token_index": image_token_index,
        "initializer_factor": stage1_config.initializer_factor,
        "initializer_range": stage1_config.initializer_range,
        "vision_feature_layer": stage1_config.vision_feature_layer,
        "vision_feature_select_strategy": stage1_config.vision_feature_select_strategy,
    }
    config = Blip2Config(**{**arguments, **config_overrides})
    if language_model is None:
        model = Blip2ForConditionalGeneration(config)
    else:
        model = build_around_language_model(Blip2ForConditionalGeneration, config, language_model)
    _load(model, state_dict, stage1_config)
    return model


# -- helpers --------------------------------------------------------------------------------------------------------
def _stage1_parts(source: Stage1Source) -> tuple[Mapping[str, torch.Tensor], Blip2Config | None]:
    if isinstance(source, PreTrainedModel):
        return source.state_dict(), source.config
    if isinstance(source, (str, os.PathLike)):
        return load_safetensors(source), Blip2Config.from_pretrained(source)
    if isinstance(source, Mapping):
        return source, None
    raise ValueError(f"expected a stage-1 model, folder or state dict, got {type(source).__name__}")


def _load(
    model: Blip2ForConditionalGeneration, state_dict: Mapping[str, torch.Tensor], stage1_config: Blip2Config | None
) -> HandoffReport:
    if stage1_config is not None:
        _check_configs_agree(stage1_config, model.config)
    report = stage2_state_dict_from_stage1(state_dict, model.config)
    missing, unexpected = model.load_state_dict(report.state_dict, strict=False)
    if unexpected or set(missing) != set(report.left_keys):
        raise RuntimeError(
            f"{type(model).__name__} does not have the layout of its config: unexpected {unexpected}, missing "
            f"{sorted(set(missing) - set(report.left_keys))}"
        )
    return report


def _check_configs_agree(stage1: Blip2Config, stage2: Blip2Config) -> None:
    """Names every architecture field of the carried parts on which the two configs disagree."""
    top_level = ("num_query_tokens", "vision_feature_layer", "vision_feature_select_strategy")
    disagreements = [
        f"{prefix}.{name}: stage 1 {getattr(one, name)!r}, stage 2 {getattr(two, name)!r}"
        for prefix, one, two, names in (
            ("qformer_config", stage1.qformer_config, stage2.qformer_config, _QFORMER_FIELDS),
            ("config", stage1, stage2, top_level),
        )
        for name in names
        if getattr(one, name) != getattr(two, name)
    ]
    disagreements += _vision_disagreements(stage1.vision_config, stage2.vision_config)
    if disagreements:
        raise ValueError(
            "the stage-1 checkpoint does not fit the stage-2 config (" + "; ".join(disagreements) + "); build the "
            "stage-2 config from the stage-1 one (build_stage2_from_stage1)"
        )


def _vision_disagreements(one: PreTrainedConfig, two: PreTrainedConfig) -> list[str]:
    """Architecture fields of two image-encoder configs that differ (ours: `_VISION_FIELDS`; another transformers
    vision model: every serialised field but bookkeeping)."""
    if type(one) is not type(two):
        return [f"vision_config: stage 1 {type(one).__name__}, stage 2 {type(two).__name__}"]
    if isinstance(one, Blip2VisionConfig):
        first, second = ({name: getattr(config, name) for name in _VISION_FIELDS} for config in (one, two))
    else:
        first, second = ({k: v for k, v in c.to_dict().items() if k not in _BOOKKEEPING} for c in (one, two))
    return [
        f"vision_config.{name}: stage 1 {first.get(name)!r}, stage 2 {second.get(name)!r}"
        for name in sorted(set(first) | set(second))
        if first.get(name) != second.get(name)
    ]


def _listed(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} ... ({len(keys)} in all)"
