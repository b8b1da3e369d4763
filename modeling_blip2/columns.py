"""Reading the columns of training examples, with errors that name the example and the column.

Column names may reach into nested values with dots: `"json.captions"` reads `example["json"]["captions"]` (a
webdataset sample's `.json` member arrives as a dict under `"json"`). A caption column may hold one string or a list
of captions (CapFilt's kept captions, COCO's five): `caption_values` draws one per example, from the example's own
random generator (`sample_rng`), so the draw is seeded and a resumed run repeats it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# Key under which `Blip2Trainer` tells the collators an example's (epoch, index); not a column of the user's data.
SAMPLE_KEY = "__blip2_sample__"
# A webdataset sample's key (its file name stem in the shard), the fallback image id of a sample without an id column.
WEBDATASET_KEY = "__key__"


def has_column(example: Any, column: str) -> bool:
    """Whether `example` has `column` (a dotted name reaches into nested dicts)."""
    if not isinstance(example, Mapping):
        return False
    if column in example:
        return True
    head, dot, rest = column.partition(".")
    return bool(dot) and head in example and has_column(example[head], rest)


def column_value(example: Any, index: int, column: str, what: str) -> Any:
    """`example[column]` (a dotted name reaches into nested dicts: `"json.captions"`), or an error naming the
    example, the missing column and the columns it has."""
    if not isinstance(example, Mapping):
        raise TypeError(f"examples must be dicts of columns, example {index} is {type(example).__name__}")
    if column in example:
        return example[column]
    head, dot, rest = column.partition(".")
    if dot and head in example and isinstance(example[head], Mapping) and has_column(example[head], rest):
        return column_value(example[head], index, rest, what)
    columns = sorted(key for key in example if key != SAMPLE_KEY)
    nested = {key: sorted(value) for key, value in example.items() if isinstance(value, Mapping) and key != SAMPLE_KEY}
    inside = f" (nested: {nested})" if nested else ""
    raise ValueError(
        f"example {index} has no {column!r} column (the {what}s); its columns are {columns}{inside}. Name the {what} "
        "column in the collator (e.g. image_column=..., text_column=...; a dotted name such as 'json.captions' "
        "reads a nested value)"
    )


def text_values(examples: Sequence[Any], column: str, what: str = "caption") -> list[str]:
    """The stripped non-empty strings of `column` in every example, or a `ValueError` naming the bad one."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    texts = []
    for index, example in enumerate(examples):
        text = column_value(example, index, column, what)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"example {index} has an empty or missing {what} ({column!r}): {text!r}")
        texts.append(text.strip())
    return texts


def caption_values(
    examples: Sequence[Any], column: str, seed: int, fallback: random.Random, what: str = "caption"
) -> list[str]:
    """One caption per example: the string in `column`, or one caption drawn from the list of captions there.

    The draw comes from the example's own generator (`sample_rng(seed, example, fallback, "caption")`: a function of
    (seed, epoch, sample) under `Blip2Trainer`, independent of the augmentation's draws), so it is reproducible,
    changes from epoch to epoch, and a resumed run draws what the uninterrupted one drew. Empty lists, empty
    captions and other types are refused, naming the example (and its webdataset key when it has one).
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    texts = []
    for index, example in enumerate(examples):
        value = column_value(example, index, column, what)
        name = _example_name(example, index)
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(
                    f"{name} has an empty list of {what}s ({column!r}): a caption list needs at least one {what}"
                )
            bad = [item for item in value if not isinstance(item, str) or not item.strip()]
            if bad:
                raise ValueError(f"{name} has an empty or non-string {what} in its list ({column!r}): {bad[0]!r}")
            value = value[sample_rng(seed, example, fallback, "caption").randrange(len(value))]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{name} has an empty or missing {what} ({column!r}): {value!r} (expected a string or a list of "
                "strings)"
            )
        texts.append(value.strip())
    return texts


def _example_name(example: Any, index: int) -> str:
    key = example.get(WEBDATASET_KEY) if isinstance(example, Mapping) else None
    return f"example {index} ({WEBDATASET_KEY} {key!r})" if key is not None else f"example {index}"


def sample_rng(seed: int, example: Mapping[str, Any], fallback: random.Random, purpose: str = "") -> random.Random:
    """The random generator of one example: seeded by (seed, epoch, index[, purpose]) when `Blip2Trainer` keyed the
    example (reproducible across resumes and worker processes), else the collator's own running generator. Draws
    for different purposes (augmentation, caption choice) come from independent generators."""
    key = example.get(SAMPLE_KEY)
    if key is None:
        return fallback
    epoch, index = key
    return random.Random(f"{seed}:{epoch}:{index}:{purpose}" if purpose else f"{seed}:{epoch}:{index}")


def image_id_value(value: Any, index: int, column: str) -> int:
    """An image id as an int. Integers (and integral floats) are kept; strings (file names, webdataset `__key__`s)
    become a stable 63-bit hash of their UTF-8 bytes (the same in every process and run; two different strings
    collide with probability ~2^-63). Non-integral numbers and other types are refused (1.7 and 1.2 must not merge)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, str):
        return stable_string_id(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise ValueError(
            f"example {index} has image id {value!r} ({column!r}): image ids must be integers or strings (captions "
            "with the same id are positives of each other); map other ids (floats, lists) to integers first"
        )
    return int(value)


def stable_string_id(text: str) -> int:
    """A non-negative int64 id of `text`: the first 63 bits of its BLAKE2b digest (unlike `hash`, stable across
    processes and runs)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1
