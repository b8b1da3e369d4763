"""Issue 12, SigLIP2 (NaFlex) as the frozen image encoder.

`Siglip2VisionModel` reads patch sequences (`pixel_values` `(B, num_patches, C * p * p)`, `pixel_attention_mask`,
`spatial_shapes`); the package passes `(B, C, H, W)` images everywhere. The backbone cuts the patches itself on the
fixed grid, and the processor of a SigLIP2 checkpoint prepares images at the square size its NaFlex processor gives a
square picture. A tiny SigLIP2 checkpoint (4 x 4 patches of 7 px) and a tiny Llama are composed here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny import QFORMER_WORDS, TEXT, TINY_RANDOM, randomise_, tiny_qformer_tokenizer
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from modeling_blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForPretraining,
    Blip2ImageTextProcessor,
    FrozenFeatureDataset,
)
from modeling_blip2.backbones import images_to_patch_sequence
from modeling_blip2.processing import fixed_resolution_image_processor

PATCH, MAX_PATCHES = 7, 16
SIDE = math.isqrt(MAX_PATCHES) * PATCH  # 28: what the NaFlex processor makes of a square picture
SIGLIP2 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SIGLIP2.update(patch_size=PATCH, num_patches=MAX_PATCHES)
QUERIES = 4
BRIDGE = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("siglip2")
    vision = randomise_(transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**SIGLIP2)), std=0.1)
    vision.save_pretrained(root / "siglip2")
    transformers.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=MAX_PATCHES).save_pretrained(
        root / "siglip2"
    )
    text = {key: value for key, value in TEXT["llama"].items() if key != "model_type"}
    randomise_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**text)), std=0.1, seed=1).save_pretrained(
        root / "llama"
    )
    AutoTokenizer.from_pretrained(TINY_RANDOM).save_pretrained(root / "llama")
    bert = transformers.BertConfig(
        vocab_size=len(QFORMER_WORDS), max_position_embeddings=64, **{**SIGLIP2, "num_hidden_layers": 2}
    )
    randomise_(transformers.BertModel(bert), std=0.1, seed=2).save_pretrained(root / "bert")
    tiny_qformer_tokenizer().save_pretrained(root / "bert")
    return {"siglip2": root / "siglip2", "llama": root / "llama", "bert": root / "bert", "source": vision}


def _square_images(count: int = 2, side: int = 45) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def _compose(folders: dict, **overrides) -> Blip2ForConditionalGeneration:
    return Blip2ForConditionalGeneration.from_unimodal_pretrained(
        folders["siglip2"], folders["llama"], folders["bert"], num_query_tokens=QUERIES, **overrides
    )


def _processor(folders: dict) -> Blip2ImageTextProcessor:
    return Blip2ImageTextProcessor.from_unimodal_pretrained(
        folders["siglip2"], folders["llama"], folders["bert"], num_query_tokens=QUERIES
    )


# -- the processor ---------------------------------------------------------------------------------------------------
def test_the_processor_prepares_images_at_the_fixed_resolution_of_the_naflex_transform(folders) -> None:
    processor = _processor(folders)
    naflex = transformers.Siglip2ImageProcessorPil.from_pretrained(folders["siglip2"])
    assert type(processor.image_processor) is transformers.SiglipImageProcessorPil
    assert processor.image_processor.size == {"height": SIDE, "width": SIDE}
    assert processor.image_processor.resample == naflex.resample  # bilinear, not SigLIP's bicubic
    assert processor.model_input_names[0] == "pixel_values" and "spatial_shapes" not in processor.model_input_names
    images = _square_images()
    pixel_values = processor(images=images, text=["a photo of", "a"]).pixel_values
    assert pixel_values.shape == (2, 3, SIDE, SIDE)
    # Cut into patches, they are the NaFlex processor's output for the same pictures: a full 4 x 4 grid.
    expected = naflex(images, return_tensors="pt")
    patches = images_to_patch_sequence(pixel_values, PATCH)
    assert torch.equal(expected.spatial_shapes, patches["spatial_shapes"])
    assert torch.equal(expected.pixel_attention_mask, patches["pixel_attention_mask"])
    torch.testing.assert_close(patches["pixel_values"], expected.pixel_values, rtol=0, atol=1e-6)
    # Any other image processor is left as it is.
    siglip = transformers.SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE})
    assert fixed_resolution_image_processor(siglip) is siglip


def test_a_naflex_image_processor_given_directly_is_refused_with_the_way_out(folders) -> None:
    naflex = transformers.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=MAX_PATCHES)
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    with pytest.raises(ValueError, match=r"makes NaFlex patch sequences .* fixed_resolution_image_processor"):
        Blip2ImageTextProcessor(naflex, tokenizer, num_query_tokens=QUERIES)
    processor = Blip2ImageTextProcessor(fixed_resolution_image_processor(naflex), tokenizer, num_query_tokens=QUERIES)
    assert processor(images=_square_images(1)).pixel_values.shape == (1, 3, SIDE, SIDE)


# -- the encoder -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layer", "strategy"), [(-1, "full"), (-2, "default"), (0, "full")])
def test_features_equal_siglip2_on_its_own_processors_output(folders, layer: int, strategy: str) -> None:
    model = _compose(folders, vision_feature_layer=layer, vision_feature_select_strategy=strategy).eval()
    source = transformers.Siglip2VisionModel.from_pretrained(folders["siglip2"]).eval()
    images = _square_images()
    naflex = transformers.Siglip2ImageProcessorPil.from_pretrained(folders["siglip2"])(images, return_tensors="pt")
    pixel_values = _processor(folders)(images=images).pixel_values
    with torch.no_grad():
        expected = source(**naflex, output_hidden_states=True).hidden_states[layer]  # (B, 16, 32)
        features = model.vision_model.forward_features(pixel_values)
        last_hidden_state = model.vision_model(pixel_values=pixel_values).last_hidden_state
    assert features.shape == (2, MAX_PATCHES, SIGLIP2["hidden_size"]) == expected.shape  # no class token to drop
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_hidden_state, model.vision_model.apply_post_layernorm(features))
    assert model.config.vision_feature_size == SIGLIP2["hidden_size"]


def test_the_frozen_feature_cache_stores_the_encoders_features(folders) -> None:
    model = _compose(folders, vision_feature_layer=-2).eval()
    processor = _processor(folders)
    examples = [{"image": image, "text": "a"} for image in _square_images(2, side=33)]
    cache = FrozenFeatureDataset(examples, model.vision_model, processor.image_processor, progress=False)
    pixel_values = processor(images=[example["image"] for example in examples]).pixel_values
    with torch.no_grad():
        assert torch.equal(cache[1]["frozen_image_features"], model.vision_model.forward_features(pixel_values)[1])


def test_naflex_patches_and_sizes_off_the_patch_grid_are_refused_by_name(folders) -> None:
    model = _compose(folders).eval()
    naflex = transformers.Siglip2ImageProcessorPil.from_pretrained(folders["siglip2"])(
        _square_images(1), return_tensors="pt"
    )
    with pytest.raises(ValueError, match=r"look like the patch sequences of Siglip2VisionModel's own image processor"):
        model.vision_model(pixel_values=naflex.pixel_values)
    with pytest.raises(ValueError, match=r"30x28 pixels do not split into 7x7 patches"):
        model.vision_model(pixel_values=torch.randn(1, 3, 30, 28))
    # Any grid of whole patches works: the position embeddings are resized to it, as in the NaFlex model.
    assert model.vision_model.forward_features(torch.randn(1, 3, 35, 21)).shape == (1, 15, SIGLIP2["hidden_size"])


def test_the_dual_encoder_config_and_a_dict_give_the_vision_tower() -> None:
    dual = transformers.Siglip2Config(vision_config=SIGLIP2, text_config={**SIGLIP2, "vocab_size": 60})
    for vision_config in (dual, {"model_type": "siglip2_vision_model", **SIGLIP2}):
        config = Blip2Config(vision_config=vision_config, qformer_config={"hidden_size": 32, "num_attention_heads": 4})
        assert type(config.vision_config) is transformers.Siglip2VisionConfig
        assert config.qformer_config.encoder_hidden_size == SIGLIP2["hidden_size"]


# -- the composed model ----------------------------------------------------------------------------------------------
def test_composed_model_trains_the_bridge_generates_and_round_trips(folders, tmp_path) -> None:
    model = _compose(folders)
    backbone = model.vision_model.backbone.state_dict()
    for key, value in folders["source"].state_dict().items():
        assert torch.equal(backbone[key], value), key
    processor = _processor(folders)
    images = _square_images()
    batch = processor(images=images, text=["a photo of a cat", "a dog"], for_training=True)

    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith(BRIDGE) for name in changed), sorted(changed)

    model.eval()
    inputs = processor(images=images, text=["a photo of", "a"])
    with torch.no_grad():
        expected = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3)
    assert generated.shape == (2, inputs.input_ids.shape[1] + 3)

    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    for model_loader, processor_loader in (
        (Blip2ForConditionalGeneration, Blip2ImageTextProcessor),
        (AutoModelForImageTextToText, AutoProcessor),
    ):
        reloaded = model_loader.from_pretrained(tmp_path / "model").eval()
        reloaded_processor = processor_loader.from_pretrained(tmp_path / "model")
        assert type(reloaded) is Blip2ForConditionalGeneration
        assert type(reloaded.config.vision_config) is transformers.Siglip2VisionConfig
        assert type(reloaded_processor.image_processor) is transformers.SiglipImageProcessorPil
        again = reloaded_processor(images=images, text=["a photo of", "a"])
        assert torch.equal(again.pixel_values, inputs.pixel_values)
        with torch.no_grad():
            assert torch.equal(reloaded(**again).logits, expected)
        assert torch.equal(reloaded.generate(**again, max_new_tokens=3), generated)


def test_stage1_runs_on_siglip2(folders) -> None:
    model = Blip2ForPretraining.from_unimodal_pretrained(folders["siglip2"], folders["bert"], num_query_tokens=QUERIES)
    tokenizer = tiny_qformer_tokenizer()
    text = tokenizer(["a red square", "a blue square"], padding="max_length", max_length=8, return_tensors="pt")
    pixel_values = _processor(folders)(images=_square_images()).pixel_values
    outputs = model(pixel_values=pixel_values, input_ids=text.input_ids, attention_mask=text.attention_mask)
    assert all(torch.isfinite(getattr(outputs, f"loss_{name}")) for name in ("itc", "itm", "itg"))
    outputs.loss.backward()
    assert model.vision_model.post_layernorm.weight.grad is not None
    assert all(parameter.grad is None for parameter in model.vision_model.backbone.parameters())
