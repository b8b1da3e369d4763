"""Stage 1 across two torchrun ranks (gloo, CPU) equals one process on the same global batch: losses and gradients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from distributed_stage1_worker import (
    GLOBAL_BATCH,
    LOCAL_BATCH,
    OUTPUTS,
    TERMS,
    TOTAL,
    WORLD_SIZE,
    build_model,
    global_batch,
    losses_and_gradients,
)

WORKER = Path(__file__).with_name("distributed_stage1_worker.py")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
# float64 throughout (see the worker): the two runs differ by ~1e-15, a wrong gradient by orders of magnitude more.
TOLERANCE = {"atol": 1e-10, "rtol": 1e-8}


def _run_torchrun(out_dir: Path) -> None:
    """`torchrun --standalone --nproc-per-node=2 WORKER OUT_DIR`; on failure or timeout, fails with its output."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # what the `torchrun` script runs, from this interpreter
        "--standalone",  # rendezvous on a free port chosen by the store itself: no port races between test runs
        f"--nproc-per-node={WORLD_SIZE}",
        str(WORKER),
        str(out_dir),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    # A session of its own, so a timeout can end torchrun and its workers together (by this group id only).
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"torchrun timed out after {TIMEOUT_S} s\n{_tails(stdout, stderr)}") from None
    assert process.returncode == 0, f"torchrun exited with {process.returncode}\n{_tails(stdout, stderr)}"


def _tails(stdout: str, stderr: str) -> str:
    """The ends of torchrun's output; the workers' tracebacks come through its stderr."""
    return f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-8000:]}"


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE, msg=lambda details: f"{what}\n{details}")


def _rank_rows(rank: int) -> slice:
    return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def _itm_rows(itm_logits: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s `(3B, 2)` ITM logits out of the `(3 * 2B, 2)` ones: `[positives; negative image; negative text]`
    blocks of the global batch, each cut to the rank's rows."""
    return itm_logits.view(3, GLOBAL_BATCH, 2)[:, _rank_rows(rank)].reshape(3 * LOCAL_BATCH, 2)


def test_two_torchrun_ranks_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """Losses and gradients of 2 ranks x B samples (DDP-averaged) equal one process on the same 2B batch.

    Set-up (`tests/distributed_stage1_worker.py`): W = 2 ranks, B = 3, N = 2B; the same tiny float64
    `Blip2ForPretraining` everywhere (vision encoder frozen but its post-LayerNorm, dropout off), distinct image ids,
    captions of equal length without padding, and fixed hard negatives `negative_image[j] = (j + 1) % N`,
    `negative_text[i] = (i + 2) % N` (indices into the gathered batch; each rank passes its rows' slice, so each rank
    pairs some of its samples with the other rank's). Rank r holds global rows `r * B ... r * B + B - 1`.

    Losses, with `L = L_itc + L_itm + L_itg` on the N rows in one process and `L^r` on rank r's B rows:
    - ITC: rank r scores its B images (texts) against all N gathered texts (images), positive column `r * B + b`, so
      its similarity rows are the single-process rows of its samples and `L^r_itc` is the same two-way cross-entropy
      averaged over its B rows. With equal B per rank, `L_itc = (L^0_itc + L^1_itc) / 2`.
    - ITM: rank r's 3B pairs `[positives; (negative image, text); (image, negative text)]` are the rank's rows of each
      of the three N-row blocks in one process (negative images gathered with gradient, negative texts as token ids);
      each loss is a mean over pairs, so `L_itm = mean_r L^r_itm`.
    - ITG: a mean over the predicted tokens; without padding every rank predicts B * (T - 1) tokens, so the mean of
      the rank means is the token mean over the N rows. (With uneven padding it would weight ranks, not tokens.)
    Hence `L = (L^0 + L^1) / 2` term by term.

    Gradients: rank r backpropagates `L^r`, then gradients are all-reduced and divided by W, as DDP does. A parameter
    p reaches the losses (a) inside rank r's own computation (local rows only), where rank r gets `dL^r/dp`; (b)
    through a tensor `x_r` that rank r computes and every rank gathers (ITC image and text features, ITM image
    embeddings): `gather_with_grad`'s backward all-reduces the gathered gradient, so rank r gets
    `sum_s dL^s/dx_r * dx_r/dp`. Summed over the ranks, (a) + (b) is the full derivative of `F = sum_s L^s = W * L`,
    and dividing by W gives `dL/dp`: the averaged gradient equals the single-process gradient of L, for every term
    and for the total. (ITM negative texts travel as token ids: the receiving rank embeds them with its own copy of
    the parameters, path (a).) Without the all-reduce in (b), rank r would miss `dL^s/dx_r` for s != r and the
    comparison fails.
    """
    _run_torchrun(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    assert not dist.is_initialized()  # the reference runs without a process group: gathers are the identity
    model = build_model()
    batch = global_batch()
    reference = losses_and_gradients(model, batch)

    # The comparison covers every trainable parameter, each of which the total moves.
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    vision = {name for name in trainable if name.startswith("vision_model.")}
    assert vision and all(name.startswith("vision_model.post_layernorm.") for name in vision)
    assert set(reference["gradients"][TOTAL]) == trainable
    unmoved = [name for name, grad in reference["gradients"][TOTAL].items() if not grad.any()]
    assert not unmoved, f"trainable parameters without a gradient in the reference: {unmoved}"

    for rank, result in enumerate(ranks):
        assert tuple(result["rank_and_world_size"]) == (rank, WORLD_SIZE)
        rows = _rank_rows(rank)
        outputs, expected = result["outputs"], reference["outputs"]
        assert set(outputs) == set(OUTPUTS)
        for name in ("similarity_image_to_text", "similarity_text_to_image", "itg_logits"):
            _assert_close(outputs[name], expected[name][rows], f"rank {rank}: {name}")
        _assert_close(outputs["itm_logits"], _itm_rows(expected["itm_logits"], rank), f"rank {rank}: itm_logits")

    for term in (*TERMS, TOTAL):
        rank_losses = torch.stack([result["losses"][term] for result in ranks])
        assert not torch.allclose(rank_losses[0], rank_losses[1]), f"{term}: ranks saw the same rows"
        _assert_close(rank_losses.mean(), reference["losses"][term], f"{term}: mean of the rank losses")
        expected_grads = reference["gradients"][term]
        for rank, result in enumerate(ranks):
            averaged = result["gradients"][term]
            assert set(averaged) == set(expected_grads)
            for name, grad in expected_grads.items():
                _assert_close(
                    averaged[name], grad, f"{term}: rank {rank}'s averaged gradient of {name} != one process's"
                )
