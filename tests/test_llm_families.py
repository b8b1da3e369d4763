"""BLIP-2 over more LLM families (issue 12): Qwen2, Gemma, Phi-3 and Mistral as `text_config`.

Each family runs the whole path the README promises for OPT / Llama / T5: training only the bridge, greedy and beam
generation (left-padded batches equal single prompts), save / load, the bf16 precision policy, LoRA (targets, a
step, adapter save / load) and 8-bit / 4-bit LLM loading. The tiny configs are in `tiny.MORE_TEXT`; Mistral's sliding
window is shorter than the prompts, Gemma scales its token embeddings inside its embedding layer, Phi-3 fuses its
query / key / value projections.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import (
    MORE_FAMILIES,
    MORE_TEXT,
    NUM_QUERY_TOKENS,
    config_dict,
    left_pad,
    pixels,
    prompt_with_image_tokens,
    randomise_,
)
from torch import nn

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration
from modeling_blip2.adapters import (
    STAGE2_TRAINABLE_PARTS,
    add_lora,
    check_4bit_widths,
    load_adapter,
    load_language_model_quantized,
    lora_module_names,
    lora_target_modules,
    quantized_module_names,
    save_adapter,
)

BRIDGE = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")
# LoRA leaf names per family: Phi-3 has no separate query / value layers, its fused qkv_proj is the target.
LORA_LEAVES = {"qwen2": {"q_proj", "v_proj"}, "gemma": {"q_proj", "v_proj"}, "phi3": {"qkv_proj"}}
LORA_LEAVES["mistral"] = LORA_LEAVES["qwen2"]
# 4-bit on CPU needs in_features % 64 and out_features % 32: hidden 64 with 4 heads of 16 (2 key/value heads: 32).
WIDE = {"hidden_size": 64, "intermediate_size": 128}
WIDE_HEAD_DIM = {"gemma": {"head_dim": 16}}
TEXTS = [[5, 6, 7, 8, 9], [10, 11]]
GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}

pytestmark = pytest.mark.parametrize("family", MORE_FAMILIES)


def _config(family: str, wide: bool = False) -> Blip2Config:
    text = copy.deepcopy(MORE_TEXT[family])
    if wide:
        text.update(WIDE, **WIDE_HEAD_DIM.get(family, {}))
    return Blip2Config(**config_dict(text_config=text))  # text_config= replaces the default family's


def _model(family: str, wide: bool = False, seed: int = 0) -> Blip2ForConditionalGeneration:
    return randomise_(Blip2ForConditionalGeneration(_config(family, wide)), std=0.1, seed=seed).eval()


def _batch(family: str) -> dict[str, torch.Tensor]:
    """Two images, left-padded prompts with image tokens, LM labels."""
    ids, mask = prompt_with_image_tokens([[5, 6, 7], [8, 9, 10, 11]], MORE_TEXT[family]["pad_token_id"])
    return {
        "pixel_values": pixels(),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, -100),
    }


def _logits(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_batch(family)).logits


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.detach().float().flatten(), b.detach().float().flatten()]))[0, 1])


@pytest.fixture(scope="module")
def models() -> dict[str, Blip2ForConditionalGeneration]:
    """One randomised eval-mode model per family, shared by the tests that do not change it."""
    return {family: _model(family) for family in MORE_FAMILIES}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory) -> dict[str, Path]:
    """Each family's model saved with our save_pretrained."""
    folders = {}
    for family, model in models.items():
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
    return folders


def test_forward_loss_and_gradients_reach_only_the_bridge(family: str) -> None:
    model = _model(family)
    model.freeze_language_model()
    model.freeze_vision_encoder()
    model.train()
    loss = model(**_batch(family)).loss
    assert torch.isfinite(loss)
    loss.backward()
    with_gradient = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_gradient == {name for name, _ in model.named_parameters() if name.startswith(BRIDGE)}
    assert all(torch.isfinite(model.get_parameter(name).grad).all() for name in with_gradient)


def test_greedy_generation_is_the_argmax_of_forward(models, family: str) -> None:
    # The soft prompts go in as inputs_embeds, the text through the LLM's own embedding layer (Gemma's scales by
    # sqrt(hidden) there): generate and a teacher-forced forward over its output must agree token by token.
    model = models[family]
    images = pixels(1)
    ids, _ = prompt_with_image_tokens([TEXTS[0]], MORE_TEXT[family]["pad_token_id"])
    sequences = model.generate(images, ids, **GREEDY)
    assert sequences.shape == (1, ids.shape[1] + GREEDY["max_new_tokens"])
    with torch.no_grad():
        logits = model(images, sequences).logits
    new = sequences[:, ids.shape[1] :]
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), new)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_left_padded_batch_generates_what_single_prompts_do(models, family: str, num_beams: int) -> None:
    model = models[family]
    ids, mask = left_pad(TEXTS, MORE_TEXT[family]["pad_token_id"])
    settings = {**GREEDY, "num_beams": num_beams}
    batched = model.generate(pixels(), ids, mask, **settings)
    assert batched.shape == (2, ids.shape[1] + GREEDY["max_new_tokens"])
    for row, text in enumerate(TEXTS):
        single = model.generate(pixels()[row : row + 1], torch.tensor([text]), **settings)
        assert torch.equal(batched[row, ids.shape[1] :], single[0, len(text) :])
    if num_beams > 1:  # the shared prompt cache (copied to the beams) is what transformers' own beams give
        assert torch.equal(model.generate(pixels(), ids, mask, share_prompt_cache=False, **settings), batched)


