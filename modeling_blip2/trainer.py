"""Training policy for BLIP-2: training arguments and the Trainer.

The model computes; this module decides what to optimise and how (loss weights and schedule, parameter groups,
layer-wise LR decay, frozen parts, several processes). The data side lives in `collators` (augmentation,
tokenization), `streaming` (streams, sample keys, resume position) and `feature_cache` (cached image features).
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import ParallelMode
from transformers.utils import logging

from .collators import IGNORE_LABEL
from .collators import Blip2CaptionCollator as Blip2CaptionCollator  # re-exported (the package's lazy names)
from .collators import Blip2ImageTextCollator as Blip2ImageTextCollator
from .collators import RandomResizedCropFlip as RandomResizedCropFlip
from .end_token import EndTokenFromModel, model_end_token_ids, unwrap_model
from .feature_cache import FrozenFeatureDataset as FrozenFeatureDataset  # re-exported: the collators read its examples
from .losses import itg_num_predicted_tokens, token_share_across_ranks
from .pretraining import Blip2ForPretraining
from .streaming import (
    STREAM_KEYS,
    StreamPosition,
    _is_map_style,
    _is_stream,
    _SampleKeyedDataset,
    _SampleKeyedStream,
    _StreamKeyCollator,
)

LOSS_NAMES = ("itc", "itm", "itg")
logger = logging.get_logger(__name__)
# Parameters that never get weight decay besides biases and norms (ndim <= 1): the contrastive temperature.
NO_DECAY_NAMES = ("temp",)


def _every_help(name: str, description: str) -> str:
    return (
        f"compute the {description} loss only on optimiser steps (global_step, from 0) divisible by this, at "
        f"this times {name}_weight; 1 (default): every step, as in the paper. A departure from the paper that saves "
        "compute at small budgets (ITM is about half a step); eval always computes every term at its plain weight"
    )


@dataclass
class Blip2TrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's defaults and BLIP-2's training knobs.

    Defaults (paper / LAVIS stage 1): AdamW betas (0.9, 0.98), weight decay 0.05 (never on biases, norms or the
    temperature), peak LR 1e-4 with linear warm-up then cosine decay to `min_lr` 1e-5.

    Objective schedule (a departure from the paper, off by default): `itc_every`, `itm_every`, `itg_every` = k
    computes that stage-1 term only on the optimiser steps whose index (`state.global_step`, counted from 0: the same
    for every micro-batch of a gradient-accumulation step, and restored on resume) is a multiple of k, at k times its
    weight. The paper computes all three losses on every step; at small budgets ITM (the Q-Former on the positives
    and two sets of hard negatives) is about half of a step's compute, and computing it every k-th step buys more
    steps of ITC and ITG. The rescaling keeps the term's total weight over k steps, hence its expected gradient, equal
    to the unscheduled run's (exactly so for plain SGD; AdamW's normalisation and `max_grad_norm` clipping see one
    larger gradient instead of k smaller ones, so there the match is approximate).

    Evaluation always computes every term at its plain weight, so `eval_loss` stays comparable across schedules. The
    logged training `loss` is the scheduled step loss (it jumps on the steps that add a scheduled term); the logged
    `loss_itc` / `loss_itm` / `loss_itg` are means over the steps that computed them. Rules: a term with weight 0
    stays off whatever its k; at least one term with a non-zero weight keeps k = 1 (otherwise step 1 would compute
    nothing). Under DDP the parameters a step uses change with the schedule, which needs `find_unused_parameters`:
    transformers' default, except with activation checkpointing, where `Blip2Trainer` asks for an explicit
    `ddp_find_unused_parameters=True`; `ddp_find_unused_parameters=False` and `ddp_static_graph=True` are refused.
    Stage 1 only: `Blip2Trainer` refuses a schedule for a `Blip2ForConditionalGeneration`.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on biases, norms, temp)"})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (paper: 0.98)"})
    warmup_steps: float = field(default=2000, metadata={"help": "linear warm-up steps (paper: 2k)"})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "cosine decay to min_lr"})
    min_lr: float = field(default=1e-5, metadata={"help": "floor of the cosine schedule"})
    itc_weight: float = field(default=1.0, metadata={"help": "weight of the image-text contrastive loss"})
    itm_weight: float = field(default=1.0, metadata={"help": "weight of the image-text matching loss"})
    itg_weight: float = field(default=1.0, metadata={"help": "weight of the image-grounded generation loss"})
    itc_every: int = field(default=1, metadata={"help": _every_help("itc", "image-text contrastive")})
    itm_every: int = field(default=1, metadata={"help": _every_help("itm", "image-text matching")})
    itg_every: int = field(default=1, metadata={"help": _every_help("itg", "image-grounded generation")})
    seeded_itm_negatives: bool = field(
        default=True,
        metadata={
            "help": "draw each training step's ITM hard negatives from a generator seeded by (seed, step, "
            "micro-batch) over the whole gathered batch: the paper's distribution (softmax of the similarities), "
            "but W processes x B samples draw exactly what 1 process x W*B draws, and a resumed run draws what the "
            "uninterrupted one did. --no_seeded_itm_negatives draws from torch's global generator, as LAVIS does"
        },
    )
    layer_wise_lr_decay: float | None = field(
        default=None,
        metadata={"help": "scale each trainable layer's LR by decay ** (depth from the top); None to disable"},
    )
    freeze_vision_encoder: bool = field(
        default=True, metadata={"help": "freeze the image encoder (its post-LayerNorm stays trainable)"}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "the collators read raw columns"})
    predict_with_generate: bool = field(
        default=False,
        metadata={
            "help": "evaluate / predict a conditional-generation model by generating text; compute_metrics then "
            "receives decoded strings (see caption_metrics.CaptionMetrics and vqa.VqaMetrics)"
        },
    )
    generation_max_new_tokens: int | None = field(
        default=None, metadata={"help": "max_new_tokens of evaluation-time generation (default: generation_config)"}
    )
    generation_num_beams: int | None = field(
        default=None, metadata={"help": "num_beams of evaluation-time generation (default: generation_config)"}
    )

    def __post_init__(self) -> None:
        if self.lr_scheduler_type == "cosine_with_min_lr":
            kwargs = dict(self.lr_scheduler_kwargs or {})
            kwargs.setdefault("min_lr", self.min_lr)
            self.lr_scheduler_kwargs = kwargs
        super().__post_init__()
        weights = (self.itc_weight, self.itm_weight, self.itg_weight)
        if any(weight < 0 for weight in weights) or not any(weights):
            raise ValueError(f"loss weights must be >= 0 and not all zero, got itc/itm/itg = {weights}")
        self._check_objective_schedule()
        if self.layer_wise_lr_decay is not None and not 0 < self.layer_wise_lr_decay <= 1:
            raise ValueError(f"layer_wise_lr_decay must be in (0, 1], got {self.layer_wise_lr_decay}")
        for name in ("generation_max_new_tokens", "generation_num_beams"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    @property
    def generation_kwargs(self) -> dict[str, int]:
        """The `generate` arguments of evaluation-time generation that these arguments set."""
        kwargs = {"max_new_tokens": self.generation_max_new_tokens, "num_beams": self.generation_num_beams}
        return {name: value for name, value in kwargs.items() if value is not None}

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weight of each stage-1 term."""
        return {"itc": self.itc_weight, "itm": self.itm_weight, "itg": self.itg_weight}

    @property
    def loss_every(self) -> dict[str, int]:
        """Every how many optimiser steps each stage-1 term is computed (1: every step, as in the paper)."""
        return {"itc": self.itc_every, "itm": self.itm_every, "itg": self.itg_every}

    @property
    def has_objective_schedule(self) -> bool:
        """Whether some term with a non-zero weight is computed less often than every step."""
        return any(self.loss_every[name] > 1 for name, weight in self.loss_weights.items() if weight > 0)

    def loss_weights_at(self, step: int | None = None) -> dict[str, float]:
        """The stage-1 terms to compute on optimiser step `step` (0-based `state.global_step`) and their weights:
        every term with a non-zero weight whose `*_every` divides `step`, at `weight * every`. None (evaluation):
        every term with a non-zero weight, at its plain weight."""
        weights, every = self.loss_weights, self.loss_every
        if step is None:
            return {name: weight for name, weight in weights.items() if weight > 0}
        return {
            name: weight * every[name] for name, weight in weights.items() if weight > 0 and step % every[name] == 0
        }

    def _check_objective_schedule(self) -> None:
        for name, value in self.loss_every.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{name}_every must be a positive integer (compute {name} every that many optimiser steps), "
                    f"got {value!r}"
                )
        if not self.has_objective_schedule:
            return
        enabled = [name for name, weight in self.loss_weights.items() if weight > 0]
        if all(self.loss_every[name] > 1 for name in enabled):
            settings = ", ".join(f"{name}_every={self.loss_every[name]}" for name in enabled)
            raise ValueError(
                f"with {settings} (the terms with a non-zero weight), optimiser step 1 would compute no loss term: "
                f"keep at least one of them at 1 (e.g. {enabled[0]}_every=1)"
            )
        if self.ddp_find_unused_parameters is False or self.ddp_static_graph:
            flag = (
                "ddp_find_unused_parameters=False"
                if self.ddp_find_unused_parameters is False
                else "ddp_static_graph=True"
            )
            raise ValueError(
                f"an objective schedule ({self._schedule_text()}) changes which parameters a step uses, which "
                f"distributed data parallel only allows with find_unused_parameters and no static graph: drop {flag}"
            )

    def _schedule_text(self) -> str:
        return ", ".join(f"{name}_every={value}" for name, value in self.loss_every.items() if value != 1)


