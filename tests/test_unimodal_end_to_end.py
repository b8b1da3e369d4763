"""Composed models (issue 12) through the rest of the package: Trainer with augmentation, the processor, the
pipeline and remote code from a saved folder, the precision policy, VQA prediction.

Tiny DINOv2 (with its own BitImageProcessor, shortest-edge resize and center crop) and CLIP-vision encoders, a Llama
LLM with the tiny-random tokenizer and a BERT are saved locally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_remote_code import CHILD
from tiny import QFORMER_WORDS, TEXT, TINY_RANDOM, randomise_, tiny_qformer_tokenizer
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    pipeline,
)

from modeling_blip2 import (
    Blip2CaptionCollator,
    Blip2ForConditionalGeneration,
    Blip2ImageTextProcessor,
    Blip2Trainer,
    Blip2TrainingArguments,
    predict_answers,
    save_with_remote_code,
)

VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
VIT.update(image_size=28, patch_size=7)
BRIDGE = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    randomise_(Dinov2Model(Dinov2Config(**VIT)), std=0.1, seed=1).save_pretrained(root / "dinov2")
    size = {"shortest_edge": 32}
    BitImageProcessor(size=size, crop_size={"height": 28, "width": 28}).save_pretrained(root / "dinov2")
    randomise_(CLIPVisionModel(CLIPVisionConfig(**VIT)), std=0.1, seed=2).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(
        root / "clip"
    )
    llama = {key: value for key, value in TEXT["llama"].items() if key != "model_type"}
    randomise_(LlamaForCausalLM(LlamaConfig(**llama)), std=0.1, seed=3).save_pretrained(root / "llama")
    AutoTokenizer.from_pretrained(TINY_RANDOM).save_pretrained(root / "llama")
    bert = BertConfig(vocab_size=len(QFORMER_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    randomise_(BertModel(BertConfig(**{**bert.to_dict(), "intermediate_size": 64})), std=0.1).save_pretrained(
        root / "bert"
    )
    tiny_qformer_tokenizer().save_pretrained(root / "bert")
    return {name: root / name for name in ("dinov2", "clip", "llama", "bert")}


def _parts(folders: dict[str, Path], vision: str = "dinov2") -> tuple[Blip2ForConditionalGeneration, object]:
    model = Blip2ForConditionalGeneration.from_unimodal_pretrained(
        folders[vision], folders["llama"], folders["bert"], num_query_tokens=4
    )
    processor = Blip2ImageTextProcessor.from_unimodal_pretrained(
        folders[vision], folders["llama"], folders["bert"], num_query_tokens=4
    )
    return model, processor


def _examples() -> list[dict]:
    words = ("red", "green", "blue", "white")
    return [
        {"image": Image.effect_noise((36, 36), 30 + 10 * index).convert("RGB"), "text": f"a {word} ball"}
        for index, word in enumerate(words)
    ]


def test_trainer_with_augmentation_trains_only_the_bridge(folders, tmp_path) -> None:
    model, processor = _parts(folders)
    assert model.config.image_token_index == processor.image_token_id
    collator = Blip2CaptionCollator(processor, is_encoder_decoder=False, augment=True)  # crop side from crop_size
    assert collator.augmentation.size == 28
    args = Blip2TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, warmup_steps=0,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
    )  # fmt: skip
    before = {name: value.clone() for name, value in model.state_dict().items()}
    Blip2Trainer(model=model, args=args, train_dataset=_examples(), data_collator=collator).train()
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith(BRIDGE) for name in changed), sorted(changed)


def test_a_saved_composed_model_captions_with_the_pipeline_and_as_remote_code(folders, tmp_path) -> None:
    model, processor = _parts(folders, "clip")
    model.eval()
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    inputs = processor(images=[image, image], text=["a photo of", "a"], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5).tolist()

    model.save_pretrained(tmp_path / "plain")
    processor.save_pretrained(tmp_path / "plain")
    captioner = pipeline("image-to-text", model=str(tmp_path / "plain"), trust_remote_code=True)
    assert isinstance(captioner(image, max_new_tokens=3)[0]["generated_text"], str)

    folder = save_with_remote_code(model, tmp_path / "remote", processor)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model_module"].startswith("transformers_modules.") and report["ids"] == expected


def test_bf16_frozen_parts_keep_the_bridge_in_fp32(folders, tmp_path) -> None:
    model, processor = _parts(folders)
    model.save_pretrained(tmp_path)
    loaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.vision_model.backbone.dtype == torch.bfloat16
    assert loaded.language_model.dtype == torch.bfloat16
    assert loaded.vision_model.post_layernorm.weight.dtype == torch.float32
    assert loaded.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.float32
    inputs = processor(images=_examples()[0]["image"], text="a photo of", return_tensors="pt")
    generated = loaded.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_vqa_prediction_reuses_any_encoder(folders) -> None:
    model, processor = _parts(folders)
    model.eval()
    images = [example["image"] for example in _examples()[:2]]
    answers = predict_answers(model, processor, images, ["what is it?", "is it red?", "what?"], image_index=[0, 0, 1])
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)


def test_device_map_auto_with_offload_keeps_the_encoders_blocks_whole(folders, tmp_path) -> None:
    """The tower's own `_no_split_modules` reach the composite (a plain wrapper would hide them)."""
    model, processor = _parts(folders)
    model.eval().save_pretrained(tmp_path / "saved")
    assert {"Dinov2Layer", "LlamaDecoderLayer", "Blip2QFormerLayer"} <= set(model._no_split_modules)
    offloaded = Blip2ForConditionalGeneration.from_pretrained(
        tmp_path / "saved",
        device_map="auto",
        max_memory={"cpu": "60KB", "disk": "1GB"},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    inputs = processor(images=_examples()[0]["image"], text="a photo of", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(offloaded(**inputs).logits, model(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("layer", [-1, -2])
def test_a_vit_config_builds_runs_and_round_trips(layer: int, tmp_path) -> None:
    from tiny import config_dict
    from transformers import ViTConfig

    from modeling_blip2 import Blip2Config

    config = Blip2Config(
        **{**config_dict("opt"), "vision_config": ViTConfig(**VIT).to_dict(), "vision_feature_layer": layer}
    )
    model = Blip2ForConditionalGeneration(config).eval()
    pixels = torch.randn(2, 3, 28, 28)
    ids = torch.tensor([[config.image_token_index] * 4 + [5, 6]] * 2)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(pixel_values=pixels, input_ids=ids).logits
        hidden = model.vision_model.backbone(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        assert torch.equal(model.vision_model.forward_features(pixels), hidden)
        assert torch.equal(
            Blip2ForConditionalGeneration.from_pretrained(tmp_path)(pixel_values=pixels, input_ids=ids).logits,
            expected,
        )


def test_composition_puts_the_loaded_llm_in_as_is_and_initialises_the_new_parts(folders, monkeypatch) -> None:
    """The composite is built on the meta device around the loaded LLM (no random LLM is allocated and dropped)."""
    import modeling_blip2.composition as composition

    loaded = []
    original = composition.load_language_model
    monkeypatch.setattr(
        composition, "load_language_model", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1]
    )
    model = Blip2ForConditionalGeneration.from_unimodal_pretrained(
        folders["dinov2"], folders["llama"], num_query_tokens=4
    )
    assert model.language_model is loaded[0][0]
    reference = Blip2ForConditionalGeneration(model.config)  # how the model initialises the parts itself
    for name in ("qformer.layernorm.weight", "qformer.encoder.layer.0.output_query.LayerNorm.bias"):
        assert torch.equal(model.get_parameter(name), reference.get_parameter(name)), name
    for name in (
        "query_tokens",
        "qformer.encoder.layer.0.attention.attention.query.weight",
        "language_projection.weight",
    ):
        ours, theirs = model.get_parameter(name), reference.get_parameter(name)
        assert torch.isfinite(ours).all() and abs(float(ours.std()) - float(theirs.std())) < 0.01, name
    ids = torch.tensor([[model.config.image_token_index] * 4 + [5]])
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=torch.randn(1, 3, 28, 28), input_ids=ids).logits).all()
