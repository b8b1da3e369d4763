"""The LLM loaded in 8-bit and 4-bit (bitsandbytes, CPU) with the vision encoder and the Q-Former unquantized.

The tiny test LLMs are widened to 64 here: 4-bit layers need widths bitsandbytes can pack (see `check_4bit_widths`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import TEXT, config_dict, labelled_batch, randomise_
from torch import nn

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration
from modeling_blip2.adapters import (
    add_lora,
    check_4bit_widths,
    load_language_model_quantized,
    quantization_config_for_llm,
    quantized_module_names,
)

bnb = pytest.importorskip("bitsandbytes")

FAMILIES = ("opt", "llama", "t5")
WIDE = {
    "opt": {"hidden_size": 64, "ffn_dim": 128, "word_embed_proj_dim": 64},
    "llama": {"hidden_size": 64, "intermediate_size": 128},  # 2 of 4 key/value heads of 16: k/v widths 64 -> 32
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128},
}
LAYER_CLASS = {8: "Linear8bitLt", 4: "Linear4bit"}
UNQUANTIZED_PARTS = ("vision_model.", "qformer.", "language_projection")


def _config(family: str, wide: bool = True) -> Blip2Config:
    text = copy.deepcopy(TEXT[family])
    if wide:
        text.update(WIDE[family])
    return Blip2Config(**config_dict(family, text_config=text))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple]:
    """Each family's wide tiny model, randomised, saved with our save_pretrained; the fp32 model for reference."""
    folders = {}
    for family in FAMILIES:
        model = randomise_(Blip2ForConditionalGeneration(_config(family)), std=0.1).eval()
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        folders[family] = (folder, model)
    return folders


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.float().flatten(), b.float().flatten()]))[0, 1])


def _llm_linear_names(model: nn.Module, family: str) -> set[str]:
    """The LLM's linear layers that should be quantized: all but the head (and T5's fp32 `wo`)."""
    kept = ("lm_head", "wo") if family == "t5" else ("lm_head",)
    return {
        name
        for name, module in model.named_modules()
        if name.startswith("language_model.") and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in kept
    }


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_llm_is_quantized_and_the_rest_stays_full_precision(saved, family: str, bits: int) -> None:
    folder, reference = saved[family]
    model = load_language_model_quantized(folder, bits=bits)

    quantized = quantized_module_names(model)
    assert set(quantized) == _llm_linear_names(reference, family)
    assert set(quantized.values()) == {LAYER_CLASS[bits]}
    for name, module in model.named_modules():
        if name.startswith(UNQUANTIZED_PARTS) and isinstance(module, nn.Linear):
            assert not type(module).__module__.startswith("bitsandbytes"), name
            assert module.weight.dtype == torch.float32, name
    for name, parameter in model.named_parameters():
        if name.startswith(UNQUANTIZED_PARTS) or name == "query_tokens":
            assert parameter.dtype == torch.float32, name
    assert torch.equal(model.query_tokens, reference.query_tokens)
    assert torch.equal(model.qformer.encoder.layer[0].attention.attention.query.weight,
                       reference.qformer.encoder.layer[0].attention.attention.query.weight)  # fmt: skip

    batch = labelled_batch(family)
    with torch.no_grad():
        expected = reference(**batch)
        output = model(**batch)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)
    # Tiny random weights quantize noisily: ask for the same logit pattern, not the same values.
    assert _correlation(output.logits, expected.logits) > 0.9
    assert abs(float(output.loss) - float(expected.loss)) < 0.1 * float(expected.loss)

    sequences = model.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], max_new_tokens=3)
    assert sequences.dtype == torch.long and sequences.shape[0] == 2
    assert int(sequences.min()) >= 0 and int(sequences.max()) < TEXT[family]["vocab_size"]


def test_4bit_with_bf16_keeps_the_qformer_in_fp32(saved) -> None:
    folder, reference = saved["opt"]
    model = load_language_model_quantized(folder, bits=4, dtype=torch.bfloat16)
    assert model.qformer.layernorm.weight.dtype == torch.float32
    assert model.query_tokens.dtype == torch.float32
    assert model.language_projection.weight.dtype == torch.float32
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(**labelled_batch("opt")).logits
        expected = reference(**labelled_batch("opt")).logits
    assert torch.isfinite(logits).all() and _correlation(logits, expected) > 0.9


def test_the_plain_config_helper_can_be_passed_to_from_pretrained(saved) -> None:
    folder, _ = saved["llama"]
    config = quantization_config_for_llm(8)
    assert set(config.llm_int8_skip_modules) >= {"vision_model", "query_tokens", "qformer", "language_projection"}
    model = Blip2ForConditionalGeneration.from_pretrained(folder, quantization_config=config)
    assert all(name.startswith("language_model.") for name in quantized_module_names(model))
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantization_config_for_llm(3)


