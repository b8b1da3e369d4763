"""Streaming and map-style datasets under `Blip2Trainer`: per-example (epoch, index) keys for the collators' random
draws, and the stream position a resumed run continues from."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .columns import SAMPLE_KEY


class _SampleKeyedDataset(Dataset):
    """A map-style dataset whose examples also carry `(epoch, index)` under `SAMPLE_KEY` (for the collators' random
    draws); `Blip2Trainer` sets `epoch` at the start of each epoch."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        if not isinstance(example, Mapping):
            raise TypeError(f"training examples must be dicts of columns, example {index} is {type(example).__name__}")
        return {**example, SAMPLE_KEY: (self.epoch, int(index))}


def _is_map_style(dataset: Any) -> bool:
    return (
        dataset is not None
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
    )


# Batch entry holding the (epoch, index) keys of a streamed batch's examples, (B, 2); taken out before the model.
STREAM_KEYS = "__blip2_stream_keys__"


def _is_stream(dataset: Any) -> bool:
    """A streaming dataset: a torch `IterableDataset` (a `datasets.IterableDataset` is one once torch is imported)."""
    if isinstance(dataset, IterableDataset):
        return True
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, datasets.IterableDataset)


class _SampleKeyedStream(IterableDataset):
    """A streaming dataset whose examples also carry `(epoch, index)` under `SAMPLE_KEY`, read by `Blip2Trainer`.

    What each pass reads. Pass `epoch` (transformers' epoch; shifted on resume so that it keeps counting passes)
    first calls the dataset's `set_epoch(epoch)`: a `datasets.IterableDataset` then orders its shards and fills its
    shuffle buffer from `seed + epoch` (`dataset.shuffle(seed, buffer_size)`), a different order every pass. The
    examples of a pass are numbered in stream order. With W > 0 DataLoader workers, worker w reads its own part of
    the stream (a `datasets.IterableDataset` gives it every W-th shard; any other `IterableDataset` must split itself
    with `torch.utils.data.get_worker_info()`, or every worker reads everything) and its i-th example gets index
    `i * W + w`. Under several processes accelerate decides who reads: by default (`dispatch_batches`) process 0
    reads the stream and sends each process its slice of every global batch; with `dispatch_batches=False` every
    process reads the whole stream and keeps its slice. Either way the global batches, and the keys, are those of
    one process reading with the global batch size.

    Resume. `Blip2Trainer` records, per worker, how many examples of the current pass the completed optimiser steps
    consumed (`StreamPosition`, saved in the checkpoint's `trainer_state.json`). A resumed run restarts the saved
    pass with the same `set_epoch` (same shard order and shuffle buffer) and drops each worker's consumed examples
    before the collator: no example of the pass is trained on twice and none is left out, and every later example
    gets the key, hence the random draws (augmentation, caption choice), of the uninterrupted run. Dropping still
    reads and decodes the dropped examples (streams have no random access), but neither collates nor trains on them.
    With 0 workers the resumed run sees exactly the uninterrupted run's batches; with W workers each worker's
    batches are the same, but the DataLoader starts its round-robin over the workers at worker 0 again, so the
    order of batches after the resume can differ (when the steps before the checkpoint consumed a number of batches
    that is not a multiple of W). transformers' own resume for a stream would instead re-read and collate all
    `global_step * gradient_accumulation_steps` batches from the start of pass 0, which repeats data once a run has
    passed the end of the stream.
    """

    def __init__(self, dataset: Any, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = max(1, num_workers)
        # [transformers' epoch, epoch offset, resumed pass (-1: none), consumed examples per worker ...], in shared
        # memory so that persistent DataLoader workers see set_epoch and start.
        self._state = torch.zeros(3 + self.num_workers, dtype=torch.long).share_memory_()
        self._state[2] = -1

    @property
    def epoch(self) -> int:
        """The pass the next iteration reads."""
        return int(self._state[0] + self._state[1])

    def set_epoch(self, epoch: int) -> None:
        """transformers' epoch (accelerate's loaders forward it here before each pass)."""
        self._state[0] = epoch

    def start(self, epoch_offset: int, epoch: int, consumed: Sequence[int] | None) -> None:
        """Pass = transformers' epoch + `epoch_offset`; pass `epoch` drops each worker's first `consumed[w]`."""
        self._state[1] = epoch_offset
        self._state[2] = epoch if consumed is not None else -1
        self._state[3:] = torch.tensor(list(consumed) if consumed is not None else [0] * self.num_workers)

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        epoch = self.epoch
        skip = int(self._state[3 + worker]) if int(self._state[2]) == epoch else 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        for position, example in enumerate(self.dataset):
            if position < skip:
                continue
            if not isinstance(example, Mapping):
                raise TypeError(
                    f"streamed training examples must be dicts of columns, example {position} of pass {epoch} is "
                    f"{type(example).__name__}"
                )
            yield {**example, SAMPLE_KEY: (epoch, position * workers + worker)}


class _StreamKeyCollator:
    """The collator of a streamed batch, plus the examples' (epoch, index) keys as a (B, 2) tensor under
    `STREAM_KEYS` (a tensor, so that accelerate dispatches and slices it with the batch)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.keyed = bool(getattr(collator, "draws_per_sample", False))

    def __call__(self, examples: Sequence[dict[str, Any]]) -> Any:
        keys = torch.tensor([example[SAMPLE_KEY] for example in examples], dtype=torch.long)  # (B, 2)
        if not self.keyed:  # a collator that does not expect the key gets the user's columns only
            examples = [{key: value for key, value in example.items() if key != SAMPLE_KEY} for example in examples]
        batch = self.collator(examples)
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                "training from a stream needs a collator that returns a dict of tensors, "
                f"{type(self.collator).__name__} returned {type(batch).__name__}"
            )
        batch[STREAM_KEYS] = keys
        return batch


class StreamPosition(TrainerCallback, ExportableState):
    """Where a run reading a streaming dataset is: the pass (`epoch`) and, per DataLoader worker, how many examples
    of that pass the completed optimiser steps consumed (`consumed`). `Blip2Trainer` adds it when it trains from a
    stream; transformers saves its `state()` in every checkpoint's `trainer_state.json`, and a resumed run starts
    the stream there (see `_SampleKeyedStream`)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.consumed: list[int] = [0]
        self._position: torch.Tensor | None = None  # [epoch, consumed ...] on the batches' device, between saves

    def reset(self, num_workers: int, epoch: int = 0, consumed: Sequence[int] | None = None) -> None:
        """Start at pass `epoch`, `consumed[w]` examples in for worker w (none by default)."""
        self._position = None
        self.epoch = int(epoch)
        self.consumed = [int(n) for n in consumed] if consumed is not None else [0] * max(1, num_workers)

    def advance(self, keys: torch.Tensor, accelerator: Any) -> None:
        """Take in the (n, 2) keys of one optimiser step's batches (this process's share of them); with several
        processes the positions are gathered, so every process holds the global one. Stays on the device (no
        synchronisation with it) until `state()` is read."""
        workers = len(self.consumed)
        position = self._position
        if position is None or position.device != keys.device:
            position = torch.tensor([self.epoch, *self.consumed], dtype=torch.long, device=keys.device)
        epoch = torch.maximum(position[0], keys[:, 0].max())
        counts = torch.where(epoch > position[0], torch.zeros_like(position[1:]), position[1:])
        index = keys[:, 1]
        reached = torch.where(keys[:, 0] == epoch, index // workers + 1, torch.zeros_like(index))
        counts = counts.scatter_reduce(0, index % workers, reached, reduce="amax")
        position = torch.cat([epoch[None], counts])
        if accelerator.num_processes > 1:
            every = accelerator.gather(position[None])  # (processes, 1 + workers)
            epoch = every[:, 0].max()
            latest = torch.where(every[:, :1] == epoch, every[:, 1:], torch.zeros_like(every[:, 1:]))
            position = torch.cat([epoch[None], latest.amax(0)])
        self._position = position

    def state(self) -> dict[str, Any]:
        if self._position is not None:
            values = self._position.tolist()
            self.epoch, self.consumed = values[0], values[1:]
        return {"args": {}, "attributes": {"epoch": self.epoch, "consumed": list(self.consumed)}}
