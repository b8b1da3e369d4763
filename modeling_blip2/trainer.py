"""Training policy for BLIP-2: training arguments, the Trainer, image-text collation and a frozen-feature cache.

The model computes; this module decides what to optimise and how (loss weights, parameter groups, layer-wise LR
decay, frozen parts), and feeds the data (augmentation, tokenization, cached image features).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments

from .processing import QFORMER_START_TOKEN, to_rgb_image

LOSS_NAMES = ("itc", "itm", "itg")
# Parameters that never get weight decay besides biases and norms (ndim <= 1): the contrastive temperature.
NO_DECAY_NAMES = ("temp",)


@dataclass
class Blip2TrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's defaults and BLIP-2's training knobs.

    Defaults (paper / LAVIS stage 1): AdamW betas (0.9, 0.98), weight decay 0.05 (never on biases, norms or the
    temperature), peak LR 1e-4 with linear warm-up then cosine decay to `min_lr` 1e-5.
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
    layer_wise_lr_decay: float | None = field(
        default=None,
        metadata={"help": "scale each trainable layer's LR by decay ** (depth from the top); None to disable"},
    )
    freeze_vision_encoder: bool = field(
        default=True, metadata={"help": "freeze the image encoder (its post-LayerNorm stays trainable)"}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "the collators read raw columns"})

    def __post_init__(self) -> None:
        if self.lr_scheduler_type == "cosine_with_min_lr":
            kwargs = dict(self.lr_scheduler_kwargs or {})
            kwargs.setdefault("min_lr", self.min_lr)
            self.lr_scheduler_kwargs = kwargs
        super().__post_init__()
        weights = (self.itc_weight, self.itm_weight, self.itg_weight)
        if any(weight < 0 for weight in weights) or not any(weights):
            raise ValueError(f"loss weights must be >= 0 and not all zero, got itc/itm/itg = {weights}")
        if self.layer_wise_lr_decay is not None and not 0 < self.layer_wise_lr_decay <= 1:
            raise ValueError(f"layer_wise_lr_decay must be in (0, 1], got {self.layer_wise_lr_decay}")

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weight of each stage-1 term."""
        return {"itc": self.itc_weight, "itm": self.itm_weight, "itg": self.itg_weight}


class Blip2Trainer(Trainer):
    """A `Trainer` that composes the stage-1 losses and owns BLIP-2's optimisation policy.

    - Loss: `itc_weight * ITC + itm_weight * ITM + itg_weight * ITG`, only the terms with a non-zero weight are
      computed; each term (and the temperature) is logged as a mean over the logging interval.
    - Parameter groups: no weight decay on biases, norms and `temp`; optional layer-wise LR decay applied through
      per-group learning rates, which the LR scheduler scales (it never overwrites them).
    - Frozen parts: the image encoder is frozen when `args.freeze_vision_encoder` (post-LayerNorm trainable) and
      frozen modules stay in eval mode under `model.train()`.
    - Gradient accumulation: the terms are batch means, so each micro-batch loss is divided by the accumulation steps.
    """

    def __init__(self, model: nn.Module | None = None, args: Blip2TrainingArguments | None = None, **kwargs: Any):
        if args is not None and not isinstance(args, Blip2TrainingArguments):
            raise TypeError(f"Blip2Trainer needs Blip2TrainingArguments, got {type(args).__name__}")
        if model is not None and args is not None and args.freeze_vision_encoder:
            model.freeze_vision_encoder()
        super().__init__(model=model, args=args, **kwargs)
        self._loss_sums: dict[str, float] = {}
        self._loss_counts: dict[str, int] = {}

    # -- loss -------------------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        weights = self.args.loss_weights
        enabled = tuple(name for name in LOSS_NAMES if weights[name] > 0)
        outputs = model(**inputs, losses=enabled)
        terms = {name: getattr(outputs, f"loss_{name}") for name in enabled}
        loss = sum(weights[name] * term for name, term in terms.items())
        if model.training:
            for name, term in terms.items():
                self._accumulate(f"loss_{name}", term)
            if outputs.temperature is not None:
                self._accumulate("temperature", outputs.temperature)
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        self._loss_sums[name] = self._loss_sums.get(name, 0.0) + float(value.detach())
        self._loss_counts[name] = self._loss_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: flush the per-term means collected since the last one
            for name, total in self._loss_sums.items():
                logs[name] = round(total / self._loss_counts[name], 6)
            self._loss_sums, self._loss_counts = {}, {}
        super().log(logs, *args, **kwargs)

    # -- optimiser ----------------------------------------------------------------------------------------------------
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
        levels = config.vision_config.num_hidden_layers + 1
        if parts[1] == "encoder":
            return levels - (int(parts[3]) + 1)
        return levels if parts[1] in ("embeddings", "pre_layernorm") else 0
    if config is not None and hasattr(config, "qformer_config"):
        levels = config.qformer_config.num_hidden_layers + 1
        if parts[0] == "qformer" and parts[1] == "encoder":
            return levels - (int(parts[3]) + 1)
        if parts[0] in ("query_tokens", "embeddings") or (parts[0] == "qformer" and parts[1] == "layernorm"):
            return levels
    return 0