def test_qlora_step_updates_lora_and_the_qformer(saved) -> None:
    from peft import prepare_model_for_kbit_training

    folder, _ = saved["opt"]
    model = load_language_model_quantized(folder, bits=4)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_model = add_lora(model, r=4, init_lora_weights=False, train_parts=["query_tokens", "qformer"])
    peft_model.train()
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert not any("language_model" in name and "lora_" not in name for name in trainable)
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    loss = peft_model(**labelled_batch("opt")).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= trainable
    assert any(".lora_A." in name for name in changed) and any(".lora_B." in name for name in changed)
    assert any(".qformer.modules_to_save." in name for name in changed)
    assert "base_model.model.query_tokens" in changed
    assert not any(name.startswith("base_model.model.vision_model.") for name in changed)


def test_4bit_with_32_wide_llm_layers_fails_before_loading(tmp_path, monkeypatch) -> None:
    model = Blip2ForConditionalGeneration(_config("opt", wide=False))
    model.save_pretrained(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained was reached")

    monkeypatch.setattr(Blip2ForConditionalGeneration, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=r"4-bit quantization cannot pack .*width\(s\) \[32.*q_proj \(32 -> 32\)"):
        load_language_model_quantized(tmp_path, bits=4)
    with pytest.raises(ValueError, match="cannot pack"):
        check_4bit_widths(_config("t5", wide=False))
    check_4bit_widths(_config("llama"))  # 64 wide: fine
    # 8-bit has no such limit: the check only runs for 4 bits.
    monkeypatch.undo()
    assert quantized_module_names(load_language_model_quantized(tmp_path, bits=8))


def test_the_width_rule_is_the_bitsandbytes_cpu_packing_rule() -> None:
    # On CPUs with AVX512-BF16, 4-bit inference repacks weights; in_features must hold whole 64-blocks.
    functional = bnb.functional
    pack = getattr(functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip("this bitsandbytes has no CPU weight packing")
    pack(*functional.quantize_4bit(torch.randn(32, 64), quant_type="nf4"))  # (out 32, in 64): packs
    narrow, state = functional.quantize_4bit(torch.randn(32, 32), quant_type="nf4")
    with pytest.raises((RuntimeError, AssertionError)):
        pack(narrow, state)


def test_a_bare_bitsandbytes_config_quantizes_only_the_llm(saved) -> None:
    from transformers import BitsAndBytesConfig

    folder, _ = saved["opt"]
    model = Blip2ForConditionalGeneration.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert all(name.startswith("language_model.") for name in quantized_module_names(model))
    with torch.no_grad():
        assert torch.isfinite(model(**labelled_batch("opt")).logits).all()


# -- issue 11 bad inputs: a plain 4-bit config on layers bitsandbytes cannot run ------------------------------------
def test_a_bare_4bit_config_on_narrow_llm_layers_is_refused_before_loading(tmp_path, monkeypatch) -> None:
    from transformers import BitsAndBytesConfig

    Blip2ForConditionalGeneration(_config("opt", wide=False)).save_pretrained(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were being loaded")

    monkeypatch.setattr("transformers.PreTrainedModel.from_pretrained", no_loading)
    with pytest.raises(
        ValueError,
        match=r"4-bit quantization cannot pack \d+ layer\(s\) of width\(s\) .* in_features a multiple of 64 and "
        r"out_features a multiple of 32\. Offending: language_model\.\S+ \(32 -> 32\)",
    ):
        Blip2ForConditionalGeneration.from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
        )
    # The check reads the layers the quantizer converts: a caller's skip list that leaves the narrow layers out lets
    # the load through (the vision encoder, queries, Q-Former and projection are added to it).
    monkeypatch.undo()
    skip_llm = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["language_model"])
    assert not quantized_module_names(
        Blip2ForConditionalGeneration.from_pretrained(tmp_path, quantization_config=skip_llm)
    )  # the vision encoder, queries, Q-Former and projection are added to a caller's skip list


def test_a_bare_4bit_config_on_wide_llm_layers_loads_and_generates(saved) -> None:
    from transformers import BitsAndBytesConfig

    folder, _ = saved["llama"]
    model = Blip2ForConditionalGeneration.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    assert set(quantized_module_names(model).values()) == {"Linear4bit"}
    batch = labelled_batch("llama")
    assert (
        model.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], max_new_tokens=2).shape[0]
        == 2
    )


def test_narrow_4bit_layers_that_skip_the_check_fail_at_generate_on_avx512_bf16_cpus(tmp_path, monkeypatch) -> None:
    """Why the load is refused: measured with bitsandbytes 0.50, eval-mode 4-bit inference on a CPU with AVX512-BF16
    repacks the weights and breaks on widths the rule refuses (other CPUs run them)."""
    from transformers import BitsAndBytesConfig

    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes runs 4-bit layers of any width here")
    Blip2ForConditionalGeneration(_config("opt", wide=False)).save_pretrained(tmp_path)
    monkeypatch.setattr("modeling_blip2.modeling._runs_on_cpu", lambda device_map: False)
    model = Blip2ForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    batch = labelled_batch("opt")
    with pytest.raises((RuntimeError, AssertionError)):
        model.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], max_new_tokens=2)
