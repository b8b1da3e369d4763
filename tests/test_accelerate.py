"""accelerate big-model loading: `device_map="auto"` with disk offload; `_no_split_modules` keep blocks whole."""

from __future__ import annotations

import pytest
import torch
from accelerate import infer_auto_device_map
from tiny import TEXT, config_dict, pixels, prompt_with_image_tokens, randomise_
from torch import nn

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration

FAMILIES = ("opt", "llama", "t5")
LLM_LAYER_CLASS = {"opt": "OPTDecoderLayer", "llama": "LlamaDecoderLayer", "t5": "T5Block"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple]:
    folders = {}
    for family in FAMILIES:
        model = randomise_(Blip2ForConditionalGeneration(Blip2Config(**config_dict(family))), std=0.1).eval()
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        folders[family] = (folder, model)
    return folders


def _batch(family: str) -> dict[str, torch.Tensor]:
    ids, mask = prompt_with_image_tokens([[5, 6, 7], [8, 9, 10, 11]], TEXT[family]["pad_token_id"])
    batch = {"pixel_values": pixels(), "input_ids": ids, "attention_mask": mask}
    if family == "t5":
        batch["decoder_input_ids"] = torch.tensor([[0, 12, 13], [0, 15, 16]])
    return batch


def _bytes(model: nn.Module, *prefixes: str) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name.startswith(prefixes))


def _largest_block(model: nn.Module, prefix: str = "") -> int:
    """What accelerate reserves on its main device for the biggest piece (under `prefix`) it may have to load there."""
    pieces = _unsplittable(model) + [name for name, m in model.named_modules() if not list(m.children())]
    return max(_bytes(model, name + ".") for name in pieces if name.startswith(prefix))


def _unsplittable(model: nn.Module) -> list[str]:
    """Paths of the module instances that `_no_split_modules` says must stay on one device."""
    classes = set(model._no_split_modules)
    return [name for name, module in model.named_modules() if type(module).__name__ in classes]


def _assert_respects_no_split(device_map: dict, model: nn.Module) -> None:
    blocks = _unsplittable(model)
    assert blocks
    for key in device_map:
        inside = [block for block in blocks if key.startswith(block + ".")]
        assert not inside, f"device map key {key!r} splits {inside}"


@pytest.mark.parametrize("family", FAMILIES)
def test_no_split_modules_cover_vision_qformer_and_llm_layers(saved, family: str) -> None:
    _, model = saved[family]
    assert {"Blip2VisionEncoderLayer", "Blip2QFormerLayer", LLM_LAYER_CLASS[family]} <= set(model._no_split_modules)
    names = _unsplittable(model)
    assert any(name.startswith("vision_model.encoder.layers.") for name in names)
    assert any(name.startswith("qformer.encoder.layer.") for name in names)
    assert any(name.startswith("language_model.") for name in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_disk_offload_with_device_map_auto_gives_the_same_logits_and_generation(saved, family, tmp_path) -> None:
    folder, reference = saved[family]
    # Room for everything but half of the LLM (and the piece accelerate reserves): the LLM is cut between CPU and disk.
    budget = _bytes(reference, "query_tokens", "vision_model", "qformer", "language_projection")
    budget += _bytes(reference, "language_model") // 2 + _largest_block(reference, "language_model.")
    model = Blip2ForConditionalGeneration.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / "offload")
    )
    device_map = model.hf_device_map
    assert device_map.get("vision_model") == "cpu" and device_map.get("qformer") == "cpu"
    llm_places = {where for key, where in device_map.items() if key.startswith("language_model.")}
    assert llm_places == {"cpu", "disk"}
    _assert_respects_no_split(device_map, model)

    batch = _batch(family)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=1e-6)
    generate_inputs = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    sequences = model.generate(*generate_inputs, max_new_tokens=3)
    assert sequences.device == batch["input_ids"].device
    assert torch.equal(sequences, reference.generate(*generate_inputs, max_new_tokens=3))


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_auto_device_map_across_devices_keeps_blocks_whole(saved, family: str) -> None:
    _, model = saved[family]
    # Many small (fictitious) accelerators, each about one block big: the model is cut as finely as allowed.
    block = _largest_block(model)
    max_memory = {index: block for index in range(16)} | {0: 2 * block, "cpu": 2 * block}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
    assert len(set(device_map.values())) > 5
    _assert_respects_no_split(device_map, model)
    # Each vision layer, Q-Former layer and LLM layer got a key of its own, i.e. the cuts are at block boundaries.
    blocks = set(_unsplittable(model))
    placed = {key for key in device_map if key in blocks}
    for part in ("vision_model.encoder.", "qformer.encoder.", "language_model."):
        assert len({key for key in placed if key.startswith(part)}) >= 2, part
    # Without the no-split list accelerate would cut inside those blocks: the list is what keeps them whole.
    unconstrained = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=[])
    assert any(key.startswith(name + ".") for key in unconstrained for name in blocks)


def test_vision_encoder_offloaded_to_disk(saved, tmp_path) -> None:
    folder, reference = saved["opt"]
    device_map = {
        "query_tokens": "cpu",
        "vision_model": "disk",
        "qformer": "cpu",
        "language_projection": "cpu",
        "language_model": "cpu",
    }
    model = Blip2ForConditionalGeneration.from_pretrained(
        folder, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch("opt")).logits, reference(**_batch("opt")).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_returns_ids_on_the_input_device_across_gpu_and_cpu(saved) -> None:
    folder, reference = saved["opt"]
    budget = _bytes(reference, "query_tokens", "vision_model", "qformer", "language_projection")
    model = Blip2ForConditionalGeneration.from_pretrained(
        folder, device_map="auto", max_memory={0: budget + 4096, "cpu": 10 * budget}
    )
    assert {0, "cpu"} <= set(model.hf_device_map.values())
    batch = {key: value.to("cuda:0") for key, value in _batch("opt").items()}
    sequences = model.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], max_new_tokens=3)
    assert sequences.device == batch["input_ids"].device
    assert sequences.shape == (2, batch["input_ids"].shape[1] + 3)
