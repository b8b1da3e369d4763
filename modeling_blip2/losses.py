"""Stage-1 (representation learning) losses as pure functions: ITC, ITM with hard negatives, ITG.

The model computes features and logits; these functions reduce them to losses. Cross-rank gathering lives in
`gather_with_grad` / `gather_no_grad`, which are the identity when `torch.distributed` is unavailable or not
initialised, so everything here runs in a single process without a process group.

Batch conventions (`W` ranks, `B` samples per rank, `Q` query tokens, `D` embedding width):
- every rank must hold the same local batch size `B` (use `drop_last=True`); gathered tensors are rank-major, so the
  local sample `b` of rank `r` is gathered row `r * B + b`;
- similarity matrices are `(B, W * B)`: local rows against all gathered columns. With `gather=False`, or in a single
  process, they are `(B, B)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_LABEL_SMOOTHING = 0.1

__all__ = [
    "IGNORE_INDEX",
    "ItcOutput",
    "Stage1Losses",
    "gather_no_grad",
    "gather_with_grad",
    "image_text_similarity",
    "itc_loss",
    "itg_inputs_and_labels",
    "itg_loss",
    "itg_num_predicted_tokens",
    "itm_labels",
    "itm_loss",
    "rank_and_world_size",
    "sample_hard_negatives",
    "token_share_across_ranks",
]


# --------------------------------------------------------------------------------------------------------------------
# Gathering across ranks
# --------------------------------------------------------------------------------------------------------------------


def rank_and_world_size() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, or `(0, 1)` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    chunks = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(chunks, tensor)
    return torch.cat(chunks, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns to each rank the gradient of its own slice, summed over ranks.

    Every rank's loss may depend on every rank's features, so the gradient w.r.t. this rank's features is the sum of
    the gathered tensor's gradients over all ranks (`all_reduce(SUM)`), restricted to this rank's rows. Combined with
    DDP's gradient averaging this yields the gradient of the mean of the rank losses (see `itc_loss`).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size = rank_and_world_size()
        ctx.rank, ctx.world_size, ctx.local_size = rank, world_size, tensor.shape[0]
        return _all_gather(tensor.contiguous(), world_size)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> torch.Tensor:
        # all_reduce works on every backend (gloo has no reduce_scatter); clone: it reduces in place.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather `tensor` `(B, ...)` from every rank into `(W * B, ...)`, differentiable w.r.t. the local slice.

    Identity in a single process. All ranks must call it with the same shape, and all must run the backward pass.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather `tensor` `(B, ...)` from every rank into a detached `(W * B, ...)`; identity in a single process."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    with torch.no_grad():
        return _all_gather(tensor.detach().contiguous(), world_size)


def _column_offset(num_rows: int, num_columns: int) -> int:
    """Index of the first local sample among the similarity columns: `rank * B` if gathered, else 0."""
    rank, world_size = rank_and_world_size()
    if num_columns == num_rows:
        return 0
    if num_columns == world_size * num_rows:
        return rank * num_rows
    raise ValueError(
        f"similarity must have the local batch size ({num_rows}) or world_size * local batch size "
        f"({world_size * num_rows}) columns, got {num_columns}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Image-text contrastive (ITC)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ItcOutput:
    """Result of `itc_loss`.

    Attributes:
        loss: Scalar; mean of the image-to-text and text-to-image cross-entropies over the local rows.
        similarity_image_to_text: `(B, N)`; local images against all `N` (gathered) texts, divided by the temperature.
        similarity_text_to_image: `(B, N)`; local texts against all `N` (gathered) images, divided by the temperature.
    """

    loss: torch.Tensor
    similarity_image_to_text: torch.Tensor
    similarity_text_to_image: torch.Tensor


def image_text_similarity(
    image_features: torch.Tensor, text_features: torch.Tensor, temperature: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-max image-text similarity divided by the temperature.

    Args:
        image_features: `(B_i, Q, D)` L2-normalised per-query image embeddings.
        text_features: `(B_t, D)` L2-normalised text ([CLS]) embeddings.
        temperature: Scalar (tensor or float). Clamping a learnable temperature is the caller's job.

    Returns:
        `(similarity_image_to_text, similarity_text_to_image)`, `(B_i, B_t)` and its transpose `(B_t, B_i)` (a view):
        `[i, t] = max_q (image_features[i, q] . text_features[t]) / temperature`.
    """
    if image_features.dim() != 3 or text_features.dim() != 2:
        raise ValueError(
            "expected image_features (batch, queries, dim) and text_features (batch, dim), got shapes "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(
            f"image and text embedding widths differ: {image_features.shape[-1]} vs {text_features.shape[-1]}"
        )
    per_query = torch.einsum("iqd,td->itq", image_features, text_features)  # (B_i, B_t, Q)
    similarity_image_to_text = per_query.amax(dim=-1) / temperature  # (B_i, B_t)
    return similarity_image_to_text, similarity_image_to_text.t()


def _soft_targets(local_image_ids: torch.Tensor, gathered_image_ids: torch.Tensor) -> torch.Tensor:
    """`(B, N)` target distributions: uniform over the gathered samples that share the row's image id."""
    positives = (local_image_ids[:, None] == gathered_image_ids[None, :]).float()  # (B, N)
    return positives / positives.sum(dim=1, keepdim=True)


def itc_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    gather: bool = True,
) -> ItcOutput:
    """Image-text contrastive loss with query-max similarity (BLIP-2 stage 1).

    Local images are scored against all gathered texts and local texts against all gathered images; the positive of
    local sample `b` on rank `r` is column `r * B + b`. The loss is the mean of the two cross-entropies (label
    smoothing 0.1 by default), each averaged over the local rows.

    Gradients: features are gathered with `gather_with_grad`, so each rank's features receive the gradient of the
    *sum* of all rank losses. After DDP averages parameter gradients over the `W` ranks, training follows the
    gradient of the mean rank loss, which equals the single-process loss on the full `W * B` batch.

    Args:
        image_features: `(B, Q, D)` L2-normalised per-query image embeddings (local batch).
        text_features: `(B, D)` L2-normalised text ([CLS]) embeddings (local batch).
        temperature: Scalar, typically the model's learnable `temp`; clamp it (e.g. to [0.001, 0.5]) before calling.
        image_ids: Optional `(B,)` integer ids. When given, every gathered sample with the same image id is a
            positive (several captions per image) and the target is uniform over the positives, then smoothed as
            cross-entropy does: `(1 - eps) * target + eps / N`. With all ids distinct this equals the hard-target loss.
        label_smoothing: Label smoothing `eps` for both directions.
        gather: Gather features (and ids) across ranks. With `False` every rank uses its local batch only.

    Returns:
        `ItcOutput` with the scalar loss and the two `(B, N)` similarity matrices (`N = W * B` when gathering),
        ready for `sample_hard_negatives`.
    """
    if image_features.dim() != 3 or text_features.dim() != 2 or image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            "expected image_features (batch, queries, dim) and text_features (batch, dim) with the same batch size, "
            f"got shapes {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    batch_size = image_features.shape[0]
    if image_ids is not None and tuple(image_ids.shape) != (batch_size,):
        raise ValueError(f"image_ids must have shape ({batch_size},), got {tuple(image_ids.shape)}")

    rank, world_size = rank_and_world_size() if gather else (0, 1)
    if world_size == 1:
        similarity_image_to_text, similarity_text_to_image = image_text_similarity(
            image_features, text_features, temperature
        )
    else:
        all_image_features = gather_with_grad(image_features)  # (W * B, Q, D)
        all_text_features = gather_with_grad(text_features)  # (W * B, D)
        similarity_image_to_text, _ = image_text_similarity(image_features, all_text_features, temperature)
        _, similarity_text_to_image = image_text_similarity(all_image_features, text_features, temperature)

    if image_ids is None:
        targets = torch.arange(batch_size, device=image_features.device) + rank * batch_size
    else:
        all_image_ids = gather_no_grad(image_ids) if world_size > 1 else image_ids
        targets = _soft_targets(image_ids, all_image_ids).to(similarity_image_to_text.dtype)
    loss = (
        F.cross_entropy(similarity_image_to_text, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(similarity_text_to_image, targets, label_smoothing=label_smoothing)
    ) / 2
    return ItcOutput(loss, similarity_image_to_text, similarity_text_to_image)


# --------------------------------------------------------------------------------------------------------------------
# Image-text matching (ITM)
# --------------------------------------------------------------------------------------------------------------------


def itm_negatives_exist(num_rows: int, num_columns: int, image_ids: torch.Tensor | None, device: torch.device) -> bool:
    """Whether every local row has a hard-negative candidate among the `num_columns` gathered samples.

    A row lacks one only when every gathered sample is its positive (a global batch of one image, or one image id
    throughout), which is a property of the global batch: every rank gets the same answer. With `image_ids` and
    several processes this gathers them, so every rank must call it.
    """
    if num_columns < 2:
        return False
    return not bool(_positive_mask(num_rows, num_columns, image_ids, device).all(dim=1).any())


def _positive_mask(
    num_rows: int, num_columns: int, image_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """`(B, N)` bool mask of the columns that are positives of each local row."""
    offset = _column_offset(num_rows, num_columns)
    rows = torch.arange(num_rows, device=device)
    columns = torch.arange(num_columns, device=device)
    positives = columns[None, :] == (rows + offset)[:, None]  # (B, N)
    if image_ids is not None:
        if tuple(image_ids.shape) != (num_rows,):
            raise ValueError(f"image_ids must have shape ({num_rows},), got {tuple(image_ids.shape)}")
        image_ids = image_ids.to(device)
        all_image_ids = gather_no_grad(image_ids) if num_columns != num_rows else image_ids
        positives = positives | (image_ids[:, None] == all_image_ids[None, :])
    return positives


@torch.no_grad()
def sample_hard_negatives(
    similarity_image_to_text: torch.Tensor,
    similarity_text_to_image: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative image per text and one hard negative text per image, weighted by similarity.

    For each local row, the candidates are all `N` columns except its positives (its own column `rank * B + b`, and
    with `image_ids` every column with the same image id); the draw is `multinomial(softmax(similarity))` over the
    candidates. The inputs are never modified. Needs at least two distinct images in the (gathered) batch.

    With `seed` (the same on every rank) the draws no longer depend on how the batch is split over processes: the
    random numbers are drawn for the whole `(N, N)` gathered batch from a generator seeded with it, each rank keeps
    the rows of its samples, and row `i` takes `argmax_j(similarity[i, j] + gumbel[i, j])` over its candidates (the
    Gumbel-max trick, exactly a draw from the same softmax). `W` ranks of `B` samples then draw the negatives one
    process draws on the `W * B` batch, for the same seed.

    Args:
        similarity_image_to_text: `(B, N)` from `itc_loss`, local images against gathered texts.
        similarity_text_to_image: `(B, N)` from `itc_loss`, local texts against gathered images.
        image_ids: Optional `(B,)` local image ids (gathered here when the columns are gathered).
        generator: Optional generator for the draws (on the similarities' device).
        seed: Optional seed of draws that depend only on the seed and the gathered batch (not with `generator`).

    Returns:
        `(negative_image_index_per_text, negative_text_index_per_image)`, both `(B,)` long indices into the `N`
        gathered samples (the rows of the gathered features / images).

    Raises:
        ValueError: if a row has no candidate: a batch of one without gathering, or every sample sharing one image id.
    """
    if similarity_image_to_text.dim() != 2 or similarity_image_to_text.shape != similarity_text_to_image.shape:
        raise ValueError(
            "expected two (batch, num_candidates) similarity matrices of the same shape, got "
            f"{tuple(similarity_image_to_text.shape)} and {tuple(similarity_text_to_image.shape)}"
        )
    num_rows, num_columns = similarity_image_to_text.shape
    if num_columns < 2:
        raise ValueError(
            "image-text matching needs at least 2 distinct images in the (global) batch to draw hard negatives, "
            f"got a batch of {num_columns}"
        )
    positives = _positive_mask(num_rows, num_columns, image_ids, similarity_image_to_text.device)
    if bool(positives.all(dim=1).any()):
        raise ValueError(
            "image-text matching needs at least 2 distinct images in the (global) batch: some rows have no negative "
            "candidate because every sample shares their image id"
        )

    if seed is not None and generator is not None:
        raise ValueError("pass a generator or a seed for the hard-negative draws, not both")
    device, dtype = similarity_image_to_text.device, torch.promote_types(similarity_image_to_text.dtype, torch.float32)
    shared = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    offset = _column_offset(num_rows, num_columns)
    rows = slice(offset, offset + num_rows)  # this rank's rows of the gathered batch

    def draw(similarity: torch.Tensor) -> torch.Tensor:
        # Masking before the softmax (out of place) keeps the candidates' weights from underflowing to zero when the
        # positive dominates at a small temperature.
        logits = similarity.to(dtype).masked_fill(positives, float("-inf"))  # (B, N)
        if shared is None:
            return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)  # (B,)
        # Noise for every row of the gathered batch, this rank's rows kept: the same numbers on any world size.
        # -log(Exp(1)) is Gumbel(0, 1); the clamp keeps an exact zero from becoming +inf (and NaN on a positive).
        noise = torch.empty(num_columns, num_columns, device=device).exponential_(generator=shared)  # (N, N)
        gumbel = -noise[rows].clamp_(min=torch.finfo(noise.dtype).tiny).log().to(dtype)  # (B, N)
        return (logits + gumbel).argmax(dim=1)  # (B,)

    return draw(similarity_text_to_image), draw(similarity_image_to_text)


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`(3 * batch_size,)` ITM labels for the `[positives; (negative image, text); (image, negative text)]` layout.

    Returns `[1] * batch_size + [0] * (2 * batch_size)` as a long tensor.
    """
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return labels


def itm_loss(itm_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Image-text matching cross-entropy.

    Args:
        itm_logits: `(3B, 2)` matching logits (the `itm_head` output averaged over queries) for the pairs
            `[(image, text); (negative image, text); (image, negative text)]`.
        labels: Optional `(3B,)` long labels (1 = match); defaults to `itm_labels(B)`.

    Returns:
        Scalar mean cross-entropy.
    """
    if itm_logits.dim() != 2 or itm_logits.shape[1] != 2:
        raise ValueError(f"itm_logits must have shape (num_pairs, 2), got {tuple(itm_logits.shape)}")
    if labels is None:
        if itm_logits.shape[0] % 3 != 0:
            raise ValueError(
                f"without explicit labels itm_logits must hold 3 * batch pairs, got {itm_logits.shape[0]} rows"
            )
        labels = itm_labels(itm_logits.shape[0] // 3, itm_logits.device)
    return F.cross_entropy(itm_logits, labels)


# --------------------------------------------------------------------------------------------------------------------
# Image-grounded text generation (ITG)
# --------------------------------------------------------------------------------------------------------------------


def itg_inputs_and_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_start_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs and labels for image-grounded generation from right-padded tokenized text.

    Args:
        input_ids: `(B, T)` token ids starting with [CLS].
        attention_mask: `(B, T)` with 1 for real tokens and 0 for padding; position 0 must be real (right padding).
        decoder_start_token_id: The `[DEC]` id that replaces position 0.
        pad_token_id: Written into the padded positions of the decoder inputs (they are masked out anyway).

    Returns:
        `(decoder_input_ids, labels)`, both `(B, T)`. Labels are `input_ids` with the padded positions (chosen by
        `attention_mask`, not by the pad id, so a pad id shared with a real token is safe) set to -100. Labels keep
        position 0, but `itg_loss` shifts by one, so it is never predicted.
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            "expected input_ids and attention_mask of the same (batch, length) shape, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    padding = attention_mask == 0
    if bool(padding[:, 0].any()):
        raise ValueError("image-grounded generation expects right-padded text: attention_mask[:, 0] must be 1")
    decoder_input_ids = input_ids.masked_fill(padding, pad_token_id)
    decoder_input_ids[:, 0] = decoder_start_token_id
    labels = input_ids.masked_fill(padding, IGNORE_INDEX)
    return decoder_input_ids, labels


def itg_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = DEFAULT_LABEL_SMOOTHING
) -> torch.Tensor:
    """Next-token cross-entropy: `logits[:, t]` predicts `labels[:, t + 1]`.

    Args:
        logits: `(B, T, V)` language-model logits over the text positions (query positions excluded).
        labels: `(B, T)` token ids, -100 where no loss is taken.
        label_smoothing: Label smoothing of the cross-entropy.

    Returns:
        Scalar mean over the predicted (non -100) tokens; NaN if there are none.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (batch, length, vocab) and labels (batch, length), got shapes {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B * (T - 1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B * (T - 1),)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def token_share_across_ranks(num_tokens: torch.Tensor) -> torch.Tensor:
    """`W * n_r / sum_s n_s` (a float64 scalar) for this rank's `n_r` predicted tokens: 1 in a single process.

    A token-mean loss times this factor is the rank's share of the token mean over the gathered batch, so that after
    distributed data parallel averages the gradients over the `W` ranks, training follows the gradient of the token
    mean over all ranks' tokens, as one process on the whole batch does (without it, the mean of the rank means,
    which weighs ranks rather than tokens when their token counts differ). transformers scales its LM losses the
    same way (`average_tokens_across_devices`). All ranks must call it (an all-reduce of the count).

    Args:
        num_tokens: Scalar count of this rank's predicted tokens (e.g. `itg_num_predicted_tokens`).
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return torch.ones((), dtype=torch.float64, device=num_tokens.device)
    total = num_tokens.detach().to(torch.float64).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    if not total > 0:
        raise ValueError("no rank holds a predicted token: the token mean over the ranks is undefined")
    return world_size * num_tokens.detach().to(torch.float64) / total


def itg_num_predicted_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of tokens image-grounded generation predicts in a right-padded `(B, T)` batch: every real token but
    the first (`itg_inputs_and_labels` keeps the real tokens as labels, and `itg_loss` never predicts position 0)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, length), got shape {tuple(attention_mask.shape)}")
    return (attention_mask[:, 1:] != 0).sum()


def itg_loss_on_predicted_positions(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
) -> torch.Tensor:
    """`itg_loss(head(hidden_states), labels)`, with the LM head run only on the positions that predict a token.

    The logits of padding positions (and of the last position) are never used by the loss; skipping them saves the
    `(B, T, V)` logits, their log-softmax and their share of the head's work. Same value and gradients.

    Args:
        hidden_states: `(B, T, H)` text outputs of the Q-Former.
        labels: `(B, T)` token ids, -100 where no loss is taken.
        head: Maps `(N, H)` states to `(N, V)` logits.
    """
    if hidden_states.dim() != 3 or hidden_states.shape[:2] != labels.shape:
        raise ValueError(
            f"expected hidden states (batch, length, hidden) and labels (batch, length), got shapes "
            f"{tuple(hidden_states.shape)} and {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    predicted = targets != IGNORE_INDEX  # (B, T - 1): position t predicts label t + 1
    logits = head(hidden_states[:, :-1][predicted])  # (N, V)
    return F.cross_entropy(logits, targets[predicted], label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------------------------------------------
# Total
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Stage1Losses:
    """Stage-1 loss terms and their weighted total.

    Attributes:
        loss: Scalar weighted total of the present terms.
        loss_itc: Scalar unweighted image-text contrastive loss, or None if not computed.
        loss_itm: Scalar unweighted image-text matching loss, or None if not computed.
        loss_itg: Scalar unweighted image-grounded generation loss, or None if not computed.
    """

    loss: torch.Tensor
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    loss_itg: torch.Tensor | None = None

    @classmethod
    def combine(
        cls,
        loss_itc: torch.Tensor | None,
        loss_itm: torch.Tensor | None,
        loss_itg: torch.Tensor | None,
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> Stage1Losses:
        """Weighted sum of the present terms (None terms and zero weights are left out of the total)."""
        terms = (loss_itc, loss_itm, loss_itg)
        if len(weights) != len(terms):
            raise ValueError(f"weights must hold one weight per term (itc, itm, itg), got {weights}")
        weighted = [weight * term for weight, term in zip(weights, terms, strict=True) if term is not None and weight]
        if not weighted:
            raise ValueError("at least one stage-1 loss term must be present with a non-zero weight")
        return cls(loss=torch.stack(weighted).sum(), loss_itc=loss_itc, loss_itm=loss_itm, loss_itg=loss_itg)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The total (`"loss"`) and the present named terms."""
        named = {"loss": self.loss, "loss_itc": self.loss_itc, "loss_itm": self.loss_itm, "loss_itg": self.loss_itg}
        return {name: value for name, value in named.items() if value is not None}
