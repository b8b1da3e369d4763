"""BLIP-2 composed from unimodal checkpoints (issue 12): any transformers vision model and any LLM as its parts.

Tiny random SigLIP, CLIP (a full dual-encoder checkpoint), DINOv2 and ConvNeXt encoders, Qwen2, Llama and T5 LLMs
and a BERT are saved locally; the models are composed from those folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import (
    UNIMODAL_LLM_FAMILIES,
    UNIMODAL_VISION_FAMILIES,
    UNIMODAL_VIT,
    config_dict,
    save_unimodal_parts,
    tiny_qformer_tokenizer,
)
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    BertModel,
    SiglipVisionConfig,
)

from modeling_blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForPretraining,
    Blip2Model,
    FrozenFeatureDataset,
    blip2_image_processor,
)

IMAGE_SIZE, PATCH = 28, 7
VIT = UNIMODAL_VIT
VISION_FAMILIES = UNIMODAL_VISION_FAMILIES
LLM_FAMILIES = UNIMODAL_LLM_FAMILIES
BRIDGE = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")

SOURCES: dict[str, torch.nn.Module] = {}  # the saved models, as they were in memory


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    saved, models = save_unimodal_parts(
        tmp_path_factory.mktemp("unimodal"), vision=VISION_FAMILIES, language=LLM_FAMILIES, bert=True
    )
    SOURCES.update(models)
    return saved


def _source_state(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if family == "clip":  # the dual encoder's vision tower (CLIPVisionModel's keys have no prefix)
        state = {
            key.removeprefix("vision_model."): value for key, value in state.items() if key.startswith("vision_model.")
        }
    return state


def _batch(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    queries = [model.config.image_token_index] * model.config.num_query_tokens
    if family == "t5":
        ids = torch.tensor([queries + [4, 5], queries + [6, 7]])
        return {"pixel_values": pixels, "input_ids": ids, "labels": torch.tensor([[7, 8, 1], [9, 10, 1]])}
    ids = torch.tensor([queries + [5, 6, 7], queries + [8, 9, 10]])
    return {"pixel_values": pixels, "input_ids": ids, "labels": ids}


@pytest.mark.parametrize("language", LLM_FAMILIES)
@pytest.mark.parametrize("vision", VISION_FAMILIES)
def test_composition_keeps_the_parts_and_training_moves_only_the_bridge(folders, vision: str, language: str) -> None:
    model = Blip2ForConditionalGeneration.from_unimodal_pretrained(
        folders[vision], folders[language], folders["bert"], num_query_tokens=4
    )
    backbone = model.vision_model.backbone.state_dict()
    for key, value in _source_state(SOURCES[vision], vision).items():
        assert torch.equal(backbone[key], value), key
    llm = model.language_model.state_dict()
    for key, value in _source_state(SOURCES[language], language).items():
        assert torch.equal(llm[key], value), key
    tokenizer = AutoTokenizer.from_pretrained(folders[language])
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().num_embeddings > model.config.image_token_index  # grown for Qwen2
    bert = BertModel.from_pretrained(folders["bert"])
    assert torch.equal(
        model.qformer.encoder.layer[0].intermediate_query.dense.weight, bert.encoder.layer[0].intermediate.dense.weight
    )
    assert model.config.qformer_config.encoder_hidden_size == model.config.vision_feature_size

    model.train()
    assert not model.vision_model.backbone.training and not model.language_model.training
    assert model.vision_model.post_layernorm.weight.requires_grad
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**_batch(model, language)).loss
    loss.backward()
    optimizer.step()
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith(BRIDGE) for name in changed), sorted(changed)
    assert any(name.startswith("qformer.") for name in changed) and "language_projection.weight" in changed


@pytest.mark.parametrize("vision", VISION_FAMILIES)
def test_save_load_and_auto_round_trips_are_exact(folders, vision: str, tmp_path) -> None:
    model = Blip2ForConditionalGeneration.from_unimodal_pretrained(
        folders[vision], folders["llama"], num_query_tokens=4, vision_feature_layer=-2
    ).eval()
    batch = _batch(model, "llama")
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(auto) is Blip2ForConditionalGeneration
    assert type(reloaded.config.vision_config) is type(model.config.vision_config)
    assert reloaded.config.vision_feature_layer == -2
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        assert torch.equal(auto(**batch).logits, expected)
    generated = reloaded.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=3)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("vision", VISION_FAMILIES)
def test_stage1_runs_on_any_encoder(folders, vision: str) -> None:
    model = Blip2ForPretraining.from_unimodal_pretrained(folders[vision], folders["bert"], num_query_tokens=4)
    assert model.config.qformer_config.use_qformer_text_input and not hasattr(model, "language_model")
    tokenizer = tiny_qformer_tokenizer()
    assert model.config.qformer_config.bos_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    text = tokenizer(["a red square", "a blue square"], padding="max_length", max_length=8, return_tensors="pt")
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    outputs = model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask)
    assert all(torch.isfinite(getattr(outputs, f"loss_{name}")) for name in ("itc", "itm", "itg"))
    outputs.loss.backward()
    assert model.vision_model.post_layernorm.weight.grad is not None
    assert all(parameter.grad is None for parameter in model.vision_model.backbone.parameters())


@pytest.mark.parametrize("vision", VISION_FAMILIES)
def test_the_feature_layer_and_select_strategy_choose_the_hidden_state(folders, vision: str) -> None:
    model = Blip2Model.from_unimodal_pretrained(
        folders[vision], folders["llama"], num_query_tokens=4, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    ).eval()  # fmt: skip
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        hidden = model.vision_model.backbone(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        features = model.vision_model.forward_features(pixels)
    if hidden.dim() == 4:  # ConvNeXt: the second-last stage's map, as tokens
        expected = hidden.flatten(2).transpose(1, 2)
    else:  # the class token (SigLIP has none) dropped
        expected = hidden[:, hidden.shape[1] - (IMAGE_SIZE // PATCH) ** 2 :]
    assert torch.equal(features, expected)
    assert features.shape[-1] == model.config.qformer_config.encoder_hidden_size
    # The feature cache stores these and gives the pixel path's outputs.
    model.freeze_vision_encoder()
    examples = [
        {"image": Image.effect_noise((40, 40), 40 + 20 * index).convert("RGB"), "text": "a"} for index in range(2)
    ]
    processor = blip2_image_processor(IMAGE_SIZE)
    cache = FrozenFeatureDataset(examples, model.vision_model, processor, progress=False)
    pixel_values = processor([e["image"] for e in examples], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(cache[0]["frozen_image_features"], model.vision_model.forward_features(pixel_values)[0])


def test_bad_parts_are_named(folders) -> None:
    with pytest.raises(ValueError, match="needs a language model"):
        Blip2ForConditionalGeneration.from_unimodal_pretrained(folders["siglip"], None)
    with pytest.raises(ValueError, match="BertModel, which does not read images"):
        Blip2ForPretraining.from_unimodal_pretrained(folders["bert"])
    with pytest.raises(ValueError, match=r"vision_feature_layer \(5\) is outside the encoder's 3 hidden states"):
        Blip2Config(vision_config=SiglipVisionConfig(**VIT), vision_feature_layer=5)
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be one of"):
        Blip2Config(vision_config=SiglipVisionConfig(**VIT), vision_feature_select_strategy="cls")


def test_export_to_the_stock_layout_refuses_what_it_cannot_represent(folders, tmp_path) -> None:
    from modeling_blip2.conversion import export_to_transformers

    model = Blip2ForConditionalGeneration.from_unimodal_pretrained(
        folders["siglip"], folders["llama"], num_query_tokens=4
    )
    model.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="this checkpoint's is a SiglipVisionConfig"):
        export_to_transformers(tmp_path / "ours", tmp_path / "stock")
    own = Blip2Config(**{**config_dict("opt"), "vision_feature_layer": -2})
    Blip2ForConditionalGeneration(own).save_pretrained(tmp_path / "layer")
    with pytest.raises(ValueError, match="reads vision_feature_layer=-2"):
        export_to_transformers(tmp_path / "layer", tmp_path / "stock")
    assert not (tmp_path / "stock").exists()