# -- data -----------------------------------------------------------------------------------------------------------


@dataclass
class RandomResizedCropFlip:
    """The paper's training augmentation without torchvision: random resized crop (area scale 0.5-1.0, aspect ratio
    3/4-4/3, bicubic) to `size` x `size`, then a horizontal flip with probability `flip_probability`."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    rng: random.Random = field(default_factory=random.Random)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        area = width * height
        for _ in range(10):
            target_area = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                left = self.rng.randint(0, width - crop_width)
                top = self.rng.randint(0, height - crop_height)
                break
        else:  # no admissible crop in 10 draws (extreme aspect ratios): keep the whole image
            crop_width, crop_height = width, height
            left, top = 0, 0
        box = (left, top, left + crop_width, top + crop_height)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.rng.random() < self.flip_probability:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


class Blip2ImageTextCollator:
    """Batches image-text examples (dicts from a `datasets` dataset or any sequence) for stage-1 training.

    Each example has an image (PIL / array / path) under `image_column` (or cached `frozen_image_features`, see
    `FrozenFeatureDataset`), a caption under `text_column` and optionally an image id under `image_id_column`
    (captions of one image are positives of each other). Captions are tokenized with the Q-Former tokenizer (BERT
    WordPiece with `[DEC]`), right-truncated to `max_length` (32 in the paper) and padded to it (a fixed length, which
    cross-rank gathering needs).

    Args:
        image_processor: The BLIP-2 image processor (`blip2_image_processor(image_size)`).
        qformer_tokenizer: BERT tokenizer with `[DEC]` (`load_qformer_tokenizer`).
        augment: Apply `RandomResizedCropFlip` (the paper's training augmentation) before the image processor.
        seed: Seed of the augmentation's random generator.
    """

    def __init__(
        self,
        image_processor: Any,
        qformer_tokenizer: Any,
        max_length: int = 32,
        augment: bool = False,
        image_column: str = "image",
        text_column: str = "text",
        image_id_column: str | None = "image_id",
        seed: int = 0,
    ) -> None:
        if QFORMER_START_TOKEN not in qformer_tokenizer.get_vocab():
            raise ValueError(
                f"the Q-Former tokenizer has no {QFORMER_START_TOKEN} token (the start of image-grounded generation); "
                "load it with modeling_blip2.load_qformer_tokenizer"
            )
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and text, got {max_length}")
        self.image_processor = image_processor
        self.qformer_tokenizer = qformer_tokenizer
        self.max_length = max_length
        self.image_column, self.text_column, self.image_id_column = image_column, text_column, image_id_column
        size = image_processor.size if isinstance(image_processor.size, int) else image_processor.size["height"]
        self.augmentation = RandomResizedCropFlip(int(size), rng=random.Random(seed)) if augment else None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        texts = []
        for index, example in enumerate(examples):
            text = example.get(self.text_column)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"example {index} has an empty or missing caption ({self.text_column!r}): {text!r}")
            texts.append(text.strip())
        encoded = self.qformer_tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if "frozen_image_features" in examples[0]:
            if self.augmentation is not None:
                raise ValueError("cached image features cannot be augmented: turn off augment or the feature cache")
            batch["frozen_image_features"] = torch.stack([example["frozen_image_features"] for example in examples])
        else:
            images = [to_rgb_image(example.get(self.image_column)) for example in examples]
            if self.augmentation is not None:
                images = [self.augmentation(image) for image in images]
            batch["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if self.image_id_column is not None and self.image_id_column in examples[0]:
            batch["image_ids"] = torch.tensor([int(example[self.image_id_column]) for example in examples])
        return batch


class FrozenFeatureDataset(Dataset):
    """A dataset whose images are replaced by the frozen encoder's features, computed once.

    With a frozen image encoder and no augmentation, every epoch would recompute identical features; this computes
    `vision_model.forward_features` once per image (batched, with a progress bar) and serves them as
    `frozen_image_features`, so training steps skip the encoder. The trainable post-LayerNorm is still applied by the
    model at each step. Memory: `num_images * (1 + num_patches) * vision_hidden * bytes(dtype)`.

    Args:
        dataset: Examples with an image column (and captions, ids ... that pass through).
        vision_model: The (frozen) `Blip2VisionModel`.
        image_processor: Turns images into `pixel_values`.
        image_column: Column holding the images.
        image_id_column: If given, examples with the same image id share one computation.
        batch_size: Images per encoder batch.
        dtype: Storage dtype of the cached features (e.g. torch.float16 to halve memory).
    """

    def __init__(
        self,
        dataset: Sequence[dict[str, Any]],
        vision_model: nn.Module,
        image_processor: Any,
        image_column: str = "image",
        image_id_column: str | None = None,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> None:
        self.dataset = dataset
        self.image_column = image_column
        if image_id_column is None:
            keys = list(range(len(dataset)))
        elif hasattr(dataset, "column_names"):  # a `datasets.Dataset`: read the column without decoding images
            keys = list(dataset[image_id_column])
        else:
            keys = [dataset[index][image_id_column] for index in range(len(dataset))]
        unique: dict[Any, int] = {}
        self.feature_index = [unique.setdefault(key, len(unique)) for key in keys]
        first_of = {slot: index for index, slot in reversed(list(enumerate(self.feature_index)))}
        self.features = self._encode(
            [first_of[slot] for slot in range(len(unique))], vision_model, image_processor, batch_size, dtype, progress
        )

    @torch.no_grad()
    def _encode(
        self,
        indices: list[int],
        vision_model: nn.Module,
        image_processor: Any,
        batch_size: int,
        dtype: torch.dtype | None,
        progress: bool,
    ) -> torch.Tensor:
        was_training = vision_model.training
        vision_model.eval()
        device = next(vision_model.parameters()).device
        chunks = []
        try:
            for start in tqdm(range(0, len(indices), batch_size), desc="caching image features", disable=not progress):
                images = [
                    to_rgb_image(self.dataset[i][self.image_column]) for i in indices[start : start + batch_size]
                ]
                pixel_values = image_processor(images, return_tensors="pt")["pixel_values"].to(device)
                features = vision_model.forward_features(pixel_values)
                chunks.append(features.to("cpu", dtype or features.dtype))
        finally:
            vision_model.train(was_training)
        return torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = {key: value for key, value in self.dataset[index].items() if key != self.image_column}
        example["frozen_image_features"] = self.features[self.feature_index[index]]
        return example
