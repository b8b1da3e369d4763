"""Checkpoint conversion with strict key accounting.

- `convert_lavis_state_dict` / `convert_lavis_checkpoint`: Salesforce LAVIS `.pth` checkpoints (EVA ViT-g image
  encoder) -> this package's layout, which is the transformers layout of the official Hub checkpoints plus the two
  stage-1 parameters transformers drops (`temp` and the Q-Former LM head `qformer_lm_head.*`).
- `export_to_transformers`: a checkpoint folder of this package -> the stock transformers `blip-2` layout, so the
  built-in `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval` (and engines that read that layout) load it.

Every key is accounted for: a converted state dict holds exactly the keys of the target architecture with the
expected shapes, or the conversion raises naming what is missing, unexpected or mis-shaped. Keys left out on purpose
are returned as `dropped_keys`.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint_io import atomic_save, check_local_checkpoint
from .configuration import Blip2Config
from .modeling import Blip2ForConditionalGeneration, Blip2QFormerModel, Blip2VisionModel
from .qformer import Blip2TextEmbeddings

# Target layouts and the class whose `config.json` `architectures` entry names them.
ARCHITECTURES = {
    "conditional_generation": "Blip2ForConditionalGeneration",
    "pretraining": "Blip2ForPretraining",
    "image_text_retrieval": "Blip2ForImageTextRetrieval",
}
# Stage-1 parameters that stock transformers has no place for.
STAGE1_ONLY_PREFIXES = ("temp", "qformer_lm_head.")

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}

# Vision config fields of this package that the stock `Blip2VisionConfig` does not have.
OWN_VISION_FIELDS = ("post_layernorm_eps", "vision_architecture", "num_channels")
# Top-level config fields that only make sense with this package's remote code.
OWN_TOP_LEVEL_FIELDS = ("auto_map", "custom_pipelines", "vision_feature_layer", "vision_feature_select_strategy")
# Our architectures -> the stock class that holds the same weights (less the stage-1-only ones).
STOCK_ARCHITECTURES = {
    "Blip2ForConditionalGeneration": ("Blip2ForConditionalGeneration", "conditional_generation"),
    "Blip2Model": ("Blip2Model", "conditional_generation"),
    "Blip2ForImageTextRetrieval": ("Blip2ForImageTextRetrieval", "image_text_retrieval"),
    "Blip2ForPretraining": ("Blip2ForImageTextRetrieval", "image_text_retrieval"),
}
# Fields of our `processor_config.json` that the stock `Blip2Processor` does not have (it reads `<image>` from the
# tokenizer) or that only make sense with this package's remote code.
OWN_PROCESSOR_FIELDS = ("auto_map", "image_token", "processor_class")
STOCK_IMAGE_TOKEN = "<image>"
# Files of a checkpoint folder carried over by `export_to_transformers` (besides config and weights).
PROCESSOR_FILE_PATTERNS = (
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer*",
    "vocab*",
    "merges*",
    "added_tokens*",
    "special_tokens*",
    "spiece.model",
    "chat_template*",
)

# LAVIS prefixes that are renamed as a whole (checked in order, first match wins).
_LAVIS_PREFIX_RENAMES = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("ln_vision.", "vision_model.post_layernorm."),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("Qformer.bert.embeddings.word_embeddings.", "embeddings.word_embeddings."),
    ("Qformer.bert.embeddings.position_embeddings.", "embeddings.position_embeddings."),
    ("Qformer.cls.predictions.transform.", "qformer_lm_head.transform."),
    ("Qformer.cls.predictions.decoder.", "qformer_lm_head.decoder."),
    # BERT's prediction head keeps its bias as `predictions.bias` and aliases it as `decoder.bias`.
    ("Qformer.cls.predictions.bias", "qformer_lm_head.decoder.bias"),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
    ("opt_proj.", "language_projection."),
    ("t5_proj.", "language_projection."),
    ("opt_model.", "language_model."),
    ("t5_model.", "language_model."),
)
_LAVIS_VISION_BLOCK = re.compile(r"^visual_encoder\.blocks\.(\d+)\.(.+)$")
_LAVIS_QFORMER_LAYER = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$")
_LAVIS_BLOCK_RENAMES = (
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
# Parts of LAVIS's EVA ViT that BLIP-2 never runs (its features are taken before them).
_LAVIS_UNUSED_VISION_PREFIXES = ("visual_encoder.norm.", "visual_encoder.fc_norm.", "visual_encoder.head.")
_LAVIS_BUFFERS = ("Qformer.bert.embeddings.position_ids",)
_LAVIS_LLM_PREFIXES = ("opt_model.", "t5_model.", "opt_proj.", "t5_proj.")
# How many keys of each kind an error message lists before it summarises.
_MAX_LISTED = 25


@dataclass
class ConversionResult:
    """Outcome of a LAVIS conversion.

    Args:
        state_dict: The converted weights, keyed like this package's (and transformers') models, in the order of
            the target architecture's state dict.
        dropped_keys: LAVIS keys intentionally not carried over (the extra EVA block, unused EVA norms, buffers,
            aliases of kept tensors, stage-1 parameters when converting to the retrieval layout).
        architecture: The target layout (`"conditional_generation"`, `"pretraining"` or `"image_text_retrieval"`).
        filled_keys: Frozen-part keys (image encoder, LLM) the LAVIS dict lacked and `frozen_state_dict` supplied.
    """

    state_dict: dict[str, torch.Tensor]
    dropped_keys: list[str] = field(default_factory=list)
    architecture: str = "conditional_generation"
    filled_keys: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    """Outcome of `export_to_transformers`.

    Args:
        output_dir: The folder written.
        dropped_keys: Keys of the source checkpoint with no place in the stock architecture (`temp`,
            `qformer_lm_head.*`).
        architecture: The stock class named in the written `config.json`.
    """

    output_dir: Path
    dropped_keys: list[str] = field(default_factory=list)
    architecture: str = "Blip2ForConditionalGeneration"


# -- expected layouts -----------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    """What a target architecture holds: key shapes, groups of keys naming one tied tensor, LLM keys to ignore."""

    shapes: dict[str, tuple[int, ...]]
    tied_groups: list[list[str]]
    ignored_llm_patterns: list[str]


def expected_state_dict_shapes(config: Blip2Config, architecture: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the state dict of `architecture` built from `config` (computed on the meta device).

    `"conditional_generation"` is the state dict of `Blip2ForConditionalGeneration`. The stage-1 layouts are
    vision model, query tokens, Q-Former (with its text feed-forward), Q-Former text embeddings, the two contrastive
    projections and the ITM head; `"pretraining"` adds the temperature `temp` and the Q-Former LM head
    `qformer_lm_head.*` (the layout of `Blip2ForPretraining`), `"image_text_retrieval"` is the layout of transformers'
    `Blip2ForImageTextRetrieval`.
    """
    return _layout(config, architecture).shapes