def test_save_and_load_give_identical_logits(models, saved, family: str) -> None:
    reloaded = Blip2ForConditionalGeneration.from_pretrained(saved[family]).eval()
    assert reloaded.config.text_config.model_type == family
    assert type(reloaded.language_model) is type(models[family].language_model)
    torch.testing.assert_close(_logits(reloaded, family), _logits(models[family], family), rtol=0, atol=0)


def test_precision_policy_keeps_the_bridge_fp32_and_the_llm_bf16(models, family: str) -> None:
    model = copy.deepcopy(models[family]).apply_precision_policy(torch.bfloat16)
    for name, parameter in model.named_parameters():
        expected = torch.float32 if name.startswith(BRIDGE) else torch.bfloat16
        assert parameter.dtype == expected, (name, parameter.dtype)
    output = model(**_batch(family))
    assert output.logits.dtype == torch.bfloat16
    assert torch.isfinite(output.loss) and _correlation(output.logits, _logits(models[family], family)) > 0.9


def test_lora_targets_step_and_adapter_round_trip(models, family: str, tmp_path) -> None:
    model = copy.deepcopy(models[family])
    model.freeze_vision_encoder()
    model.freeze_language_model()
    targets = lora_target_modules(model)
    assert {name.rsplit(".", 1)[-1] for name in targets} == LORA_LEAVES[family]
    assert len(targets) == 2 * len(LORA_LEAVES[family])  # 2 layers
    assert all(name.startswith("language_model.model.layers.") for name in targets)

    peft_model = add_lora(model, init_lora_weights=False, train_parts=STAGE2_TRAINABLE_PARTS)
    assert lora_module_names(peft_model) == targets
    peft_model.train()
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(**_batch(family)).loss.backward()
    optimizer.step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    lora = {name for name in changed if ".lora_A." in name or ".lora_B." in name}
    bridge = {name for name in changed if ".modules_to_save." in name or name.endswith("query_tokens")}
    assert changed == lora | bridge
    assert len(lora) == 2 * len(targets)
    assert "base_model.model.query_tokens" in bridge
    assert any(".qformer.modules_to_save." in name for name in bridge)
    assert any(".language_projection.modules_to_save." in name for name in bridge)

    expected = _logits(peft_model.eval(), family)
    save_adapter(peft_model, tmp_path)
    reloaded = load_adapter(copy.deepcopy(models[family]), tmp_path)
    torch.testing.assert_close(_logits(reloaded, family), expected, rtol=0, atol=0)


def _llm_linear_names(model: nn.Module) -> set[str]:
    """The LLM's linear layers but its head: what 8-/4-bit loading must quantize."""
    return {
        name
        for name, module in model.named_modules()
        if name.startswith("language_model.") and isinstance(module, nn.Linear) and not name.endswith("lm_head")
    }


def test_8bit_quantizes_only_the_llm_and_generates(models, saved, family: str) -> None:
    from transformers import BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    model = Blip2ForConditionalGeneration.from_pretrained(
        saved[family], quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    quantized = quantized_module_names(model)
    assert set(quantized) == _llm_linear_names(models[family])
    assert set(quantized.values()) == {"Linear8bitLt"}
    batch = _batch(family)
    with torch.no_grad():
        assert _correlation(model(**batch).logits, _logits(models[family], family)) > 0.9
    sequences = model.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], **GREEDY)
    assert sequences.shape == (2, batch["input_ids"].shape[1] + GREEDY["max_new_tokens"])
    assert int(sequences.max()) < MORE_TEXT[family]["vocab_size"]


def test_4bit_loads_64_wide_layers_and_refuses_32_wide_ones(family: str, tmp_path) -> None:
    from transformers import BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match=r"4-bit quantization cannot pack .* Offending: language_model\."):
        check_4bit_widths(_config(family))
    check_4bit_widths(_config(family, wide=True))

    reference = _model(family, wide=True)
    reference.save_pretrained(tmp_path)
    model = Blip2ForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    quantized = quantized_module_names(model)
    assert set(quantized) == _llm_linear_names(reference) and set(quantized.values()) == {"Linear4bit"}
    assert model.query_tokens.dtype == torch.float32 and torch.equal(model.query_tokens, reference.query_tokens)
    output = model(**_batch(family))
    assert torch.isfinite(output.loss)
    # Tiny random weights quantize noisily: the same logit pattern, not the same values.
    assert _correlation(output.logits, _logits(reference, family)) > 0.9

    # QLoRA: LoRA on the 4-bit layers (Phi-3: the fused qkv_proj) trains beside the Q-Former; the LLM stays put.
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(load_language_model_quantized(tmp_path, bits=4))
    peft_model = add_lora(model, r=4, init_lora_weights=False, train_parts=["query_tokens", "qformer"]).train()
    assert {name.rsplit(".", 1)[-1] for name in lora_module_names(peft_model)} == LORA_LEAVES[family]
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(**_batch(family)).loss.backward()
    optimizer.step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    assert any(".lora_B." in name for name in changed) and any(".qformer.modules_to_save." in name for name in changed)
    assert not any(".language_model." in name and "lora_" not in name for name in changed)


def test_the_tiny_configs_are_what_the_tests_claim(family: str) -> None:
    text_config = _config(family).text_config
    assert text_config.model_type == family and text_config.vocab_size == 120 and text_config.hidden_size == 32
    assert _config(family).num_query_tokens == NUM_QUERY_TOKENS
    if family == "mistral":  # shorter than prompt + new tokens: the windowed attention path runs above
        assert text_config.sliding_window < NUM_QUERY_TOKENS + len(TEXTS[0]) + GREEDY["max_new_tokens"]
