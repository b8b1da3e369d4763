"""Saves are atomic and accumulate: a failure mid-save leaves the old checkpoint loading with its own weights, and a
model and its processor saved into one folder keep each other's files (issue 11 item 7)."""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import transformers
from tiny import TINY_RANDOM, randomise_, tiny_checkpoint_parts

import modeling_blip2.checkpoint_io as checkpoint_io
import modeling_blip2.conversion as conversion
from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2ImageTextProcessor, save_with_remote_code
from modeling_blip2.checkpoint_io import atomic_save, stale_weight_files, weight_file_variant

SHARDED = "40KB"  # the tiny model in several shards


@pytest.fixture(scope="module")
def parts():
    """The tiny model and processor, and a second model with other weights (the 'new version')."""
    model, processor = tiny_checkpoint_parts(seed=0)
    newer, _ = tiny_checkpoint_parts(seed=1)
    return model, processor, newer


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path: (folder / path).read_bytes() for path in checkpoint_io.relative_files(folder)}


def _disk_full_at(call: int, function):
    """`function`, except that its call number `call` raises ENOSPC, as a full disk does."""
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return function(*args, **kwargs)

    return failing


def _assert_old_checkpoint_intact(folder: Path, before: dict[str, bytes], model) -> None:
    assert _snapshot(folder) == before
    assert sorted(path.name for path in folder.parent.iterdir()) == [folder.name], "a staging folder was left behind"
    loaded = Blip2ForConditionalGeneration.from_pretrained(folder)
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def _saved(tmp_path: Path, model, processor, **kwargs) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder, **kwargs)
    processor.save_pretrained(folder)
    return folder, _snapshot(folder)


# -- a failure while writing leaves the old folder as it was --------------------------------------------------------
@pytest.mark.parametrize("old_shards", [None, SHARDED])
def test_model_save_failing_after_its_first_weight_file_keeps_the_old_checkpoint(
    parts, tmp_path, monkeypatch, old_shards
) -> None:
    model, processor, newer = parts
    folder, before = _saved(tmp_path, model, processor, **({"max_shard_size": old_shards} if old_shards else {}))
    monkeypatch.setattr(
        transformers.modeling_utils, "safe_save_file", _disk_full_at(2, transformers.modeling_utils.safe_save_file)
    )
    with pytest.raises(OSError, match="No space left"):
        newer.save_pretrained(folder, max_shard_size=SHARDED)
    monkeypatch.undo()
    _assert_old_checkpoint_intact(folder, before, model)


def test_processor_save_failing_midway_keeps_the_old_processor(parts, tmp_path, monkeypatch) -> None:
    model, processor, _ = parts
    folder, before = _saved(tmp_path, model, processor)
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.add_tokens(["<new-word>"])
    changed = Blip2ImageTextProcessor(processor.image_processor, tokenizer, num_query_tokens=4)
    # The tokenizer files are written first, processor_config.json last: fail on that.
    monkeypatch.setattr(
        transformers.ProcessorMixin, "to_json_file", _disk_full_at(1, transformers.ProcessorMixin.to_json_file)
    )
    with pytest.raises(OSError, match="No space left"):
        changed.save_pretrained(folder)
    monkeypatch.undo()
    _assert_old_checkpoint_intact(folder, before, model)
    assert Blip2ImageTextProcessor.from_pretrained(folder).num_query_tokens == processor.num_query_tokens


def test_remote_code_save_failing_after_the_model_keeps_the_old_checkpoint(parts, tmp_path, monkeypatch) -> None:
    model, processor, newer = parts
    folder = save_with_remote_code(model, tmp_path / "checkpoint", processor)
    before = _snapshot(folder)
    monkeypatch.setattr(
        Blip2ImageTextProcessor, "save_pretrained", _disk_full_at(1, Blip2ImageTextProcessor.save_pretrained)
    )
    with pytest.raises(OSError, match="No space left"):
        save_with_remote_code(newer, folder, processor)
    monkeypatch.undo()
    _assert_old_checkpoint_intact(folder, before, model)


def test_export_failing_after_its_first_shard_keeps_the_old_export(parts, tmp_path, monkeypatch) -> None:
    _, processor, _ = parts
    config = Blip2Config.from_pretrained(TINY_RANDOM)
    config.qformer_config.use_qformer_text_input = False  # the stock generation class has no Q-Former text side
    model, newer = (randomise_(Blip2ForConditionalGeneration(config), seed=seed).eval() for seed in (0, 1))
    for name, source in (("ours", model), ("newer", newer)):
        source.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    exported = tmp_path / "exported"
    exported.mkdir()
    options = {"allow_post_layernorm_eps_change": True}
    with pytest.warns(UserWarning):
        conversion.export_to_transformers(tmp_path / "ours", exported / "stock", **options)
    before = _snapshot(exported / "stock")
    monkeypatch.setattr(conversion, "save_file", _disk_full_at(2, conversion.save_file))
    with pytest.raises(OSError, match="No space left"), pytest.warns(UserWarning):
        conversion.export_to_transformers(tmp_path / "newer", exported / "stock", max_shard_size=SHARDED, **options)
    monkeypatch.undo()
    assert _snapshot(exported / "stock") == before
    assert [path.name for path in exported.iterdir()] == ["stock"]
    stock = transformers.Blip2ForConditionalGeneration.from_pretrained(exported / "stock")
    assert torch.equal(stock.query_tokens, model.query_tokens)


