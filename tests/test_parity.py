"""Weight compatibility both ways with transformers' built-in BLIP-2 (the numerical oracle), on tiny configs."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import FAMILIES, NUM_QUERY_TOKENS, TEXT, config_dict, pixels, prompt_with_image_tokens, randomise_

import modeling_blip2

ATOL = 1e-5


def _stock_config(family: str, **overrides: object) -> transformers.Blip2Config:
    return transformers.Blip2Config(**config_dict(family, **overrides))


def _stock_then_ours(cls_name: str, family: str, tmp_path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    stock = randomise_(getattr(transformers, cls_name)(_stock_config(family))).eval()
    stock.save_pretrained(tmp_path)
    ours, info = getattr(modeling_blip2, cls_name).from_pretrained(tmp_path, output_loading_info=True)
    return stock, ours.eval(), info


def _inputs(family: str) -> dict[str, torch.Tensor]:
    pad = TEXT[family]["pad_token_id"]
    input_ids, attention_mask = prompt_with_image_tokens([[5, 6, 7, 8], [9, 10]], pad)
    inputs = {"pixel_values": pixels(), "input_ids": input_ids, "attention_mask": attention_mask}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 11, 12], [0, 13, 14]])
    return inputs


def _assert_no_missing_keys(info: dict) -> None:
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_checkpoint_loads_with_same_logits_and_generations(family: str, tmp_path) -> None:
    stock, ours, info = _stock_then_ours("Blip2ForConditionalGeneration", family, tmp_path)
    _assert_no_missing_keys(info)
    assert ours.config.model_type == "modeling_blip2"
    inputs = _inputs(family)
    with torch.no_grad():
        expected, actual = stock(**inputs), ours(**inputs)
    assert torch.allclose(expected.logits, actual.logits, atol=ATOL), (expected.logits - actual.logits).abs().max()

    generate_inputs = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
    for settings in ({"num_beams": 1}, {"num_beams": 3}):
        kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, **settings}
        assert torch.equal(stock.generate(**generate_inputs, **kwargs), ours.generate(**generate_inputs, **kwargs))


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_losses_match_stock(family: str, tmp_path) -> None:
    stock, ours, _ = _stock_then_ours("Blip2ForConditionalGeneration", family, tmp_path)
    inputs = _inputs(family)
    if family == "t5":
        labels = torch.tensor([[11, 12, 1], [13, 14, -100]])
    else:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        labels[:, : NUM_QUERY_TOKENS + 2] = -100  # image positions (and padding) carry no loss
    with torch.no_grad():
        expected = stock(**inputs, labels=labels).loss
        actual = ours(**inputs, labels=labels).loss
    assert torch.allclose(expected, actual, atol=ATOL)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_our_state_dict_loads_strictly_into_stock(family: str, tmp_path) -> None:
    ours = randomise_(modeling_blip2.Blip2ForConditionalGeneration(modeling_blip2.Blip2Config(**config_dict(family))))
    ours.eval()
    stock = transformers.Blip2ForConditionalGeneration(_stock_config(family)).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    inputs = _inputs(family)
    with torch.no_grad():
        assert torch.allclose(stock(**inputs).logits, ours(**inputs).logits, atol=ATOL)
    generate_inputs = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 3}
    assert torch.equal(stock.generate(**generate_inputs, **kwargs), ours.generate(**generate_inputs, **kwargs))

    # And through files: our save_pretrained output is a checkpoint the built-in class reads without complaint.
    ours.save_pretrained(tmp_path)
    config = transformers.Blip2Config(**{k: v for k, v in config_dict(family).items()})
    reloaded, info = transformers.Blip2ForConditionalGeneration.from_pretrained(
        tmp_path, config=config, output_loading_info=True
    )
    _assert_no_missing_keys(info)


@pytest.mark.parametrize("text_input", [False, True])
def test_qformer_model_both_ways(text_input: bool, tmp_path) -> None:
    qformer = dict(config_dict()["qformer_config"], encoder_hidden_size=32, use_qformer_text_input=text_input)
    stock = randomise_(transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**qformer))).eval()
    stock.save_pretrained(tmp_path)
    ours, info = modeling_blip2.Blip2QFormerModel.from_pretrained(tmp_path, output_loading_info=True)
    _assert_no_missing_keys(info)
    ours.eval()
    image = torch.randn(2, 17, 32)
    queries = torch.randn(2, NUM_QUERY_TOKENS, 32)
    with torch.no_grad():
        expected = stock(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        actual = ours(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        assert torch.allclose(expected, actual, atol=ATOL)
        if text_input:
            sequence = torch.randn(2, NUM_QUERY_TOKENS + 5, 32)
            mask = torch.ones(2, NUM_QUERY_TOKENS + 5, dtype=torch.long)
            mask[1, -2:] = 0
            kwargs = {"query_embeds": sequence, "query_length": NUM_QUERY_TOKENS, "attention_mask": mask}
            expected = stock(**kwargs, encoder_hidden_states=image).last_hidden_state
            actual = ours(**kwargs, encoder_hidden_states=image).last_hidden_state
            assert torch.allclose(expected, actual, atol=ATOL)

    back = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**qformer)).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(
            back(query_embeds=queries, encoder_hidden_states=image).last_hidden_state,
            ours(query_embeds=queries, encoder_hidden_states=image).last_hidden_state,
            atol=ATOL,
        )


def test_blip2_model_both_ways(tmp_path) -> None:
    stock, ours, info = _stock_then_ours("Blip2Model", "opt", tmp_path)
    _assert_no_missing_keys(info)
    inputs = _inputs("opt")
    with torch.no_grad():
        assert torch.allclose(stock(**inputs).logits, ours(**inputs).logits, atol=ATOL)
        expected_image = stock.get_image_features(inputs["pixel_values"]).last_hidden_state
        assert torch.allclose(
            expected_image, ours.get_image_features(inputs["pixel_values"]).last_hidden_state, atol=ATOL
        )
        assert torch.allclose(
            stock.get_qformer_features(inputs["pixel_values"]),
            ours.get_qformer_features(inputs["pixel_values"]),
            atol=ATOL,
        )
        text_ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
        assert torch.allclose(
            stock.get_text_features(text_ids).last_hidden_state,
            ours.get_text_features(text_ids).last_hidden_state,
            atol=ATOL,
        )

    back = transformers.Blip2Model(_stock_config("opt")).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(back(**inputs).logits, ours(**inputs).logits, atol=ATOL)


def test_vision_model_position_interpolation_matches_stock(tmp_path) -> None:
    stock = randomise_(transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**config_dict()["vision_config"])))
    stock.eval().save_pretrained(tmp_path)
    ours = modeling_blip2.Blip2VisionModel.from_pretrained(tmp_path).eval()
    larger = pixels(size=42)
    with torch.no_grad():
        expected = stock(larger, interpolate_pos_encoding=True).last_hidden_state
        actual = ours(larger, interpolate_pos_encoding=True).last_hidden_state
    assert actual.shape == (2, 1 + 6 * 6, 32)
    assert torch.allclose(expected, actual, atol=ATOL)


def test_official_config_json_loads(tmp_path) -> None:
    """A stock `model_type: "blip-2"` folder (config.json as the Hub has it) gives our config, sub-configs included."""
    stock_config = _stock_config("t5")
    stock_config.save_pretrained(tmp_path)
    ours = modeling_blip2.Blip2Config.from_pretrained(tmp_path)
    assert ours.model_type == "modeling_blip2"
    assert isinstance(ours.vision_config, modeling_blip2.Blip2VisionConfig)
    assert isinstance(ours.qformer_config, modeling_blip2.Blip2QFormerConfig)
    assert ours.text_config.model_type == "t5" and ours.is_encoder_decoder
    assert not ours.use_decoder_only_language_model
    assert ours.qformer_config.encoder_hidden_size == 32
    assert ours.image_token_id == stock_config.image_token_index
    assert modeling_blip2.Blip2VisionConfig.from_pretrained(tmp_path).hidden_size == 32
    assert modeling_blip2.Blip2QFormerConfig.from_pretrained(tmp_path).num_hidden_layers == 3
    from_dict = modeling_blip2.Blip2Config.from_dict(stock_config.to_dict())
    assert from_dict.to_dict()["text_config"]["d_model"] == 32
