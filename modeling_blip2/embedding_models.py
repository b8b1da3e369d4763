"""Embedding models for retrieval indexes: the text side and the image side of BLIP-2's contrastive space.

Key-compatible with transformers' `Blip2TextModelWithProjection` / `Blip2VisionModelWithProjection`, and so with
the matching subsets of the official `blip2-itm-vit-g` checkpoints (the other keys are reported as unexpected).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration import Blip2Config
from .modeling import (
    QFORMER_TEXT_EMBEDDINGS_PATTERN,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    _wants_dict,
    build_vision_model,
)
from .qformer import Blip2TextEmbeddings


@dataclass
class Blip2TextModelOutput(ModelOutput):
    """Output of `Blip2TextModelWithProjection`.

    Args:
        text_embeds: `(batch, length, embed_dim)` L2-normalised projections of every text position; position 0
            (`[CLS]`) is the text's contrastive embedding.
        last_hidden_state: `(batch, length, qformer_hidden)` Q-Former outputs of the text alone.
        hidden_states: Q-Former hidden states (embeddings + one per layer), when asked for.
        attentions: Q-Former self-attention weights, when asked for.
    """

    text_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class Blip2VisionModelOutput(ModelOutput):
    """Output of `Blip2VisionModelWithProjection`.

    Args:
        image_embeds: `(batch, num_query_tokens, embed_dim)` L2-normalised projected query outputs (ITC compares a
            text with each and keeps the best).
        last_hidden_state: `(batch, 1 + num_patches, vision_hidden)` vision encoder output.
        hidden_states: The vision encoder's hidden states, when asked for.
        attentions: The vision encoder's attention weights, when asked for.
    """

    image_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _require_qformer_text_input(model: nn.Module, config: Blip2Config) -> None:
    if not config.qformer_config.use_qformer_text_input:
        raise ValueError(
            f"{type(model).__name__} reads text with the Q-Former: set qformer_config.use_qformer_text_input=True"
        )


class Blip2TextModelWithProjection(Blip2PreTrainedModel):
    """The text side of BLIP-2's contrastive space: Q-Former text pass (unimodal mask) + `text_projection`."""

    main_input_name = "input_ids"
    # As transformers' class: an embedding model without a loss of its own (train it through Blip2ForPretraining).
    supports_gradient_checkpointing = False
    _keep_in_fp32_modules_strict = ["query_tokens", "qformer", QFORMER_TEXT_EMBEDDINGS_PATTERN, "text_projection"]

    def __init__(self, config: Blip2Config) -> None:
        _require_qformer_text_input(self, config)
        super().__init__(config)
        hidden = config.qformer_config.hidden_size
        # Unused by the text pass; kept so that the key set is that of transformers' class.
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden))
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.text_projection = nn.Linear(hidden, config.image_text_hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Blip2TextModelOutput | tuple:
        """Embeds `(batch, length)` Q-Former (BERT) token ids; `text_embeds[:, 0]` is the retrieval embedding."""
        if input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be a (batch, length) tensor of Q-Former token ids, got {shape}")
        outputs = self.qformer(
            self.embeddings(input_ids, position_ids=position_ids),
            query_length=0,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state.to(self.text_projection.weight.dtype)
        output = Blip2TextModelOutput(
            text_embeds=F.normalize(self.text_projection(hidden), dim=-1),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


class Blip2VisionModelWithProjection(Blip2PreTrainedModel):
    """The image side of BLIP-2's contrastive space: vision encoder, queries, Q-Former + `vision_projection`."""

    main_input_name = "pixel_values"
    _keep_in_fp32_modules_strict = ["query_tokens", "qformer", "vision_model.post_layernorm", "vision_projection"]

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        hidden = config.qformer_config.hidden_size
        self.vision_model = build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.vision_projection = nn.Linear(hidden, config.image_text_hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Blip2VisionModelOutput | tuple:
        """Embeds `(batch, 3, H, W)` images as `(batch, num_query_tokens, embed_dim)` normalised query embeddings."""
        vision_outputs = self.vision_model(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        query_output = self.query_outputs(vision_outputs.last_hidden_state).last_hidden_state
        projected = self.vision_projection(query_output.to(self.vision_projection.weight.dtype))
        output = Blip2VisionModelOutput(
            image_embeds=F.normalize(projected, dim=-1),
            last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()
