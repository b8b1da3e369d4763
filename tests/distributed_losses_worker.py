"""Two-process (gloo, CPU) run of the stage-1 losses, driven by `tests/test_losses.py`.

Usage: `python distributed_losses_worker.py WORK_DIR`. Reads `WORK_DIR/inputs.pt` (the full `2B` batch), spawns two
ranks that each take their half, and writes `WORK_DIR/rank{r}.pt` with the rank's losses, similarities, DDP-averaged
gradients and hard-negative draws. Comparing them with the single-process run is the test's job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling_blip2.losses import itc_loss, rank_and_world_size, sample_hard_negatives

WORLD_SIZE = 2
NUM_DRAWS = 50


def _itc_step(inputs: dict[str, torch.Tensor], rank: int, image_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One ITC forward/backward on the local half; gradients averaged over ranks as DDP does for parameters.

    The full-batch leaves stand in for shared parameters: each rank only touches its own slice, so before averaging
    the gradient on that slice is the gradient of the sum of both rank losses (what `gather_with_grad` routes back).
    """
    image = inputs["image_features"].clone().requires_grad_()
    text = inputs["text_features"].clone().requires_grad_()
    temperature = inputs["temperature"].clone().requires_grad_()
    batch = image.shape[0] // WORLD_SIZE
    local = slice(rank * batch, (rank + 1) * batch)
    output = itc_loss(
        image[local], text[local], temperature, image_ids=None if image_ids is None else image_ids[local]
    )
    output.loss.backward()
    result = {
        "loss": output.loss.detach(),
        "similarity_image_to_text": output.similarity_image_to_text.detach(),
        "similarity_text_to_image": output.similarity_text_to_image.detach(),
    }
    for name, leaf in (("image_features", image), ("text_features", text), ("temperature", temperature)):
        grad = leaf.grad.clone()
        result[f"local_grad_{name}"] = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        result[f"grad_{name}"] = grad / WORLD_SIZE
    return result


def _run_rank(rank: int, work_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(work_dir, 'store')}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        inputs = torch.load(os.path.join(work_dir, "inputs.pt"))
        results: dict[str, object] = {"rank_and_world_size": torch.tensor(rank_and_world_size())}
        results["hard"] = _itc_step(inputs, rank, image_ids=None)
        results["soft"] = _itc_step(inputs, rank, image_ids=inputs["image_ids"])

        batch = inputs["image_features"].shape[0] // WORLD_SIZE
        local_ids = inputs["image_ids"][rank * batch : (rank + 1) * batch]
        soft = results["soft"]
        generator = torch.Generator().manual_seed(rank)
        draws = [
            torch.stack(
                sample_hard_negatives(
                    soft["similarity_image_to_text"], soft["similarity_text_to_image"], local_ids, generator
                )
            )
            for _ in range(NUM_DRAWS)
        ]
        results["negatives"] = torch.stack(draws)  # (NUM_DRAWS, 2, B)
        torch.save(results, os.path.join(work_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> None:
    work_dir = str(Path(sys.argv[1]).resolve())
    mp.spawn(_run_rank, args=(work_dir,), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
