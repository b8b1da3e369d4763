"""Checkpoints that load without this package installed, through transformers' `trust_remote_code=True`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .checkpoint_io import atomic_save, pop_hub_kwargs, push_files, relative_files
from .model_card import require_hub_token

# Every module a checkpoint folder needs to rebuild models, processor and pipelines (relative imports only).
MODULE_FILES = (
    "attention.py",
    "backbones.py",
    "checkpoint_io.py",
    "composition.py",
    "configuration.py",
    "initialization.py",
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

    All of it is one atomic save (`checkpoint_io.atomic_save`): model, processor and code are written into a staging
    folder and moved into `save_directory` together, so a failure anywhere leaves a checkpoint already there as it
    was. With `push_to_hub=True` (and the other push arguments of `save_pretrained`) everything written is then
    pushed in one commit that also deletes the repo's superseded weight files.
    """
    folder = Path(save_directory)
    push_to_hub = kwargs.pop("push_to_hub", False)
    hub_kwargs = pop_hub_kwargs(kwargs)
    if push_to_hub:
        hub_kwargs["token"] = require_hub_token(hub_kwargs.get("token"))
    with atomic_save(folder) as staging:
        model.save_pretrained(staging, **kwargs)
        if processor is not None:
            processor.save_pretrained(staging)
        add_remote_code(staging)
        written = relative_files(staging)
    if push_to_hub:
        push_files(
            folder,
            hub_kwargs.pop("repo_id", None) or Path(os.path.abspath(folder)).name,
            written,
            commit_message=hub_kwargs.pop("commit_message", None) or "Upload BLIP-2 model with remote code",
            **hub_kwargs,
        )
    return folder


def add_remote_code(save_directory: str | os.PathLike) -> None:
    """Adds the module files and `auto_map` entries to a checkpoint folder saved by this package (atomically: the
    module files and the rewritten configs are moved in together once all are written)."""
    folder = Path(save_directory)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} holds no config.json: save the model there first")
    package_folder = Path(__file__).resolve().parent
    with atomic_save(folder) as staging:
        for name in MODULE_FILES:
            shutil.copyfile(package_folder / name, staging / name)
        _write_with_auto_map(config_path, staging / config_path.name, MODEL_AUTO_MAP)
        processor_config = folder / "processor_config.json"
        if processor_config.is_file():
            _write_with_auto_map(processor_config, staging / processor_config.name, PROCESSOR_AUTO_MAP)


def _write_with_auto_map(source: Path, destination: Path, entries: dict[str, str]) -> None:
    content = json.loads(source.read_text())
    content["auto_map"] = {**content.get("auto_map", {}), **entries}
    destination.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