def _accumulate(sums: dict[str, Any], counts: dict[str, int], name: str, value: torch.Tensor) -> None:
    # Summed on the device: converting to a Python float here would synchronise with the GPU at every step.
    sums[name] = sums.get(name, 0.0) + value.detach()
    counts[name] = counts.get(name, 0) + 1


class Blip2Trainer(Trainer):
    """A `Trainer` that composes the stage-1 losses and owns BLIP-2's optimisation policy.

    - Loss: `itc_weight * ITC + itm_weight * ITM + itg_weight * ITG`, only the terms with a non-zero weight are
      computed; each term (and the temperature) is logged as a mean over the logging interval. With an objective
      schedule (`itm_every` etc., a departure from the paper, see `Blip2TrainingArguments`) a training step computes
      only the terms due on it, at `weight * every`; evaluation always computes every term at its plain weight.
    - Parameter groups: no weight decay on biases, norms and `temp`; optional layer-wise LR decay applied through
      per-group learning rates, which the LR scheduler scales (it never overwrites them).
    - Frozen parts: the image encoder is frozen when `args.freeze_vision_encoder` (post-LayerNorm trainable) and
      frozen modules stay in eval mode under `model.train()`.
    - Gradient accumulation: the terms are batch means, so each micro-batch loss is divided by the accumulation steps.
    - Several processes: ITC and ITM are means over equal local batches with cross-rank negatives; ITG, a mean over
      the rank's tokens, is weighted by the rank's share of all ranks' tokens (with `average_tokens_across_devices`,
      transformers' default), and `seeded_itm_negatives` draws the hard negatives independently of the split. With
      both, W processes x B samples follow the gradients of 1 process x W*B (dropout and augmentation aside).

    Stage-2 and fine-tuning models (`Blip2ForConditionalGeneration`) train on their LLM loss, with the same
    optimiser policy; `Blip2CaptionCollator` builds their batches.
    """

    def __init__(self, model: nn.Module | None = None, args: Blip2TrainingArguments | None = None, **kwargs: Any):
        if args is not None and not isinstance(args, Blip2TrainingArguments):
            raise TypeError(f"Blip2Trainer needs Blip2TrainingArguments, got {type(args).__name__}")
        if model is not None and args is not None and args.freeze_vision_encoder:
            model.freeze_vision_encoder()
        if model is not None:
            _check_collator_fits_model(kwargs.get("data_collator"), model)
            if args is not None and not _is_stage1(model) and any(every != 1 for every in args.loss_every.values()):
                raise ValueError(
                    f"{args._schedule_text()} schedules stage-1 loss terms, but the model is "
                    f"{type(unwrap_model(model)).__name__}, which trains on its LLM loss: leave itc_every, itm_every "
                    "and itg_every at 1"
                )
            if args is not None:
                _check_schedule_fits_ddp(args, model, args.parallel_mode == ParallelMode.DISTRIBUTED)
            if args is not None and args.predict_with_generate and _is_stage1(model):
                raise ValueError(
                    "predict_with_generate evaluates a Blip2ForConditionalGeneration by generating text; a stage-1 "
                    "Blip2ForPretraining evaluates its losses (eval_loss, eval_loss_itc/itm/itg): leave it False"
                )
        super().__init__(model=model, args=args, **kwargs)
        _check_parallel_setup(self.args, self.is_fsdp_enabled, self.accelerator.distributed_type)
        self._loss_sums: dict[str, Any] = {}
        self._loss_counts: dict[str, int] = {}
        self._eval_sums: dict[str, Any] = {}
        self._eval_counts: dict[str, int] = {}
        self._generation_overrides: dict[str, Any] = {}
        self._sample_keyed: _SampleKeyedDataset | None = None
        self._stream: _SampleKeyedStream | None = None
        self._special_tokens: dict[str, Any] | None = None
        self._hard_negative_draws = (-1, -1)  # (optimiser step, micro-batch index) of the last seeded ITM draw
        self.add_callback(_Blip2TrainingHooks(self))
        if self.args.predict_with_generate and self.compute_metrics is not None:
            end_ids = model_end_token_ids(self.model) if self.model is not None else []
            self.compute_metrics = _DecodedMetrics(self.compute_metrics, self._decoding_tokenizer(), end_ids)

    # -- loss -------------------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not _is_stage1(model):
            # Stage 2 / fine-tuning: the LLM's own loss (token-normalised across accumulation steps by Trainer).
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Training follows the objective schedule of the optimiser step (global_step: every micro-batch of an
        # accumulation step agrees, and a resumed run restores it); evaluation computes every term at its plain weight.
        weights = self.args.loss_weights_at(self.state.global_step if model.training else None)
        enabled = tuple(name for name in LOSS_NAMES if name in weights)
        # A global batch without a hard negative (the last batch of an epoch may hold one image) skips ITM rather
        # than stopping the run; every rank agrees, the decision is on the gathered batch.
        # The ITG head runs on the predicted positions only: the loss needs no logits over the padding.
        seed = self._hard_negative_seed() if model.training and self.args.seeded_itm_negatives else None
        outputs = model(
            **inputs, losses=enabled, itm_without_negatives="skip", return_itg_logits=False, hard_negative_seed=seed
        )
        terms = {name: getattr(outputs, f"loss_{name}") for name in enabled}
        if model.training and "itg" in terms and self.args.average_tokens_across_devices:
            # ITG is a mean over this rank's tokens: weighted by the rank's share of all ranks' tokens, the averaged
            # gradient is that of the token mean over the global batch, as one process computes it on that batch.
            mask = inputs.get("attention_mask")
            tokens = itg_num_predicted_tokens(torch.ones_like(inputs["input_ids"]) if mask is None else mask)
            weights = {**weights, "itg": weights["itg"] * token_share_across_ranks(tokens).to(terms["itg"].dtype)}
        loss = sum(weights[name] * term for name, term in terms.items())
        sums, counts = (self._loss_sums, self._loss_counts) if model.training else (self._eval_sums, self._eval_counts)
        for name, term in terms.items():
            if name == "itm" and outputs.itm_logits is None:
                continue  # skipped: not a measurement of the ITM loss
            _accumulate(sums, counts, f"loss_{name}", term)
        if outputs.temperature is not None:
            _accumulate(sums, counts, "temperature", outputs.temperature)
        return (loss, outputs) if return_outputs else loss

    def _hard_negative_seed(self) -> int:
        """The ITM hard-negative seed of this micro-batch: a function of (seed, optimiser step, micro-batch index in
        the step), the same on every rank, so a resumed run draws what the uninterrupted one drew."""
        step = self.state.global_step
        micro_batch = self._hard_negative_draws[1] + 1 if self._hard_negative_draws[0] == step else 0
        self._hard_negative_draws = (step, micro_batch)
        return random.Random(f"{self.args.seed}:itm:{step}:{micro_batch}").getrandbits(63)

    # -- training ---------------------------------------------------------------------------------------------------
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`. With a tokenizer or processor as `processing_class`, transformers would rewrite the
        model's EOS / BOS / PAD ids to the tokenizer's (and the saved checkpoint would keep them); the model's
        `generation_config` is the source of truth for BLIP-2's end token, so its ids are restored before the first
        step (see `end_token`)."""
        self._special_tokens = _special_token_ids(self.model)
        try:
            return super().train(*args, **kwargs)
        finally:
            self._special_tokens = None

    def get_train_dataloader(self) -> Any:
        """transformers' loader; a collator that draws random numbers (augmentation, prefix-LM split, caption
        choice) gets each example's (epoch, index), so that its draws are a function of (seed, epoch, sample) and
        resuming from a checkpoint reproduces the uninterrupted run exactly.

        A streaming dataset (a `datasets.IterableDataset` from `load_dataset(..., streaming=True)`, or any torch
        `IterableDataset` of dicts) is read through `_SampleKeyedStream`: examples are numbered in stream order
        within each pass (epoch), the pass number reaches the dataset's `set_epoch` (shard order and shuffle
        buffer), and the position reached is saved with every checkpoint so that a resumed run continues the
        stream where it stopped (see `_SampleKeyedStream` for exactly what is guaranteed). Needs `max_steps`
        (transformers refuses a stream without it)."""
        dataset = self.train_dataset
        self._stream = None
        if _is_stream(dataset):
            return self._stream_dataloader(dataset)
        if not getattr(self.data_collator, "draws_per_sample", False) or not _is_map_style(dataset):
            return super().get_train_dataloader()
        self._sample_keyed = _SampleKeyedDataset(dataset)
        self.train_dataset = self._sample_keyed
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = dataset

    def _stream_dataloader(self, dataset: Any) -> Any:
        # (transformers refuses a dataset without a length and without max_steps when the Trainer is made)
        if self.data_collator is None:
            raise ValueError("a streaming training dataset needs a data collator (Blip2ImageTextCollator, ...)")
        if (
            self.accelerator.num_processes > 1
            and self.accelerator.dispatch_batches is not False
            and not self.accelerator.split_batches
            and isinstance(self.data_collator, Blip2CaptionCollator)
            and not self.data_collator.pad_to_max_length
        ):
            raise ValueError(
                "with several processes, accelerate reads a stream on process 0 and concatenates one batch per "
                "process (dispatch_batches), which needs batches of one shape; Blip2CaptionCollator pads each batch "
                "to its longest caption: pass pad_to_max_length=True to the collator"
            )
        self._stream = _SampleKeyedStream(dataset, num_workers=self.args.dataloader_num_workers)
        if not any(isinstance(callback, StreamPosition) for callback in self.callback_handler.callbacks):
            self.add_callback(StreamPosition())
        collator = self.data_collator
        self.train_dataset = self._stream
        self.data_collator = _StreamKeyCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """transformers' skip of the batches trained before a checkpoint; a stream skips them itself (it resumes at
        the saved position, without collating what it skips), so its loader is returned as is."""
        if self._stream is not None:
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """transformers' batches of one optimiser step; from a stream, each batch's sample keys are taken out (the
        model never sees them) and advance the stream position that checkpoints save."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._stream is not None:
            keys = [batch.pop(STREAM_KEYS) for batch in batches if isinstance(batch, Mapping) and STREAM_KEYS in batch]
            if keys:
                self._stream_position().advance(torch.cat(keys), self.accelerator)
        return batches, num_items_in_batch

    def _stream_position(self) -> StreamPosition:
        # Looked up each time: transformers replaces stateful callbacks when it restores their state.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StreamPosition):
                return callback
        raise RuntimeError("training from a stream without its StreamPosition callback")

    def _resume_stream(self, state: Any) -> None:
        """At the start of `train()`: where the stream starts (the saved position when resuming)."""
        position = self._stream_position()
        if state.global_step == 0:
            position.reset(self._stream.num_workers)
            self._stream.start(epoch_offset=0, epoch=0, consumed=None)
            return
        saved = state.stateful_callbacks.get(StreamPosition.__name__)
        trainer_epoch = state.global_step // max(state.max_steps, 1)  # transformers' epochs_trained for a stream
        if saved is None:
            if not self.args.ignore_data_skip:
                raise ValueError(
                    f"resuming at step {state.global_step} from a checkpoint that holds no stream position (saved "
                    "without a streaming dataset, or by an older version): it cannot tell where the stream stopped. "
                    "Pass ignore_data_skip=True to restart the stream from its beginning"
                )
            position.reset(self._stream.num_workers)
            state.stateful_callbacks[StreamPosition.__name__] = position.state()
            self._stream.start(epoch_offset=-trainer_epoch, epoch=0, consumed=None)
            return
        attributes = saved.get("attributes", {})
        epoch, consumed = int(attributes.get("epoch", 0)), [int(n) for n in attributes.get("consumed", [])]
        if self.args.ignore_data_skip:  # the saved pass, from its beginning
            position.reset(self._stream.num_workers, epoch=epoch)
            self._stream.start(epoch_offset=epoch - trainer_epoch, epoch=epoch, consumed=None)
            return
        if len(consumed) != self._stream.num_workers:
            raise ValueError(
                f"the checkpoint's stream position is per DataLoader worker and holds {len(consumed)} of them (each "
                "worker reads its own shards; dataloader_num_workers=0 counts as one), but this run has "
                f"dataloader_num_workers={self.args.dataloader_num_workers}: resume with the same number of workers "
                "(or pass ignore_data_skip=True to restart that pass from its beginning)"
            )
        position.reset(self._stream.num_workers, epoch=epoch, consumed=consumed)
        self._stream.start(epoch_offset=epoch - trainer_epoch, epoch=epoch, consumed=consumed)

    # -- evaluation -------------------------------------------------------------------------------------------------
    def evaluate(self, *args: Any, **gen_kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate`; extra keyword arguments go to `generate` when `predict_with_generate` is set."""
        return self._with_generation_overrides(super().evaluate, args, gen_kwargs)

    def predict(self, *args: Any, **gen_kwargs: Any) -> Any:
        """`Trainer.predict`; extra keyword arguments go to `generate` when `predict_with_generate` is set. Its
        `predictions` are then the generated token ids (new tokens only, padded with -100 across batches)."""
        return self._with_generation_overrides(super().predict, args, gen_kwargs)

    def _with_generation_overrides(self, method: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        known = {"eval_dataset", "test_dataset", "ignore_keys", "metric_key_prefix"}
        self._generation_overrides = {name: value for name, value in kwargs.items() if name not in known}
        try:
            return method(*args, **{name: value for name, value in kwargs.items() if name in known})
        finally:
            self._generation_overrides = {}

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Stage 1 has no `labels`, so transformers would compute no loss: evaluate the composed stage-1 loss (and
        collect its terms for `evaluate`'s metrics). Conditional generation with `predict_with_generate`: the loss
        on the batch's labels, and the text generated from each row's prompt (its tokens before the first target)
        as predictions. Otherwise transformers' own step (the model's outputs other than the logits are ignored:
        `config.keys_to_ignore_at_inference`)."""
        if _is_stage1(model):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach().mean(), None, None
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        base = unwrap_model(model)
        loss = None
        with torch.no_grad():
            if "labels" in inputs:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, inputs).detach().mean()
            prompts = generation_prompts(inputs, base.config)
            generated = base.generate(**prompts, **{**self.args.generation_kwargs, **self._generation_overrides})
        if not base.config.is_encoder_decoder:  # decoder-only generate returns the prompt first
            generated = generated[:, prompts["input_ids"].shape[1] :]
        return loss, generated, inputs.get("labels")

    def _decoding_tokenizer(self) -> Any:
        for source in (self.processing_class, self.data_collator):
            tokenizer = getattr(source, "tokenizer", source if hasattr(source, "batch_decode") else None)
            if tokenizer is not None and hasattr(tokenizer, "batch_decode"):
                return tokenizer
        raise ValueError(
            "predict_with_generate with compute_metrics decodes the generated text, but neither processing_class "
            "nor the data collator has a tokenizer: pass processing_class=processor"
        )

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """transformers' loop; for stage 1 its metrics gain `{prefix}_loss_itc`, `_loss_itm`, `_loss_itg` and
        `_temperature` (means over the evaluation batches) beside `{prefix}_loss`, so that
        `metric_for_best_model="loss_itc"` and `load_best_model_at_end` work."""
        self._eval_sums, self._eval_counts = {}, {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, total in self._eval_sums.items():
            value = self.accelerator.gather(torch.as_tensor(total, device=self.args.device)[None])
            mean = float(value.sum()) / (self._eval_counts[name] * len(value))
            output.metrics[f"{metric_key_prefix}_{name}"] = round(mean, 6)
        self._eval_sums, self._eval_counts = {}, {}
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: flush the per-term means collected since the last one
            for name, total in self._loss_sums.items():
                logs[name] = round(float(total) / self._loss_counts[name], 6)
            self._loss_sums, self._loss_counts = {}, {}
        super().log(logs, *args, **kwargs)

    # -- optimiser ----------------------------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        warmup = self.args.get_warmup_steps(num_training_steps)
        if warmup >= num_training_steps:
            logger.warning(
                f"the learning-rate warm-up ({warmup} steps) is as long as the whole run ({num_training_steps} "
                "steps): the LR never reaches learning_rate and the model barely trains. Lower warmup_steps (the "
                "paper's 2000 suits its 250k-step runs) or train longer"
            )
        return super().create_scheduler(num_training_steps, optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(
                model, self.args.learning_rate, self.args.weight_decay, self.args.layer_wise_lr_decay
            )
            optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)  # every group carries its own
            self.optimizer = optimizer_class(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer


def _check_parallel_setup(args: TrainingArguments, fsdp_enabled: bool, distributed_type: Any) -> None:
    """Refuses the launches that would silently train otherwise than asked: processes started by torchrun /
    accelerate launch without a process group (each would train alone on the whole data), and `fsdp` that accelerate
    did not set up (it shards across GPUs or other accelerators only; CPU processes get DDP instead)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size == 1:
        raise ValueError(
            f"this process is one of {launched} (WORLD_SIZE={launched}, set by torchrun / accelerate launch), but no "
            "process group was set up, so every process would train alone on the whole data set: on a machine "
            "without GPUs pass --use_cpu (use_cpu=True), which joins the processes on the CPU with gloo"
        )
    if args.fsdp and not fsdp_enabled:
        raise ValueError(
            f"fsdp is set, but accelerate set up {distributed_type} instead of FSDP: it shards only across GPUs or "
            "other accelerators under torchrun / accelerate launch (CPU processes would run DDP, a single process "
            "would not shard): run on GPUs, or drop --fsdp"
        )


class _Blip2TrainingHooks(TrainerCallback):
    """What `Blip2Trainer` does at points of transformers' training loop that have no method to override."""

    def __init__(self, trainer: Blip2Trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # transformers' align_special_tokens ran at the start of train(): undo it, the model's ids are the truth.
        if self.trainer._special_tokens is not None:
            _restore_special_token_ids(self.trainer.model, self.trainer._special_tokens)
        # After the checkpoint's state is loaded, before the first epoch's iterator is made.
        if self.trainer._stream is not None:
            self.trainer._resume_stream(state)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Before the epoch's iterator is made (so non-persistent loader workers copy the new epoch too).
        if self.trainer._sample_keyed is not None:
            self.trainer._sample_keyed.epoch = math.floor((state.epoch or 0) + 1e-6)


SPECIAL_TOKEN_NAMES = ("eos_token_id", "bos_token_id", "pad_token_id")


def _special_token_ids(model: nn.Module | None) -> dict[str, Any]:
    """The special token ids of the model's text config and generation config."""
    return {
        where: {name: copy.deepcopy(getattr(config, name, None)) for name in SPECIAL_TOKEN_NAMES}
        for where, config in _special_token_configs(model).items()
    }


def _restore_special_token_ids(model: nn.Module, saved: dict[str, Any]) -> None:
    configs = _special_token_configs(model)
    restored = {}
    for where, values in saved.items():
        for name, value in values.items():
            if getattr(configs[where], name, None) != value:
                restored[f"{where}.{name}"] = value
                setattr(configs[where], name, value)
    if restored:
        logger.warning(
            f"kept the model's own special token ids {restored}, which transformers had aligned with the "
            "processing_class tokenizer: BLIP-2 ends generated text at generation_config.eos_token_id"
        )


def _special_token_configs(model: nn.Module | None) -> dict[str, Any]:
    """The configs holding the model's special token ids: its text config and its generation config."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    configs = {"config": text_config, "generation_config": getattr(base, "generation_config", None)}
    return {where: value for where, value in configs.items() if value is not None}


def _check_collator_fits_model(collator: Any, model: nn.Module) -> None:
    """The meeting point of collator and model: the right collator for the stage, and one end token."""
    if collator is None:
        return
    stage1 = _is_stage1(model)
    if stage1 and isinstance(collator, EndTokenFromModel):
        raise ValueError(
            f"{type(collator).__name__} builds LLM batches (input_ids and labels for Blip2ForConditionalGeneration), "
            "but the model is a stage-1 Blip2ForPretraining: use Blip2ImageTextCollator"
        )
    if not stage1 and isinstance(collator, Blip2ImageTextCollator):
        raise ValueError(
            f"Blip2ImageTextCollator builds stage-1 batches (Q-Former text, no LLM labels), but the model is "
            f"{type(unwrap_model(model)).__name__}: use Blip2CaptionCollator (captions) or Blip2VqaCollator (VQA)"
        )
    if isinstance(collator, EndTokenFromModel):
        collator.bind_model(model)


def generation_prompts(batch: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """The `generate` inputs of a training batch: its image inputs, and each row's prompt (decoder-only LLMs: the
    attended tokens before the row's first target, left-padded; encoder-decoder LLMs: the encoder input)."""
    image_keys = ("pixel_values", "frozen_image_features", "qformer_input_ids", "qformer_attention_mask")
    prompts = {name: batch[name] for name in image_keys if batch.get(name) is not None}
    input_ids = batch.get("input_ids")
    if input_ids is None:
        return prompts
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if config.is_encoder_decoder:
        return {**prompts, "input_ids": input_ids, "attention_mask": attention_mask}
    labels = batch.get("labels")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    rows = []
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        if labels is not None:
            targets = (labels[row] != IGNORE_LABEL).nonzero()
            if len(targets):
                keep &= positions < targets[0, 0]
        rows.append(input_ids[row][keep])
    width = max(len(row) for row in rows)
    if width == 0:
        return prompts  # no prompt at all: generate from the image alone
    pad = getattr(config.get_text_config(), "pad_token_id", None) or 0
    ids = input_ids.new_full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        if len(row):
            ids[index, width - len(row) :], mask[index, width - len(row) :] = row, 1
    return {**prompts, "input_ids": ids, "attention_mask": mask}


class _DecodedMetrics:
    """Wraps a `compute_metrics` so that it receives decoded strings: `EvalPrediction.predictions` the generated
    texts, `label_ids` the target texts (each cut at the model's end token, special tokens dropped, stripped)."""

    def __init__(self, compute_metrics: Any, tokenizer: Any, end_token_ids: Sequence[int] = ()) -> None:
        self.compute_metrics, self.tokenizer, self.end_token_ids = compute_metrics, tokenizer, set(end_token_ids)

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        predictions = prediction.predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        labels = prediction.label_ids
        return self.compute_metrics(
            EvalPrediction(
                predictions=self.decode(predictions),
                label_ids=None if labels is None else self.decode(labels),
                inputs=prediction.inputs,
                losses=prediction.losses,
            )
        )

    def decode(self, rows: Any) -> list[str]:
        texts = []
        for row in rows:
            ids = []
            for token in (int(token) for token in row):
                if token < 0:  # -100: label masking, or padding between batches
                    continue
                if token in self.end_token_ids and ids:
                    break
                ids.append(token)
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts


def _check_schedule_fits_ddp(args: Blip2TrainingArguments, model: nn.Module, distributed: bool) -> None:
    """An objective schedule changes which parameters a step uses, which DDP allows with `find_unused_parameters`;
    transformers turns that off by default under activation checkpointing, and DDP would fail at the second step."""
    if not (distributed and args.has_objective_schedule and args.ddp_find_unused_parameters is None):
        return
    if getattr(args, "activation_checkpointing", False) or getattr(
        unwrap_model(model), "is_activation_checkpointing", False
    ):
        raise ValueError(
            f"an objective schedule ({args._schedule_text()}) under distributed data parallel with activation "
            "checkpointing needs ddp_find_unused_parameters=True (transformers turns it off by default with "
            "checkpointing, and the parameters a step uses change with the schedule): pass it explicitly"
        )


def _is_stage1(model: nn.Module) -> bool:
    """Whether `model` (possibly wrapped by DDP / PEFT) computes the stage-1 terms."""
    return isinstance(unwrap_model(model), Blip2ForPretraining)


def parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, layer_wise_lr_decay: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: weight decay except on biases, norms and `temp`; optional layer-wise LR decay.

    With `layer_wise_lr_decay = d`, a parameter at depth `k` of a stack with `n` levels (embeddings / query tokens at
    0, layer `i` at `i + 1`, what follows the last layer at `n`) gets `learning_rate * d ** (n - k)`; the image
    encoder and the Q-Former are separate stacks. Each group records its `lr_scale`.
    """
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = parameter.ndim > 1 and name.split(".")[-1] not in NO_DECAY_NAMES
        scale = 1.0 if layer_wise_lr_decay is None else layer_wise_lr_decay ** _depth_from_top(model, name)
        grouped.setdefault((decays, scale), []).append(parameter)
    if not grouped:
        raise ValueError("the model has no trainable parameters")
    return [
        {
            "params": parameters,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": learning_rate * scale,
            "lr_scale": scale,
        }
        for (decays, scale), parameters in sorted(grouped.items(), key=lambda item: (-item[0][1], not item[0][0]))
    ]


def _depth_from_top(model: nn.Module, name: str) -> int:
    """How many levels below the top of its stack a parameter sits (0 = the top, e.g. heads and last layers)."""
    config = getattr(model, "config", None)
    parts = name.split(".")
    if parts[0] == "vision_model" and config is not None:
        levels = getattr(config.vision_config, "num_hidden_layers", 0) + 1
        if parts[1] == "encoder":  # our own encoder's layers (another family's tower is `backbone`: frozen)
            return levels - (int(parts[3]) + 1)
        return levels if parts[1] in ("embeddings", "pre_layernorm") else 0
    if config is not None and hasattr(config, "qformer_config"):
        levels = config.qformer_config.num_hidden_layers + 1
        if parts[0] == "qformer" and parts[1] == "encoder":
            return levels - (int(parts[3]) + 1)
        if parts[0] in ("query_tokens", "embeddings") or (parts[0] == "qformer" and parts[1] == "layernorm"):
            return levels
    return 0
