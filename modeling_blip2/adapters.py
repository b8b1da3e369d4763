"""LoRA adapters (PEFT) and 8-bit / 4-bit LLM loading (bitsandbytes) for BLIP-2.

LoRA
    `add_lora(model, part=...)` wraps a BLIP-2 model in a `peft.PeftModel` with LoRA on the attention query / value
    projections of the LLM (`part="language_model"`), of the Q-Former (`"qformer"`) or of both (`"both"`).
    `lora_target_modules` resolves those projections to full module paths, so nothing outside the requested part is
    touched: the LLM families name them differently (OPT / Llama / Mistral / Qwen2 / Gemma `q_proj`, `v_proj`; T5 `q`,
    `v`; Phi-3 one fused `qkv_proj`, which is then the target; GPT-NeoX `query_key_value` ...), the Q-Former calls
    them `query`, `value`, and the vision encoder's fused `qkv` is never matched.

    The returned `PeftModel` is used like the BLIP-2 model: `peft_model(pixel_values=..., input_ids=..., labels=...)`,
    `peft_model.generate(pixel_values, input_ids, ...)`, `Trainer(model=peft_model, ...)` / `Blip2Trainer`.
    PEFT's own API saves, loads and merges it: `peft_model.save_pretrained(folder)` (adapter weights only),
    `PeftModel.from_pretrained(base_model, folder)`, `peft_model.merge_and_unload()`. Parts trained in full beside
    the adapters (`train_parts`, e.g. the Q-Former in a stage-2-style run) are PEFT `modules_to_save` and travel
    with the adapter too; a bare parameter among them (`query_tokens`) cannot be a PEFT module, so `save_adapter` /
    `load_adapter` write and read it in a side file next to the adapter.

Quantization
    `Blip2ForConditionalGeneration.from_pretrained(folder, quantization_config=quantization_config_for_llm(8))`
    (or `load_language_model_quantized(folder, bits=4)`) quantizes the LLM only. A bare `BitsAndBytesConfig` would
    also quantize the vision encoder and the Q-Former: transformers' bitsandbytes quantizers skip only the output
    embeddings, the last module and `_keep_in_fp32_modules` (not `_keep_in_fp32_modules_strict`, where BLIP-2 lists
    its fp32 parts). `quantization_config_for_llm` therefore lists the vision encoder, query tokens, Q-Former,
    projection and the LLM head in `llm_int8_skip_modules`; the LLM's own `_keep_in_fp32_modules` (T5: `wo`) stay
    unquantized as transformers decides. 4-bit layers need widths the bitsandbytes kernels can pack; loading checks
    them first (`check_4bit_widths`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .modeling import check_4bit_layer_widths, linear_layers_to_quantize

PARTS = ("language_model", "qformer", "both")
# Leaf names of the attention query / value projections, tried in this order when the LLM's model type is not in
# PEFT's table (or its names are not in the model). One-element entries are fused query-key-value projections.
ATTENTION_PROJECTION_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # OPT, Llama, Mistral, Qwen2, Gemma, Phi, ...
    ("q", "v"),  # T5, mT5, UMT5
    ("query", "value"),  # BERT-like
    ("query_key_value",),  # GPT-NeoX, Bloom, Falcon
    ("qkv_proj",),  # Phi-3
    ("Wqkv",),  # MPT
    ("W_pack",),  # Baichuan
    ("c_attn",),  # GPT-2 (Conv1D)
)
QFORMER_ATTENTION_PROJECTIONS = ("query", "value")
# The parts of a BLIP-2 model that must not be quantized when the LLM is (plus the LLM's output head).
QUANTIZATION_SKIP_MODULES = ("vision_model", "query_tokens", "qformer", "language_projection", "lm_head")
# The parts trained in stage 2 (the LLM and the vision encoder but its post-LayerNorm are frozen).
STAGE2_TRAINABLE_PARTS = ("query_tokens", "qformer", "language_projection", "vision_model.post_layernorm")
EXTRA_PARAMETERS_FILE = "blip2_trained_parameters.safetensors"


# -- LoRA targets -----------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The BLIP-2 model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_linear(module: nn.Module) -> bool:
    # nn.Linear covers bitsandbytes' Linear8bitLt / Linear4bit; Conv1D is GPT-2's linear layer.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _linear_names(model: nn.Module, prefix: str) -> list[str]:
    return [name for name, module in model.named_modules() if name.startswith(prefix) and _is_linear(module)]


def _language_model_projection_names(model: nn.Module) -> tuple[str, ...]:
    """Leaf names of the LLM's attention query / value projections (from its model type, else its module names)."""
    leaves = {name.rsplit(".", 1)[-1] for name in _linear_names(model, "language_model.")}
    candidates: list[tuple[str, ...]] = []
    model_type = getattr(getattr(model.config, "text_config", None), "model_type", None)
    from peft.utils import constants as peft_constants

    peft_targets = getattr(peft_constants, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", {})
    entry = peft_targets.get(model_type)
    # Most entries are leaf names; a few are a regex over that model's own paths (gemma4), which says nothing about
    # our layout and whose tuple() would be its characters (a stray "q", "k", "v" match T5 leaves): skip those.
    if isinstance(entry, (list, tuple, set, frozenset)):
        candidates.append(tuple(entry))
    candidates.extend(ATTENTION_PROJECTION_CANDIDATES)
    for names in candidates:
        if all(name in leaves for name in names):
            return names
    raise ValueError(
        f"cannot tell the attention projections of the LLM (model_type {model_type!r}); pass target_modules "
        f"explicitly. Linear layer names in the LLM: {sorted(leaves)}"
    )


def lora_target_modules(model: nn.Module, part: str = "language_model") -> list[str]:
    """Full module paths of the attention query / value projections of `part`, as PEFT `target_modules`.

    Args:
        model: A BLIP-2 model with a `language_model` and/or a `qformer` (or a PeftModel around one).
        part: `"language_model"` (the LLM's self-attention, and the cross-attention of encoder-decoder LLMs),
            `"qformer"` (self- and cross-attention `query` / `value` of every Q-Former layer) or `"both"`.

    Returns:
        Sorted full paths such as `language_model.model.decoder.layers.0.self_attn.q_proj` or
        `qformer.encoder.layer.0.crossattention.attention.value`. PEFT matches list entries by exact name (or dotted
        suffix), so a full path matches only that module: never the vision encoder (`qkv`), never the other part.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    model = _unwrap(model)
    targets: list[str] = []
    if part in ("language_model", "both"):
        if not isinstance(getattr(model, "language_model", None), nn.Module):
            raise ValueError(f"{type(model).__name__} has no language_model to put LoRA on")
        leaves = _language_model_projection_names(model)
        targets += [name for name in _linear_names(model, "language_model.") if name.rsplit(".", 1)[-1] in leaves]
    if part in ("qformer", "both"):
        if not isinstance(getattr(model, "qformer", None), nn.Module):
            raise ValueError(f"{type(model).__name__} has no qformer to put LoRA on")
        pattern = re.compile(r"qformer\.encoder\.layer\.\d+\.(?:attention|crossattention)\.attention\.(?:query|value)")
        targets += [name for name in _linear_names(model, "qformer.") if pattern.fullmatch(name)]
    return sorted(targets)


def _part_prefixes(part: str) -> tuple[str, ...]:
    return {"language_model": ("language_model.",), "qformer": ("qformer.",), "both": ("language_model.", "qformer.")}[
        part
    ]


def _resolve_targets(model: nn.Module, part: str, target_modules: str | Sequence[str]) -> str | list[str]:
    """Explicit targets -> what PEFT gets; raises when a pattern matches no module.

    A string is a PEFT regex (full match over module paths, anywhere in the model). A list holds leaf names or
    dotted suffixes (`"q_proj"`, `"self_attn.v_proj"`) or full paths: each is resolved to the full paths of the
    matching linear layers *within `part`*, so `["q_proj", "v_proj"]` never reaches a vision encoder that uses the
    same names.
    """
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        matched = [name for name, _ in model.named_modules() if name and pattern.fullmatch(name)]
        if not matched:
            raise ValueError(
                f"target_modules regex {target_modules!r} matches no module of {type(model).__name__}; "
                f"the linear layers of part {part!r} have {_examples(model, part)}"
            )
        return target_modules
    if not target_modules:
        raise ValueError("target_modules is empty")
    candidates = [name for name in _linear_names(model, "") if name.startswith(_part_prefixes(part))]
    resolved: list[str] = []
    unmatched: list[str] = []
    for target in target_modules:
        hits = [name for name in candidates if name == target or name.endswith("." + target)]
        if hits:
            resolved += hits
        else:
            unmatched.append(target)
    if unmatched:
        raise ValueError(
            f"target_modules {unmatched} match no linear layer in part {part!r} of {type(model).__name__}; "
            f"its linear layers have {_examples(model, part)}"
        )
    return sorted(set(resolved))


def _examples(model: nn.Module, part: str, count: int = 4) -> str:
    names = [name for name in _linear_names(model, "") if name.startswith(_part_prefixes(part))]
    leaves = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
    return f"leaf names {leaves}, e.g. {names[:count]}"


# -- LoRA -------------------------------------------------------------------------------------------------------------
def add_lora(
    model: nn.Module,
    part: str = "language_model",
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] | None = None,
    train_parts: Iterable[str] = (),
    **lora_kwargs: Any,
) -> Any:
    """Wraps `model` in a `peft.PeftModel` with LoRA adapters; only the adapters (and `train_parts`) train.

    Args:
        model: A BLIP-2 model (`Blip2ForConditionalGeneration`, `Blip2Model`; for `part="qformer"` also the
            stage-1 models). It is modified in place (PEFT injects the LoRA layers into it).
        part: Where the default targets are: `"language_model"`, `"qformer"` or `"both"` (see
            `lora_target_modules`).
        r, alpha, dropout: LoRA rank, `lora_alpha` and `lora_dropout`.
        target_modules: Instead of the default query / value projections: leaf names or suffixes resolved within
            `part` (e.g. `["q_proj", "k_proj", "v_proj", "out_proj"]`), or a PEFT regex string. A pattern that
            matches nothing raises a `ValueError` naming it and listing layer names that exist.
        train_parts: BLIP-2 parts trained in full beside the adapters, e.g. `STAGE2_TRAINABLE_PARTS` (query tokens,
            Q-Former, projection, post-LayerNorm). Modules become PEFT `modules_to_save` (saved in the adapter
            folder by `save_pretrained`); bare parameters (`query_tokens`) are trained in place and need
            `save_adapter` / `load_adapter` to travel with the adapter.
        lora_kwargs: Any other `peft.LoraConfig` argument (`bias`, `use_rslora`, `init_lora_weights`, ...).

    Returns:
        The `PeftModel`. Call it with keyword arguments (`pixel_values=`, `input_ids=`, `labels=` ...);
        `generate` takes the BLIP-2 arguments. Parts frozen with `freeze_modules` keep `requires_grad=False`, but
        the LoRA'd part is released from the eval-mode lock so that `lora_dropout` acts under `train()`.
    """
    from peft import LoraConfig, get_peft_model

    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if hasattr(model, "peft_config"):
        raise ValueError("model already carries PEFT adapters; add more with peft_model.add_adapter(name, config)")
    targets = (
        lora_target_modules(model, part) if target_modules is None else _resolve_targets(model, part, target_modules)
    )
    if not targets:
        raise ValueError(f"no attention projections found in part {part!r} of {type(model).__name__}")

    train_parts = list(dict.fromkeys(train_parts))
    own_parameters = dict(model.named_parameters())
    modules_to_save, parameters_to_train = [], []
    for name in train_parts:
        if name in own_parameters:
            parameters_to_train.append(name)
            continue
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"train_parts entry {name!r} is neither a submodule nor a parameter of the model"
            ) from None
        lora_roots = [prefix.rstrip(".") for prefix in _part_prefixes(part)]
        if any(name == root or name.startswith(root + ".") or root.startswith(name + ".") for root in lora_roots):
            raise ValueError(f"train_parts entry {name!r} also receives LoRA (part={part!r}): train it one way")
        modules_to_save.append(name)
    if lora_kwargs.get("modules_to_save"):
        modules_to_save += list(lora_kwargs.pop("modules_to_save"))

    # Frozen parts stay in eval mode under train(); LoRA layers injected into them need train() for their dropout.
    # (get_peft_model then sets requires_grad=False on every base weight again.)
    lora_roots = {prefix.rstrip(".") for prefix in _part_prefixes(part)}
    locked = [name for name in getattr(model, "frozen_module_names", ()) if name in lora_roots]
    if locked:
        model.unfreeze_modules(*locked)

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    for name in parameters_to_train:
        peft_model.get_base_model().get_parameter(name).requires_grad_(True)
    peft_model.blip2_trained_parameters = tuple(parameters_to_train)
    return peft_model


def lora_module_names(model: nn.Module) -> list[str]:
    """Paths (in the BLIP-2 model) of the modules that carry LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, module in _unwrap(model).named_modules() if isinstance(module, LoraLayer))