def _layout(config: Blip2Config, architecture: str) -> _Layout:
    architecture = _check_architecture(architecture)
    if architecture == "conditional_generation":
        # Shapes only: on the meta device the model costs no memory and no initialisation time.
        with torch.device("meta"):
            model = Blip2ForConditionalGeneration(config)
        aliases: dict[int, list[str]] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(parameter), []).append(name)
        return _Layout(
            shapes={name: tuple(tensor.shape) for name, tensor in model.state_dict().items()},
            tied_groups=[names for names in aliases.values() if len(names) > 1],
            ignored_llm_patterns=list(model.language_model._keys_to_ignore_on_load_unexpected or []),
        )

    qformer_config = config.qformer_config
    if not qformer_config.use_qformer_text_input:
        raise ValueError(
            f"the {architecture!r} layout has the Q-Former text feed-forward, but "
            "config.qformer_config.use_qformer_text_input is False; set it to True"
        )
    with torch.device("meta"):
        parts = {
            "vision_model.": Blip2VisionModel(config.vision_config),
            "qformer.": Blip2QFormerModel(qformer_config),
            "embeddings.": Blip2TextEmbeddings(qformer_config),
        }
    hidden, embed = qformer_config.hidden_size, config.image_text_hidden_size
    shapes = {"query_tokens": (1, config.num_query_tokens, hidden)}
    for prefix, module in parts.items():
        shapes.update({prefix + name: tuple(tensor.shape) for name, tensor in module.state_dict().items()})
    for name, out_features in (("vision_projection", embed), ("text_projection", embed), ("itm_head", 2)):
        shapes[f"{name}.weight"] = (out_features, hidden)
        shapes[f"{name}.bias"] = (out_features,)
    if architecture == "image_text_retrieval":
        return _Layout(shapes=shapes, tied_groups=[], ignored_llm_patterns=[])
    vocab = qformer_config.vocab_size
    shapes["temp"] = ()
    for name, shape in (
        ("transform.dense.weight", (hidden, hidden)),
        ("transform.dense.bias", (hidden,)),
        ("transform.LayerNorm.weight", (hidden,)),
        ("transform.LayerNorm.bias", (hidden,)),
        ("decoder.weight", (vocab, hidden)),
        ("decoder.bias", (vocab,)),
    ):
        shapes[f"qformer_lm_head.{name}"] = shape
    # The ITG head decodes with the Q-Former word embeddings (BERT's tied LM head).
    tied = [["embeddings.word_embeddings.weight", "qformer_lm_head.decoder.weight"]]
    return _Layout(shapes=shapes, tied_groups=tied, ignored_llm_patterns=[])


