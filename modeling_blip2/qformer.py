"""Building blocks of the Querying Transformer (Q-Former) and the attention masks of the paper's three objectives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Blip2QFormerKeyValues:
    """Keys and values of the Q-Former's attention layers, computed once and reused by later passes.

    Two kinds, one container (each entry `(key, value)` is `(batch, heads, length, head_dim)`, or None for a layer
    that has none):

    - **Image key/values** (`Blip2QFormerModel.image_key_values`): every cross-attention layer's projection of the
      image features. Passed as `encoder_key_values` instead of `encoder_hidden_states`, they spare each pass over
      the same images the projections (stage 1 runs one pass for ITC, three image-text pairs per image for ITM;
      retrieval reranks k texts per image; VQA asks several questions per image). `select` picks rows (e.g. the
      image of each ITM pair); gradients flow back to the shared projections.
    - **Self-attention key/values** of a pass (`return_key_values=True`): what later positions attend to. Passed as
      `prefix_key_values`, a text-only pass attends to them as if they preceded it in the sequence: image-grounded
      generation reads the queries of the contrastive pass (as LAVIS does), and decoding appends one token at a
      time. `query_length` says how many of the leading positions are queries (for the attention masks).
    """

    layers: tuple[KeyValue | None, ...]
    query_length: int = 0

    def __post_init__(self) -> None:
        shapes = {tuple(key.shape[:3:2]) for key, _ in self._present()}
        if len(shapes) > 1:
            raise ValueError(f"key/values must share batch size and length across layers, got {sorted(shapes)}")

    def _present(self) -> list[KeyValue]:
        return [entry for entry in self.layers if entry is not None]

    @property
    def batch_size(self) -> int:
        present = self._present()
        return present[0][0].shape[0] if present else 0

    @property
    def length(self) -> int:
        """Number of positions (image tokens, or prefix positions)."""
        present = self._present()
        return present[0][0].shape[2] if present else 0

    def select(self, index: torch.Tensor | Sequence[int]) -> Blip2QFormerKeyValues:
        """The rows `index` (e.g. one image per image-text pair); differentiable."""
        index = torch.as_tensor(index, dtype=torch.long, device=self._device())
        return self._map(lambda tensor: tensor.index_select(0, index))

    def repeat_interleave(self, repeats: int) -> Blip2QFormerKeyValues:
        """Each row `repeats` times in a row (e.g. several questions or captions per image)."""
        return self._map(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    @classmethod
    def concatenate(cls, parts: Sequence[Blip2QFormerKeyValues]) -> Blip2QFormerKeyValues:
        """The rows of `parts`, one after the other (same layers and lengths)."""
        if not parts or len({(len(part.layers), part.query_length) for part in parts}) != 1:
            raise ValueError("concatenate needs one or more key/values of the same layers and query length")
        layers = []
        for entries in zip(*(part.layers for part in parts), strict=True):
            if any(entry is None for entry in entries):
                if not all(entry is None for entry in entries):
                    raise ValueError("concatenate needs key/values for the same layers")
                layers.append(None)
            else:
                layers.append(tuple(torch.cat([entry[i] for entry in entries]) for i in range(2)))
        return cls(tuple(layers), parts[0].query_length)

    def _device(self) -> torch.device:
        present = self._present()
        return present[0][0].device if present else torch.device("cpu")

    def _map(self, function: object) -> Blip2QFormerKeyValues:
        layers = tuple(None if entry is None else (function(entry[0]), function(entry[1])) for entry in self.layers)
        return Blip2QFormerKeyValues(layers, self.query_length)


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

    def key_value(self, source: torch.Tensor) -> KeyValue:
        """`(B, S, key_value_width)` -> the `(B, heads, S, head_dim)` keys and values."""
        return self._split_heads(self.key(source)), self._split_heads(self.value(source))

    def forward(
        self,
        hidden_states: torch.Tensor,
        additive_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        key_value: KeyValue | None = None,
        prefix_key_value: KeyValue | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KeyValue]:
        """Attends from `hidden_states` to `key_value_states` (cross-attention) or to themselves.

        `key_value` gives the keys and values ready-made (from `key_value`) instead; `prefix_key_value` is put before
        them (positions of an earlier pass). Returns the output, the attention probabilities when asked for, and the
        keys and values attended to.
        """
        query = self._split_heads(self.query(hidden_states))
        if key_value is None:
            key_value = self.key_value(hidden_states if key_value_states is None else key_value_states)
        key, value = key_value
        if prefix_key_value is not None:
            key = torch.cat([prefix_key_value[0].to(key.dtype), key], dim=2)
            value = torch.cat([prefix_key_value[1].to(value.dtype), value], dim=2)
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        attended, weights = attend(
            query, key, value, additive_mask, dropout, self.config._attn_implementation, output_attentions
        )
        batch, _, length, _ = attended.shape
        return attended.transpose(1, 2).reshape(batch, length, -1), weights, (key, value)


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
        key_value: KeyValue | None = None,
        prefix_key_value: KeyValue | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KeyValue]:
        attended, weights, key_value = self.attention(
            hidden_states, additive_mask, key_value_states, output_attentions, key_value, prefix_key_value
        )
        return self.output(attended, hidden_states), weights, key_value


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
        encoder_key: torch.Tensor | None = None,
        encoder_value: torch.Tensor | None = None,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        output_positions: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """One layer. The image's cross-attention keys/values (`encoder_key`/`encoder_value`) and an earlier pass's
        self-attention keys/values (`prefix_key`/`prefix_value`) come as separate tensors, positional, so that
        gradient checkpointing (re-entrant too) carries their gradients.

        `output_positions=n` computes the outputs of the first `n` positions only (all positions are still attended
        to): what a last layer needs when the rest of its outputs go unused.

        Returns the hidden states, the self- and cross-attention probabilities (when asked for), and the
        self-attention keys and values (prefix included)."""
        prefix = None if prefix_key is None else (prefix_key, prefix_value)
        if output_positions is not None and output_positions < hidden_states.shape[1]:
            rows_mask = None if additive_mask is None else additive_mask[:, :, :output_positions]
            hidden_states, self_weights, (key, value) = self.attention(
                hidden_states[:, :output_positions],
                rows_mask,
                key_value_states=hidden_states,
                output_attentions=output_attentions,
                prefix_key_value=prefix,
            )
            query_length = min(query_length, output_positions)
        else:
            hidden_states, self_weights, (key, value) = self.attention(
                hidden_states, additive_mask, output_attentions=output_attentions, prefix_key_value=prefix
            )
        queries, text = hidden_states[:, :query_length], hidden_states[:, query_length:]
        cross_weights = None
        outputs = []
        if query_length > 0:
            if self.has_cross_attention:
                encoder = None if encoder_key is None else (encoder_key, encoder_value)
                queries, cross_weights, _ = self.crossattention(
                    queries, encoder_additive_mask, encoder_hidden_states, output_attentions, key_value=encoder
                )
            outputs.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1] > 0:
            outputs.append(self.output(self.intermediate(text), text))
        hidden_states = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return hidden_states, self_weights, cross_weights, key, value


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