def save_adapter(peft_model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """`peft_model.save_pretrained(save_directory)` plus the bare parameters trained beside the adapters.

    Those (`train_parts` entries that are not modules, e.g. `query_tokens`) go to
    `blip2_trained_parameters.safetensors`.
    """
    from safetensors.torch import save_file

    peft_model.save_pretrained(save_directory, **kwargs)
    names = getattr(peft_model, "blip2_trained_parameters", ())
    if names:
        base = peft_model.get_base_model()
        tensors = {name: base.get_parameter(name).detach().cpu().contiguous() for name in names}
        save_file(tensors, os.path.join(save_directory, EXTRA_PARAMETERS_FILE), metadata={"format": "pt"})


def load_adapter(
    base_model: nn.Module, adapter_directory: str | os.PathLike, is_trainable: bool = False, **kwargs: Any
):
    """Loads what `save_adapter` (or `PeftModel.save_pretrained`) wrote onto a fresh base model: a `PeftModel`."""
    from peft import PeftModel
    from safetensors.torch import load_file

    extra_path = os.path.join(adapter_directory, EXTRA_PARAMETERS_FILE)
    names: tuple[str, ...] = ()
    if os.path.isfile(extra_path):
        tensors = load_file(extra_path)
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameter = base_model.get_parameter(name)
                if parameter.shape != tensor.shape:
                    raise ValueError(
                        f"{name} has shape {tuple(tensor.shape)} in the adapter, {tuple(parameter.shape)} in the model"
                    )
                parameter.copy_(tensor.to(parameter.dtype))
        names = tuple(tensors)
    peft_model = PeftModel.from_pretrained(base_model, adapter_directory, is_trainable=is_trainable, **kwargs)
    for name in names:
        peft_model.get_base_model().get_parameter(name).requires_grad_(is_trainable)
    peft_model.blip2_trained_parameters = names
    return peft_model


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Folds the adapters into the base weights (`merge_and_unload`) and returns the plain BLIP-2 model."""
    return peft_model.merge_and_unload()


# -- quantization -----------------------------------------------------------------------------------------------------
def quantization_config_for_llm(bits: int = 8, **kwargs: Any):
    """A `BitsAndBytesConfig` that quantizes the LLM only (vision encoder, query tokens, Q-Former, projection and the
    LLM head stay in their floating-point dtype; the Q-Former in fp32).

    Args:
        bits: 8 (LLM.int8) or 4 (NF4 unless `bnb_4bit_quant_type` says otherwise).
        kwargs: More `BitsAndBytesConfig` arguments (`bnb_4bit_compute_dtype`, `bnb_4bit_use_double_quant`, ...).
            `llm_int8_skip_modules` entries are added to the BLIP-2 ones.
    """
    from transformers import BitsAndBytesConfig

    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    skip = list(QUANTIZATION_SKIP_MODULES) + [m for m in kwargs.pop("llm_int8_skip_modules", None) or [] if m]
    kwargs.pop("load_in_8bit", None)
    kwargs.pop("load_in_4bit", None)
    if bits == 4:
        kwargs.setdefault("bnb_4bit_quant_type", "nf4")
        kwargs.setdefault("bnb_4bit_compute_dtype", torch.float32)
    return BitsAndBytesConfig(
        load_in_8bit=bits == 8,
        load_in_4bit=bits == 4,
        llm_int8_skip_modules=list(dict.fromkeys(skip)),
        **kwargs,
    )


def _skeleton(config: Any, model_class: type | None = None) -> nn.Module:
    """The model built on the meta device (no memory, no weights) to read its layer names and widths."""
    from accelerate import init_empty_weights

    if model_class is None:
        from .modeling import Blip2ForConditionalGeneration

        model_class = Blip2ForConditionalGeneration
    with init_empty_weights():
        return model_class(config)


modules_to_quantize = linear_layers_to_quantize


def check_4bit_widths(model_or_config: Any, quantization_config: Any = None, model_class: type | None = None) -> None:
    """Raises a `ValueError` if a layer that 4-bit loading would quantize has a width bitsandbytes cannot pack
    (`modeling.check_4bit_layer_widths`, on a model or on the meta-device model of a config)."""
    if quantization_config is None:
        quantization_config = quantization_config_for_llm(4)
    model = model_or_config if isinstance(model_or_config, nn.Module) else _skeleton(model_or_config, model_class)
    check_4bit_layer_widths(_unwrap(model), quantization_config)


def load_language_model_quantized(
    pretrained_model_name_or_path: str | os.PathLike,
    bits: int = 8,
    model_class: type | None = None,
    quantization_kwargs: dict[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """`model_class.from_pretrained` with the LLM in 8-bit or 4-bit and everything else unquantized.

    Args:
        pretrained_model_name_or_path: A saved BLIP-2 checkpoint.
        bits: 8 or 4. For 4 bits the layer widths are checked before anything is loaded (`check_4bit_widths`).
        model_class: Default `Blip2ForConditionalGeneration`.
        quantization_kwargs: More `BitsAndBytesConfig` arguments (see `quantization_config_for_llm`).
        from_pretrained_kwargs: `dtype`, `device_map`, ... (the Q-Former, query tokens, projection and
            post-LayerNorm stay fp32 whatever `dtype` says).
    """
    from .configuration import Blip2Config

    if model_class is None:
        from .modeling import Blip2ForConditionalGeneration

        model_class = Blip2ForConditionalGeneration
    if "quantization_config" in from_pretrained_kwargs:
        raise ValueError("pass quantization_kwargs, not quantization_config: this function builds the config")
    quantization_config = quantization_config_for_llm(bits, **dict(quantization_kwargs or {}))
    config = Blip2Config.from_pretrained(pretrained_model_name_or_path)
    skeleton = _skeleton(config, model_class)
    output_embeddings = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    head = [
        name
        for name, module in skeleton.named_modules()
        if output_embeddings is not None and module is output_embeddings
    ]
    quantization_config.llm_int8_skip_modules = list(dict.fromkeys(quantization_config.llm_int8_skip_modules + head))
    if bits == 4:
        check_4bit_widths(skeleton, quantization_config)
    return model_class.from_pretrained(
        pretrained_model_name_or_path, quantization_config=quantization_config, **from_pretrained_kwargs
    )


def quantized_module_names(model: nn.Module) -> dict[str, str]:
    """`{module path: class name}` of the bitsandbytes layers in `model`."""
    return {
        name: type(module).__name__
        for name, module in _unwrap(model).named_modules()
        if type(module).__module__.startswith("bitsandbytes")
    }


__all__ = [
    "ATTENTION_PROJECTION_CANDIDATES",
    "QUANTIZATION_SKIP_MODULES",
    "STAGE2_TRAINABLE_PARTS",
    "add_lora",
    "check_4bit_widths",
    "load_adapter",
    "load_language_model_quantized",
    "lora_module_names",
    "lora_target_modules",
    "merge_lora",
    "modules_to_quantize",
    "quantization_config_for_llm",
    "quantized_module_names",
    "save_adapter",
]
