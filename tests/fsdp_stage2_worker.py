"""Stage 2 sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`) over two CPU processes (gloo), driven by
`tests/test_multiprocess_training.py`.

Usage: `torchrun --standalone --nproc-per-node=2 fsdp_stage2_worker.py OUT_DIR`. Every rank builds the same tiny
float64 `Blip2ForConditionalGeneration` (OPT LLM) with the image encoder and the LLM frozen, shards the encoder's and
the LLM's blocks (`SHARDED_BLOCKS`) and then the whole model, frozen parts included (FSDP2 shards each parameter on
its own, so frozen and trainable parameters share a unit; FSDP1 needs `use_orig_params=True` for that),
and takes `STEPS` AdamW steps on its rows of a global batch of captions of different lengths, with the LM loss over
all ranks' tokens (`num_items_in_batch`, times the world size, as transformers' Trainer does). Rank 0 writes the
gathered parameters to `OUT_DIR/fsdp.pt`; `train_unsharded` is the single-process reference on the whole batch.

transformers' `TrainingArguments(fsdp=...)` does not reach this on CPU (accelerate sets FSDP up across GPUs or other
accelerators only, and Blip2Trainer refuses the combination); torch's FSDP2 itself runs on CPU, which this shows.
"""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tiny import IMAGE_TOKEN, NUM_QUERY_TOKENS, TEXT, config_dict, pixels, randomise_

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration

# The units: the frozen encoder's and LLM's blocks; the Q-Former stays in the root unit, because each layer's
# cross-attention keys and values are computed before the layers run (once per image, `image_key_values`), outside
# the layer's own forward, where a sharded layer's parameters are not gathered.
SHARDED_BLOCKS = ("Blip2VisionEncoderLayer", "OPTDecoderLayer")
WORLD_SIZE = 2
LOCAL_BATCH = 3
STEPS = 3
LEARNING_RATE = 1e-2
# Caption token ids of different lengths: the ranks hold different numbers of target tokens.
CAPTIONS = ([5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19], [20, 21, 22, 23, 24], [25])


def build_model() -> Blip2ForConditionalGeneration:
    """The same tiny float64 model in every process: no dropout, image encoder and LLM frozen (eval mode)."""
    config = config_dict("opt")
    config["qformer_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomise_(Blip2ForConditionalGeneration(Blip2Config(**config)), std=0.1, seed=0).to(torch.float64)
    model.freeze_vision_encoder()
    model.freeze_language_model()
    return model.train()


def global_batch() -> dict[str, torch.Tensor]:
    """`[<image> x Q] + caption + end`, right-padded, labels on the caption and end tokens only."""
    pad, end = TEXT["opt"]["pad_token_id"], TEXT["opt"]["eos_token_id"]
    rows = [[IMAGE_TOKEN] * NUM_QUERY_TOKENS + caption + [end] for caption in CAPTIONS]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :NUM_QUERY_TOKENS] = -100
    return {
        "pixel_values": pixels(batch=len(rows), seed=3).to(torch.float64),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }


def num_items(batch: dict[str, torch.Tensor]) -> int:
    """Predicted tokens of the whole batch (a causal LM predicts label t from position t - 1)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return torch.optim.AdamW(trainable, lr=LEARNING_RATE, betas=(0.9, 0.98), weight_decay=0.05, foreach=False)


def _step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], items: int, world: int
) -> None:
    loss = model(**batch, num_items_in_batch=torch.tensor(items)).loss * world
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_unsharded() -> dict[str, torch.Tensor]:
    """The reference: one process, the whole global batch, the same steps."""
    model = build_model()
    optimizer = _optimizer(model)
    batch = global_batch()
    for _ in range(STEPS):
        _step(model, optimizer, batch, num_items(batch), 1)
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def main() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    # FSDP2 warns that a view returned by a unit would lose its hook under a later in-place op; none follows here (the
    # weights would not match the reference), and the warning, once per step and rank, would bury any real error.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        assert dist.get_world_size() == WORLD_SIZE
        rank = dist.get_rank()
        model = build_model()
        blocks = [module for module in model.modules() if type(module).__name__ in SHARDED_BLOCKS]
        assert {type(module).__name__ for module in blocks} == set(SHARDED_BLOCKS)
        for module in blocks:
            fully_shard(module)
        fully_shard(model)
        parameters = dict(model.named_parameters())
        assert all(isinstance(parameter, DTensor) for parameter in parameters.values())
        frozen = sorted({name.split(".")[0] for name, parameter in parameters.items() if not parameter.requires_grad})
        optimizer = _optimizer(model)
        batch = global_batch()
        items = num_items(batch)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = {name: value[rows] for name, value in batch.items()}
        for _ in range(STEPS):
            _step(model, optimizer, local, items, WORLD_SIZE)
        full = {name: parameter.full_tensor().detach() for name, parameter in parameters.items()}
        if rank == 0:
            torch.save({"parameters": full, "sharded_blocks": len(blocks), "frozen": frozen}, out_dir / "fsdp.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
