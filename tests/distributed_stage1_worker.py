"""One rank of a two-process (torchrun, gloo, CPU) stage-1 step, driven by `tests/test_distributed_stage1.py`.

Usage: `torchrun --standalone --nproc-per-node=2 distributed_stage1_worker.py OUT_DIR`. Every rank builds the same
tiny `Blip2ForPretraining` and the same global batch of `2B` image-text pairs (`global_batch`), runs the ITC, ITM and
ITG losses on its own `B` rows with fixed hard negatives (indices into the gathered batch), backpropagates, averages
the gradients over the ranks as DDP does and writes `OUT_DIR/rank{r}.pt`. The test imports the helpers below to run
the single-process reference on the full batch; comparing the two is the test's job.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tiny import pixels, randomise_, stage1_config_dict, tiny_qformer_tokenizer

from modeling_blip2 import Blip2Config, Blip2ForPretraining
from modeling_blip2.losses import rank_and_world_size

WORLD_SIZE = 2
LOCAL_BATCH = 3
GLOBAL_BATCH = WORLD_SIZE * LOCAL_BATCH
# Six words each: every caption tokenizes to [CLS] + 6 + [SEP], so no padding and equal ITG token counts per rank.
CAPTIONS = (
    "a photo of the red cat",
    "the blue dog on the left",
    "a green square on the right",
    "what is this yellow dog ?",
    "the red square of the cat",
    "a blue cat on the square",
)
TERMS = ("loss_itc", "loss_itm", "loss_itg")
TOTAL = "loss"
OUTPUTS = ("similarity_image_to_text", "similarity_text_to_image", "itm_logits", "itg_logits")
TEMPERATURE = 0.07  # inside the clamp range, so `temp` gets a gradient
# The relations checked are exact; float64 keeps the comparison far above the noise of different summation orders.
DTYPE = torch.float64


def build_model() -> Blip2ForPretraining:
    """The same tiny stage-1 model in every process: fixed random weights, no dropout, vision encoder frozen.

    Dropout is switched off in the config, before construction: the `nn.Dropout` modules take their `p` from it and
    the attention layers read their dropout probability from the config at call time. The model is in train mode as
    in training (the frozen vision encoder stays in eval mode); without dropout this is the same function as eval.
    """
    config = stage1_config_dict()
    config["qformer_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config["vision_config"].update(attention_dropout=0.0)
    torch.manual_seed(0)
    model = randomise_(Blip2ForPretraining(Blip2Config(**config)), std=0.1, seed=0)
    with torch.no_grad():
        model.temp.fill_(TEMPERATURE)
    model.to(DTYPE).freeze_vision_encoder()
    model.train()
    dropout = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout) and module.p]
    assert not dropout, f"dropout left on in {dropout}"
    return model


def global_batch() -> dict[str, torch.Tensor]:
    """The `2B` image-text pairs with distinct image ids and fixed hard negatives (derangements of the batch)."""
    tokenizer = tiny_qformer_tokenizer()
    text = tokenizer(list(CAPTIONS), return_tensors="pt")  # fails if the lengths differ: no padding asked for
    assert bool(text["attention_mask"].all()), "captions must not need padding"
    samples = torch.arange(GLOBAL_BATCH)
    return {
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "pixel_values": pixels(batch=GLOBAL_BATCH, seed=1).to(DTYPE),
        "image_ids": 10 * samples + 7,
        # Indices into the gathered batch; every rank gets some negatives held by the other rank.
        "negative_image_per_text": (samples + 1) % GLOBAL_BATCH,
        "negative_text_per_image": (samples + 2) % GLOBAL_BATCH,
    }


def local_rows(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s `B` rows (gathered tensors are rank-major: local row `b` is global row `rank * B + b`).

    The hard-negative indices are sliced by row too, but keep pointing into the gathered `2B` batch.
    """
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return {name: value[rows] for name, value in batch.items()}


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def losses_and_gradients(model: Blip2ForPretraining, batch: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Forward on `batch`: the loss terms, their gradients and the total's w.r.t. every trainable parameter, logits.

    The total goes through `loss.backward()` into `.grad`, as in training; the terms use `autograd.grad` on the
    retained graph first. In a process group every rank must call this with the same shapes (the backward passes of
    the gathers are collectives, and every rank runs them in the same order).
    """
    parameters = trainable_parameters(model)
    output = model(
        batch["input_ids"],
        batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_ids=batch["image_ids"],
        hard_negatives=(batch["negative_image_per_text"], batch["negative_text_per_image"]),
    )
    gradients: dict[str, dict[str, torch.Tensor]] = {}
    for term in TERMS:
        grads = torch.autograd.grad(
            getattr(output, term), list(parameters.values()), retain_graph=True, allow_unused=True
        )
        gradients[term] = {
            name: torch.zeros_like(parameter) if grad is None else grad
            for (name, parameter), grad in zip(parameters.items(), grads, strict=True)
        }
    model.zero_grad(set_to_none=True)
    output.loss.backward()
    gradients[TOTAL] = {
        name: torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.clone()
        for name, parameter in parameters.items()
    }
    losses = {name: getattr(output, name).detach() for name in (*TERMS, TOTAL)}
    outputs = {name: getattr(output, name).detach() for name in OUTPUTS}
    return {"losses": losses, "gradients": gradients, "outputs": outputs}


def average_over_ranks(gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`all_reduce(SUM) / world_size` of every gradient (one flat collective), as DDP averages `.grad`."""
    names = list(gradients)
    flat = torch.cat([gradients[name].reshape(-1) for name in names])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    chunks = torch.split(flat, [gradients[name].numel() for name in names])
    return {name: chunk.view_as(gradients[name]) for name, chunk in zip(names, chunks, strict=True)}


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    # A short collective timeout: a rank stuck in a collective fails with a message instead of hanging the test.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        rank, world_size = rank_and_world_size()
        assert world_size == WORLD_SIZE, f"expected {WORLD_SIZE} ranks, got {world_size}"
        assert int(os.environ["LOCAL_RANK"]) == rank
        result = losses_and_gradients(build_model(), local_rows(global_batch(), rank))
        result["rank_and_world_size"] = (rank, world_size)
        result["gradients"] = {term: average_over_ranks(grads) for term, grads in result["gradients"].items()}
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
