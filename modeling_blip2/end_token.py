"""The end token of generated text, with one source of truth: the model's `generation_config`.

A caption or answer target must end with the token `generate` stops at, or the model learns a stop token it is never
stopped on. Tokenizers often disagree with the model here (the official OPT checkpoints end text with "\\n", their
tokenizer's EOS is `</s>`), so the collators take their end token from the model when they meet it, and a collator
given an explicit end token the model does not stop at is an error that names both.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PreTrainedModel


def unwrap_model(model: Any) -> Any:
    """The model under DDP / PEFT / accelerate wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) and not isinstance(model, PreTrainedModel):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def model_end_token_ids(model: Any) -> list[int]:
    """The ids `model.generate` stops at (`generation_config.eos_token_id`, one id or a list), first the main one."""
    model = unwrap_model(model)
    generation_config = getattr(model, "generation_config", None)
    ids = getattr(generation_config, "eos_token_id", None)
    if ids is None:
        return []
    return [int(token) for token in (ids if isinstance(ids, (list, tuple)) else [ids])]


class EndTokenFromModel:
    """Mixin of the collators whose targets end with the model's end token (decoder-only LLMs).

    `eos_token_id=None` leaves the end token to the model: `bind_model(model)` (which `Blip2Trainer` calls where the
    collator meets the model) sets it to `model.generation_config.eos_token_id`. An explicit `eos_token_id` is
    checked there against the ids the model stops at.
    """

    is_encoder_decoder: bool
    eos_token_id: int | None

    def bind_model(self, model: Any) -> None:
        """Take the end token from `model` (or check the explicit one), and check the LLM family matches."""
        base = unwrap_model(model)
        config = getattr(base, "config", None)
        model_is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        if model_is_encoder_decoder != self.is_encoder_decoder:
            raise ValueError(
                f"{type(self).__name__} was built with is_encoder_decoder={self.is_encoder_decoder}, but the model's "
                f"LLM is {'an encoder-decoder' if model_is_encoder_decoder else 'decoder-only'} "
                f"(config.is_encoder_decoder={model_is_encoder_decoder})"
            )
        model_ids = model_end_token_ids(base)
        if self.is_encoder_decoder:
            # The tokenizer closes encoder-decoder targets with its EOS: generate must stop on it.
            tokenizer_eos = getattr(getattr(self, "tokenizer", None), "eos_token_id", None)
            if tokenizer_eos is not None and model_ids and tokenizer_eos not in model_ids:
                raise ValueError(
                    f"the tokenizer ends targets with its EOS {tokenizer_eos}, but the model's "
                    f"generation_config.eos_token_id is {model_ids}: generate would never stop where training ends"
                )
            return
        if not model_ids:
            raise ValueError(
                "the model's generation_config.eos_token_id is not set, so there is no end token for the targets: "
                "set model.generation_config.eos_token_id (the token generate should stop at)"
            )
        if self.eos_token_id is None:
            self.eos_token_id = model_ids[0]
        elif self.eos_token_id not in model_ids:
            raise ValueError(
                f"{type(self).__name__} ends targets with token {self.eos_token_id}, but the model's "
                f"generation_config.eos_token_id is {model_ids[0] if len(model_ids) == 1 else model_ids}: the model "
                "would learn to stop on a token generate never stops at. Pass eos_token_id=None to take the model's, "
                "or set generation_config.eos_token_id"
            )

    def _end_token(self) -> int:
        if self.eos_token_id is None:
            raise ValueError(
                f"{type(self).__name__} has no end token yet: pass eos_token_id=model.generation_config.eos_token_id, "
                "call collator.bind_model(model), or train through Blip2Trainer (which takes it from the model)"
            )
        return self.eos_token_id
