"""The attention kernel shared by the vision encoder and the Q-Former: an eager path and PyTorch SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    additive_mask: torch.Tensor | None,
    dropout: float,
    implementation: str | None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention over `(batch, heads, length, head_dim)` tensors.

    `additive_mask` broadcasts to `(batch, heads, query_length, key_length)` and holds 0 where attention is allowed
    and a large negative number where it is not. Returns the attended values `(batch, heads, query_length,
    head_dim)` and, when `need_weights` (which forces the eager path), the attention probabilities.
    """
    implementation = implementation or "sdpa"
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation must be one of {SUPPORTED_IMPLEMENTATIONS}, got {implementation!r}"
        )
    if implementation == "sdpa" and not need_weights:
        if additive_mask is not None:
            additive_mask = additive_mask.to(query.dtype)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask, dropout_p=dropout)
        return output, None

    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    if additive_mask is not None:
        scores = scores + additive_mask.to(scores.dtype)
    # Softmax in fp32 keeps fp16/bf16 encoders stable; the result returns to the input dtype.
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        probabilities = F.dropout(probabilities, p=dropout, training=True)
    return torch.matmul(probabilities, value), probabilities


def padding_to_additive_mask(padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(batch, key_length)` 1/0 (or bool) key mask -> `(batch, 1, 1, key_length)` additive mask."""
    allowed = padding_mask.to(torch.bool)[:, None, None, :]
    return boolean_to_additive_mask(allowed, dtype)


def boolean_to_additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """True/1 = may attend -> 0, False/0 -> the most negative finite value of `dtype`."""
    allowed = allowed.to(torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
