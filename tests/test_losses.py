"""Stage-1 losses: ITC against a loop reference, hard-negative sampling, ITM, ITG, the total, and a 2-rank run."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling_blip2.losses import (
    IGNORE_INDEX,
    Stage1Losses,
    gather_no_grad,
    gather_with_grad,
    image_text_similarity,
    itc_loss,
    itg_inputs_and_labels,
    itg_loss,
    itm_labels,
    itm_loss,
    rank_and_world_size,
    sample_hard_negatives,
)

WORKER = Path(__file__).with_name("distributed_losses_worker.py")


def _features(batch: int = 3, queries: int = 4, dim: int = 8, dtype: torch.dtype = torch.float64):
    image = F.normalize(torch.randn(batch, queries, dim, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=-1)
    return image, text


def _loop_similarity(image: torch.Tensor, text: torch.Tensor, temperature: float) -> list[list[float]]:
    batch, queries, dim = image.shape
    return [
        [
            max(sum(image[i, q, d].item() * text[t, d].item() for d in range(dim)) for q in range(queries))
            / temperature
            for t in range(batch)
        ]
        for i in range(batch)
    ]


def _loop_cross_entropy(row: list[float], target: list[float], eps: float) -> float:
    log_normaliser = math.log(sum(math.exp(value) for value in row))
    return -sum(
        ((1 - eps) * p + eps / len(row)) * (value - log_normaliser) for value, p in zip(row, target, strict=True)
    )


def _loop_itc(image: torch.Tensor, text: torch.Tensor, temperature: float, targets: list[list[float]], eps: float):
    similarity = _loop_similarity(image, text, temperature)
    batch = len(similarity)
    image_to_text = sum(_loop_cross_entropy(similarity[i], targets[i], eps) for i in range(batch)) / batch
    columns = [[similarity[i][t] for i in range(batch)] for t in range(batch)]
    text_to_image = sum(_loop_cross_entropy(columns[t], targets[t], eps) for t in range(batch)) / batch
    return (image_to_text + text_to_image) / 2


def _identity(batch: int) -> list[list[float]]:
    return [[float(i == j) for j in range(batch)] for i in range(batch)]


# ---------------------------------------------------------------------------------------------------------------------
# Single-process gathering
# ---------------------------------------------------------------------------------------------------------------------


def test_gathering_is_identity_without_process_group() -> None:
    tensor = torch.randn(3, 2, requires_grad=True)
    assert rank_and_world_size() == (0, 1)
    assert gather_with_grad(tensor) is tensor
    assert gather_no_grad(tensor) is tensor


# ---------------------------------------------------------------------------------------------------------------------
# ITC
# ---------------------------------------------------------------------------------------------------------------------


def test_similarity_is_query_max_over_temperature() -> None:
    image, text = _features()
    image_to_text, text_to_image = image_text_similarity(image, text, 0.07)
    assert image_to_text.shape == (3, 3)
    torch.testing.assert_close(image_to_text, torch.tensor(_loop_similarity(image, text, 0.07), dtype=torch.float64))
    torch.testing.assert_close(text_to_image, image_to_text.t())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_itc_matches_loop_reference(label_smoothing: float) -> None:
    image, text = _features()
    output = itc_loss(image, text, torch.tensor(0.07, dtype=torch.float64), label_smoothing=label_smoothing)
    expected = _loop_itc(image, text, 0.07, _identity(3), label_smoothing)
    torch.testing.assert_close(output.loss, torch.tensor(expected, dtype=torch.float64))
    assert output.similarity_image_to_text.shape == output.similarity_text_to_image.shape == (3, 3)


def test_itc_soft_targets_with_unique_ids_equal_hard_targets() -> None:
    image, text = _features(batch=5)
    temperature = torch.tensor(0.05, dtype=torch.float64)
    hard = itc_loss(image, text, temperature)
    soft = itc_loss(image, text, temperature, image_ids=torch.tensor([9, 3, 4, 0, 7]))
    torch.testing.assert_close(soft.loss, hard.loss)


def test_itc_soft_targets_with_duplicate_ids_match_hand_reference() -> None:
    image, text = _features()
    output = itc_loss(image, text, torch.tensor(0.07, dtype=torch.float64), image_ids=torch.tensor([4, 4, 1]))
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    expected = _loop_itc(image, text, 0.07, targets, 0.1)
    torch.testing.assert_close(output.loss, torch.tensor(expected, dtype=torch.float64))


def test_itc_gradient_reaches_features_and_temperature() -> None:
    image, text = (tensor.requires_grad_() for tensor in _features(dtype=torch.float32))
    temperature = torch.tensor(0.07, requires_grad=True)
    itc_loss(image, text, temperature).loss.backward()
    for tensor in (image, text, temperature):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_itc_rejects_mismatched_shapes() -> None:
    image, text = _features()
    with pytest.raises(ValueError, match="same batch size"):
        itc_loss(image, text[:2], 0.07)
    with pytest.raises(ValueError, match="image_ids must have shape"):
        itc_loss(image, text, 0.07, image_ids=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------------------------
# Hard negatives
# ---------------------------------------------------------------------------------------------------------------------


def test_hard_negative_at_batch_two_is_the_other_sample() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        similarity = torch.randn(2, 2) * 10
        negative_images, negative_texts = sample_hard_negatives(similarity, similarity.t(), generator=generator)
        assert negative_images.tolist() == [1, 0] and negative_texts.tolist() == [1, 0]


def test_hard_negatives_never_draw_positives() -> None:
    image_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    same_image = image_ids[:, None] == image_ids[None, :]
    generator = torch.Generator().manual_seed(0)
    drawn = torch.zeros(6, 6, dtype=torch.bool)
    for _ in range(300):
        similarity = torch.randn(6, 6)
        for negatives in sample_hard_negatives(similarity, similarity.t(), image_ids, generator):
            assert negatives.shape == (6,) and negatives.dtype == torch.long
            assert not same_image[torch.arange(6), negatives].any()
            drawn[torch.arange(6), negatives] = True
    assert torch.equal(drawn, ~same_image)  # every other candidate does get drawn


def test_hard_negatives_survive_a_dominant_positive() -> None:
    # At a small temperature softmax(similarity) underflows to 0 for everything but the positive.
    similarity = torch.eye(4) * 1e4 + torch.randn(4, 4)
    negative_images, negative_texts = sample_hard_negatives(similarity, similarity.t())
    assert (negative_images != torch.arange(4)).all() and (negative_texts != torch.arange(4)).all()


def test_hard_negatives_need_two_distinct_images() -> None:
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        sample_hard_negatives(torch.randn(1, 1), torch.randn(1, 1))
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        sample_hard_negatives(torch.randn(3, 3), torch.randn(3, 3), image_ids=torch.tensor([5, 5, 5]))


def test_hard_negatives_are_vectorised_and_leave_inputs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = 512
    similarity_image_to_text = torch.randn(batch, batch, requires_grad=True)
    similarity_text_to_image = torch.randn(batch, batch, requires_grad=True)
    image_ids = torch.arange(batch) // 2
    before = (similarity_image_to_text.detach().clone(), similarity_text_to_image.detach().clone(), image_ids.clone())

    calls = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *args, **kwargs: calls.append(1) or multinomial(*args, **kwargs))
    start = time.perf_counter()
    negative_images, negative_texts = sample_hard_negatives(
        similarity_image_to_text, similarity_text_to_image, image_ids
    )
    elapsed = time.perf_counter() - start

    assert len(calls) == 2  # one draw per direction, not one per row
    assert elapsed < 2.0
    assert negative_images.shape == negative_texts.shape == (batch,)
    assert not negative_images.requires_grad
    for tensor, original in zip((similarity_image_to_text, similarity_text_to_image, image_ids), before, strict=True):
        assert torch.equal(tensor.detach(), original)
    assert similarity_image_to_text.grad is None


# ---------------------------------------------------------------------------------------------------------------------
# ITM and ITG
# ---------------------------------------------------------------------------------------------------------------------


def test_itm_labels_and_loss() -> None:
    labels = itm_labels(2)
    assert labels.tolist() == [1, 1, 0, 0, 0, 0] and labels.dtype == torch.long
    logits = torch.randn(6, 2)
    loss = itm_loss(logits)
    assert loss.shape == ()
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    torch.testing.assert_close(
        itm_loss(logits, torch.ones(6, dtype=torch.long)), F.cross_entropy(logits, labels * 0 + 1)
    )
    assert itm_labels(1).tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="3 \\* batch"):
        itm_loss(torch.randn(4, 2))
    with pytest.raises(ValueError, match="num_pairs, 2"):
        itm_loss(torch.randn(6, 3))


def test_itg_loss_matches_manual_shifted_cross_entropy() -> None:
    batch, length, vocab, eps = 2, 5, 7, 0.1
    logits = torch.randn(batch, length, vocab, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length))
    labels[1, 3:] = IGNORE_INDEX
    terms = []
    for b in range(batch):
        for t in range(length - 1):
            target = labels[b, t + 1].item()
            if target == IGNORE_INDEX:
                continue
            log_probs = logits[b, t].log_softmax(-1)
            terms.append(-(1 - eps) * log_probs[target] - eps * log_probs.mean())
    torch.testing.assert_close(itg_loss(logits, labels, label_smoothing=eps), torch.stack(terms).mean())
    torch.testing.assert_close(itg_loss(logits, labels), itg_loss(logits, labels, label_smoothing=0.1))


def test_itg_inputs_and_labels_mask_padding_by_position() -> None:
    dec, pad = 30522, 7
    input_ids = torch.tensor([[101, 7, 20, 102, 7, 7], [101, 30, 102, 7, 7, 7]])  # 7 is a real token in row 0
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    original = input_ids.clone()
    decoder_input_ids, labels = itg_inputs_and_labels(input_ids, attention_mask, dec, pad)
    assert decoder_input_ids.tolist() == [[dec, 7, 20, 102, 7, 7], [dec, 30, 102, 7, 7, 7]]
    assert labels.tolist() == [[101, 7, 20, 102, -100, -100], [101, 30, 102, -100, -100, -100]]
    assert torch.equal(input_ids, original)
    with pytest.raises(ValueError, match="right-padded"):
        itg_inputs_and_labels(input_ids, attention_mask.flip(1), dec, pad)


# ---------------------------------------------------------------------------------------------------------------------
# Total
# ---------------------------------------------------------------------------------------------------------------------


def test_stage1_losses_combine() -> None:
    itc, itm, itg = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    losses = Stage1Losses.combine(itc, itm, itg)
    assert losses.loss.item() == 6.0
    assert Stage1Losses.combine(itc, itm, itg, weights=(1.0, 0.5, 2.0)).loss.item() == 8.0
    partial = Stage1Losses.combine(itc, None, itg)
    assert partial.loss.item() == 4.0 and set(partial.to_dict()) == {"loss", "loss_itc", "loss_itg"}
    assert set(losses.to_dict()) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert Stage1Losses.combine(itc, torch.tensor(float("nan")), itg, weights=(1, 0, 1)).loss.item() == 4.0
    with pytest.raises(ValueError, match="at least one"):
        Stage1Losses.combine(None, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# Two ranks
# ---------------------------------------------------------------------------------------------------------------------


def test_two_ranks_match_single_process(tmp_path: Path) -> None:
    """Each rank's ITC on its half of a `2B` batch, DDP-averaged, equals the single-process ITC on the whole batch.

    Single process: `L = (CE_i2t + CE_t2i) / 2`, each averaged over all `2B` rows. Rank `r` averages over its `B` rows
    against all `2B` columns, so `L = (L_0 + L_1) / 2` (the mean of the rank losses). `gather_with_grad` gives rank
    `r`'s features the gradient of `L_0 + L_1` (= 2 * dL/dx on its rows); DDP's average over the two ranks divides by
    2, which recovers dL/dx exactly. The temperature is not gathered: each rank has dL_r/dtemp and their mean is
    dL/dtemp.
    """
    batch, world = 4, 2
    image, text = _features(batch=world * batch, dtype=torch.float64)
    temperature = torch.tensor(0.07, dtype=torch.float64)
    image_ids = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5])  # duplicates inside and across ranks
    torch.save(
        {"image_features": image, "text_features": text, "temperature": temperature, "image_ids": image_ids},
        tmp_path / "inputs.pt",
    )
    completed = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]

    for variant, ids in (("hard", None), ("soft", image_ids)):
        leaves = [tensor.clone().requires_grad_() for tensor in (image, text, temperature)]
        reference = itc_loss(*leaves, image_ids=ids)
        reference.loss.backward()
        results = [result[variant] for result in ranks]
        torch.testing.assert_close(torch.stack([result["loss"] for result in results]).mean(), reference.loss.detach())
        for rank, result in enumerate(results):
            rows = slice(rank * batch, (rank + 1) * batch)
            torch.testing.assert_close(result["similarity_image_to_text"], reference.similarity_image_to_text[rows])
            torch.testing.assert_close(result["similarity_text_to_image"], reference.similarity_text_to_image[rows])
            for name, leaf in zip(("image_features", "text_features", "temperature"), leaves, strict=True):
                torch.testing.assert_close(result[f"grad_{name}"], leaf.grad)
            for name, leaf in zip(("image_features", "text_features"), leaves[:2], strict=True):
                torch.testing.assert_close(result[f"local_grad_{name}"][rows], world * leaf.grad[rows])

    for rank, result in enumerate(ranks):
        assert result["rank_and_world_size"].tolist() == [rank, world]
        negatives = result["negatives"]  # (draws, 2, B), indices into the gathered batch
        local_ids = image_ids[rank * batch : (rank + 1) * batch]
        assert ((negatives >= 0) & (negatives < world * batch)).all()
        assert (image_ids[negatives] != local_ids).all()
        other_rank = (negatives // batch) != rank
        assert other_rank.any()  # negatives come from the other rank's samples too
