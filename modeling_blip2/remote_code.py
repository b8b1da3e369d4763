"""Checkpoints that load without this package installed, through transformers' `trust_remote_code=True`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

# Every module a checkpoint folder needs to rebuild models, processor and pipelines (relative imports only).
MODULE_FILES = (
    "attention.py",
    "configuration.py",
    "losses.py",
    "model_card.py",
    "modeling.py",
    "pipelines.py",
    "pretraining.py",
    "processing.py",
    "qformer.py",
    "vision.py",
)
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration.Blip2Config",
    "AutoModel": "modeling.Blip2Model",
    "AutoModelForImageTextToText": "modeling.Blip2ForConditionalGeneration",
    "AutoModelForVisualQuestionAnswering": "modeling.Blip2ForConditionalGeneration",
    "AutoModelForPreTraining": "pretraining.Blip2ForPretraining",
    "AutoModelForZeroShotImageClassification": "pretraining.Blip2ForImageTextRetrieval",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing.Blip2ImageTextProcessor"}


def save_with_remote_code(model: Any, save_directory: str | os.PathLike, processor: Any = None, **kwargs: Any) -> Path:
    """Saves `model` (and `processor`) with this package's module files and `auto_map` entries next to them.

    A process without `modeling_blip2` installed then loads them with
    `AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` and
    `AutoProcessor.from_pretrained(folder, trust_remote_code=True)`. Extra keyword arguments go to
    `model.save_pretrained`.
    """
    folder = Path(save_directory)
    model.save_pretrained(folder, **kwargs)
    if processor is not None:
        processor.save_pretrained(folder)
    add_remote_code(folder)
    return folder


def add_remote_code(save_directory: str | os.PathLike) -> None:
    """Adds the module files and `auto_map` entries to a checkpoint folder saved by this package."""
    folder = Path(save_directory)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} holds no config.json: save the model there first")
    package_folder = Path(__file__).resolve().parent
    for name in MODULE_FILES:
        shutil.copyfile(package_folder / name, folder / name)
    _merge_auto_map(config_path, MODEL_AUTO_MAP)
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        _merge_auto_map(processor_config, PROCESSOR_AUTO_MAP)


def _merge_auto_map(path: Path, entries: dict[str, str]) -> None:
    content = json.loads(path.read_text())
    content["auto_map"] = {**content.get("auto_map", {}), **entries}
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
