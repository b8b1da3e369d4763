"""A cache of the frozen image encoder's features: the encoder runs once per image, training steps read the cache.

The cache lives in RAM, or with `cache_dir` on disk, where later runs and other processes read it back. On disk it is
one safetensors file, memory-mapped read-only by every reader, and a JSON manifest of what made it:

    cache_dir/
        features.safetensors   one tensor "features" (num_images, tokens, hidden), float16 unless told otherwise
        manifest.json          the encoder (weights hash, config, feature layer), the preprocessing, the dataset
        .lock                  taken while a process builds the cache

Rules that keep it safe:

- The manifest is written last (temp file + rename), so a folder without one is never read as a cache. A build in
  progress writes `features.safetensors.partial` (its header, which is written first, declares the full shape, so no
  safetensors reader takes a partial file for a whole one), appends the features batch by batch (the build holds one
  batch in RAM, never the whole cache) and renames it in when complete.
- An interrupted build resumes from the rows its partial file holds when the same encoder, preprocessing, dataset and
  dtype come back (the fingerprint in the partial file's header says so), and restarts from scratch otherwise.
- One process builds while the others wait for it (`flock` on `.lock`: ranks of a torchrun job may all open the
  cache at once); a complete cache is read without the lock and without writing anything, so any number of
  processes can read it at the same time, also from a read-only folder.
- Reopening checks the manifest against this run's encoder, preprocessing, dataset and dtype and refuses a mismatch
  with an error that names each difference; a complete cache is never rebuilt or overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers.utils import logging

from .processing import to_rgb_image

try:
    import fcntl
except ImportError:  # not on Windows: there concurrent builds of one cache folder are not serialised
    fcntl = None

logger = logging.get_logger(__name__)

FEATURE_FILE = "features.safetensors"
PARTIAL_FILE = FEATURE_FILE + ".partial"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
CACHE_FORMAT = "modeling_blip2.feature_cache"
CACHE_VERSION = 1
# Storage dtypes of the disk cache: (safetensors dtype code, numpy dtype the file is mapped with). numpy has no
# bfloat16: its bits are mapped as uint16 and viewed as bfloat16 by torch.
DISK_DTYPES = {
    torch.float16: ("F16", np.float16),
    torch.bfloat16: ("BF16", np.uint16),
    torch.float32: ("F32", np.float32),
}
# Images decoded on every open to tell two datasets of the same length and ids apart.
SAMPLED_IMAGES = 8
# Config entries that do not change what the encoder computes: bookkeeping, output switches, initialisation, and the
# dtype (the weights' dtypes are hashed with the weights). Entries starting with "_" are private bookkeeping too.
IGNORED_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "dtype",
        "torch_dtype",
        "id2label",
        "label2id",
        "problem_type",
        "initializer_range",
    }
)


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
    model at each step. Size: `num_images * (1 + num_patches) * vision_hidden * bytes(dtype)` (0.7 MB per ViT-g image
    in float16).

    In RAM by default. With `cache_dir` the features go to disk instead (see the module docstring): the first run
    writes them, batch by batch, in float16 unless `dtype` says otherwise; later runs, other processes and
    DataLoader workers memory-map the file and never run the encoder. The folder records which encoder (a hash of its
    frozen weights, its config, `feature_layer` / `select_strategy`), which image preprocessing
    (`image_processor.to_dict()`), which dataset (number of examples, image ids, a hash of a few sampled images) and
    which dtype made it; reopening it with any of them changed is refused with an error naming what differs. Losses
    equal those of the RAM cache of the same dtype.

    Args:
        dataset: Examples with an image column (and captions, ids ... that pass through).
        vision_model: The frozen `Blip2VisionModel` (`model.freeze_vision_encoder()` first: an encoder that still
            trains is refused, its updates would never reach the cached features; the post-LayerNorm may train).
        image_processor: Turns images into `pixel_values` (with `cache_dir`: an image processor with `to_dict()`).
        image_column: Column holding the images.
        image_id_column: Examples with the same image id share one computation; the collator's default column
            (`"image_id"`), used when the dataset has it. None: one computation per example.
        batch_size: Images per encoder batch.
        dtype: Storage dtype of the cached features. In RAM: the encoder's by default (torch.float16 halves memory);
            on disk: torch.float16 by default, or torch.bfloat16 / torch.float32.
        progress: Show a progress bar while encoding.
        cache_dir: A folder for the on-disk cache: built there when absent (resumed when a build was interrupted),
            read back when present. None: keep the features in RAM.

    Attributes:
        features: `(num_images, tokens, hidden)` features, in RAM or memory-mapped from `cache_dir`.
        feature_index: For each example, its row of `features`.
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
        cache_dir: str | os.PathLike | None = None,
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of images per encoder batch, got {batch_size}")
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
        indices = [first_of[slot] for slot in range(len(unique))]

        def batches(start: int) -> Iterator[torch.Tensor]:
            return self._encoded_batches(indices, start, vision_model, image_processor, batch_size, dtype, progress)

        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is None:
            self.features = torch.cat(list(batches(0)))
            return
        dtype = torch.float16 if dtype is None else dtype
        if dtype not in DISK_DTYPES:
            raise ValueError(
                f"the disk feature cache stores {[str(d) for d in DISK_DTYPES]}, got dtype={dtype}: pick one of them"
            )
        identity = {
            "encoder": encoder_fingerprint(vision_model),
            "preprocessing": preprocessing_fingerprint(image_processor),
            "dataset": self._dataset_fingerprint(keys, indices, image_id_column),
            "dtype": str(dtype).removeprefix("torch."),
        }
        self._fingerprint = _digest(identity)
        self.features = _open_or_build(self.cache_dir, identity, self._fingerprint, len(indices), dtype, batches)

    def _dataset_fingerprint(self, keys: list[Any], indices: list[int], image_id_column: str | None) -> dict[str, Any]:
        """What identifies the dataset without decoding all of it: sizes, the image ids and a few sampled images.

        A `datasets` fingerprint is not used: an in-memory dataset gets a random one in every process."""
        ids = hashlib.sha256()
        if image_id_column is not None:
            for start in range(0, len(keys), 1 << 16):  # in blocks: web-scale datasets have 100M+ ids
                ids.update("".join(f"{key}\n" for key in keys[start : start + (1 << 16)]).encode())
        sampled = hashlib.sha256()
        count = min(SAMPLED_IMAGES, len(indices))
        slots = sorted({round(i * (len(indices) - 1) / max(count - 1, 1)) for i in range(count)})
        for slot in slots:
            image = to_rgb_image(self.dataset[indices[slot]][self.image_column])
            sampled.update(f"{slot}|{image.mode}|{image.size}\n".encode())
            sampled.update(image.tobytes())
        return {
            "num_examples": len(self.dataset),
            "num_images": len(indices),
            "image_column": self.image_column,
            "image_id_column": image_id_column,
            "image_ids_sha256": ids.hexdigest() if image_id_column is not None else None,
            "sampled_images_sha256": sampled.hexdigest(),
        }

    @torch.no_grad()
    def _encoded_batches(
        self,
        indices: list[int],
        start: int,
        vision_model: nn.Module,
        image_processor: Any,
        batch_size: int,
        dtype: torch.dtype | None,
        progress: bool,
    ) -> Iterator[torch.Tensor]:
        """The features of the images `indices[start:]`, a batch at a time, on the CPU in `dtype`."""
        was_training = vision_model.training
        vision_model.eval()
        device = next(vision_model.parameters()).device
        try:
            for first in tqdm(
                range(start, len(indices), batch_size), desc="caching image features", disable=not progress
            ):
                images = [
                    to_rgb_image(self.dataset[i][self.image_column]) for i in indices[first : first + batch_size]
                ]
                pixel_values = image_processor(images, return_tensors="pt")["pixel_values"].to(device)
                features = vision_model.forward_features(pixel_values)
                stored = features.to("cpu", dtype or features.dtype)
                overflowed = stored.dtype != features.dtype and not bool(torch.isfinite(stored).all())
                if overflowed and bool(torch.isfinite(features).all()):
                    raise ValueError(
                        f"the image features of images {first}-{first + len(images) - 1} exceed the range of "
                        f"{stored.dtype} (largest magnitude {features.abs().max().item():.4g}): cache them with "
                        "dtype=torch.bfloat16 or torch.float32"
                    )
                yield stored
        finally:
            vision_model.train(was_training)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = {key: value for key, value in self.dataset[index].items() if key != self.image_column}
        example["frozen_image_features"] = self.features[self.feature_index[index]]
        return example

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.cache_dir is not None:  # DataLoader workers map the file again instead of receiving its bytes
            state["features"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.cache_dir is not None:
            self.features = _map_complete(self.cache_dir, self._fingerprint)


def encoder_fingerprint(vision_model: nn.Module) -> dict[str, Any]:
    """What makes `vision_model.forward_features` what it is: its class, the feature layer and token selection, its
    config (less bookkeeping entries) and a SHA-256 of its frozen weights and buffers (everything but the trainable
    post-LayerNorm: names, dtypes, shapes and bytes)."""
    weights = hashlib.sha256()
    for name, tensor in sorted(vision_model.state_dict().items()):
        if name.startswith("post_layernorm"):
            continue
        if tensor.device.type == "meta":
            raise ValueError(
                f"the image encoder's {name!r} is on the meta device (not loaded): the feature cache fingerprints "
                "the encoder's weights, load them first"
            )
        weights.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        weights.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    config = getattr(vision_model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    return {
        "class": type(vision_model).__name__,
        "feature_layer": getattr(vision_model, "feature_layer", None),
        "select_strategy": getattr(vision_model, "select_strategy", None),
        "config": _plain(_without_bookkeeping(config_dict)),
        "weights_sha256": weights.hexdigest(),
    }


def preprocessing_fingerprint(image_processor: Any) -> dict[str, Any]:
    """The image processor's settings (`to_dict()`, less private entries): what turns an image into pixels."""
    if not hasattr(image_processor, "to_dict"):
        raise TypeError(
            "the disk feature cache records the image preprocessing that made it, which needs an image processor "
            f"with to_dict() (a transformers image processor); got {type(image_processor).__name__}"
        )
    settings = {key: value for key, value in image_processor.to_dict().items() if not key.startswith("_")}
    return _plain({"class": type(image_processor).__name__, **settings})