def _check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {tuple(ARCHITECTURES)}, got {architecture!r}")
    return architecture


# -- LAVIS -> ours --------------------------------------------------------------------------------------------------
def infer_lavis_architecture(lavis_state_dict: Mapping[str, Any]) -> str:
    """The target layout a LAVIS state dict describes.

    An LLM (`opt_model.*` / `t5_model.*`) means `"conditional_generation"`; a Q-Former LM head (`Qformer.cls.*`) or
    a temperature `temp` means `"pretraining"` (stage 1); anything else `"image_text_retrieval"`.
    """
    keys = list(lavis_state_dict)
    if any(key.startswith(_LAVIS_LLM_PREFIXES) for key in keys):
        return "conditional_generation"
    if "temp" in lavis_state_dict or any(key.startswith("Qformer.cls.") for key in keys):
        return "pretraining"
    return "image_text_retrieval"


def convert_lavis_state_dict(
    lavis_state_dict: Mapping[str, torch.Tensor],
    config: Blip2Config,
    architecture: str | None = None,
    frozen_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> ConversionResult:
    """Converts a LAVIS BLIP-2 state dict (EVA ViT-g image encoder) to this package's layout.

    LAVIS's released checkpoints keep only the trained parameters (no frozen ViT or LLM): pass
    `frozen_state_dict` (our / transformers layout, e.g. the weights of the official Hugging Face checkpoint) to
    take the missing `vision_model.*` (except the trained post-LayerNorm) and `language_model.*` tensors from it;
    they are listed in `filled_keys`. Everything else must come from the LAVIS dict. Tensors
    keep their dtype. The fused qkv bias of each vision block is built as `cat(q_bias, zeros, v_bias)` (EVA has no
    key bias). Dropped on purpose (returned in `dropped_keys`): an extra last EVA block when the state dict holds
    exactly one block more than `config.vision_config.num_hidden_layers` (BLIP-2 uses the penultimate layer),
    the EVA norms BLIP-2 never runs, the Q-Former `position_ids` buffer, LLM keys the LLM class itself ignores on
    load, aliases of kept tensors and, for `"image_text_retrieval"`, the stage-1-only `temp` and `Qformer.cls.*`.
    Tied weights missing from the LAVIS dict (e.g. an LM head tied to the input embeddings) are filled in from the
    tensor they are tied to.

    The config is the caller's: for an OPT checkpoint converted from LAVIS, set `text_config.eos_token_id` to the
    id of "\\n" (50118), which LAVIS trains as end of caption; for Flan-T5, `dense_act_fn="gelu"` and
    `bos_token_id=1` (see the hub_configs folders).

    Args:
        lavis_state_dict: The LAVIS `model` state dict.
        config: Config of the converted model.
        architecture: `"conditional_generation"`, `"pretraining"` or `"image_text_retrieval"`; inferred from the
            keys when `None` (see `infer_lavis_architecture`).
        frozen_state_dict: Where missing frozen-part tensors come from (see above).

    Raises:
        ValueError: if the state dict is empty or holds something other than tensors under string keys (naming
            them), if the converted keys are not exactly those of the target architecture (listing the missing
            and unexpected ones) or shapes differ (listing them).
    """
    _check_lavis_state_dict(lavis_state_dict, "lavis_state_dict")
    architecture = _check_architecture(architecture or infer_lavis_architecture(lavis_state_dict))
    _check_lavis_config(lavis_state_dict, config, architecture)
    layout = _layout(config, architecture)
    expected = layout.shapes
    num_layers = config.vision_config.num_hidden_layers

    dropped: list[str] = []
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}  # our key -> the LAVIS key it came from
    query_value_biases: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    extra_block = _extra_vision_block(lavis_state_dict, num_layers)

    for key, tensor in lavis_state_dict.items():
        if _is_dropped_lavis_key(key, architecture, extra_block):
            dropped.append(key)
            continue
        block = _LAVIS_VISION_BLOCK.match(key)
        if block and block.group(2) in ("attn.q_bias", "attn.v_bias"):
            target = f"vision_model.encoder.layers.{block.group(1)}.self_attn.qkv.bias"
            kind = "q" if block.group(2) == "attn.q_bias" else "v"
            query_value_biases.setdefault(target, {})[kind] = (key, tensor)
            continue
        _add_converted(converted, sources, dropped, _rename_lavis_key(key), key, tensor)

    missing_notes = []
    for target, biases in query_value_biases.items():
        if set(biases) != {"q", "v"}:
            present = next(iter(biases.values()))[0]
            absent = present[: -len("q_bias")] + ("v_bias" if "q" in biases else "q_bias")
            missing_notes.append(f"{absent} (LAVIS; {present} is there, {target} needs both)")
            continue
        (q_key, q_bias), (v_key, v_bias) = biases["q"], biases["v"]
        fused = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        _add_converted(converted, sources, dropped, target, f"{q_key} + {v_key}", fused)

    _ignore_llm_keys(converted, sources, dropped, layout)
    filled = _fill_frozen(converted, sources, expected, frozen_state_dict or {})
    _fill_tied(converted, sources, layout.tied_groups)
    _check_against(converted, expected, sources, "LAVIS checkpoint", architecture, missing_notes)
    ordered = {name: converted[name] for name in expected}
    return ConversionResult(state_dict=ordered, dropped_keys=dropped, architecture=architecture, filled_keys=filled)


