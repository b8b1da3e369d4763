"""Stage-1 initialisation of the Q-Former from a pretrained BERT, as in the paper.

BERT's embeddings and layers fill the Q-Former's text side, and each layer's feed-forward is copied into the
query feed-forward as well; cross-attention stays random and the query tokens are drawn from N(0, 0.02). The
Q-Former has no token-type embeddings, so BERT's `token_type_embeddings[0]` (the type of every single-segment
text) is folded into the position embeddings: the Q-Former's text pass then reproduces BERT's hidden states.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, BertForMaskedLM, BertForPreTraining, BertModel, PreTrainedConfig, PreTrainedModel

from .configuration import Blip2QFormerConfig
from .processing import QFORMER_START_TOKEN

# LAVIS draws the learned queries from N(0, 0.02).
QUERY_TOKEN_INIT_STD = 0.02
# BERT config fields the Q-Former config takes over unchanged.
_BERT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)
# (description, field) pairs that must agree for BERT's weights to compute the same function in the Q-Former.
_MUST_AGREE = (
    ("hidden size", "hidden_size"),
    ("number of layers", "num_hidden_layers"),
    ("number of attention heads", "num_attention_heads"),
    ("intermediate size", "intermediate_size"),
    ("activation", "hidden_act"),
    ("LayerNorm epsilon", "layer_norm_eps"),
)
# BERT checkpoints whose folder is loaded with its MLM head (the Q-Former LM head's transform comes from it).
_WITH_MLM_HEAD = {"BertForMaskedLM": BertForMaskedLM, "BertForPreTraining": BertForPreTraining}
_MLM_HEAD = "cls.predictions."
# Target keys no BERT weight maps to; anything else left unfilled means the model has a layout we do not know.
_NEVER_FROM_BERT = re.compile(
    r"query_tokens|temp|vision_model\..+|qformer\.encoder\.layer\.\d+\.crossattention\..+"
    r"|(vision_projection|text_projection|itm_head|language_projection|language_model)\..+"
)
_LM_HEAD = re.compile(r"qformer_lm_head\..+")
# Target tensors with one row per Q-Former token.
_VOCABULARY_KEYS = (
    "embeddings.word_embeddings.weight",
    "qformer_lm_head.decoder.weight",
    "qformer_lm_head.decoder.bias",
)


@dataclass
class InitReport:
    """What `init_qformer_from_bert` did, key by key.

    Args:
        copied: Target key -> the source keys its value came from (in the source model's own names, e.g.
            `bert.encoder.layer.0.intermediate.dense.weight` for a `BertForMaskedLM`). The position embeddings list
            `token_type_embeddings` too (row 0 folded in); the query feed-forward lists the text feed-forward it was
            copied from; the tied LM-head decoder lists the word embeddings.
        left_initialised: Target keys kept at their initialisation: cross-attention, the (re-drawn) query tokens,
            projections, ITM head, temperature, the vision model, and the Q-Former LM head when the source has no
            MLM head.
        unused_source_keys: Source keys that filled nothing (BERT's pooler, an NSP head, the MLM head when the target
            has no LM head). Tied aliases of used tensors count as used.
        new_rows: Target key -> number of trailing rows BERT has no counterpart for (`[DEC]` and any other token
            beyond BERT's vocabulary), set to the mean of BERT's rows.
        source: What was loaded (a folder or a model class).
    """

    copied: dict[str, tuple[str, ...]] = field(default_factory=dict)
    left_initialised: list[str] = field(default_factory=list)
    unused_source_keys: list[str] = field(default_factory=list)
    new_rows: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def summary(self) -> str:
        """One line per category, for logs."""
        return "\n".join(
            [
                f"Q-Former initialised from {self.source}",
                f"  copied: {len(self.copied)} tensors",
                f"  left at their initialisation: {len(self.left_initialised)} tensors",
                f"  unused source tensors: {', '.join(self.unused_source_keys) or 'none'}",
                f"  rows beyond BERT's vocabulary (mean-initialised): {self.new_rows or 'none'}",
            ]
        )


def qformer_config_from_bert(
    bert_config: PreTrainedConfig | str | os.PathLike,
    encoder_hidden_size: int,
    cross_attention_frequency: int = 2,
    vocab_size: int | None = None,
    **overrides: Any,
) -> Blip2QFormerConfig:
    """A stage-1 Q-Former config with the dimensions of a BERT, ready for `init_qformer_from_bert`.

    Args:
        bert_config: The BERT config (or a folder / Hub id holding one).
        encoder_hidden_size: Width of the image features the cross-attention reads (the vision width).
        cross_attention_frequency: Layers `i` with `i % cross_attention_frequency == 0` cross-attend to the image.
        vocab_size: Q-Former vocabulary; default BERT's plus one for `[DEC]`, whose id is then BERT's vocabulary size
            (what `load_qformer_tokenizer` gives it) and becomes `bos_token_id`.
        overrides: Any other `Blip2QFormerConfig` field (e.g. `max_position_embeddings=64`, `bos_token_id`).

    Returns:
        A `Blip2QFormerConfig` with `use_qformer_text_input=True`.
    """
    if not isinstance(bert_config, PreTrainedConfig):
        bert_config = AutoConfig.from_pretrained(bert_config)
    _check_is_bert(bert_config)
    known = set(Blip2QFormerConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown Blip2QFormerConfig fields {unknown}; known fields are {sorted(known)}")
    vocab_size = bert_config.vocab_size + 1 if vocab_size is None else vocab_size
    if vocab_size < bert_config.vocab_size:
        raise ValueError(
            f"vocab_size ({vocab_size}) is smaller than BERT's vocabulary ({bert_config.vocab_size}): BERT's word "
            "embeddings would not fit"
        )
    fields = {name: getattr(bert_config, name) for name in _BERT_FIELDS}
    fields.update(
        vocab_size=vocab_size,
        encoder_hidden_size=encoder_hidden_size,
        cross_attention_frequency=cross_attention_frequency,
        use_qformer_text_input=True,
        # [DEC] is the first token added after BERT's vocabulary.
        bos_token_id=bert_config.vocab_size if vocab_size > bert_config.vocab_size else None,
    )
    fields.update(overrides)
    return Blip2QFormerConfig(**fields)


def init_qformer_from_bert(
    model: nn.Module,
    bert_path_or_model: str | os.PathLike | PreTrainedModel,
    tokenizer: Any = None,
    allow_pickle: bool = False,
) -> InitReport:
    """Initialises a stage-1 model's Q-Former from a pretrained BERT, in place.

    Copies BERT's word embeddings (rows beyond BERT's vocabulary, i.e. `[DEC]`, get the mean of BERT's rows),
    position embeddings (first `max_position_embeddings` rows, plus `token_type_embeddings[0]`), embedding LayerNorm
    (-> `qformer.layernorm`), and per layer the self-attention and the feed-forward, the latter into both the text
    (`intermediate`/`output`) and the query (`intermediate_query`/`output_query`) paths. A source with an MLM head
    (`BertForMaskedLM`, `BertForPreTraining`) also fills the Q-Former LM head's transform and decoder bias; its decoder
    weight is the word embeddings, as in BERT. Cross-attention keeps its random initialisation and the query tokens
    are re-drawn from N(0, 0.02); the vision model, projections, ITM head and temperature are not touched.

    Args:
        model: `Blip2ForPretraining`, `Blip2ForImageTextRetrieval`, or any module with `.qformer` (with the text
            feed-forward) and `.embeddings` (Q-Former text embeddings), and optionally `.query_tokens` and
            `.qformer_lm_head`.
        bert_path_or_model: A BERT folder (a `BertModel` checkpoint, a sentence-transformers folder such as
            all-MiniLM-L6-v2, or a `BertForMaskedLM` / `BertForPreTraining` checkpoint) or a loaded model of those
            classes.
        tokenizer: Optional Q-Former tokenizer; it must hold `[DEC]` (with the config's `bos_token_id`, if set) and
            exactly `qformer_config.vocab_size` tokens.
        allow_pickle: Also read `pytorch_model.bin` weights from a folder (pickle can run code: trusted sources only).

    Returns:
        An `InitReport` accounting for every target and source tensor.

    Raises:
        ValueError: The model has no Q-Former text side, BERT's dimensions disagree with the Q-Former's, or the
            tokenizer does not fit the config.
    """
    qformer_config, text_side = _check_target(model)
    if tokenizer is not None:
        _check_tokenizer(tokenizer, qformer_config)
    bert, source = _load_bert(bert_path_or_model, allow_pickle)
    _check_dimensions(bert.config, qformer_config)
    prefix = "" if bert.base_model is bert else f"{bert.base_model_prefix}."
    source_state = bert.state_dict()
    target_state = model.state_dict()
    plan = _plan(source_state, target_state, prefix, qformer_config, text_side)

    # Every check before the first write: a refused model is left as it was.
    mismatched = [
        f"{key}: BERT gives {tuple(value.shape)} (from {', '.join(sources)}), the model has "
        f"{tuple(target_state[key].shape)}"
        for key, (sources, value) in plan.items()
        if tuple(value.shape) != tuple(target_state[key].shape)
    ]
    if mismatched:
        raise ValueError("shapes disagree: " + "; ".join(mismatched))
    has_mlm_head = f"{_MLM_HEAD}transform.dense.weight" in source_state
    left_initialised = [key for key in target_state if key not in plan]
    unknown = [
        key
        for key in left_initialised
        if not _NEVER_FROM_BERT.fullmatch(key) and not (not has_mlm_head and _LM_HEAD.fullmatch(key))
    ]
    if unknown:
        raise ValueError(f"no BERT weight maps to these tensors of {type(model).__name__}: {unknown}")

    with torch.no_grad():
        for key, (_, value) in plan.items():
            target_state[key].copy_(value)
        query_tokens = getattr(model, "query_tokens", None)
        if isinstance(query_tokens, nn.Parameter):
            nn.init.normal_(query_tokens, mean=0.0, std=QUERY_TOKEN_INIT_STD)

    used = {name for sources, _ in plan.values() for name in sources}
    extra_tokens = qformer_config.vocab_size - bert.config.vocab_size
    return InitReport(
        copied={key: sources for key, (sources, _) in plan.items()},
        left_initialised=left_initialised,
        unused_source_keys=[key for key in source_state if not _aliases(key, source_state) & used],
        new_rows={key: extra_tokens for key in _VOCABULARY_KEYS if key in plan} if extra_tokens else {},
        source=source,
    )


# -- checks ---------------------------------------------------------------------------------------------------------
def _check_target(model: nn.Module) -> tuple[Blip2QFormerConfig, bool]:
    """The model's Q-Former config, and whether it has a text side (text embeddings and text feed-forward)."""
    qformer = getattr(model, "qformer", None)
    if qformer is None:
        raise ValueError(f"{type(model).__name__} has no Q-Former (`.qformer`) to initialise from BERT")
    config = qformer.config
    text_feed_forward = config.use_qformer_text_input and all(
        layer.has_text_feed_forward for layer in qformer.encoder.layer
    )
    if hasattr(model, "embeddings") and not text_feed_forward:
        raise ValueError(
            f"the Q-Former of {type(model).__name__} has text embeddings but no text feed-forward "
            "(use_qformer_text_input=False), so BERT's feed-forward has nowhere to go: build it with "
            "qformer_config.use_qformer_text_input=True"
        )
    return config, text_feed_forward and hasattr(model, "embeddings")


def _check_is_bert(config: PreTrainedConfig) -> None:
    if config.model_type != "bert":
        raise ValueError(f"expected a BERT config (model_type 'bert'), got model_type {config.model_type!r}")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"the Q-Former has absolute position embeddings; this BERT uses position_embedding_type {position_type!r}"
        )


def _check_dimensions(bert_config: PreTrainedConfig, qformer_config: Blip2QFormerConfig) -> None:
    _check_is_bert(bert_config)
    disagreements = [
        f"{description}: BERT {getattr(bert_config, name)!r}, Q-Former {getattr(qformer_config, name)!r}"
        for description, name in _MUST_AGREE
        if getattr(bert_config, name) != getattr(qformer_config, name)
    ]
    if disagreements:
        raise ValueError(
            "BERT does not fit the Q-Former (" + "; ".join(disagreements) + "). Build the Q-Former config with "
            "qformer_config_from_bert(bert_config, ...)"
        )
    if qformer_config.vocab_size < bert_config.vocab_size:
        raise ValueError(
            f"the Q-Former vocabulary ({qformer_config.vocab_size}) is smaller than BERT's ({bert_config.vocab_size})"
        )
    if qformer_config.max_position_embeddings > bert_config.max_position_embeddings:
        raise ValueError(
            f"the Q-Former has {qformer_config.max_position_embeddings} positions, BERT only "
            f"{bert_config.max_position_embeddings}: the extra ones would be untrained"
        )


def _check_tokenizer(tokenizer: Any, qformer_config: Blip2QFormerConfig) -> None:
    vocab = tokenizer.get_vocab()
    if QFORMER_START_TOKEN not in vocab:
        raise ValueError(
            f"the Q-Former tokenizer has no {QFORMER_START_TOKEN} token (the start token of image-grounded "
            "generation): load it with load_qformer_tokenizer, or add it with with_qformer_start_token"
        )
    if len(tokenizer) != qformer_config.vocab_size:
        raise ValueError(
            f"the Q-Former tokenizer has {len(tokenizer)} tokens ({QFORMER_START_TOKEN} included) but "
            f"qformer_config.vocab_size is {qformer_config.vocab_size}; they must agree"
        )
    start = vocab[QFORMER_START_TOKEN]
    if qformer_config.bos_token_id is not None and qformer_config.bos_token_id != start:
        raise ValueError(
            f"the tokenizer's {QFORMER_START_TOKEN} has id {start} but qformer_config.bos_token_id is "
            f"{qformer_config.bos_token_id}"
        )


# -- source -------------------------------------------------------------------------------------------------------
def _load_bert(bert_path_or_model: str | os.PathLike | PreTrainedModel, allow_pickle: bool) -> tuple[Any, str]:
    if isinstance(bert_path_or_model, PreTrainedModel):
        bert, source = bert_path_or_model, type(bert_path_or_model).__name__
    elif isinstance(bert_path_or_model, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(bert_path_or_model)
        _check_is_bert(config)
        architectures = config.architectures or []
        model_class = next((_WITH_MLM_HEAD[name] for name in architectures if name in _WITH_MLM_HEAD), BertModel)
        kwargs = {} if allow_pickle else {"use_safetensors": True}
        try:
            bert, info = model_class.from_pretrained(bert_path_or_model, output_loading_info=True, **kwargs)
        except OSError as error:
            if allow_pickle or "safetensors" not in str(error):
                raise
            raise ValueError(
                f"{bert_path_or_model} has no safetensors weights; reading pickle weights (pytorch_model.bin) can run "
                "code, so pass allow_pickle=True only for a source you trust"
            ) from error
        # The pooler is never used; every other tensor must come from the checkpoint.
        missing = [key for key in info["missing_keys"] if ".pooler." not in f".{key}"]
        if missing:
            raise ValueError(f"the BERT checkpoint {bert_path_or_model} lacks {missing}")
        source = f"{Path(bert_path_or_model)} ({model_class.__name__})"
    else:
        raise ValueError(f"expected a BERT folder or model, got {type(bert_path_or_model).__name__}")
    if not isinstance(bert.base_model, BertModel):
        raise ValueError(f"expected a BERT model (BertModel, BertForMaskedLM, ...), got {type(bert).__name__}")
    return bert, source


def _plan(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    prefix: str,
    qformer_config: Blip2QFormerConfig,
    text_side: bool = True,
) -> dict[str, tuple[tuple[str, ...], torch.Tensor]]:
    """Target key -> (source keys, value) for every tensor BERT fills (a Q-Former without a text side gets the
    attention, the embedding LayerNorm and the query feed-forward)."""
    plan: dict[str, tuple[tuple[str, ...], torch.Tensor]] = {}

    def take(name: str) -> torch.Tensor:
        if name not in source:
            raise ValueError(f"the BERT checkpoint has no {name}")
        return source[name]

    def same(target_key: str, source_key: str) -> None:
        plan[target_key] = ((source_key,), take(source_key))

    words = prefix + "embeddings.word_embeddings.weight"
    word_embeddings = _with_mean_rows(take(words), qformer_config.vocab_size)
    if text_side:
        plan["embeddings.word_embeddings.weight"] = ((words,), word_embeddings)
        positions, token_types = (
            prefix + "embeddings.position_embeddings.weight",
            prefix + "embeddings.token_type_embeddings.weight",
        )
        folded = take(positions)[: qformer_config.max_position_embeddings].float() + take(token_types)[0].float()
        plan["embeddings.position_embeddings.weight"] = ((positions, token_types), folded)
    for part in ("weight", "bias"):
        same(f"qformer.layernorm.{part}", f"{prefix}embeddings.LayerNorm.{part}")

    for index in range(qformer_config.num_hidden_layers):
        bert_layer, layer = f"{prefix}encoder.layer.{index}.", f"qformer.encoder.layer.{index}."
        for part in ("weight", "bias"):
            for projection in ("query", "key", "value"):
                same(
                    f"{layer}attention.attention.{projection}.{part}",
                    f"{bert_layer}attention.self.{projection}.{part}",
                )
            for module in ("dense", "LayerNorm"):
                same(f"{layer}attention.output.{module}.{part}", f"{bert_layer}attention.output.{module}.{part}")
            # The query path starts as a copy of the text path (the paper's initialisation).
            for suffix in ("", "_query") if text_side else ("_query",):
                same(f"{layer}intermediate{suffix}.dense.{part}", f"{bert_layer}intermediate.dense.{part}")
                for module in ("dense", "LayerNorm"):
                    same(f"{layer}output{suffix}.{module}.{part}", f"{bert_layer}output.{module}.{part}")

    if "qformer_lm_head.decoder.weight" in target:
        # BERT's MLM decoder is its word embeddings (the Q-Former's LM head is tied to them as well).
        plan["qformer_lm_head.decoder.weight"] = ((words,), word_embeddings)
    if f"{_MLM_HEAD}transform.dense.weight" in source and "qformer_lm_head.transform.dense.weight" in target:
        for module in ("dense", "LayerNorm"):
            for part in ("weight", "bias"):
                same(f"qformer_lm_head.transform.{module}.{part}", f"{_MLM_HEAD}transform.{module}.{part}")
        bias = f"{_MLM_HEAD}bias"
        plan["qformer_lm_head.decoder.bias"] = ((bias,), _with_mean_rows(take(bias), qformer_config.vocab_size))

    absent = [key for key in plan if key not in target]
    if absent:
        raise ValueError(f"the model lacks Q-Former tensors BERT fills: {absent}")
    return plan


def _with_mean_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with rows appended up to `rows`, each the mean of the existing rows (a neutral new token)."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, *tensor.shape[1:])], dim=0)


def _aliases(key: str, state: Mapping[str, torch.Tensor]) -> set[str]:
    """`key` and the keys of `state` naming the same tensor (tied weights)."""
    tensor = state[key]
    return {
        name
        for name, other in state.items()
        if name == key
        or (
            other.numel()
            and other.data_ptr() == tensor.data_ptr()
            and other.shape == tensor.shape
            and other.dtype == tensor.dtype
        )
    }