def _without_bookkeeping(config: dict[str, Any]) -> dict[str, Any]:
    return {
        key: _without_bookkeeping(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in IGNORED_CONFIG_KEYS and not key.startswith("_")
    }


def _plain(value: Any) -> Any:
    """`value` as JSON would read it back (tuples become lists, other objects their `str`), so that what is computed
    now compares equal to what a manifest holds."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# -- the disk cache -------------------------------------------------------------------------------------------------
class _DamagedCacheError(ValueError):
    """A cache file that is not what its manifest or this run's fingerprint says."""


def _open_or_build(
    folder: Path,
    identity: dict[str, Any],
    fingerprint: str,
    num_images: int,
    dtype: torch.dtype,
    batches: Callable[[int], Iterator[torch.Tensor]],
) -> torch.Tensor:
    """The features in `folder`, built first when it holds no complete cache; a cache of other origins is refused."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"cache_dir {folder} is a file, expected a folder for the feature cache (or a new path)"
        )
    if (folder / MANIFEST_FILE).exists():
        return _read_complete(folder, identity, fingerprint)
    with _build_lock(folder):
        if (folder / MANIFEST_FILE).exists():  # built by another process while this one waited for the lock
            return _read_complete(folder, identity, fingerprint)
        _build(folder, identity, fingerprint, num_images, dtype, batches)
    logger.info("cached the features of %d images in %s", num_images, folder)
    return _map_complete(folder, fingerprint)


def _read_complete(folder: Path, identity: dict[str, Any], fingerprint: str) -> torch.Tensor:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except ValueError as error:
        raise ValueError(
            f"the feature cache manifest {folder / MANIFEST_FILE} is unreadable ({error}); delete {folder} to rebuild"
        ) from error
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != CACHE_FORMAT
        or manifest.get("version") != CACHE_VERSION
    ):
        found = [manifest.get(key) for key in ("format", "version")] if isinstance(manifest, dict) else manifest
        raise ValueError(
            f"{folder / MANIFEST_FILE} is not a version-{CACHE_VERSION} {CACHE_FORMAT} manifest (format and version "
            f"{_short(found)}): use another cache_dir"
        )
    differences = _differences(manifest.get("identity", {}), identity)
    if differences:
        sections = sorted({path.split(".")[0] for path, _, _ in differences})
        listed = "; ".join(
            f"{path}: {_short(cached)} in the cache, {_short(now)} now" for path, cached, now in differences[:8]
        )
        more = f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
        raise ValueError(
            f"the feature cache in {folder} was made with a different {' / '.join(sections)} than this run's, so "
            f"its features are not this run's: {listed}{more}. Use another cache_dir, or delete {folder} to "
            "rebuild it"
        )
    return _map_complete(folder, fingerprint)


def _map_complete(folder: Path, fingerprint: str) -> torch.Tensor:
    """The memory-mapped features of the complete cache in `folder`, checked against `fingerprint`."""
    path = folder / FEATURE_FILE
    try:
        header, data_start = _read_header(path, fingerprint)
        entry = header["features"]
        code, shape = entry["dtype"], tuple(entry["shape"])
        torch_dtype = next(dtype for dtype, (known, _) in DISK_DTYPES.items() if known == code)
        expected = data_start + math.prod(shape) * torch_dtype.itemsize
        if path.stat().st_size != expected:
            raise _DamagedCacheError(f"{path.stat().st_size} bytes instead of the {expected} its header declares")
    except (OSError, _DamagedCacheError, KeyError, StopIteration, TypeError) as error:
        raise ValueError(
            f"the feature cache in {folder} is damaged ({FEATURE_FILE}: {error}); delete the folder to rebuild it"
        ) from error
    array = np.memmap(path, dtype=DISK_DTYPES[torch_dtype][1], mode="c", offset=data_start, shape=shape)
    features = torch.from_numpy(array)  # copy-on-write mapping: pages are shared, writes never reach the file
    return features.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else features


def _build(
    folder: Path,
    identity: dict[str, Any],
    fingerprint: str,
    num_images: int,
    dtype: torch.dtype,
    batches: Callable[[int], Iterator[torch.Tensor]],
) -> None:
    partial, final = folder / PARTIAL_FILE, folder / FEATURE_FILE
    if final.exists():  # renamed in, but the process ended before it wrote the manifest: finish that build
        os.replace(final, partial)
    resumed = _resumable(partial, fingerprint, num_images, dtype)
    with contextlib.ExitStack() as stack:
        if resumed is None:
            partial.unlink(missing_ok=True)
            done, file, data_start, row_shape = 0, None, 0, None
        else:
            data_start, row_shape, done = resumed
            file = stack.enter_context(open(partial, "r+b"))
            file.truncate(data_start + done * math.prod(row_shape) * dtype.itemsize)  # drop a half-written row
            file.seek(0, os.SEEK_END)
            logger.warning("resuming the feature cache build in %s at image %d of %d", folder, done, num_images)
        for batch in stack.enter_context(contextlib.closing(batches(done))):
            if file is None:  # the header needs the shape of a row, known from the first batch
                row_shape = tuple(batch.shape[1:])
                file = stack.enter_context(open(partial, "wb"))
                data_start = _write_header(file, fingerprint, (num_images, *row_shape), dtype)
            if tuple(batch.shape[1:]) != row_shape:
                raise ValueError(
                    f"the encoder gave features of shape {tuple(batch.shape[1:])} per image after {row_shape}: the "
                    "disk cache holds one shape for all images (give the image processor a fixed size)"
                )
            file.write(batch.contiguous().view(torch.uint8).numpy())
            file.flush()  # into the OS: a killed process leaves every row it wrote for the resumed build
        os.fsync(file.fileno())
    size, expected = partial.stat().st_size, data_start + num_images * math.prod(row_shape) * dtype.itemsize
    if size != expected:
        raise RuntimeError(f"the feature cache build wrote {size} bytes to {partial}, expected {expected}")
    os.replace(partial, final)
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "identity": identity,
        "features": {"file": FEATURE_FILE, "shape": [num_images, *row_shape], "dtype": identity["dtype"]},
        "created_with": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    _write_json_atomically(folder / MANIFEST_FILE, manifest)


def _resumable(
    partial: Path, fingerprint: str, num_images: int, dtype: torch.dtype
) -> tuple[int, tuple[int, ...], int] | None:
    """`(data_start, row_shape, complete rows)` of a partial build of this very cache, else None."""
    if not partial.exists():
        return None
    try:
        header, data_start = _read_header(partial, fingerprint)
        entry = header["features"]
        shape = tuple(entry["shape"])
        if entry["dtype"] != DISK_DTYPES[dtype][0] or shape[0] != num_images:
            raise _DamagedCacheError(f"dtype {entry['dtype']} and shape {shape}")
    except (OSError, _DamagedCacheError, KeyError, TypeError, IndexError) as error:
        logger.warning(
            "restarting the feature cache build in %s: its partial file is not resumable (%s)", partial, error
        )
        return None
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    return data_start, shape[1:], min((partial.stat().st_size - data_start) // row_bytes, num_images)


def _write_header(file: Any, fingerprint: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Writes the safetensors header of the whole cache (one tensor "features"); returns where the data starts."""
    header = {
        "__metadata__": {"format": CACHE_FORMAT, "fingerprint": fingerprint},
        "features": {
            "dtype": DISK_DTYPES[dtype][0],
            "shape": list(shape),
            "data_offsets": [0, math.prod(shape) * dtype.itemsize],
        },
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    file.write(struct.pack("<Q", len(text)) + text)
    return 8 + len(text)


def _read_header(path: Path, fingerprint: str) -> tuple[dict[str, Any], int]:
    """The safetensors header of `path` and where its data starts; `_DamagedCacheError` unless it was made for
    `fingerprint`."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise _DamagedCacheError("no header")
        (size,) = struct.unpack("<Q", prefix)
        if size > 1 << 20:
            raise _DamagedCacheError(f"a {size}-byte header")
        try:
            header = json.loads(file.read(size))
        except ValueError as error:
            raise _DamagedCacheError(f"unreadable header ({error})") from error
    if not isinstance(header, dict):
        raise _DamagedCacheError(f"a header that is a {type(header).__name__}, not an object")
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != CACHE_FORMAT or metadata.get("fingerprint") != fingerprint:
        raise _DamagedCacheError(
            "its header's fingerprint is not that of this encoder, preprocessing, dataset and dtype"
        )
    return header, 8 + size


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as file:
        json.dump(data, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    with contextlib.suppress(OSError):  # make the renames durable (not possible on every platform)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Held while this process builds the cache in `folder`; released when the process ends, however it ends."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning("waiting for another process to finish building the feature cache in %s", folder)
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _differences(cached: Any, now: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """`(dotted path, cached value, current value)` of every leaf where two manifests' identities differ."""
    if isinstance(cached, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(cached) | set(now)):
            found += _differences(
                cached.get(key, "<absent>"), now.get(key, "<absent>"), f"{path}.{key}" if path else key
            )
        return found
    return [] if cached == now else [(path, cached, now)]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
