"""Frozen vision encoder / LLM, and the mixed-precision policy (frozen parts in bf16, trained parts in fp32)."""

from __future__ import annotations

import torch
from tiny import TEXT, config_dict, pixels, prompt_with_image_tokens, randomise_

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration

FP32_PARTS = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")


def _model(family: str = "opt") -> Blip2ForConditionalGeneration:
    return randomise_(Blip2ForConditionalGeneration(Blip2Config(**config_dict(family))), std=0.1)


def test_freeze_vision_encoder_keeps_post_layernorm_trainable_and_frozen_parts_in_eval() -> None:
    model = _model()
    model.freeze_vision_encoder()
    model.freeze_language_model()
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        name
        for name, _ in model.named_parameters()
        if name.startswith(("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm."))
    }
    assert not model.vision_model.encoder.training and not model.vision_model.embeddings.training
    assert not model.language_model.training and not any(m.training for m in model.language_model.modules())
    assert model.qformer.training and model.vision_model.post_layernorm.training
    # A training step updates only the trainable parts.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = prompt_with_image_tokens([[5, 6, 7], [8, 9, 10]], TEXT["opt"]["pad_token_id"])
    model(pixels(), ids, mask, labels=ids.clone()).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    assert "vision_model.post_layernorm.weight" in changed

    model.unfreeze_modules("language_model")
    model.train()
    assert model.language_model.training
    assert all(p.requires_grad for p in model.language_model.parameters())


def test_frozen_vision_encoder_can_freeze_its_layernorm_too() -> None:
    model = _model()
    model.freeze_vision_encoder(train_post_layernorm=False)
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert "vision_model.post_layernorm" in model.frozen_module_names


def _assert_precision_policy(model: Blip2ForConditionalGeneration, low: torch.dtype) -> None:
    for name, parameter in model.named_parameters():
        expected = torch.float32 if name.startswith(FP32_PARTS) else low
        assert parameter.dtype == expected, (name, parameter.dtype)


def test_bf16_policy_from_pretrained_runs_forward_backward_generate_without_nan(tmp_path) -> None:
    _model("opt").save_pretrained(tmp_path)
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    _assert_precision_policy(model, torch.bfloat16)
    model.freeze_vision_encoder()
    model.freeze_language_model()
    model.train()
    ids, mask = prompt_with_image_tokens([[5, 6, 7], [8, 9]], TEXT["opt"]["pad_token_id"])
    labels = ids.masked_fill(mask == 0, -100)
    output = model(pixels(), ids, mask, labels=labels)
    assert output.logits.dtype == torch.bfloat16
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
            assert torch.isfinite(parameter.grad).all(), name
    model.eval()
    generated = model.generate(pixels(), ids, mask, max_new_tokens=4, min_new_tokens=4)
    assert generated.shape == (2, ids.shape[1] + 4)


def test_apply_precision_policy_on_a_model_built_from_config() -> None:
    model = _model("t5").apply_precision_policy(torch.bfloat16)
    _assert_precision_policy(model, torch.bfloat16)
    with torch.no_grad():
        logits = model(pixels(), torch.tensor([[5, 6], [7, 8]]), decoder_input_ids=torch.tensor([[0], [0]])).logits
    assert torch.isfinite(logits.float()).all()
