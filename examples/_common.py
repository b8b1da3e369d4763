"""Loading shared by the command-line examples: model + processor from a folder or Hub id (or random weights), and
image-text training data (image folders, saved datasets, dataset names, webdataset / parquet shards, streamed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import AutoProcessor

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration
from modeling_blip2.columns import WEBDATASET_KEY

# The members a webdataset sample's image may come in (the first one present is taken).
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def load_model_and_processor(model_id: str, random_init: bool = False, seed: int = 0) -> tuple[Any, Any]:
    """A BLIP-2 checkpoint (ours or the official transformers layout) and its processor, in eval mode."""
    torch.manual_seed(seed)
    if random_init:
        model = Blip2ForConditionalGeneration(Blip2Config.from_pretrained(model_id))
        print("NOTE: randomly initialised model: the output below is noise, not a trained model's.")
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(model_id)
    return model.eval(), AutoProcessor.from_pretrained(model_id)


@dataclass
class StreamingArguments:
    """Where the training data comes from besides `--dataset`, and whether it is streamed."""

    data_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "files (glob patterns allowed) of a packaged builder named by --dataset: webdataset .tar shards "
            "(--dataset webdataset --data_files 'shards/*.tar'), parquet, json, csv ..."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "stream the dataset (datasets' IterableDataset: nothing is downloaded or converted first); "
            "needs --max_steps. Blip2Trainer numbers the examples of each pass and resumes where a checkpoint "
            "stopped"
        },
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={
            "help": "with --streaming: shuffle the shard order and the examples in a buffer of this size, seeded by "
            "--seed and reshuffled every pass (0: the stream's own order)"
        },
    )


def load_image_text_dataset(
    dataset: str,
    split: str = "train",
    data_files: list[str] | str | None = None,
    streaming: bool = False,
    shuffle_buffer_size: int = 0,
    seed: int = 0,
) -> datasets.Dataset | datasets.IterableDataset:
    """A saved dataset (`save_to_disk` folder), an image folder (with `metadata.jsonl`), a packaged builder over
    `data_files` (`"webdataset"`, `"parquet"` ...) or a dataset name; streamed when `streaming` (a saved dataset is
    turned into an iterable one), then shuffled by shards and in a buffer of `shuffle_buffer_size` (seeded)."""
    if shuffle_buffer_size < 0:
        raise ValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}")
    files = {"data_files": data_files} if data_files else {}
    if os.path.isdir(dataset) and os.path.isfile(os.path.join(dataset, "dataset_info.json")):
        if data_files:
            raise ValueError(f"{dataset} is a saved dataset: --data_files does not apply to it")
        loaded = datasets.load_from_disk(dataset)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
        if streaming:
            loaded = loaded.to_iterable_dataset(num_shards=min(len(loaded), 64) or 1)
    elif os.path.isdir(dataset) and not data_files:
        loaded = datasets.load_dataset("imagefolder", data_dir=dataset, split=split, streaming=streaming)
    else:
        loaded = datasets.load_dataset(dataset, split=split, streaming=streaming, **files)
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        loaded = loaded[split]
    if streaming and shuffle_buffer_size:
        loaded = loaded.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return loaded


def is_webdataset(dataset: str) -> bool:
    """Whether `--dataset` names the webdataset builder."""
    return dataset.strip().lower() == "webdataset"


def resolve_columns(
    dataset: Any,
    image_column: str | None,
    text_column: str | None,
    image_id_column: str | None,
    webdataset: bool = False,
) -> tuple[str, str, str | None]:
    """The image, caption and image-id columns: the given ones, checked against the dataset; the defaults `"image"`
    and `"text"` (no image id) otherwise. Webdataset samples (keyed by member extension) default to their image
    member (jpg / jpeg / png / webp), to `json.captions` (a caption list) when their `.json` holds one, else `txt`,
    and to `json.image_id` as the image id when present, else the sample's `__key__` (hashed by the collators)."""
    columns = _columns(dataset)
    if webdataset:
        if image_column is None:
            image_column = next((ext for ext in WEBDATASET_IMAGE_EXTENSIONS if ext in columns), None)
        if text_column is None:
            text_column = "json.captions" if "json.captions" in columns else "txt" if "txt" in columns else None
        if image_id_column is None:
            image_id_column = "json.image_id" if "json.image_id" in columns else WEBDATASET_KEY
        if image_column is None or text_column is None:
            raise ValueError(
                f"the webdataset samples have members {sorted(columns)}: none is an image "
                f"({', '.join(WEBDATASET_IMAGE_EXTENSIONS)}) or a caption (txt, or json with 'captions'); name them "
                "with --image_column / --text_column"
            )
    image_column = image_column or "image"
    text_column = text_column or "text"
    wanted = [image_column, text_column] + ([image_id_column] if image_id_column else [])
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise ValueError(
            f"the dataset has no column(s) {missing}; it has {sorted(columns)} (dotted names read nested values, "
            "e.g. json.captions): pass --image_column / --text_column / --image_id_column"
        )
    return image_column, text_column, image_id_column


def _columns(dataset: Any) -> set[str]:
    """The dataset's column names, with `parent.child` for the fields of dict columns (from its features, or from
    its first example when a stream's features are unknown)."""
    features = getattr(dataset, "features", None)
    if features is not None:
        row = dict(features)
    else:
        try:
            row = next(iter(dataset))
        except StopIteration:
            raise ValueError("the dataset is empty") from None
    names = set(row)
    for name, value in row.items():
        if isinstance(value, dict):
            names |= {f"{name}.{child}" for child in value}
    return names


def load_training_data(args: Any, streaming: StreamingArguments, seed: int) -> tuple[Any, str, str, str | None]:
    """The training dataset of a pretraining script (`args.dataset`, `args.dataset_split` and the column arguments)
    and its resolved image, caption and image-id columns."""
    dataset = load_image_text_dataset(
        args.dataset,
        args.dataset_split,
        streaming.data_files,
        streaming.streaming,
        streaming.shuffle_buffer_size,
        seed,
    )
    columns = resolve_columns(
        dataset, args.image_column, args.text_column, args.image_id_column, webdataset=is_webdataset(args.dataset)
    )
    return (dataset, *columns)


def check_streaming_options(streaming: StreamingArguments, max_steps: int, cache_image_features: bool) -> None:
    """Refuses what a streamed dataset cannot do: run without --max_steps, or cache image features."""
    if not streaming.streaming:
        return
    if max_steps <= 0:
        raise ValueError("--streaming reads a dataset of unknown length: pass --max_steps")
    if cache_image_features:
        raise ValueError(
            "--cache_image_features computes every image's features once before training, which needs the whole "
            "dataset at hand: it cannot be combined with --streaming"
        )
