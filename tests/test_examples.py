"""The command-line examples run end to end on the tiny-random fixture."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_caption_example_on_random_tiny_model(tmp_path) -> None:
    from PIL import Image

    image_path = tmp_path / "image.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image_path)
    caption = _load("caption")
    folder = str(ROOT / "hub_configs" / "tiny-random")
    captions = caption.main(
        [
            "--model",
            folder,
            "--random-init",
            "--max_new_tokens",
            "4",
            "--prompt",
            "a photo of",
            "--images",
            str(image_path),
            str(image_path),
        ]
    )
    assert len(captions) == 2 and all(text.startswith("a photo of") for text in captions)
    assert captions[0] == captions[1]  # same image, same greedy caption
