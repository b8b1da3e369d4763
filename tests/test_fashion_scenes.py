"""Two-item scenes for the demonstration: layout, captions, splits (synthetic items; real data when installed)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fashion_scenes", ROOT / "examples" / "fashion_scenes.py")
scenes_module = importlib.util.module_from_spec(spec)
sys.modules["fashion_scenes"] = scenes_module
spec.loader.exec_module(scenes_module)


def _synthetic_items() -> object:
    images = np.stack([np.full((28, 28), 10 + 20 * label, dtype=np.uint8) for label in range(10) for _ in range(3)])
    labels = np.repeat(np.arange(10, dtype=np.uint8), 3)
    return scenes_module.FashionItems(images=images, labels=labels)


def test_scene_puts_each_item_in_its_half() -> None:
    left, right = np.full((28, 28), 100, np.uint8), np.full((28, 28), 200, np.uint8)
    scene = np.asarray(scenes_module.compose_scene(left, right, random.Random(0)))
    assert scene.shape == (56, 56, 3)
    assert set(np.unique(scene[:, :28, 0])) <= {0, 100} and 100 in scene[:, :28, 0]
    assert set(np.unique(scene[:, 28:, 0])) <= {0, 200} and 200 in scene[:, 28:, 0]


def test_captions_name_items_and_places(tmp_path) -> None:
    assert scenes_module.caption_for(7, 8) == "a sneaker on the left and a bag on the right"
    captions = {scenes_module.caption_for(a, b) for a in range(10) for b in range(10)}
    assert len(captions) == 100
    scenes = scenes_module.make_scenes(_synthetic_items(), 50, seed=3)
    for scene in scenes:
        pixels = np.asarray(scene["image"])[:, :, 0]
        assert scene["text"] == scenes_module.caption_for(scene["left"], scene["right"])
        assert 10 + 20 * scene["left"] in pixels[:, :28] and 10 + 20 * scene["right"] in pixels[:, 28:]
    assert [s["text"] for s in scenes] == [s["text"] for s in scenes_module.make_scenes(_synthetic_items(), 50, 3)]
    scenes_module.save_image_folder(scenes[:4], tmp_path / "folder")
    rows = [json.loads(line) for line in (tmp_path / "folder" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and (tmp_path / "folder" / rows[0]["file_name"]).is_file()


@pytest.mark.skipif(not scenes_module.FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_splits() -> None:
    train, test = scenes_module.load_split("train"), scenes_module.load_split("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert set(np.unique(test.labels)) == set(range(10))
    with pytest.raises(ValueError, match="split must be"):
        scenes_module.load_split("validation")
