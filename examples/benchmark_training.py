"""Training benchmark: stage-1 (ITC + ITM + ITG) throughput and peak memory, with and without the feature cache.

Three ways to train one stage-1 model (`modeling_blip2.Blip2ForPretraining`, randomly initialised) on the same
data, with the same batch size, number of steps and optimiser settings (AdamW, peak LR 1e-4, betas (0.9, 0.98),
weight decay 0.05 except on biases, norms and the temperature, linear warm-up then cosine decay to 1e-5):

(a) a straightforward loop written here, as LAVIS trains: a `DataLoader` whose collate function runs the image
    processor and the tokenizer, then every step `loss = model(...).loss`, `backward`, `step`, `zero_grad` and
    `loss.item()` for the log. The image encoder is frozen as in LAVIS (`requires_grad=False`, eval mode) and runs
    on every step. LAVIS does not wrap it in `torch.no_grad` (`self.ln_vision(self.visual_encoder(image))`), but
    with frozen weights and pixels that need no gradient autograd records nothing for it, so its cost is the plain
    forward, in LAVIS as here. Plain `torch.optim.AdamW` and no gradient clipping, as in LAVIS.
(b) ours: `Blip2Trainer` with `Blip2ImageTextCollator` (the encoder still runs every step), with its defaults:
    gradient clipping at norm 1.0 and the fused AdamW kernel.
(c) ours with the feature cache: `Blip2Trainer` over `FrozenFeatureDataset`, which runs the frozen encoder once per
    image before training (the model still applies the trainable post-LayerNorm at each step).

All three share the model's forward pass and losses, so (b)/(a) measures what our training loop and collator cost
or save around it, and (c)/(a) what skipping the encoder is worth. (LAVIS's model code itself is not measured: it
differs from ours, e.g. its ITG reuses the keys and values of the ITC pass's queries, which ours recomputes.) The
model is shaped so that, as with EVA ViT-g (about 1B parameters) against the Q-Former (about 105M), the vision
encoder's forward is the bulk of a step although it needs no backward: for ViT-g it is about two thirds of a
stage-1 step by FLOP count (~520 GFLOP per image for the encoder against ~275 for the Q-Former's forward and
backward over its six passes: ITC image and text, three ITM pairs, ITG), and here (a 21.7M-parameter encoder, 12
blocks of width 384 over 197 tokens, against a 0.9M-parameter Q-Former) it takes about two thirds of a step on an
idle CPU; the script prints the measured share for (a) and (b). The steady-state speed-up of the cache is about
1 / (1 - share), 3x for a share of two thirds.

Data: `--num-images` distinct random 256x256 images, one random caption each (up to 16 tokens), trained for
`--epochs` epochs (3 by default, about what the paper's 250k steps of 1680 samples make over its 129M images). The
cache costs one encoder forward per image, paid once, so the speed-up of (c) including it grows with the epochs; the
script prints it for a few epoch counts from the measured times. The cache needs un-augmented images: with the
paper's random crop and flip (`augment=True`) every epoch sees other pixels and (c) does not apply.

Timing. Each round trains three fresh copies of the model, one per variant, in lock-step: one training step of
(a), one of (b), one of (c), and so on (each variant runs in a thread that holds a baton while it computes; the order
rotates every round), so that the steps being compared run under the same load of a shared machine. A step is timed
from the moment its variant gets the baton to the end of its optimiser step, so it includes fetching and collating
its batch; (c)'s caching takes one turn per encoder batch. The first step of each run (lazy initialisation, and the
Trainer's start-up) is left out of the steady state: its throughput is the batch size over the median step time,
pooled over all rounds, and (c) "incl. caching" adds the median caching batch time once per epoch's worth of
batches. The same figures from the fastest decile of the turns are shown next to them: when other processes load
the machine, the encoder's large matrix products (on all threads) slow down more than the Q-Former's small ones,
which inflates the median (c)/(a); the fastest decile approximates an idle machine. The paired ratio of the steps
of one lock-step cycle is printed as well, with its quartiles. The whole runs (setup, `Trainer.train()` start-up,
first step, caching: everything each variant did) are timed too, median over rounds, in the second table.

Peak memory is measured as in `benchmark_inference.py` (whose helpers this script imports): once per variant in a
fresh process that builds the model and data, trains one warm-up step of the same variant on a copy of the model
(lazy initialisation), resets the kernel's resident-memory high-water mark (`/proc/self/clear_refs`), then trains
`--memory-steps` steps, and reports how far peak RSS rises above that post-setup baseline, with glibc's mmap
threshold pinned at 128 KiB. The figure includes everything the training run allocates: optimiser state, gradients,
activations, the Trainer's own state, and for (c) the feature cache itself
(`num_images * (1 + num_patches) * vision_hidden * bytes`; it is printed) and the caching pass.

Run it from the repository root (about 2.5 minutes on 2 idle CPU cores; `--quick` is a smoke test of about 20 s):

    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_training.py
    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_training.py --quick
    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_training.py --rounds 5 --epochs 5 --output-json out.json
    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_training.py --vision-dtype bfloat16

`--vision-dtype bfloat16` runs the frozen encoder (patch embedding and blocks; the post-LayerNorm stays float32) in
bfloat16 in all three variants, which also halves the cache; on CPUs without native bfloat16 it is slower.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertTokenizerFast, TrainerCallback, get_cosine_with_min_lr_schedule_with_warmup
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import modeling_blip2
from modeling_blip2 import (
    Blip2Config,
    Blip2ForPretraining,
    Blip2ImageTextCollator,
    Blip2Trainer,
    Blip2TrainingArguments,
    FrozenFeatureDataset,
    blip2_image_processor,
)
from modeling_blip2.processing import with_qformer_start_token

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_inference import (  # noqa: E402  (a sibling script: same memory methodology)
    MemoryResult,
    _peak_rss_increase,
    _pin_mmap_threshold,
    configure_threads,
    measure_in_fresh_processes,
    quiet_transformers,
)

PLAIN = "a"
TRAINER = "b"
CACHED = "c"
VARIANTS = (PLAIN, TRAINER, CACHED)
LABELS = {
    PLAIN: "(a) plain loop, encoder every step (as LAVIS)",
    TRAINER: "(b) ours: Blip2Trainer + Blip2ImageTextCollator",
    CACHED: "(c) ours + FrozenFeatureDataset",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WORKER_PRELOAD = ["torch", "transformers", "modeling_blip2", "modeling_blip2.trainer", "benchmark_inference"]
SOURCE_IMAGE_SIZE = 256
# Optimiser settings of all variants (the paper's; `Blip2TrainingArguments` defaults to them).
LEARNING_RATE = 1e-4
MIN_LEARNING_RATE = 1e-5
BETAS = (0.9, 0.98)
WEIGHT_DECAY = 0.05
NO_DECAY_NAMES = ("temp",)


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of the benchmarked stage-1 model (EVA-style vision encoder, Q-Former with text input)."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    qformer_hidden: int
    qformer_layers: int
    qformer_heads: int
    qformer_intermediate: int
    num_query_tokens: int
    embed_dim: int


# The encoder's forward takes about two thirds of a stage-1 step here on an idle CPU, as ViT-g's does by FLOP count.
DEFAULT_SIZE = ModelSize(
    vision_hidden=384,
    vision_layers=12,
    vision_heads=6,
    vision_intermediate=1536,
    image_size=224,
    patch_size=16,
    qformer_hidden=128,
    qformer_layers=2,
    qformer_heads=4,
    qformer_intermediate=512,
    num_query_tokens=32,
    embed_dim=128,
)
QUICK_SIZE = ModelSize(
    vision_hidden=128,
    vision_layers=4,
    vision_heads=4,
    vision_intermediate=512,
    image_size=112,
    patch_size=16,
    qformer_hidden=64,
    qformer_layers=2,
    qformer_heads=4,
    qformer_intermediate=256,
    num_query_tokens=8,
    embed_dim=32,
)


@dataclass(frozen=True)
class Workload:
    """The training run every variant does."""

    num_images: int = 48
    batch_size: int = 8
    epochs: int = 3
    text_length: int = 16
    warmup_steps: int = 2
    seed: int = 0
    max_steps: int | None = None  # stop early (the memory runs)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_images // self.batch_size

    @property
    def total_steps(self) -> int:
        steps = self.epochs * self.steps_per_epoch
        return steps if self.max_steps is None else min(steps, self.max_steps)


@dataclass(frozen=True)
class Setup:
    """Everything a variant needs besides its model, identical in every process."""

    size: ModelSize
    workload: Workload
    vision_dtype: str


@dataclass
class RunTimes:
    """Seconds one variant spent in one round."""

    caching_batch_s: list[float] = field(default_factory=list)  # (c): one turn per encoder batch of the caching
    setup_s: float = 0.0  # optimiser, data loader, Trainer and `train()` start-up, up to the first batch
    step_s: list[float] = field(default_factory=list)  # every step, the first included
    vision_s: list[float] = field(default_factory=list)  # encoder time within each step
    whole_s: float = 0.0  # all the time the variant held the machine
    mean_loss: float = float("nan")


# -- model and data --------------------------------------------------------------------------------------------------
CAPTION_WORDS = [f"w{index}" for index in range(400)]


def build_tokenizer() -> BertTokenizerFast:
    """A BERT WordPiece tokenizer over a synthetic vocabulary, with `[DEC]` added as the Q-Former needs."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CAPTION_WORDS]
    return with_qformer_start_token(BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)}))


