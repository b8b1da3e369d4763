"""Building blocks of the Querying Transformer (Q-Former) and the attention masks of the paper's three objectives."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import attend, boolean_to_additive_mask
from .configuration import Blip2QFormerConfig

ATTENTION_TYPES = ("bidirectional", "unimodal", "multimodal_causal")


def build_qformer_attention_mask(
    padding_mask: torch.Tensor, query_length: int, attention_type: str, dtype: torch.dtype
) -> torch.Tensor:
    """The Q-Former self-attention mask over a `[queries; text]` sequence, as an additive `(B, 1, T, T)` mask.

    - `"bidirectional"` (image-text matching): every token sees every non-padding token.
    - `"unimodal"` (image-text contrastive): queries see only queries, text sees only text.
    - `"multimodal_causal"` (image-grounded generation): queries see only queries; a text token sees all queries
      and the text up to itself.

    Args:
        padding_mask: `(B, T)` with 1 for real tokens and 0 for padding; `T = query_length + text length`.
        query_length: Number of leading query positions.
        attention_type: One of `ATTENTION_TYPES`.
        dtype: dtype of the returned mask.
    """
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
    if padding_mask.dim() != 2:
        raise ValueError(f"padding_mask must be (batch, length), got shape {tuple(padding_mask.shape)}")
    length = padding_mask.shape[1]
    if not 0 <= query_length <= length:
        raise ValueError(f"query_length must be between 0 and the sequence length {length}, got {query_length}")
    positions = torch.arange(length, device=padding_mask.device)
    row, key = positions[:, None], positions[None, :]
    if attention_type == "bidirectional":
        structure = torch.ones(length, length, dtype=torch.bool, device=padding_mask.device)
    elif attention_type == "unimodal":
        structure = (row < query_length) == (key < query_length)
    else:
        structure = (key < query_length) | ((row >= query_length) & (key <= row))
    allowed = structure[None] & padding_mask.to(torch.bool)[:, None, :]  # (B, T, T)
    return boolean_to_additive_mask(allowed[:, None], dtype)


class Blip2QFormerMultiHeadAttention(nn.Module):
    """BERT multi-head attention; as cross-attention, keys and values come from the image features."""

    def __init__(self, config: Blip2QFormerConfig, key_value_width: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        key_value_width = key_value_width or config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_value_width, config.hidden_size)
        self.value = nn.Linear(key_value_width, config.hidden_size)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, width = states.shape
        return states.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, h, T, hd)

    def forward(
        self,
        hidden_states: torch.Tensor,
        additive_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        source = hidden_states if key_value_states is None else key_value_states
        query = self._split_heads(self.query(hidden_states))
        key = self._split_heads(self.key(source))
        value = self._split_heads(self.value(source))
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        attended, weights = attend(
            query, key, value, additive_mask, dropout, self.config._attn_implementation, output_attentions
        )
        batch, _, length, _ = attended.shape
        return attended.transpose(1, 2).reshape(batch, length, -1), weights


class Blip2QFormerResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual), the BERT output sub-layer."""

    def __init__(self, config: Blip2QFormerConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class Blip2QFormerAttentionBlock(nn.Module):
    """Attention followed by its residual output sub-layer."""

    def __init__(self, config: Blip2QFormerConfig, key_value_width: int | None = None) -> None:
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(config, key_value_width)
        self.output = Blip2QFormerResidualOutput(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        additive_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(hidden_states, additive_mask, key_value_states, output_attentions)
        return self.output(attended, hidden_states), weights


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states))


class Blip2QFormerLayer(GradientCheckpointingLayer):
    """Shared self-attention over `[queries; text]`; queries alone cross-attend (on some layers) and have their own
    feed-forward; text tokens use the text feed-forward."""

    def __init__(self, config: Blip2QFormerConfig, layer_index: int) -> None:
        super().__init__()
        self.attention = Blip2QFormerAttentionBlock(config)
        self.has_cross_attention = config.has_cross_attention(layer_index)
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttentionBlock(config, config.resolved_encoder_hidden_size)
        self.intermediate_query = Blip2QFormerIntermediate(config)
        self.output_query = Blip2QFormerResidualOutput(config, config.intermediate_size)
        self.has_text_feed_forward = config.use_qformer_text_input
        if self.has_text_feed_forward:
            self.intermediate = Blip2QFormerIntermediate(config)
            self.output = Blip2QFormerResidualOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        additive_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_additive_mask: torch.Tensor | None,
        query_length: int,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        hidden_states, self_weights = self.attention(hidden_states, additive_mask, output_attentions=output_attentions)
        queries, text = hidden_states[:, :query_length], hidden_states[:, query_length:]
        cross_weights = None
        outputs = []
        if query_length > 0:
            if self.has_cross_attention:
                queries, cross_weights = self.crossattention(
                    queries, encoder_additive_mask, encoder_hidden_states, output_attentions
                )
            outputs.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1] > 0:
            outputs.append(self.output(self.intermediate(text), text))
        hidden_states = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return hidden_states, self_weights, cross_weights


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Blip2QFormerLayer(config, index) for index in range(config.num_hidden_layers)])


class Blip2TextEmbeddings(nn.Module):
    """Q-Former text embeddings (word + absolute position), optionally preceded by the query embeddings.

    The LayerNorm of BERT's embeddings is the Q-Former's own `layernorm`, applied after the concatenation.
    """

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        query_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(B, T)` ids (and optional `(B, T)` or `(T,)` positions, default `0..T-1`) -> `(B, [Q +] T, hidden)`."""
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"Q-Former text of {length} tokens exceeds its max_position_embeddings "
                f"({self.config.max_position_embeddings}); truncate it in the tokenizer"
            )
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None]
        elif position_ids.shape[-1] != length:
            raise ValueError(f"position_ids must have {length} positions, got shape {tuple(position_ids.shape)}")
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if query_embeds is not None:
            embeddings = torch.cat([query_embeds.to(embeddings.dtype), embeddings], dim=1)
        return embeddings


class Blip2QFormerPredictionTransform(nn.Module):
    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.activation(self.dense(hidden_states)))


class Blip2QFormerLMHead(nn.Module):
    """BERT's prediction head over the Q-Former text outputs (the ITG head): transform, then vocabulary logits.

    The decoder weight is tied to the Q-Former word embeddings by the model that owns both.
    """

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.transform = Blip2QFormerPredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))  # (B, T, vocab)
