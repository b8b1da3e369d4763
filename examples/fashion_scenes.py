"""Two-item Fashion-MNIST scenes with captions that need both the items and their places.

Fashion-MNIST (Zalando, MIT licence) installs offline from Debian's `dataset-fashion-mnist` package into
/usr/share/datasets/fashion-mnist. A scene puts one 28x28 item on the left and one on the right of a 56x56 canvas
(with a small random vertical offset) and is captioned "a {left item} on the left and a {right item} on the right":
10 x 10 = 100 distinct captions. Training scenes are drawn from the train split, a fixed held-out set from the test
split, so no item image is shared between them.

    python examples/fashion_scenes.py --num-train 20000 --num-eval 200 --output-dir data/fashion-scenes
"""

from __future__ import annotations

import argparse
import gzip
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ITEM_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
ITEM_SIZE = 28
SCENE_SIZE = 56
CAPTION_TEMPLATE = "a {left} on the left and a {right} on the right"


@dataclass
class FashionItems:
    """The item images `(N, 28, 28)` uint8 and their labels `(N,)` of one split."""

    images: np.ndarray
    labels: np.ndarray


def load_split(split: str, folder: Path = FASHION_MNIST_DIR) -> FashionItems:
    """Reads the IDX files of `split` ("train" or "test")."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(
            f"{images_path} not found: install Fashion-MNIST with `apt-get install dataset-fashion-mnist`"
        )
    with gzip.open(images_path, "rb") as handle:
        magic, count, rows, columns = struct.unpack(">IIII", handle.read(16))
        if magic != 2051:
            raise ValueError(f"{images_path} is not an IDX image file (magic {magic})")
        images = np.frombuffer(handle.read(), dtype=np.uint8).reshape(count, rows, columns)
    with gzip.open(labels_path, "rb") as handle:
        magic, count_labels = struct.unpack(">II", handle.read(8))
        if magic != 2049 or count_labels != count:
            raise ValueError(f"{labels_path} does not match {images_path}")
        labels = np.frombuffer(handle.read(), dtype=np.uint8)
    return FashionItems(images=images, labels=labels)


def caption_for(left: int, right: int) -> str:
    """The caption of a scene with item classes `left` and `right`."""
    return CAPTION_TEMPLATE.format(left=ITEM_NAMES[left], right=ITEM_NAMES[right])


def compose_scene(left: np.ndarray, right: np.ndarray, rng: random.Random, max_shift: int = 6) -> Image.Image:
    """A 56x56 RGB scene: `left` in the left half, `right` in the right half, each shifted vertically at random."""
    canvas = np.zeros((SCENE_SIZE, SCENE_SIZE), dtype=np.uint8)
    top = (SCENE_SIZE - ITEM_SIZE) // 2
    for item, column in ((left, 0), (right, ITEM_SIZE)):
        row = top + rng.randint(-max_shift, max_shift)
        canvas[row : row + ITEM_SIZE, column : column + ITEM_SIZE] = item
    return Image.fromarray(canvas).convert("RGB")


def make_scenes(items: FashionItems, count: int, seed: int) -> list[dict]:
    """`count` scenes as dicts with `image`, `text`, `left`, `right` and `image_id` (class pair uniform)."""
    rng = random.Random(seed)
    by_class = [np.flatnonzero(items.labels == label) for label in range(len(ITEM_NAMES))]
    scenes = []
    for index in range(count):
        left, right = rng.randrange(len(ITEM_NAMES)), rng.randrange(len(ITEM_NAMES))
        left_item = items.images[rng.choice(by_class[left])]
        right_item = items.images[rng.choice(by_class[right])]
        scenes.append(
            {
                "image": compose_scene(left_item, right_item, rng),
                "text": caption_for(left, right),
                "left": left,
                "right": right,
                "image_id": index,
            }
        )
    return scenes


def save_image_folder(scenes: list[dict], folder: Path) -> None:
    """Writes an image folder with `metadata.jsonl` (readable by `datasets` "imagefolder")."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for scene in scenes:
            name = f"{scene['image_id']:06d}.png"
            scene["image"].save(folder / name)
            row = {key: value for key, value in scene.items() if key != "image"}
            metadata.write(json.dumps({"file_name": name, **row}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    save_image_folder(make_scenes(load_split("train"), args.num_train, args.seed), args.output_dir / "train")
    save_image_folder(make_scenes(load_split("test"), args.num_eval, args.seed + 1), args.output_dir / "eval")
    print(f"wrote {args.num_train} training and {args.num_eval} held-out scenes to {args.output_dir}")


if __name__ == "__main__":
    main()