def test_a_failure_while_moving_the_files_in_is_rolled_back(parts, tmp_path, monkeypatch) -> None:
    model, processor, newer = parts
    folder, before = _saved(tmp_path, model, processor)
    # The third rename of the final move fails (two new shards are in place by then); only the move's renames.
    move_in = checkpoint_io._move_in

    def move_in_with_a_failing_rename(*args):
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", _disk_full_at(3, os.replace))
            return move_in(*args)

    monkeypatch.setattr(checkpoint_io, "_move_in", move_in_with_a_failing_rename)
    with pytest.raises(OSError, match="No space left"):
        newer.save_pretrained(folder, max_shard_size=SHARDED)
    monkeypatch.undo()
    _assert_old_checkpoint_intact(folder, before, model)


# -- sequential saves into one folder accumulate; superseded weights go ---------------------------------------------
def test_model_then_processor_then_resharded_model_accumulate(parts, tmp_path) -> None:
    model, processor, newer = parts
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "runs").mkdir()
    (folder / "runs" / "log.txt").write_text("a trainer's file")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    newer.save_pretrained(folder, max_shard_size=SHARDED)

    files = set(checkpoint_io.relative_files(folder))
    shards = {name for name in files if name.startswith("model-")}
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    assert "model.safetensors" not in files, "the old unsharded weights would load before the new index"
    assert {"notes.txt", "runs/log.txt", "processor_config.json", "tokenizer.json", "config.json"} <= files
    loaded = Blip2ForConditionalGeneration.from_pretrained(folder)
    assert all(torch.equal(tensor, newer.state_dict()[name]) for name, tensor in loaded.state_dict().items())
    assert Blip2ImageTextProcessor.from_pretrained(folder).num_query_tokens == processor.num_query_tokens

    model.save_pretrained(folder)  # and back to one file: the shards and their index go
    files = set(checkpoint_io.relative_files(folder))
    assert not {name for name in files if name.startswith("model-")} and "model.safetensors.index.json" not in files
    assert {"model.safetensors", "notes.txt", "runs/log.txt", "processor_config.json"} <= files
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint"]


def test_processor_first_then_model_keeps_the_processor(parts, tmp_path) -> None:
    model, processor, _ = parts
    folder = tmp_path / "new" / "checkpoint"  # parents are created, as transformers does
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    assert {"processor_config.json", "model.safetensors"} <= set(os.listdir(folder))
    # A fresh folder is the staging folder renamed: it gets the usual permissions, not mkdtemp's 0o700.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_lavis_conversion_into_an_old_output_keeps_it_on_failure(tmp_path, monkeypatch) -> None:
    model, _ = tiny_checkpoint_parts()
    output = tmp_path / "converted"
    model.save_pretrained(output)
    before = _snapshot(output)
    converted = conversion.ConversionResult(state_dict=dict(model.state_dict()))
    monkeypatch.setattr(conversion, "load_lavis_state_dict", lambda *args, **kwargs: {})
    monkeypatch.setattr(conversion, "convert_lavis_state_dict", lambda *args, **kwargs: converted)
    monkeypatch.setattr(conversion, "save_file", _disk_full_at(1, conversion.save_file))
    with pytest.raises(OSError, match="No space left"):
        conversion.convert_lavis_checkpoint("unused.pth", model.config, output, allow_pickle=True)
    assert _snapshot(output) == before
    assert [path.name for path in tmp_path.iterdir()] == ["converted"]


def test_a_folder_whose_parent_is_not_writable_is_staged_inside_itself(parts, tmp_path, monkeypatch) -> None:
    model, processor, newer = parts
    folder, _ = _saved(tmp_path, model, processor)
    new_folder = checkpoint_io._new_folder

    def parent_not_writable(parent: Path, prefix: str) -> Path:
        if parent == tmp_path.resolve():
            raise PermissionError(13, "Permission denied", str(parent))
        return new_folder(parent, prefix)

    monkeypatch.setattr(checkpoint_io, "_new_folder", parent_not_writable)
    newer.save_pretrained(folder)
    assert not [path for path in folder.iterdir() if path.name.startswith(".")]
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint"]
    loaded = Blip2ForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(loaded.query_tokens, newer.query_tokens)


# -- the helper itself ----------------------------------------------------------------------------------------------
def test_atomic_save_refuses_a_file_and_cleans_up_after_an_exception(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file"), atomic_save(tmp_path / "file"):
        pass
    with pytest.raises(RuntimeError, match="boom"), atomic_save(tmp_path / "folder") as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("boom")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_which_weight_files_a_save_supersedes() -> None:
    assert weight_file_variant("model.safetensors") == ""
    assert weight_file_variant("model-00001-of-00002.safetensors") == ""
    assert weight_file_variant("model.safetensors.index.json") == ""
    assert weight_file_variant("pytorch_model.bin") == ""
    assert weight_file_variant("model.fp16-00001-of-00002.safetensors") == "fp16"
    assert weight_file_variant("adapter_model.safetensors") is None
    assert weight_file_variant("sub/model.safetensors") is None
    assert weight_file_variant("config.json") is None
    existing = [
        "config.json",
        "model.safetensors",
        "model-00001-of-00003.safetensors",
        "pytorch_model.bin",
        "model.fp16.safetensors",
        "adapter_model.safetensors",
    ]
    written = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert stale_weight_files(existing, written) == [
        "model-00001-of-00003.safetensors",
        "model.safetensors",
        "pytorch_model.bin",
    ]
    assert stale_weight_files(existing, ["processor_config.json", "tokenizer.json"]) == []


def test_index_file_given_as_a_folder_is_not_read_as_a_config(tmp_path, parts) -> None:
    model, processor, _ = parts
    model.save_pretrained(tmp_path, max_shard_size=SHARDED)
    index = tmp_path / "model.safetensors.index.json"
    assert json.loads(index.read_text())["weight_map"]
    with pytest.raises(NotADirectoryError, match="a weights file"):
        Blip2ForConditionalGeneration.config_class.from_pretrained(index)
