"""LoRA (PEFT) on the LLM and on the Q-Former: targets per LLM family, training, save / reload, merge, generate."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import TEXT, config_dict, labelled_batch, randomise_

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration
from modeling_blip2.adapters import (
    STAGE2_TRAINABLE_PARTS,
    add_lora,
    load_adapter,
    lora_module_names,
    lora_target_modules,
    merge_lora,
    save_adapter,
)

FAMILY_PROJECTIONS = {"opt": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj"), "t5": ("q", "v")}
# 2 decoder layers x (q, v); T5: 2 encoder blocks x (q, v) + 2 decoder blocks x (self q, v + cross q, v).
FAMILY_LORA_COUNT = {"opt": 4, "llama": 4, "t5": 12}
# 3 Q-Former layers x self-attention (query, value) + cross-attention on layers 0 and 2 x (query, value).
QFORMER_LORA_COUNT = 10


def _model(family: str = "opt", seed: int = 0, **overrides: object) -> Blip2ForConditionalGeneration:
    model = Blip2ForConditionalGeneration(Blip2Config(**config_dict(family, **overrides)))
    return randomise_(model, std=0.1, seed=seed).eval()


def _logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**labelled_batch(family)).logits


def _generate(model: torch.nn.Module, family: str) -> torch.Tensor:
    batch = labelled_batch(family)
    return model.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], max_new_tokens=3)


@pytest.mark.parametrize("family", ["opt", "llama", "t5"])
def test_lora_on_the_llm_wraps_only_its_query_and_value_projections(family: str) -> None:
    model = _model(family)
    targets = lora_target_modules(model)
    peft_model = add_lora(model)
    wrapped = lora_module_names(peft_model)
    assert wrapped == targets
    assert len(wrapped) == FAMILY_LORA_COUNT[family]
    assert all(name.startswith("language_model.") for name in wrapped)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == set(FAMILY_PROJECTIONS[family])
    # Only LoRA weights train; the vision encoder, Q-Former, projection and LLM base weights are frozen.
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "olmo"])
def test_llama_like_families_are_detected_from_the_model(model_type: str) -> None:
    # olmo is not in PEFT's default table: its projections are found from the module names.
    text = dict(TEXT["llama"], model_type=model_type)
    model = Blip2ForConditionalGeneration(Blip2Config(**config_dict("llama", text_config=text)))
    targets = lora_target_modules(model)
    assert len(targets) == 4
    assert all(name.startswith("language_model.model.layers.") for name in targets)
    assert {name.rsplit(".", 1)[-1] for name in targets} == {"q_proj", "v_proj"}


def test_a_regex_entry_in_peft_table_is_not_read_as_leaf_names(monkeypatch) -> None:
    # PEFT gives a few model types a regex over their own paths (gemma4); its characters are no leaf names. "kv" would
    # otherwise become the leaves ("k", "v"), which T5 has: the query projection would be missed.
    from peft.utils import constants

    monkeypatch.setitem(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "t5", "kv")
    targets = lora_target_modules(_model("t5"))
    assert {name.rsplit(".", 1)[-1] for name in targets} == {"q", "v"} and len(targets) == FAMILY_LORA_COUNT["t5"]


def test_lora_on_the_qformer_wraps_only_its_query_and_value_projections() -> None:
    model = _model("opt")
    peft_model = add_lora(model, part="qformer")
    wrapped = lora_module_names(peft_model)
    assert len(wrapped) == QFORMER_LORA_COUNT
    assert all(name.startswith("qformer.encoder.layer.") for name in wrapped)
    assert {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in wrapped} == {
        "attention.query",
        "attention.value",
    }
    assert any(".crossattention." in name for name in wrapped)
    # "both" is the union; the vision encoder's fused qkv is never a target.
    both = lora_target_modules(_model("opt"), part="both")
    assert set(both) == set(wrapped) | set(lora_target_modules(_model("opt")))
    assert not any(name.startswith("vision_model.") for name in both)


def test_explicit_suffixes_are_resolved_within_the_part() -> None:
    model = _model("opt")
    peft_model = add_lora(model, part="qformer", target_modules=["query", "key", "value"])
    wrapped = lora_module_names(peft_model)
    assert len(wrapped) == 15 and all(name.startswith("qformer.") for name in wrapped)
    peft_model = add_lora(_model("opt"), target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    wrapped = lora_module_names(peft_model)
    assert len(wrapped) == 8 and all(name.startswith("language_model.") for name in wrapped)


def test_target_names_that_match_nothing_raise_and_name_them() -> None:
    # The classic mix-up: OPT names on a T5 LLM.
    with pytest.raises(ValueError, match=r"\['q_proj', 'v_proj'\].*match no linear layer") as error:
        add_lora(_model("t5"), target_modules=["q_proj", "v_proj"])
    assert "SelfAttention.q" in str(error.value) or "'q'" in str(error.value)  # the names that do exist
    with pytest.raises(ValueError, match=r"\['v_prj'\]"):
        add_lora(_model("opt"), target_modules=["q_proj", "v_prj"])
    with pytest.raises(ValueError, match="regex"):
        add_lora(_model("opt"), target_modules=r"language_model\..*\.nothing")
    with pytest.raises(ValueError, match="part must be one of"):
        add_lora(_model("opt"), part="vision_model")
    with pytest.raises(ValueError, match="train_parts entry 'nope'"):
        add_lora(_model("opt"), train_parts=["nope"])
    with pytest.raises(ValueError, match="also receives LoRA"):
        add_lora(_model("opt"), part="qformer", train_parts=["qformer"])


@pytest.mark.parametrize("family", ["opt", "llama", "t5"])
def test_training_step_changes_only_lora_parameters(family: str) -> None:
    model = _model(family)
    model.freeze_language_model()
    peft_model = add_lora(model, init_lora_weights=False)
    peft_model.train()
    assert peft_model.get_base_model().language_model.training  # LoRA dropout acts under train()
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(**labelled_batch(family)).loss.backward()
    optimizer.step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".lora_A." in name or ".lora_B." in name for name in changed)
    assert len(changed) == 2 * FAMILY_LORA_COUNT[family]


def test_training_step_with_a_trainable_qformer_changes_lora_and_stage2_parts(tmp_path) -> None:
    model = _model("opt")
    model.freeze_vision_encoder()
    model.freeze_language_model()
    peft_model = add_lora(model, init_lora_weights=False, train_parts=STAGE2_TRAINABLE_PARTS)
    peft_model.train()
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(**labelled_batch("opt")).loss.backward()
    optimizer.step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    stage2 = {name for name in changed if ".modules_to_save." in name or name.endswith("query_tokens")}
    lora = {name for name in changed if ".lora_A." in name or ".lora_B." in name}
    assert changed == stage2 | lora and lora
    assert any(".qformer.modules_to_save." in name for name in stage2)
    assert any(".language_projection.modules_to_save." in name for name in stage2)
    assert any(".post_layernorm.modules_to_save." in name for name in stage2)
    assert "base_model.model.query_tokens" in stage2
    # The adapter folder carries the trained Q-Former parts; save_adapter adds the query tokens.
    expected = _logits(peft_model.eval(), "opt")
    save_adapter(peft_model, tmp_path / "adapter")
    reloaded = load_adapter(_model("opt"), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, "opt"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["opt", "llama", "t5"])
def test_adapters_reload_onto_a_fresh_base_and_merge_to_the_same_logits(family: str, tmp_path) -> None:
    base_logits = _logits(_model(family), family)
    peft_model = add_lora(_model(family), init_lora_weights=False).eval()
    adapter_logits = _logits(peft_model, family)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # the adapters do something

    peft_model.save_pretrained(tmp_path / "adapter")  # PEFT's own API
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == lora_target_modules(_model(family))
    reloaded = load_adapter(_model(family), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, family), adapter_logits, rtol=0, atol=0)

    sequences = _generate(peft_model, family)
    merged = merge_lora(peft_model)
    assert isinstance(merged, Blip2ForConditionalGeneration) and not lora_module_names(merged)
    torch.testing.assert_close(_logits(merged, family), adapter_logits, rtol=0, atol=1e-5)
    assert torch.equal(_generate(merged, family), sequences)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_generate_with_the_adapter_model(family: str) -> None:
    peft_model = add_lora(_model(family), init_lora_weights=False).eval()
    batch = labelled_batch(family)
    sequences = peft_model.generate(
        pixel_values=batch["pixel_values"],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=4,
    )
    assert sequences.dtype == torch.long and sequences.shape[0] == 2
    if family == "opt":
        assert sequences.shape[1] == batch["input_ids"].shape[1] + 4
        assert torch.equal(sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    # With the adapters disabled, generation is the base model's.
    with peft_model.disable_adapter():
        disabled = _generate(peft_model, family)
    assert torch.equal(disabled, _generate(_model(family), family))


def test_blip2_trainer_trains_and_saves_the_adapter(tmp_path) -> None:
    from modeling_blip2 import Blip2Trainer, Blip2TrainingArguments

    peft_model = add_lora(_model("opt"), train_parts=["qformer"])
    batch = labelled_batch("opt")
    dataset = [{key: value[i] for key, value in batch.items()} for i in range(2)] * 2
    args = Blip2TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Blip2Trainer(model=peft_model, args=args, train_dataset=dataset)
    base = copy.deepcopy(peft_model.get_base_model().qformer.original_module.state_dict())
    trainer.train()
    trained = peft_model.get_base_model().qformer.modules_to_save["default"].state_dict()
    assert any(not torch.equal(trained[key], base[key]) for key in base)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = load_adapter(_model("opt"), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, "opt"), _logits(peft_model.eval(), "opt"), rtol=0, atol=1e-6)