def _check_lavis_state_dict(state_dict: Any, what: str) -> None:
    """Raises a `ValueError` unless `state_dict` is a non-empty mapping of string keys to tensors, naming the rest."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{what} must be a state dict (a mapping of names to tensors), got {type(state_dict).__name__}"
        )
    if not state_dict:
        raise ValueError(f"{what} is an empty state dict: expected the tensors of a LAVIS BLIP-2 model")
    wrong = [
        f"{key!r}: {type(value).__name__}"
        for key, value in state_dict.items()
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if wrong:
        listed = "\n  ".join(wrong[:_MAX_LISTED])
        more = f"\n  ... and {len(wrong) - _MAX_LISTED} more" if len(wrong) > _MAX_LISTED else ""
        raise ValueError(
            f"{what} must map string names to torch.Tensors; {len(wrong)} entries do not:\n  {listed}{more}"
        )


def _fill_frozen(
    converted: dict[str, torch.Tensor],
    sources: dict[str, str],
    expected: Mapping[str, tuple[int, ...]],
    frozen_state_dict: Mapping[str, torch.Tensor],
) -> list[str]:
    """Takes the frozen image encoder / LLM tensors the LAVIS dict lacks from `frozen_state_dict`."""
    filled = []
    for key in expected:
        frozen_part = key.startswith("language_model.") or (
            key.startswith("vision_model.") and not key.startswith("vision_model.post_layernorm.")
        )
        if key not in converted and frozen_part and key in frozen_state_dict:
            converted[key] = frozen_state_dict[key]
            sources[key] = "frozen weights"
            filled.append(key)
    return filled


def _check_lavis_config(lavis_state_dict: Mapping[str, Any], config: Blip2Config, architecture: str) -> None:
    if not isinstance(config, Blip2Config):
        raise TypeError(f"config must be a modeling_blip2 Blip2Config, got {type(config).__name__}")
    if config.vision_config.vision_architecture != "eva":
        raise ValueError(
            "only LAVIS checkpoints with the EVA ViT-g image encoder are supported; config.vision_config."
            f"vision_architecture is {config.vision_config.vision_architecture!r}"
        )
    if architecture != "conditional_generation":
        return
    keys = list(lavis_state_dict)
    decoder_only = config.use_decoder_only_language_model
    if any(key.startswith("opt_model.") for key in keys) and not decoder_only:
        raise ValueError(
            f"the LAVIS checkpoint holds a decoder-only OPT LLM (opt_model.*) but config.text_config is "
            f"{config.text_config.model_type!r} (encoder-decoder)"
        )
    if any(key.startswith("t5_model.") for key in keys) and decoder_only:
        raise ValueError(
            f"the LAVIS checkpoint holds an encoder-decoder T5 LLM (t5_model.*) but config.text_config is "
            f"{config.text_config.model_type!r} (decoder-only)"
        )


def _extra_vision_block(lavis_state_dict: Mapping[str, Any], num_layers: int) -> int | None:
    """Index of the one EVA block beyond the configured depth, if the dict holds exactly one more."""
    indices = {int(match.group(1)) for key in lavis_state_dict if (match := _LAVIS_VISION_BLOCK.match(key))}
    return num_layers if indices and max(indices) == num_layers else None


def _is_dropped_lavis_key(key: str, architecture: str, extra_block: int | None) -> bool:
    if key in _LAVIS_BUFFERS or key.startswith(_LAVIS_UNUSED_VISION_PREFIXES):
        return True
    if extra_block is not None and key.startswith(f"visual_encoder.blocks.{extra_block}."):
        return True
    return architecture == "image_text_retrieval" and (key == "temp" or key.startswith("Qformer.cls."))


def _rename_lavis_key(key: str) -> str:
    """Our name of a LAVIS key; keys with no rule keep their name (and then show up as unexpected)."""
    block = _LAVIS_VISION_BLOCK.match(key)
    if block:
        index, rest = block.groups()
        for old, new in _LAVIS_BLOCK_RENAMES:
            if rest.startswith(old):
                return f"vision_model.encoder.layers.{index}.{new}{rest[len(old) :]}"
        return key
    layer = _LAVIS_QFORMER_LAYER.match(key)
    if layer:
        index, rest = layer.groups()
        # BERT's `(cross)attention.self.*` is our `(cross)attention.attention.*`.
        rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", rest)
        return f"qformer.encoder.layer.{index}.{rest}"
    for old, new in _LAVIS_PREFIX_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _add_converted(
    converted: dict[str, torch.Tensor],
    sources: dict[str, str],
    dropped: list[str],
    target: str,
    source: str,
    tensor: torch.Tensor,
) -> None:
    """Adds one renamed tensor; a second source for the same key must be an alias with equal values."""
    if target not in converted:
        converted[target] = tensor
        sources[target] = source
        return
    if converted[target].shape != tensor.shape or not torch.equal(converted[target], tensor):
        raise ValueError(f"{sources[target]} and {source} both map to {target} but hold different values")
    dropped.append(source)


def _ignore_llm_keys(
    converted: dict[str, torch.Tensor], sources: dict[str, str], dropped: list[str], layout: _Layout
) -> None:
    """Drops unexpected LLM keys that the LLM class itself ignores on load (e.g. a stale T5 cross-attention bias)."""
    prefix = "language_model."
    for name in [name for name in converted if name not in layout.shapes and name.startswith(prefix)]:
        if any(re.search(pattern, name[len(prefix) :]) for pattern in layout.ignored_llm_patterns):
            dropped.append(sources.pop(name))
            del converted[name]


def _fill_tied(converted: dict[str, torch.Tensor], sources: dict[str, str], groups: Iterable[list[str]]) -> None:
    """Fills tied keys absent from the checkpoint with the tensor they are tied to."""
    for group in groups:
        present = [name for name in group if name in converted]
        if not present:
            continue
        for name in group:
            if name not in converted:
                converted[name] = converted[present[0]]
                sources[name] = f"{sources[present[0]]} (tied)"


def _check_against(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    sources: Mapping[str, str],
    what: str,
    architecture: str,
    missing_notes: Iterable[str] = (),
) -> None:
    """Raises unless `state_dict` has exactly the `expected` keys with the expected shapes."""
    missing = [name for name in expected if name not in state_dict] + list(missing_notes)
    unexpected = [
        name if sources.get(name, name) == name else f"{name} (from {sources[name]})"
        for name in state_dict
        if name not in expected
    ]
    mismatched = [
        f"{name}: {tuple(state_dict[name].shape)} in the {what}, {tuple(expected[name])} expected"
        + ("" if sources.get(name, name) == name else f" (from {sources[name]})")
        for name in expected
        if name in state_dict and tuple(state_dict[name].shape) != tuple(expected[name])
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for title, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if names:
            listed = "\n  ".join(names[:_MAX_LISTED])
            more = f"\n  ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
            problems.append(f"{len(names)} {title}:\n  {listed}{more}")
    raise ValueError(f"the {what} does not match the {architecture!r} layout of the config:\n" + "\n".join(problems))


def load_lavis_state_dict(checkpoint_path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Reads the model state dict of a LAVIS `.pth` file (`{"model": state_dict, ...}` or a bare state dict).

    `.pth` files are pickles, so nothing is read unless `allow_pickle=True`; even then only tensors and plain
    containers are unpickled (`torch.load(..., weights_only=True)`).
    """
    if not allow_pickle:
        raise ValueError(
            f"{checkpoint_path} is a pickle (.pth) file, which can run code when loaded. Pass allow_pickle=True "
            "(--allow_pickle on the command line) to read it, only for a file from a source you trust; it is then "
            "loaded with torch.load(weights_only=True), which unpickles tensors and plain containers only"
        )
    try:
        loaded = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{checkpoint_path} holds objects other than tensors and plain containers, which weights_only loading "
            f"refuses: {error}. Extract its state dict with trusted code and save that (torch.save(state_dict))"
        ) from error
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{checkpoint_path} holds a {type(loaded).__name__}; expected a state dict, or a dict with one under "
            "'model'"
        )
    has_model = isinstance(loaded.get("model"), dict)
    state_dict = loaded["model"] if has_model else loaded
    _check_lavis_state_dict(
        state_dict, f"the state dict in {checkpoint_path}" + (" (under 'model')" if has_model else "")
    )
    return state_dict


