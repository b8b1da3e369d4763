"""Reading the columns of training examples, with errors that name the example and the column."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Key under which `Blip2Trainer` tells the collators an example's (epoch, index); not a column of the user's data.
SAMPLE_KEY = "__blip2_sample__"


def column_value(example: Any, index: int, column: str, what: str) -> Any:
    """`example[column]`, or an error naming the example, the missing column and the columns it has."""
    if not isinstance(example, Mapping):
        raise TypeError(f"examples must be dicts of columns, example {index} is {type(example).__name__}")
    if column not in example:
        columns = sorted(key for key in example if key != SAMPLE_KEY)
        raise ValueError(
            f"example {index} has no {column!r} column (the {what}s); its columns are {columns}. Name the {what} "
            "column in the collator (e.g. image_column=..., text_column=...)"
        )
    return example[column]


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
