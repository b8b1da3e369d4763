"""Config round trips, LLM resolution through AutoConfig, and config validation."""

from __future__ import annotations

import pytest
from tiny import FAMILIES, config_dict

from modeling_blip2 import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_and_llm_resolution(family: str, tmp_path) -> None:
    config = Blip2Config(**config_dict(family))
    assert config.text_config.model_type == family
    assert config.use_decoder_only_language_model == (family != "t5")
    config.save_pretrained(tmp_path)
    reloaded = Blip2Config.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.to_dict()["model_type"] == "modeling_blip2"
    assert reloaded.vision_config.model_type == "modeling_blip2_vision_model"
    assert reloaded.qformer_config.model_type == "modeling_blip2_qformer"


def test_defaults_describe_the_official_vit_g_and_bert_base_qformer() -> None:
    config = Blip2Config()
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1408, 39)
    assert config.vision_config.num_patches == 256
    assert config.qformer_config.encoder_hidden_size == 1408
    assert [config.qformer_config.has_cross_attention(i) for i in range(4)] == [True, False, True, False]
    assert config.num_query_tokens == 32 and config.text_config.model_type == "opt"
    # A stand-alone Q-Former config cross-attends to ViT-g features unless told otherwise.
    assert Blip2QFormerConfig().resolved_encoder_hidden_size == 1408


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vision_architecture": "swin"}, "vision_architecture must be one of"),
        ({"image_size": 30, "patch_size": 7}, r"image_size \(30\) must be a multiple of patch_size \(7\)"),
        ({"hidden_size": 30, "num_attention_heads": 4}, r"hidden_size \(30\) must be a multiple"),
        ({"image_size": [28, 35]}, "square"),
    ],
)
def test_vision_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Blip2VisionConfig(**kwargs)


def test_non_square_pair_of_equal_sides_is_accepted() -> None:
    assert Blip2VisionConfig(image_size=[224, 224], patch_size=(14, 14)).num_patches == 256


def test_qformer_and_composite_validation() -> None:
    with pytest.raises(ValueError, match="cross_attention_frequency must be >= 1"):
        Blip2QFormerConfig(cross_attention_frequency=0)
    with pytest.raises(ValueError, match="num_query_tokens must be >= 1"):
        Blip2Config(**config_dict(num_query_tokens=0))
