"""The command-line examples run end to end on the tiny-random fixture (random weights)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "hub_configs" / "tiny-random")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _images(tmp_path) -> list[str]:
    paths = [tmp_path / "red.png", tmp_path / "blue.png"]
    Image.new("RGB", (40, 30), (200, 30, 30)).save(paths[0])
    Image.new("RGBA", (30, 40), (30, 30, 200, 255)).save(paths[1])
    return [str(path) for path in paths]


def test_caption_example(tmp_path) -> None:
    red, blue = _images(tmp_path)
    common = ["--model", TINY, "--random_init", "--max_new_tokens", "4", "--min_new_tokens", "4"]
    captions = _load("caption").main([*common, "--prompt", "a photo of", "--images", red, blue, red])
    assert len(captions) == 3 and all(text.startswith("a photo of") for text in captions)
    assert captions[0] == captions[2]  # same image, same greedy caption
    beam = _load("caption").main([*common, "--num_beams", "3", "--images", red])
    assert len(beam) == 1 and isinstance(beam[0], str)


def test_vqa_example(tmp_path) -> None:
    red, blue = _images(tmp_path)
    common = ["--model", TINY, "--random_init", "--max_new_tokens", "3", "--num_beams", "2"]
    answers = _load("vqa").main([*common, "--images", red, blue, "--questions", "what color?", "what shape?"])
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    shared = _load("vqa").main([*common, "--images", red, blue, "--questions", "what color?"])
    assert len(shared) == 2
