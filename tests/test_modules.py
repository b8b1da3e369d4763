"""Equivalence tests between code paths: eager vs SDPA, checkpointing on vs off, masks, encoder variants."""

from __future__ import annotations

import pytest
import torch
from tiny import NUM_QUERY_TOKENS, TEXT, config_dict, pixels, prompt_with_image_tokens, randomise_

from modeling_blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2TextEmbeddings,
    Blip2VisionConfig,
    Blip2VisionModel,
    build_qformer_attention_mask,
)


def _model(family: str = "opt", attn: str = "sdpa", **overrides: object) -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    config = Blip2Config(**config_dict(family, **overrides))
    model = randomise_(Blip2ForConditionalGeneration(config), std=0.1)
    model.set_attn_implementation(attn)
    return model


def _opt_inputs() -> dict[str, torch.Tensor]:
    input_ids, attention_mask = prompt_with_image_tokens([[5, 6, 7, 8], [9, 10]], TEXT["opt"]["pad_token_id"])
    return {"pixel_values": pixels(), "input_ids": input_ids, "attention_mask": attention_mask}


def test_eager_and_sdpa_agree() -> None:
    eager = _model(attn="eager").eval()
    sdpa = _model(attn="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.vision_model.config._attn_implementation == "eager"
    assert sdpa.qformer.config._attn_implementation == "sdpa"
    inputs = _opt_inputs()
    real = inputs["attention_mask"].bool()  # padded positions hold no meaningful output in either path
    with torch.no_grad():
        assert torch.allclose(eager(**inputs).logits[real], sdpa(**inputs).logits[real], atol=1e-5)
    qformer_config = Blip2QFormerConfig(
        **config_dict()["qformer_config"], encoder_hidden_size=32, use_qformer_text_input=True
    )
    qformer = randomise_(Blip2QFormerModel(qformer_config), std=0.1).eval()
    sequence, image = torch.randn(2, NUM_QUERY_TOKENS + 6, 32), torch.randn(2, 17, 32)
    mask = torch.ones(2, NUM_QUERY_TOKENS + 6, dtype=torch.long)
    mask[0, -3:] = 0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        qformer.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = [
                qformer(sequence, NUM_QUERY_TOKENS, mask, image, attention_type=kind).last_hidden_state
                for kind in ("bidirectional", "unimodal", "multimodal_causal")
            ]
    for eager_out, sdpa_out in zip(outputs["eager"], outputs["sdpa"], strict=True):
        assert torch.allclose(eager_out, sdpa_out, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _model().train()
        for module in model.modules():  # dropout off so both runs are deterministic
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.vision_model.encoder.layers[0].gradient_checkpointing
            assert model.qformer.encoder.layer[0].gradient_checkpointing
        inputs = _opt_inputs()
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        model(**inputs, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("vision_model.encoder") for name in plain)
    assert any(name.startswith("qformer.encoder") for name in plain)
    for name, gradient in plain.items():
        assert torch.allclose(gradient, checkpointed[name], atol=1e-6), name


def test_eva_key_bias_stays_zero_under_training() -> None:
    vision = Blip2VisionModel(Blip2VisionConfig(**config_dict()["vision_config"]))
    randomise_(vision)
    optimizer = torch.optim.SGD(vision.parameters(), lr=1.0)
    vision(pixels()).last_hidden_state.pow(2).sum().backward()
    optimizer.step()
    width = vision.config.hidden_size
    for layer in vision.encoder.layers:
        bias = layer.self_attn.qkv.bias
        assert torch.count_nonzero(bias[width : 2 * width]) == 0
        assert torch.count_nonzero(bias.grad[width : 2 * width]) == 0
        assert torch.count_nonzero(bias.grad[:width]) > 0  # query and value biases do train


def test_clip_variant_has_pre_layernorm_full_qkv_bias_and_quick_gelu() -> None:
    config = Blip2VisionConfig(
        **config_dict()["vision_config"], vision_architecture="clip", hidden_act="quick_gelu", layer_norm_eps=1e-5
    )
    vision = randomise_(Blip2VisionModel(config)).eval()
    keys = set(vision.state_dict())
    assert "pre_layernorm.weight" in keys
    assert "embeddings.patch_embedding.bias" not in keys
    layer = vision.encoder.layers[0]
    assert layer.self_attn.fused_bias() is layer.self_attn.qkv.bias  # the key bias is a real parameter
    # The pre-LayerNorm is really applied: changing it changes the output.
    with torch.no_grad():
        before = vision(pixels()).last_hidden_state
        vision.pre_layernorm.weight.mul_(2.0)
        after = vision(pixels()).last_hidden_state
    assert not torch.allclose(before, after)
    # And the composite model takes the variant through the config.
    composite = Blip2ForConditionalGeneration(Blip2Config(**config_dict(vision_config=config.to_dict())))
    assert composite.vision_model.config.vision_architecture == "clip"
    assert hasattr(composite.vision_model, "pre_layernorm")


def test_post_layernorm_eps_default_reproduces_stock_and_can_differ() -> None:
    default = Blip2VisionModel(Blip2VisionConfig(**config_dict()["vision_config"]))
    assert default.post_layernorm.eps == default.config.layer_norm_eps == 1e-6
    lavis = Blip2VisionModel(Blip2VisionConfig(**config_dict()["vision_config"], post_layernorm_eps=1e-5))
    assert lavis.post_layernorm.eps == 1e-5 and lavis.encoder.layers[0].layer_norm1.eps == 1e-6


def test_mask_builder_shapes_the_three_masks_of_the_paper() -> None:
    padding = torch.tensor([[1, 1, 1, 1, 1, 0]])  # 2 queries, 4 text tokens, the last one padding
    allowed = {
        kind: build_qformer_attention_mask(padding, 2, kind, torch.float32)[0, 0] == 0
        for kind in ("bidirectional", "unimodal", "multimodal_causal")
    }
    assert allowed["bidirectional"].tolist() == [[True] * 5 + [False]] * 6
    unimodal = allowed["unimodal"]
    assert unimodal[:2].tolist() == [[True, True, False, False, False, False]] * 2
    assert unimodal[2:].tolist() == [[False, False, True, True, True, False]] * 4
    causal = allowed["multimodal_causal"]
    assert causal[:2].tolist() == [[True, True, False, False, False, False]] * 2
    assert causal[2].tolist() == [True, True, True, False, False, False]
    assert causal[4].tolist() == [True, True, True, True, True, False]
    with pytest.raises(ValueError, match="attention_type must be one of"):
        build_qformer_attention_mask(padding, 2, "causal", torch.float32)


def test_unimodal_mask_equals_separate_query_and_text_passes() -> None:
    config = Blip2QFormerConfig(**config_dict()["qformer_config"], encoder_hidden_size=32, use_qformer_text_input=True)
    qformer = randomise_(Blip2QFormerModel(config), std=0.1).eval()
    embeddings = randomise_(Blip2TextEmbeddings(config), std=0.1)
    queries, image = torch.randn(2, NUM_QUERY_TOKENS, 32), torch.randn(2, 17, 32)
    text_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    text_mask = (text_ids != 0).long()
    joint_mask = torch.cat([torch.ones(2, NUM_QUERY_TOKENS, dtype=torch.long), text_mask], dim=1)
    with torch.no_grad():
        joint = qformer(
            embeddings(text_ids, query_embeds=queries), NUM_QUERY_TOKENS, joint_mask, image, attention_type="unimodal"
        ).last_hidden_state
        query_only = qformer(queries, encoder_hidden_states=image).last_hidden_state
        text_only = qformer(embeddings(text_ids), query_length=0, attention_mask=text_mask).last_hidden_state
    assert torch.allclose(joint[:, :NUM_QUERY_TOKENS], query_only, atol=1e-5)
    real = text_mask.bool()
    assert torch.allclose(joint[:, NUM_QUERY_TOKENS:][real], text_only[real], atol=1e-5)


def test_text_without_text_feed_forward_is_refused() -> None:
    qformer = Blip2QFormerModel(Blip2QFormerConfig(**config_dict()["qformer_config"], encoder_hidden_size=32))
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        qformer(torch.randn(1, NUM_QUERY_TOKENS + 2, 32), NUM_QUERY_TOKENS, None, torch.randn(1, 5, 32))


def test_text_longer_than_qformer_positions_is_a_clear_error() -> None:
    embeddings = Blip2TextEmbeddings(Blip2QFormerConfig(**config_dict()["qformer_config"]))
    with pytest.raises(ValueError, match="exceeds its max_position_embeddings"):
        embeddings(torch.ones(1, 65, dtype=torch.long))


def test_output_attentions_and_hidden_states() -> None:
    model = _model(attn="sdpa").eval()
    with torch.no_grad():
        encoding = model.encode_images(pixels(), output_attentions=True, output_hidden_states=True)
    assert len(encoding.vision_outputs.hidden_states) == 3
    assert encoding.vision_outputs.attentions[0].shape == (2, 4, 17, 17)
    assert len(encoding.qformer_outputs.attentions) == 3
    assert encoding.qformer_outputs.cross_attentions[0].shape == (2, 4, NUM_QUERY_TOKENS, 17)
    # One entry per layer that cross-attends (every other layer: 0 and 2), as transformers' class reports them.
    assert len(encoding.qformer_outputs.cross_attentions) == 2