def convert_lavis_checkpoint(
    checkpoint_path: str | os.PathLike,
    config: Blip2Config | str | os.PathLike,
    output_dir: str | os.PathLike,
    architecture: str | None = None,
    allow_pickle: bool = False,
    max_shard_size: int | str = "5GB",
    frozen_weights_from: str | os.PathLike | None = None,
) -> ConversionResult:
    """Converts a LAVIS `.pth` checkpoint into a checkpoint folder of this package.

    Writes `config.json` (the given config with `architectures` naming the target class) and `model.safetensors`
    (sharded with an index above `max_shard_size`) into `output_dir`, atomically (`checkpoint_io.atomic_save`: an
    earlier conversion there survives any failure); see `convert_lavis_state_dict` for the conversion itself and
    `load_lavis_state_dict` for why `allow_pickle=True` must be passed.

    Args:
        checkpoint_path: The LAVIS `.pth` file.
        config: A `Blip2Config`, or a folder with its `config.json` (e.g. one of `hub_configs/`).
        output_dir: Folder to write; created if needed.
        architecture: Target layout, inferred from the checkpoint when `None`.
        allow_pickle: Must be True to read the pickle file at all.
        max_shard_size: Largest weight file before the weights are sharded.
        frozen_weights_from: A checkpoint folder (ours or the official transformers layout, safetensors) that
            supplies the frozen image encoder and LLM tensors a LAVIS training checkpoint does not hold.
    """
    state_dict = load_lavis_state_dict(checkpoint_path, allow_pickle=allow_pickle)
    config = copy.deepcopy(config) if isinstance(config, Blip2Config) else Blip2Config.from_pretrained(config)
    frozen = load_safetensors(frozen_weights_from) if frozen_weights_from is not None else None
    result = convert_lavis_state_dict(state_dict, config, architecture, frozen_state_dict=frozen)
    config.architectures = [ARCHITECTURES[result.architecture]]
    with atomic_save(output_dir) as staging:
        config.save_pretrained(staging)
        save_safetensors(result.state_dict, staging, max_shard_size=max_shard_size)
    return result


