"""Safetensors by default, pickle only on request, and clear errors for broken or foreign checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny import tiny_checkpoint_parts

from modeling_blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ImageTextProcessor,
    Blip2VisionConfig,
    blip2_image_processor,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model, processor = tiny_checkpoint_parts()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model


def test_pickle_checkpoint_is_refused_unless_asked_for(saved, tmp_path) -> None:
    folder, model = saved
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save({key: value.clone() for key, value in model.state_dict().items()}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no safetensors weights.*allow_pickle=True"):
        Blip2ForConditionalGeneration.from_pretrained(pickled)
    with pytest.raises(ValueError, match="use_safetensors=False reads pickle weights"):
        Blip2ForConditionalGeneration.from_pretrained(pickled, use_safetensors=False)
    loaded = Blip2ForConditionalGeneration.from_pretrained(pickled, allow_pickle=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_says_so(saved, tmp_path, damage: str) -> None:
    folder, _ = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((folder / name).read_bytes())
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    with pytest.raises(ValueError, match="safetensors weights of .* are corrupt or truncated"):
        Blip2ForConditionalGeneration.from_pretrained(broken)


def test_config_of_another_model_type_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ValueError, match="expects a BLIP-2 config .* got model_type 'bert'"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="got model_type 'bert'"):
        Blip2Config.from_pretrained(tmp_path)


def test_processor_with_another_query_count_fails_with_the_counts(saved) -> None:
    folder, model = saved
    tokenizer = Blip2ImageTextProcessor.from_pretrained(folder).tokenizer
    mismatched = Blip2ImageTextProcessor(blip2_image_processor(28), tokenizer, num_query_tokens=6)
    inputs = mismatched(images=Image.new("RGB", (5, 5)), text="a cat")
    with pytest.raises(ValueError, match="has 6 image tokens .* num_query_tokens=4"):
        model.generate(**inputs, max_new_tokens=2)


# -- paths that are not checkpoint folders (issue 11, bad-input list) -----------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json"])
def test_a_weights_file_instead_of_the_folder_is_named(saved, tmp_path, name: str) -> None:
    folder, model = saved
    if name == "model.safetensors":
        weights = folder / name
    else:
        model.save_pretrained(tmp_path, max_shard_size="40KB")
        weights = tmp_path / name
    loaders = {
        "Blip2ForConditionalGeneration": Blip2ForConditionalGeneration.from_pretrained,
        "Blip2Config": Blip2Config.from_pretrained,
        "Blip2VisionConfig": Blip2VisionConfig.from_pretrained,
        "Blip2ImageTextProcessor": Blip2ImageTextProcessor.from_pretrained,
    }
    for caller, load in loaders.items():
        with pytest.raises(NotADirectoryError) as error:
            load(weights)
        message = str(error.value)
        assert f"{caller}.from_pretrained expects a checkpoint folder" in message
        assert f"got the file {weights} (a weights file): pass its folder {weights.parent}" in message


def test_a_folder_without_config_json_is_refused_before_a_model_is_built(saved, tmp_path, monkeypatch) -> None:
    folder, _ = saved
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())

    def no_building(*args, **kwargs):
        raise AssertionError("a model was built from a default config (5 GB for the default BLIP-2)")

    monkeypatch.setattr(Blip2ForConditionalGeneration, "__init__", no_building)
    expected = f"{tmp_path} has no config.json, so it is not a checkpoint folder .* holds model.safetensors"
    with pytest.raises(FileNotFoundError, match=expected):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=expected):
        Blip2Config.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no processor_config.json or preprocessor_config.json"):
        Blip2ImageTextProcessor.from_pretrained(tmp_path)
    monkeypatch.undo()
    # A config passed in needs no config.json; nor does a config read from its own JSON file. (transformers itself
    # then needs generation_config.json for a generative model.)
    config = Blip2Config.from_pretrained(folder / "config.json")
    (tmp_path / "generation_config.json").write_bytes((folder / "generation_config.json").read_bytes())
    assert Blip2ForConditionalGeneration.from_pretrained(tmp_path, config=config).config.num_query_tokens == 4
