"""Write tiny webdataset `.tar` shards for the streaming tests (shared by several test files).

Each sample `{key}` is three members of one tar file, the webdataset layout that
`datasets.load_dataset("webdataset", data_files=..., streaming=True)` reads offline:

- `{key}.jpg`: an RGB image, `image_size` pixels square, a flat colour with a black or white square on it;
- `{key}.txt`: one caption (the first of the image's captions);
- `{key}.json`: `{"captions": [...], "image_id": int}` with `captions_per_image` captions, all naming the image.

Keys are `sample{index:06d}` (global index over all shards, which hold consecutive images), image ids are the index.
Everything is a function of the arguments: the same call writes byte-identical shards.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 230, 30),
    "purple": (150, 30, 160),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}
SHAPES = ("square", "spot", "block", "patch")
TEMPLATES = (
    "a {colour} picture with a {shape}",
    "the {colour} image shows a {shape}",
    "a {shape} on {colour}",
    "{colour} background and a small {shape}",
    "a photo that is mostly {colour}",
    "one {shape} in a {colour} frame",
)


def sample_key(index: int) -> str:
    """The `__key__` of sample `index` in shards written by `write_webdataset_shards`."""
    return f"sample{index:06d}"


def sample_captions(index: int, captions_per_image: int = 1) -> list[str]:
    """The captions `write_webdataset_shards` stores for image `index` (the `.txt` member holds the first)."""
    colour = COLOURS[index % len(COLOURS)]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    templates = [TEMPLATES[(index + i) % len(TEMPLATES)] for i in range(captions_per_image)]
    captions = [template.format(colour=colour, shape=shape) for template in templates]
    # Several captions of one image all differ, so that which one was drawn is visible in a test.
    return [f"{caption} version {i}" if i >= len(TEMPLATES) else caption for i, caption in enumerate(captions)]


def sample_image(index: int, image_size: int = 32, seed: int = 0) -> Image.Image:
    """The image `write_webdataset_shards` stores for index `index` (before JPEG compression)."""
    rng = random.Random(seed * 1_000_003 + index)
    image = Image.new("RGB", (image_size, image_size), _RGB[COLOURS[index % len(COLOURS)]])
    side = max(2, image_size // 4)
    left, top = rng.randrange(image_size - side + 1), rng.randrange(image_size - side + 1)
    image.paste((255, 255, 255) if index % 2 else (0, 0, 0), (left, top, left + side, top + side))
    return image


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # byte-identical shards for identical arguments
    archive.addfile(info, io.BytesIO(payload))


def write_webdataset_shards(
    folder: str | Path,
    num_images: int,
    num_shards: int,
    captions_per_image: int = 1,
    image_size: int = 32,
    seed: int = 0,
    image_format: str = "jpg",
) -> list[Path]:
    """Write `num_images` tiny captioned images into `num_shards` webdataset shards `shard-{k:05d}.tar` in `folder`.

    Shards hold consecutive images, split as evenly as possible (the first `num_images % num_shards` shards hold one
    more). Returns the shard paths in order. `image_format` is `"jpg"` or `"png"` (the member extension too).
    """
    if num_shards < 1 or num_images < num_shards:
        raise ValueError(f"need 1 <= num_shards <= num_images, got num_shards={num_shards}, num_images={num_images}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(num_images, num_shards)
    paths, index = [], 0
    for shard in range(num_shards):
        path = folder / f"shard-{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
            for _ in range(base + (shard < extra)):
                key = sample_key(index)
                buffer = io.BytesIO()
                sample_image(index, image_size, seed).save(buffer, format="JPEG" if image_format == "jpg" else "PNG")
                captions = sample_captions(index, captions_per_image)
                _add(archive, f"{key}.{image_format}", buffer.getvalue())
                _add(archive, f"{key}.txt", captions[0].encode())
                _add(archive, f"{key}.json", json.dumps({"captions": captions, "image_id": index}).encode())
                index += 1
        paths.append(path)
    return paths