def build_config(size: ModelSize, tokenizer: BertTokenizerFast) -> Blip2Config:
    return Blip2Config(
        vision_config={
            "hidden_size": size.vision_hidden,
            "num_hidden_layers": size.vision_layers,
            "num_attention_heads": size.vision_heads,
            "intermediate_size": size.vision_intermediate,
            "image_size": size.image_size,
            "patch_size": size.patch_size,
        },
        qformer_config={
            "hidden_size": size.qformer_hidden,
            "num_hidden_layers": size.qformer_layers,
            "num_attention_heads": size.qformer_heads,
            "intermediate_size": size.qformer_intermediate,
            "encoder_hidden_size": size.vision_hidden,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "use_qformer_text_input": True,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=size.num_query_tokens,
        image_text_hidden_size=size.embed_dim,
        image_token_index=None,
    )


def build_model(setup: Setup, tokenizer: BertTokenizerFast) -> Blip2ForPretraining:
    """The randomly initialised model (the same weights for a given seed), in train mode, nothing frozen yet."""
    torch.manual_seed(setup.workload.seed)
    model = Blip2ForPretraining(build_config(setup.size, tokenizer))
    dtype = DTYPES[setup.vision_dtype]
    if dtype != torch.float32:  # the frozen part only: the post-LayerNorm stays trainable, in float32
        for name, module in model.vision_model.named_children():
            if name != "post_layernorm":
                module.to(dtype)
    return model.train()


def build_dataset(workload: Workload) -> list[dict[str, Any]]:
    """Distinct random RGB images (smooth noise, 256x256) with one random caption and an image id each."""
    rng = np.random.default_rng(workload.seed)
    words = random.Random(workload.seed)
    examples = []
    for index in range(workload.num_images):
        coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((SOURCE_IMAGE_SIZE, SOURCE_IMAGE_SIZE), Image.Resampling.BILINEAR)
        caption = " ".join(words.choices(CAPTION_WORDS, k=words.randint(6, 14)))
        examples.append({"image": image, "text": caption, "image_id": index})
    return examples


def cache_size_mib(setup: Setup) -> float:
    """Size of the feature cache: one `(1 + num_patches, vision_hidden)` tensor per image."""
    tokens = 1 + (setup.size.image_size // setup.size.patch_size) ** 2
    element = torch.finfo(DTYPES[setup.vision_dtype]).bits // 8
    return setup.workload.num_images * tokens * setup.size.vision_hidden * element / 2**20


# -- lock-step scheduling and timing ---------------------------------------------------------------------------------
class Baton:
    """Lets one variant compute at a time, in turns; `pass_on` hands the machine to the next one in the queue."""

    def __init__(self, names: Sequence[str]) -> None:
        self._condition = threading.Condition()
        self._queue = list(names)
        self._holder: str | None = None
        self._since = 0.0
        self.held_s = dict.fromkeys(names, 0.0)

    def acquire(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._queue[0] == name and self._holder is None)
            self._holder, self._since = name, time.perf_counter()

    def pass_on(self, name: str) -> None:
        """Gives the machine to the next variant and waits for this one's next turn."""
        self._release(name, leave=False)
        self.acquire(name)

    def leave(self, name: str) -> None:
        """This variant is done (or failed): releases the machine if it holds it and drops out of the queue."""
        self._release(name, leave=True)

    def _release(self, name: str, leave: bool) -> None:
        with self._condition:
            if self._holder == name:
                self.held_s[name] += time.perf_counter() - self._since
                self._holder = None
            if name in self._queue:
                self._queue.remove(name)
                if not leave:
                    self._queue.append(name)
            self._condition.notify_all()


class NoBaton(Baton):
    """Runs alone (the memory workers)."""

    def __init__(self) -> None:
        super().__init__([])

    def acquire(self, name: str) -> None:
        pass

    def pass_on(self, name: str) -> None:
        pass

    def leave(self, name: str) -> None:
        pass


class StepClock:
    """Times a variant's turns: one per caching batch (for (c)), then the setup and first step, then one per step."""

    def __init__(self, name: str, baton: Baton, total_steps: int, vision_timer: VisionTimer) -> None:
        self.name, self.baton, self.total_steps, self.vision_timer = name, baton, total_steps, vision_timer
        self.times = RunTimes()
        self._turn_start = 0.0
        self._vision_at_turn_start = 0.0

    def start(self) -> None:
        self.baton.acquire(self.name)
        self._turn_start = time.perf_counter()

    def caching_batch_done(self) -> None:
        now = time.perf_counter()
        self.times.caching_batch_s.append(now - self._turn_start)
        self.baton.pass_on(self.name)
        self._turn_start = time.perf_counter()

    def setup_done(self) -> None:
        """Ends the setup: the first step starts here (in the same turn)."""
        now = time.perf_counter()
        self.times.setup_s = now - self._turn_start
        self._turn_start, self._vision_at_turn_start = now, self.vision_timer.total_s

    def step_done(self) -> None:
        now = time.perf_counter()
        self.times.step_s.append(now - self._turn_start)
        self.times.vision_s.append(self.vision_timer.total_s - self._vision_at_turn_start)
        if len(self.times.step_s) < self.total_steps:  # after the last step the variant keeps the turn to finish
            self.baton.pass_on(self.name)
        self._turn_start, self._vision_at_turn_start = time.perf_counter(), self.vision_timer.total_s


class VisionTimer:
    """Accumulates the time spent in the vision encoder (patch embedding to the last block) through module hooks;
    calls `on_exit` (if set) after each encoder pass."""

    def __init__(self, model: Blip2ForPretraining) -> None:
        self.total_s = 0.0
        self._start = 0.0
        self.on_exit: Callable[[], None] | None = None
        model.vision_model.embeddings.register_forward_pre_hook(self._enter)
        model.vision_model.encoder.register_forward_hook(self._exit)

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_: Any) -> None:
        self.total_s += time.perf_counter() - self._start
        if self.on_exit is not None:
            self.on_exit()


class ClockCallback(TrainerCallback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.setup_done()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.step_done()


# -- the variants ----------------------------------------------------------------------------------------------------
def plain_collate(
    examples: list[dict[str, Any]], image_processor: Any, tokenizer: BertTokenizerFast, max_length: int
) -> dict[str, torch.Tensor]:
    """What a LAVIS data loader hands the model: processed images and padded token ids (and image ids)."""
    pixel_values = image_processor([example["image"] for example in examples], return_tensors="pt")["pixel_values"]
    text = tokenizer(
        [example["text"] for example in examples],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return {
        "pixel_values": pixel_values,
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "image_ids": torch.tensor([example["image_id"] for example in examples]),
    }


def plain_parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """LAVIS's groups: weight decay on matrices only (not on biases, norms or the 0-d temperature)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            plain = parameter.ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES
            (no_decay if plain else decay).append(parameter)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def run_plain_loop(
    model: Blip2ForPretraining,
    dataset: list[dict[str, Any]],
    tokenizer: BertTokenizerFast,
    image_processor: Any,
    workload: Workload,
    clock: StepClock,
) -> float:
    """(a): the straightforward loop. Returns the mean loss."""
    model.freeze_vision_encoder()  # requires_grad=False and eval mode for the encoder, as LAVIS's freeze_vit
    model.train()
    optimizer = torch.optim.AdamW(plain_parameter_groups(model), lr=LEARNING_RATE, betas=BETAS)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, workload.warmup_steps, workload.epochs * workload.steps_per_epoch, min_lr=MIN_LEARNING_RATE
    )
    loader = DataLoader(
        dataset,
        batch_size=workload.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=partial(
            plain_collate, image_processor=image_processor, tokenizer=tokenizer, max_length=workload.text_length
        ),
        generator=torch.Generator().manual_seed(workload.seed),
    )
    clock.setup_done()
    losses = []
    for _ in range(workload.epochs):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            clock.step_done()
            if len(losses) == workload.total_steps:
                return statistics.fmean(losses)
    return statistics.fmean(losses)


def run_trainer(
    model: Blip2ForPretraining,
    dataset: list[dict[str, Any]],
    tokenizer: BertTokenizerFast,
    image_processor: Any,
    workload: Workload,
    clock: StepClock,
    cached: bool,
) -> float:
    """(b), or (c) with `cached`: `Blip2Trainer` as `examples/pretrain_stage1.py` sets it up. Returns the mean loss."""
    train_dataset: Any = dataset
    if cached:
        model.freeze_vision_encoder()
        clock.vision_timer.on_exit = clock.caching_batch_done  # one turn per encoder batch
        train_dataset = FrozenFeatureDataset(
            dataset,
            model.vision_model,
            image_processor,
            image_id_column="image_id",
            batch_size=workload.batch_size,
            progress=False,
        )
        clock.vision_timer.on_exit = None
    collator = Blip2ImageTextCollator(
        image_processor, tokenizer, max_length=workload.text_length, image_id_column="image_id", seed=workload.seed
    )
    with tempfile.TemporaryDirectory(prefix="blip2-benchmark-training-") as output_dir:
        args = Blip2TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=workload.batch_size,
            num_train_epochs=workload.epochs,
            max_steps=workload.max_steps or -1,
            warmup_steps=workload.warmup_steps,
            learning_rate=LEARNING_RATE,
            min_lr=MIN_LEARNING_RATE,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            weight_decay=WEIGHT_DECAY,
            dataloader_num_workers=0,
            dataloader_drop_last=True,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=workload.seed,
        )
        trainer = Blip2Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=collator,
            callbacks=[ClockCallback(clock)],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        output = trainer.train()  # the callback ends the setup at `on_train_begin`
    return float(output.training_loss)


def run_variant(
    name: str,
    model: Blip2ForPretraining,
    dataset: list[dict[str, Any]],
    tokenizer: BertTokenizerFast,
    image_processor: Any,
    workload: Workload,
    baton: Baton,
) -> RunTimes:
    clock = StepClock(name, baton, workload.total_steps, VisionTimer(model))
    clock.start()
    try:
        if name == PLAIN:
            loss = run_plain_loop(model, dataset, tokenizer, image_processor, workload, clock)
        else:
            loss = run_trainer(model, dataset, tokenizer, image_processor, workload, clock, cached=name == CACHED)
    finally:
        baton.leave(name)
    clock.times.whole_s = baton.held_s.get(name, 0.0)
    clock.times.mean_loss = loss
    if len(clock.times.step_s) != workload.total_steps:
        raise RuntimeError(f"{LABELS[name]} ran {len(clock.times.step_s)} steps, not {workload.total_steps}")
    return clock.times


def run_round(
    model: Blip2ForPretraining,
    dataset: list[dict[str, Any]],
    tokenizer: BertTokenizerFast,
    image_processor: Any,
    workload: Workload,
    order: Sequence[str],
) -> dict[str, RunTimes]:
    """Trains a fresh copy of `model` with each variant, in lock-step (one step each, in `order`)."""
    baton = Baton(order)
    copies = {name: copy.deepcopy(model) for name in order}
    results: dict[str, RunTimes] = {}
    errors: list[BaseException] = []

    def target(name: str) -> None:
        try:
            results[name] = run_variant(name, copies[name], dataset, tokenizer, image_processor, workload, baton)
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(name,), name=f"variant-{name}", daemon=True) for name in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# -- equivalence of the cached path ----------------------------------------------------------------------------------
@torch.no_grad()
def check_cache_equivalence(
    model: Blip2ForPretraining,
    dataset: list[dict[str, Any]],
    tokenizer: BertTokenizerFast,
    image_processor: Any,
    text_length: int,
) -> float:
    """Max |difference| of the three losses between the encoder path and the cached features (eval mode, fixed
    hard negatives): the cache must not change what is trained."""
    model = copy.deepcopy(model).eval()
    model.freeze_vision_encoder()
    examples = dataset[:4]
    batch = plain_collate(examples, image_processor, tokenizer, max_length=text_length)
    cached = FrozenFeatureDataset(examples, model.vision_model, image_processor, progress=False)
    features = torch.stack([cached[index]["frozen_image_features"] for index in range(len(examples))])
    negatives = (torch.arange(4).roll(1), torch.arange(4).roll(-1))
    common = {key: batch[key] for key in ("input_ids", "attention_mask", "image_ids")}
    direct = model(**common, pixel_values=batch["pixel_values"], hard_negatives=negatives)
    from_cache = model(**common, frozen_image_features=features, hard_negatives=negatives)
    return max(
        float((getattr(direct, name) - getattr(from_cache, name)).abs())
        for name in ("loss_itc", "loss_itm", "loss_itg")
    )


# -- peak memory (runs in the worker processes) ----------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryJob:
    variant: str
    setup: Setup
    threads: int | None
    pin_mmap_threshold: bool


def measure_peak_memory(job: MemoryJob) -> MemoryResult:
    """Builds the model and data, warms up, then measures one training run of `setup.workload.max_steps` steps."""
    quiet_transformers()
    configure_threads(job.threads)
    pinned = job.pin_mmap_threshold and _pin_mmap_threshold()
    tokenizer = build_tokenizer()
    model = build_model(job.setup, tokenizer)
    dataset = build_dataset(job.setup.workload)
    image_processor = blip2_image_processor(job.setup.size.image_size)

    workload = job.setup.workload
    # Warm-up: one step of the same variant on a copy, so that lazy initialisation (imports, thread pools, kernel
    # caches) is not counted; the copy is freed before the baseline is taken.
    warmup = Workload(**{**asdict(workload), "num_images": workload.batch_size, "epochs": 1, "max_steps": 1})
    run_variant(
        job.variant,
        copy.deepcopy(model),
        dataset[: workload.batch_size],
        tokenizer,
        image_processor,
        warmup,
        NoBaton(),
    )

    def run() -> None:
        run_variant(job.variant, model, dataset, tokenizer, image_processor, workload, NoBaton())

    result = _peak_rss_increase(run)
    if pinned:
        return MemoryResult(result.peak_increase_mib, result.baseline_mib, result.source + ", mmap threshold pinned")
    return result


def measure_memory(jobs: list[MemoryJob]) -> list[MemoryResult]:
    """Runs every job in a fresh process, one at a time."""
    return measure_in_fresh_processes(measure_peak_memory, jobs, WORKER_PRELOAD)


# -- report ----------------------------------------------------------------------------------------------------------
def fastest_decile(values: Sequence[float]) -> float:
    """The 10th percentile: the steps that the machine's other load disturbed least."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[0]


STATISTICS: dict[str, Callable[[Sequence[float]], float]] = {
    "median": statistics.median,
    "fastest decile": fastest_decile,
}


@dataclass(frozen=True)
class Estimate:
    """Steady-state seconds under one statistic of the timed turns, pooled over the rounds (first steps left out)."""

    statistic: str
    step_s: dict[str, float]
    vision_s: dict[str, float]  # encoder time per step, (a) and (b)
    caching_batch_s: float

    def samples_per_s(self, variant: str, workload: Workload) -> float:
        return workload.batch_size / self.step_s[variant]

    def ratio(self, variant: str) -> float:
        """Throughput of `variant` over that of (a)."""
        return self.step_s[PLAIN] / self.step_s[variant]

    def vision_share(self, variant: str) -> float:
        return self.vision_s[variant] / self.step_s[variant]

    def cached_with_caching_s(self, epochs: int, workload: Workload) -> float:
        """Seconds (c) takes for `epochs` epochs, the caching (one encoder batch per step of an epoch) included."""
        return workload.steps_per_epoch * (self.caching_batch_s + epochs * self.step_s[CACHED])

    def cached_with_caching_ratio(self, epochs: int, workload: Workload) -> float:
        plain_s = epochs * workload.steps_per_epoch * self.step_s[PLAIN]
        return plain_s / self.cached_with_caching_s(epochs, workload)


def estimate(rounds: list[dict[str, RunTimes]], statistic: str) -> Estimate:
    aggregate = STATISTICS[statistic]

    def pooled(variant: str, attribute: str, skip_first: bool = True) -> list[float]:
        return [value for times in rounds for value in getattr(times[variant], attribute)[int(skip_first) :]]

    return Estimate(
        statistic=statistic,
        step_s={variant: aggregate(pooled(variant, "step_s")) for variant in VARIANTS},
        vision_s={variant: aggregate(pooled(variant, "vision_s")) for variant in (PLAIN, TRAINER)},
        caching_batch_s=aggregate(pooled(CACHED, "caching_batch_s", skip_first=False)),
    )


@dataclass(frozen=True)
class WholeRun:
    """Medians over the rounds of what each variant's run took, as timed (not steady-state)."""

    whole_s: dict[str, float]
    caching_s: float
    setup_s: dict[str, float]
    first_step_s: dict[str, float]
    mean_loss: dict[str, float]


def whole_run(rounds: list[dict[str, RunTimes]]) -> WholeRun:
    def median_of(variant: str, get: Callable[[RunTimes], float]) -> float:
        return statistics.median(get(times[variant]) for times in rounds)

    return WholeRun(
        whole_s={variant: median_of(variant, lambda times: times.whole_s) for variant in VARIANTS},
        caching_s=median_of(CACHED, lambda times: sum(times.caching_batch_s)),
        setup_s={variant: median_of(variant, lambda times: times.setup_s) for variant in VARIANTS},
        first_step_s={variant: median_of(variant, lambda times: times.step_s[0]) for variant in VARIANTS},
        mean_loss={variant: median_of(variant, lambda times: times.mean_loss) for variant in VARIANTS},
    )


def paired_ratios(rounds: list[dict[str, RunTimes]], variant: str) -> tuple[float, float, float]:
    """Median and quartiles of (a)'s step time over `variant`'s in the same cycle of the lock-step."""
    ratios = [
        plain / other
        for times in rounds
        for plain, other in zip(times[PLAIN].step_s[1:], times[variant].step_s[1:], strict=True)
    ]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    first, middle, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return middle, first, third


def format_ratio(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


def throughput_table(estimates: list[Estimate], workload: Workload, memory: dict[str, MemoryResult] | None) -> str:
    header = "| variant | " + " | ".join(f"samples/s ({item.statistic} step) | vs (a)" for item in estimates)
    lines = [header + " | peak memory above baseline (MiB) |", "|---|" + "---:|" * (2 * len(estimates) + 1)]
    rows = [
        (LABELS[PLAIN], PLAIN, False),
        (LABELS[TRAINER], TRAINER, False),
        (f"{LABELS[CACHED]}: training steps", CACHED, False),
        (f"{LABELS[CACHED]}: incl. caching, over {workload.epochs} epochs", CACHED, True),
    ]
    samples = workload.num_images * workload.epochs
    for label, variant, with_caching in rows:
        cells = []
        for item in estimates:
            if with_caching:
                rate = samples / item.cached_with_caching_s(workload.epochs, workload)
                ratio = item.cached_with_caching_ratio(workload.epochs, workload)
            else:
                rate, ratio = item.samples_per_s(variant, workload), item.ratio(variant)
            cells += [f"{rate:.2f}", format_ratio(ratio)]
        peak = f"{memory[variant].peak_increase_mib:.0f}" if memory else "not measured"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {peak} |")
    return "\n".join(lines)


def whole_run_table(run: WholeRun, workload: Workload) -> str:
    samples = workload.num_images * workload.epochs
    lines = [
        "| variant | whole run (s) | caching (s) | setup incl. `train()` start-up (s) | first step (s) "
        f"| samples/s over the {samples} samples | vs (a) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        whole = run.whole_s[variant]
        caching = f"{run.caching_s:.1f}" if variant == CACHED else "-"
        lines.append(
            f"| {LABELS[variant]} | {whole:.1f} | {caching} | {run.setup_s[variant]:.2f} "
            f"| {run.first_step_s[variant]:.2f} | {samples / whole:.2f} | {format_ratio(run.whole_s[PLAIN] / whole)} |"
        )
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modeling_blip2": modeling_blip2.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "vision_dtype": args.vision_dtype,
    }


def parameter_counts(model: Blip2ForPretraining) -> dict[str, int]:
    vision = sum(parameter.numel() for parameter in model.vision_model.parameters())
    return {"vision_encoder": vision, "rest (trainable)": sum(p.numel() for p in model.parameters()) - vision}


# -- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test (about 20 s)")
    parser.add_argument("--rounds", type=int, default=None, help="lock-step rounds (default 3; 1 with --quick)")
    parser.add_argument("--num-images", type=int, default=None, help="distinct images (default 48; 16 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs over them (default 3; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step (default 8; 4 with --quick)")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps of each peak-memory run")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--vision-dtype", choices=sorted(DTYPES), default="float32", help="of the frozen encoder")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--adaptive-mmap-threshold",
        action="store_true",
        help="leave glibc's adaptive mmap threshold on in the memory workers",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"rounds": 1 if quick else 3, "num_images": 16 if quick else 48, "epochs": 2 if quick else 3}
    defaults["batch_size"] = 4 if quick else 8
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.rounds, args.num_images, args.epochs, args.batch_size, args.memory_steps) < 1:
        parser.error("--rounds, --num-images, --epochs, --batch-size and --memory-steps must be >= 1")
    if args.num_images % args.batch_size or args.num_images // args.batch_size * args.epochs < 2:
        parser.error("--num-images must be a multiple of --batch-size, with at least 2 steps in all")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_transformers()
    configure_threads(args.threads)
    size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    workload = Workload(num_images=args.num_images, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed)
    setup = Setup(size, workload, args.vision_dtype)
    tokenizer = build_tokenizer()
    model = build_model(setup, tokenizer)
    dataset = build_dataset(workload)
    image_processor = blip2_image_processor(size.image_size)
    counts = parameter_counts(model)
    print(
        f"threads={torch.get_num_threads()} vision_dtype={args.vision_dtype} quick={args.quick}; parameters: "
        + ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in counts.items())
    )
    print(
        f"data: {workload.num_images} images x {workload.epochs} epochs, batch {workload.batch_size} "
        f"({workload.total_steps} steps per run), {args.rounds} round(s); "
        f"feature cache {cache_size_mib(setup):.1f} MiB"
    )
    cache_diff = check_cache_equivalence(model, dataset, tokenizer, image_processor, workload.text_length)
    print(f"cached features reproduce the encoder path: max |loss difference| = {cache_diff:.2e}")

    rounds = []
    for index in range(args.rounds):
        order = VARIANTS[index % 3 :] + VARIANTS[: index % 3]
        rounds.append(run_round(model, dataset, tokenizer, image_processor, workload, order))
        gc.collect()
        median_ms = {name: statistics.median(times.step_s[1:]) * 1e3 for name, times in rounds[-1].items()}
        print(
            f"round {index + 1}/{args.rounds} (order {''.join(order)}): median step "
            + ", ".join(f"({name}) {median_ms[name]:.0f} ms" for name in VARIANTS)
        )
    estimates = [estimate(rounds, statistic) for statistic in STATISTICS]
    run = whole_run(rounds)

    memory = None
    if not args.skip_memory:
        memory_setup = Setup(size, Workload(**{**asdict(workload), "max_steps": args.memory_steps}), args.vision_dtype)
        jobs = [
            MemoryJob(variant, memory_setup, args.threads, not args.adaptive_mmap_threshold) for variant in VARIANTS
        ]
        memory = dict(zip(VARIANTS, measure_memory(jobs), strict=True))

    print(f"\n{throughput_table(estimates, workload, memory)}\n")
    print(f"{whole_run_table(run, workload)}\n")
    for variant in (PLAIN, TRAINER):
        shares = " / ".join(f"{item.vision_share(variant):.0%}" for item in estimates)
        print(f"vision encoder share of a step of ({variant}): {shares} ({' / '.join(STATISTICS)})")
    for variant in (TRAINER, CACHED):
        middle, first, third = paired_ratios(rounds, variant)
        print(f"paired per-step ratio (a)/({variant}): median {middle:.2f}, quartiles {first:.2f}-{third:.2f}")
    epoch_counts = (1, 3, 10, 30)
    for item in estimates:
        projected = ", ".join(
            f"{epochs}: {item.cached_with_caching_ratio(epochs, workload):.2f}" for epochs in epoch_counts
        )
        print(f"(c) incl. caching vs (a) by epochs ({item.statistic}): {projected}; limit {item.ratio(CACHED):.2f}")
    targets = {
        f"{name} ({item.statistic})": item.ratio(variant) >= threshold
        for item in estimates
        for name, variant, threshold in (("(b)/(a) >= 1.0", TRAINER, 1.0), ("(c)/(a) >= 3", CACHED, 3.0))
    }
    note = " (--quick: a smoke test, its encoder does not dominate)" if args.quick else ""
    print("targets: " + ", ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in targets.items()) + note)
    print("mean training loss: " + ", ".join(f"({name}) {run.mean_loss[name]:.3f}" for name in VARIANTS))
    if memory:
        print(f"memory read from: {'; '.join(sorted({result.source for result in memory.values()}))}")
    elapsed = time.perf_counter() - started
    print(f"wall time: {elapsed:.1f} s (after start-up and imports)")
    if args.output_json:
        report = {
            "environment": environment(args),
            "model_size": asdict(size),
            "parameters": counts,
            "workload": asdict(workload),
            "rounds": args.rounds,
            "cache_size_mib": cache_size_mib(setup),
            "cache_max_abs_loss_diff": cache_diff,
            "steady_state": [
                {
                    **asdict(item),
                    "samples_per_s": {name: item.samples_per_s(name, workload) for name in VARIANTS},
                    "ratio_vs_a": {name: item.ratio(name) for name in VARIANTS},
                    "cached_incl_caching_ratio_by_epochs": {
                        epochs: item.cached_with_caching_ratio(epochs, workload) for epochs in epoch_counts
                    },
                }
                for item in estimates
            ],
            "paired_ratio_vs_a": {name: paired_ratios(rounds, name) for name in (TRAINER, CACHED)},
            "whole_run": asdict(run),
            "targets_met": targets,
            "per_round": [{name: asdict(times) for name, times in by_variant.items()} for by_variant in rounds],
            "memory": {name: asdict(result) for name, result in memory.items()} if memory else None,
            "memory_steps": args.memory_steps,
            "wall_time_s": elapsed,
        }
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
