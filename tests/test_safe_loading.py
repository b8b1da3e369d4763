"""Safetensors by default, pickle only on request, and clear errors for broken or foreign checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny import tiny_checkpoint_parts

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2ImageTextProcessor, blip2_image_processor


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