# -- ours -> stock transformers -------------------------------------------------------------------------------------
def export_to_transformers(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    allow_post_layernorm_eps_change: bool = False,
    max_shard_size: int | str = "5GB",
) -> ExportResult:
    """Rewrites a checkpoint folder of this package in the stock transformers `blip-2` layout.

    The written folder loads with transformers' built-in classes (`Blip2ForConditionalGeneration`, or
    `Blip2ForImageTextRetrieval` for stage-1 and retrieval checkpoints) and with engines that read that layout.
    `config.json` gets the stock model types (`blip-2`, `blip_2_vision_model`, `blip_2_qformer`) and loses the
    fields the stock config does not have (and `auto_map` / `custom_pipelines`); the weights are copied (the
    stage-1-only `temp` and `qformer_lm_head.*` are dropped and reported); generation, preprocessor and tokenizer
    files are copied. `processor_config.json` is the source's (its image processor settings) rewritten for the
    stock `Blip2Processor` (or just its name and `num_query_tokens` when the source has none), so
    `transformers.Blip2Processor.from_pretrained(output_dir)` loads it. Python files and the Q-Former tokenizer
    are not copied.

    The output is written atomically (`checkpoint_io.atomic_save`): a failure leaves an earlier export in
    `output_dir` as it was, and files there that the export does not write are kept (stale weight files removed).

    Args:
        source_dir: Checkpoint folder written by this package (`config.json` with model_type `modeling_blip2`,
            `model.safetensors` or sharded `model-*.safetensors` with `model.safetensors.index.json`).
        output_dir: Folder to write (must differ from `source_dir`).
        allow_post_layernorm_eps_change: The stock vision model uses `layer_norm_eps` in its post-encoder
            LayerNorm. When `post_layernorm_eps` differs (LAVIS: 1e-5 vs 1e-6), exporting changes outputs slightly;
            it is refused unless this is True (then a warning is issued).
        max_shard_size: Largest weight file before the weights are sharded.

    Raises:
        ValueError: for what the stock layout cannot represent (a CLIP-style image encoder, images with other
            than 3 channels, a generation model whose Q-Former reads the question, a post-LayerNorm epsilon of its
            own unless allowed, an image token other than `<image>`), for weights that do not match the config
            exactly, and for unreadable (truncated, corrupt) config, index or weight files, naming the file.
        FileNotFoundError / NotADirectoryError: when `source_dir` is not a checkpoint folder.
    """
    source_dir, output_dir = Path(source_dir), Path(output_dir)
    if not source_dir.exists():
        raise FileNotFoundError(f"export_to_transformers: source_dir {source_dir} does not exist")
    check_local_checkpoint(source_dir, "export_to_transformers (source_dir)")
    if source_dir.resolve() == output_dir.resolve():
        raise ValueError("output_dir must differ from source_dir")
    raw_config = _read_json(source_dir / "config.json")
    model_type = raw_config.get("model_type") if isinstance(raw_config, dict) else None
    if model_type != Blip2Config.model_type:
        raise ValueError(
            f"{source_dir / 'config.json'} has model_type {model_type!r}; expected a checkpoint "
            f"of this package ({Blip2Config.model_type!r})"
        )
    config = Blip2Config.from_pretrained(source_dir)
    source_architecture = (config.architectures or ["Blip2ForConditionalGeneration"])[0]
    if source_architecture not in STOCK_ARCHITECTURES:
        raise ValueError(
            f"cannot export a {source_architecture}: supported architectures are {tuple(STOCK_ARCHITECTURES)}"
        )
    stock_architecture, layout = STOCK_ARCHITECTURES[source_architecture]
    if layout == "conditional_generation" and config.qformer_config.use_qformer_text_input:
        raise ValueError(
            f"{source_dir} holds a {source_architecture} whose Q-Former reads the question "
            "(qformer_config.use_qformer_text_input=True, weights embeddings.*): the stock "
            f"{stock_architecture} has no Q-Former text input, so the export would drop that conditioning. Export "
            "a model without it, or keep this checkpoint in this package's layout (remote code)"
        )
    stock_config = stock_config_dict(config, allow_post_layernorm_eps_change=allow_post_layernorm_eps_change)
    stock_config["architectures"] = [stock_architecture]

    state_dict = load_safetensors(source_dir)
    dropped = [name for name in state_dict if name.startswith(STAGE1_ONLY_PREFIXES)]
    weights = {name: tensor for name, tensor in state_dict.items() if name not in dropped}
    target = _layout(config, layout)
    expected = target.shapes
    # save_pretrained leaves out tied copies (e.g. OPT's lm_head); the stock class ties them again on load.
    tied_copies = {
        name
        for group in target.tied_groups
        if any(member in weights for member in group)
        for name in group
        if name not in weights
    }
    _check_against(
        weights,
        {name: shape for name, shape in expected.items() if name not in tied_copies},
        {},
        f"checkpoint in {source_dir}",
        layout,
    )

    processor_config = stock_processor_config(source_dir, config.num_query_tokens)

    with atomic_save(output_dir) as staging:
        (staging / "config.json").write_text(json.dumps(stock_config, indent=2, sort_keys=True) + "\n")
        save_safetensors({name: weights[name] for name in expected if name in weights}, staging, max_shard_size)
        for path in sorted(source_dir.iterdir()):
            if (
                path.is_file()
                and path.suffix != ".py"
                and any(path.match(pattern) for pattern in PROCESSOR_FILE_PATTERNS)
            ):
                shutil.copyfile(path, staging / path.name)
        _name_stock_processor(staging / "tokenizer_config.json")
        (staging / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    return ExportResult(output_dir=output_dir, dropped_keys=dropped, architecture=stock_architecture)


def stock_processor_config(source_dir: str | os.PathLike, num_query_tokens: int) -> dict[str, Any]:
    """The `processor_config.json` of the stock `Blip2Processor` for a checkpoint folder of this package.

    Our processor config holds the image processor settings under `image_processor` (transformers 5's layout), so it
    is kept, less the fields the stock class does not know, with `processor_class: "Blip2Processor"`. Without one,
    the stock processor reads `preprocessor_config.json`, and the config only names the class and the query count.
    """
    path = Path(source_dir) / "processor_config.json"
    ours = _read_json(path) if path.is_file() else {}
    image_token = ours.get("image_token", STOCK_IMAGE_TOKEN)
    if image_token != STOCK_IMAGE_TOKEN:
        raise ValueError(
            f"{path} uses the image token {image_token!r}; the stock Blip2Processor inserts {STOCK_IMAGE_TOKEN!r}, "
            "so the exported prompts would not hold the model's image token"
        )
    given = ours.get("num_query_tokens", num_query_tokens)
    if given != num_query_tokens:
        raise ValueError(
            f"{path} has num_query_tokens={given} but the model's config.json num_query_tokens={num_query_tokens}: "
            "the processor would insert the wrong number of image tokens; save the matching processor first"
        )
    stock = {key: value for key, value in ours.items() if key not in OWN_PROCESSOR_FIELDS}
    return {**stock, "processor_class": "Blip2Processor", "num_query_tokens": num_query_tokens}


def _name_stock_processor(tokenizer_config: Path) -> None:
    """Points a copied `tokenizer_config.json`'s `processor_class` (AutoProcessor's fallback) at the stock class."""
    if tokenizer_config.is_file():
        content = _read_json(tokenizer_config)
        if "processor_class" in content:
            content["processor_class"] = "Blip2Processor"
            tokenizer_config.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a valid JSON file (truncated or corrupt?): {error}") from error


def stock_config_dict(config: Blip2Config, allow_post_layernorm_eps_change: bool = False) -> dict[str, Any]:
    """`config` as a stock transformers `blip-2` config dict; refuses what the stock classes cannot represent."""
    if not config.has_own_vision_encoder:
        raise ValueError(
            f"the stock transformers BLIP-2 has only its EVA ViT as image encoder; this checkpoint's is a "
            f"{type(config.vision_config).__name__} (model_type {config.vision_config.model_type!r}), which it "
            "cannot represent: keep it in this package's layout (remote code)"
        )
    if (config.vision_feature_layer, config.vision_feature_select_strategy) != (-1, "full"):
        raise ValueError(
            "the stock transformers BLIP-2 reads every token of the image encoder's last layer; this checkpoint "
            f"reads vision_feature_layer={config.vision_feature_layer} with "
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}, which it cannot represent"
        )
    vision = config.vision_config
    if vision.vision_architecture != "eva":
        raise ValueError(
            f"the stock transformers BLIP-2 vision model is EVA-style only; this checkpoint's image encoder is "
            f"vision_architecture={vision.vision_architecture!r} (a LayerNorm before the blocks, a patch embedding "
            "without bias), which it cannot represent"
        )
    if vision.num_channels != 3:
        raise ValueError(
            f"the stock transformers BLIP-2 vision model takes 3 channels, this one {vision.num_channels}"
        )
    if vision.resolved_post_layernorm_eps != vision.layer_norm_eps:
        message = (
            f"the stock transformers BLIP-2 vision model uses layer_norm_eps ({vision.layer_norm_eps}) in its "
            f"post-encoder LayerNorm, this checkpoint post_layernorm_eps ({vision.post_layernorm_eps}); the exported "
            "model's outputs differ slightly"
        )
        if not allow_post_layernorm_eps_change:
            raise ValueError(f"{message}. Pass allow_post_layernorm_eps_change=True to export anyway")
        warnings.warn(message, UserWarning, stacklevel=3)

    stock = config.to_dict()
    for name in OWN_TOP_LEVEL_FIELDS:
        stock.pop(name, None)
    stock["model_type"] = "blip-2"
    stock["use_decoder_only_language_model"] = config.use_decoder_only_language_model
    stock["vision_config"] = {
        **{key: value for key, value in stock["vision_config"].items() if key not in OWN_VISION_FIELDS},
        "model_type": "blip_2_vision_model",
    }
    stock["qformer_config"] = {**stock["qformer_config"], "model_type": "blip_2_qformer"}
    return stock


