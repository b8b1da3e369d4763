"""A cache of the frozen image encoder's features: the encoder runs once per image, training steps read the cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .processing import to_rgb_image


def _columns(dataset: Any) -> list[str]:
    """The column names of a `datasets.Dataset`, or the keys of a list of dicts' first example."""
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    return list(dataset[0])


class FrozenFeatureDataset(Dataset):
    """A dataset whose images are replaced by the frozen encoder's features, computed once.

    With a frozen image encoder and no augmentation, every epoch would recompute identical features; this computes
    `vision_model.forward_features` once per image (batched, with a progress bar) and serves them as
    `frozen_image_features`, so training steps skip the encoder. The trainable post-LayerNorm is still applied by the
    model at each step. Memory: `num_images * (1 + num_patches) * vision_hidden * bytes(dtype)`.

    Args:
        dataset: Examples with an image column (and captions, ids ... that pass through).
        vision_model: The frozen `Blip2VisionModel` (`model.freeze_vision_encoder()` first: an encoder that still
            trains is refused, its updates would never reach the cached features; the post-LayerNorm may train).
        image_processor: Turns images into `pixel_values`.
        image_column: Column holding the images.
        image_id_column: Examples with the same image id share one computation; the collator's default column
            (`"image_id"`), used when the dataset has it. None: one computation per example.
        batch_size: Images per encoder batch.
        dtype: Storage dtype of the cached features (e.g. torch.float16 to halve memory).
    """

    def __init__(
        self,
        dataset: Sequence[dict[str, Any]],
        vision_model: nn.Module,
        image_processor: Any,
        image_column: str = "image",
        image_id_column: str | None = "image_id",
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> None:
        still_training = [
            name
            for name, parameter in vision_model.named_parameters()
            if parameter.requires_grad and not name.startswith("post_layernorm")
        ]
        if still_training:
            raise ValueError(
                f"FrozenFeatureDataset computes the image encoder's features once, but {len(still_training)} of its "
                f"parameters still train (e.g. {still_training[:3]}): their updates would never reach the cached "
                "features. Freeze the encoder first (model.freeze_vision_encoder(), which keeps the post-LayerNorm "
                "trainable), or train without the cache"
            )
        if len(dataset) == 0:
            raise ValueError("FrozenFeatureDataset got an empty dataset: there are no images to encode")
        if image_column not in _columns(dataset):
            raise ValueError(
                f"FrozenFeatureDataset reads images from column {image_column!r}, but the dataset's columns are "
                f"{_columns(dataset)}: pass image_column=..."
            )
        self.dataset = dataset
        self.image_column = image_column
        if image_id_column is not None and image_id_column not in _columns(dataset):
            image_id_column = None  # no such column: every example is its own image
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