# -- safetensors files ----------------------------------------------------------------------------------------------
def load_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder's `model.safetensors`, or of the shards its `model.safetensors.index.json` lists."""
    folder = Path(folder)
    check_local_checkpoint(folder, "load_safetensors", ())
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map (name -> shard file): the index is corrupt")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {', '.join(missing)}")
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{folder} holds neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")
    state_dict = {}
    for name in files:
        try:
            with safe_open(folder / name, framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    state_dict[key] = weights.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(
                f"{folder / name} is not a readable safetensors file (truncated or corrupt?): {error}; "
                "save or download it again"
            ) from error
    return state_dict


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], folder: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> list[str]:
    """Writes `state_dict` as `model.safetensors`, or as shards plus `model.safetensors.index.json` when large.

    Tensors sharing storage (tied weights) are written as separate copies. Returns the names of the files written.
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if storage is not None and storage in seen_storages:
            tensor = tensor.clone()
        elif storage is not None:
            seen_storages.add(storage)
        tensors[name] = tensor.contiguous()
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    # Weights of an earlier run in the folder would mix with these on load.
    for stale in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, *(path.name for path in folder.glob("model-*-of-*.safetensors"))):
        (folder / stale).unlink(missing_ok=True)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, folder / filename, metadata=SAFETENSORS_METADATA)
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)
