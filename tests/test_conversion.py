"""LAVIS -> ours conversion and ours -> stock transformers export, on tiny configs with transformers as the oracle."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny import TEXT, config_dict, pixels, prompt_with_image_tokens, randomise_

import modeling_blip2
from modeling_blip2.conversion import (
    convert_lavis_checkpoint,
    convert_lavis_state_dict,
    expected_state_dict_shapes,
    export_to_transformers,
    infer_lavis_architecture,
)

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
LLM_PREFIX = {"opt": "opt", "t5": "t5"}


# -- an independent inverse mapping: our names -> LAVIS names -------------------------------------------------------
_VISION_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(\w+(?:\.\w+)?)\.(weight|bias)$")
_VISION_LAYER_PARTS = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOP_LEVEL = {
    "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
    "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
    "qformer_lm_head.decoder.weight": "Qformer.cls.predictions.decoder.weight",
    "qformer_lm_head.decoder.bias": "Qformer.cls.predictions.bias",
    "query_tokens": "query_tokens",
    "temp": "temp",
}
_PREFIXES = {
    "vision_model.embeddings.patch_embedding.": "visual_encoder.patch_embed.proj.",
    "vision_model.post_layernorm.": "ln_vision.",
    "qformer.layernorm.": "Qformer.bert.embeddings.LayerNorm.",
    "embeddings.": "Qformer.bert.embeddings.",
    "vision_projection.": "vision_proj.",
    "text_projection.": "text_proj.",
    "itm_head.": "itm_head.",
    "qformer_lm_head.transform.": "Qformer.cls.predictions.transform.",
}


def _lavis_name(name: str, llm: str | None) -> str:
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _VISION_LAYER.match(name)
    if match:
        index, part, kind = match.groups()
        return f"visual_encoder.blocks.{index}.{_VISION_LAYER_PARTS[part]}.{kind}"
    if name.startswith("qformer.encoder.layer."):
        rest = name[len("qformer.encoder.layer.") :]
        rest = rest.replace(".attention.attention.", ".attention.self.").replace(
            ".crossattention.attention.", ".crossattention.self."
        )
        return "Qformer.bert.encoder.layer." + rest
    if llm is not None and name.startswith("language_projection."):
        return f"{llm}_proj." + name[len("language_projection.") :]
    if llm is not None and name.startswith("language_model."):
        return f"{llm}_model." + name[len("language_model.") :]
    for ours, lavis in _PREFIXES.items():
        if name.startswith(ours):
            return lavis + name[len(ours) :]
    raise AssertionError(f"no LAVIS name for {name}")


def to_lavis(state_dict: dict[str, torch.Tensor], num_layers: int, llm: str | None = None) -> dict[str, torch.Tensor]:
    """LAVIS layout of our state dict, with what a LAVIS model also holds: a 40th-style extra EVA block, buffers."""
    lavis = {}
    for name, tensor in state_dict.items():
        if name.endswith("self_attn.qkv.bias"):
            query, key, value = tensor.clone().chunk(3)
            assert not key.any(), "EVA has no key bias"
            block = _lavis_name(name, llm)[: -len("qkv.bias")]
            lavis[block + "q_bias"], lavis[block + "v_bias"] = query, value
        else:
            lavis[_lavis_name(name, llm)] = tensor.clone()
        if name == "qformer_lm_head.decoder.bias":
            lavis["Qformer.cls.predictions.decoder.bias"] = lavis["Qformer.cls.predictions.bias"]  # BERT's alias
    extra = f"visual_encoder.blocks.{num_layers}."
    for name in [name for name in lavis if name.startswith("visual_encoder.blocks.0.")]:
        lavis[extra + name[len("visual_encoder.blocks.0.") :]] = torch.randn_like(lavis[name])
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
    return lavis


def _our_config(family: str = "opt", **overrides: object) -> modeling_blip2.Blip2Config:
    return modeling_blip2.Blip2Config(**config_dict(family, **overrides))


def _stage1_config_dict() -> dict:
    config = config_dict()
    config["qformer_config"]["use_qformer_text_input"] = True
    config["image_text_hidden_size"] = 16
    return config


def _inputs(family: str) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = prompt_with_image_tokens([[5, 6, 7, 8], [9, 10]], TEXT[family]["pad_token_id"])
    inputs = {"pixel_values": pixels(), "input_ids": input_ids, "attention_mask": attention_mask}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 11, 12], [0, 13, 14]])
    return inputs


def _random_model(family: str, **overrides: object) -> modeling_blip2.Blip2ForConditionalGeneration:
    return randomise_(modeling_blip2.Blip2ForConditionalGeneration(_our_config(family, **overrides))).eval()


def _assert_same_state_dict(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, different


def _assert_clean_load(info: dict) -> None:
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])


# -- LAVIS -> ours --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["opt", "t5"])
def test_lavis_round_trip_gives_the_same_model(family: str) -> None:
    model = _random_model(family)
    original = model.state_dict()
    num_layers = model.config.vision_config.num_hidden_layers
    lavis = to_lavis(original, num_layers, llm=LLM_PREFIX[family])
    assert infer_lavis_architecture(lavis) == "conditional_generation"

    result = convert_lavis_state_dict(lavis, model.config)

    assert result.architecture == "conditional_generation"
    _assert_same_state_dict(result.state_dict, original)
    assert sorted(result.dropped_keys) == sorted(
        [name for name in lavis if name.startswith(f"visual_encoder.blocks.{num_layers}.")]
        + ["Qformer.bert.embeddings.position_ids"]
    )
    fresh = modeling_blip2.Blip2ForConditionalGeneration(_our_config(family)).eval()
    fresh.load_state_dict(result.state_dict, strict=True)
    inputs = _inputs(family)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


def test_lavis_without_tied_lm_head_and_with_unused_eva_parts() -> None:
    model = _random_model("opt")
    lavis = to_lavis(model.state_dict(), 2, llm="opt")
    del lavis["opt_model.lm_head.weight"]  # tied to the input embeddings
    lavis["visual_encoder.norm.weight"] = torch.ones(32)
    lavis["visual_encoder.norm.bias"] = torch.zeros(32)

    result = convert_lavis_state_dict(lavis, model.config, architecture="conditional_generation")

    _assert_same_state_dict(result.state_dict, model.state_dict())
    assert {"visual_encoder.norm.weight", "visual_encoder.norm.bias"} <= set(result.dropped_keys)


def test_lavis_flan_t5_untied_lm_head_survives_conversion_and_export(tmp_path) -> None:
    """Flan-T5's LM head is not its input embedding; transformers unties the two when a checkpoint holds both."""
    model = _random_model("t5")
    lavis = to_lavis(model.state_dict(), 2, llm="t5")
    lm_head = torch.randn_like(lavis["t5_model.lm_head.weight"])
    lavis["t5_model.lm_head.weight"] = lm_head
    torch.save({"model": lavis}, tmp_path / "flan_t5.pth")
    convert_lavis_checkpoint(tmp_path / "flan_t5.pth", model.config, tmp_path / "ours", allow_pickle=True)

    ours = modeling_blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(ours.language_model.lm_head.weight, lm_head)
    assert torch.equal(ours.language_model.shared.weight, model.language_model.shared.weight)
    ours.save_pretrained(tmp_path / "saved")
    export_to_transformers(tmp_path / "saved", tmp_path / "stock")
    stock = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "stock").eval()
    assert torch.equal(stock.language_model.lm_head.weight, lm_head)
    with torch.no_grad():
        assert torch.allclose(stock(**_inputs("t5")).logits, ours(**_inputs("t5")).logits, atol=ATOL)


def _stage1_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in our stage-1 layout: the stock retrieval model's keys plus `temp` and the ITG head."""
    stock = transformers.Blip2Config(**_stage1_config_dict())
    with torch.device("meta"):
        shapes = {
            name: tensor.shape for name, tensor in transformers.Blip2ForImageTextRetrieval(stock).state_dict().items()
        }
    hidden, vocab = 32, config_dict()["qformer_config"]["vocab_size"]
    shapes["temp"] = torch.Size([])
    shapes["qformer_lm_head.transform.dense.weight"] = torch.Size([hidden, hidden])
    shapes["qformer_lm_head.transform.dense.bias"] = torch.Size([hidden])
    shapes["qformer_lm_head.transform.LayerNorm.weight"] = torch.Size([hidden])
    shapes["qformer_lm_head.transform.LayerNorm.bias"] = torch.Size([hidden])
    shapes["qformer_lm_head.decoder.weight"] = torch.Size([vocab, hidden])
    shapes["qformer_lm_head.decoder.bias"] = torch.Size([vocab])
    generator = torch.Generator().manual_seed(seed)
    state_dict = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    for name, tensor in state_dict.items():
        if name.endswith("self_attn.qkv.bias"):
            tensor[32:64] = 0
    return state_dict


def test_lavis_stage1_checkpoint_converts_to_the_pretraining_layout() -> None:
    config = modeling_blip2.Blip2Config(**_stage1_config_dict())
    ours = _stage1_state_dict()
    lavis = to_lavis(ours, 2)
    assert infer_lavis_architecture(lavis) == "pretraining"

    result = convert_lavis_state_dict(lavis, config)

    assert result.architecture == "pretraining"
    assert set(result.state_dict) == set(ours)
    assert all(torch.equal(result.state_dict[name], ours[name]) for name in ours)
    assert set(expected_state_dict_shapes(config, "pretraining")) == set(ours)
    assert result.state_dict["temp"].shape == ()
    assert "Qformer.cls.predictions.decoder.bias" in result.dropped_keys  # an alias of predictions.bias

    # LAVIS ties the ITG decoder to the word embeddings; a dict without the decoder copy gets it filled in.
    del lavis["Qformer.cls.predictions.decoder.weight"]
    filled = convert_lavis_state_dict(lavis, config).state_dict
    assert torch.equal(filled["qformer_lm_head.decoder.weight"], ours["embeddings.word_embeddings.weight"])


def test_lavis_retrieval_checkpoint_loads_strictly_into_stock_retrieval_model() -> None:
    config = modeling_blip2.Blip2Config(**_stage1_config_dict())
    ours = _stage1_state_dict()
    retrieval = {name: tensor for name, tensor in ours.items() if not name.startswith(("temp", "qformer_lm_head."))}
    lavis = to_lavis(retrieval, 2)
    assert infer_lavis_architecture(lavis) == "image_text_retrieval"

    result = convert_lavis_state_dict(lavis, config)

    stock = transformers.Blip2ForImageTextRetrieval(transformers.Blip2Config(**_stage1_config_dict()))
    stock.load_state_dict(result.state_dict, strict=True)
    assert all(torch.equal(stock.state_dict()[name], retrieval[name]) for name in retrieval)

    # A full stage-1 dict converts to the retrieval layout too, leaving out (and reporting) the stage-1-only parts.
    full = convert_lavis_state_dict(to_lavis(ours, 2), config, architecture="image_text_retrieval")
    assert set(full.state_dict) == set(retrieval)
    assert "temp" in full.dropped_keys and "Qformer.cls.predictions.decoder.weight" in full.dropped_keys


def test_lavis_stage1_layout_needs_the_qformer_text_feed_forward() -> None:
    lavis = to_lavis(_stage1_state_dict(), 2)
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        convert_lavis_state_dict(lavis, _our_config("opt"))


def _lavis_opt() -> tuple[dict[str, torch.Tensor], modeling_blip2.Blip2Config]:
    model = _random_model("opt")
    return to_lavis(model.state_dict(), 2, llm="opt"), model.config


def test_lavis_unexpected_key_is_named() -> None:
    lavis, config = _lavis_opt()
    lavis["opt_model.model.decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 unexpected keys:\n  language_model\.model\.decoder\.extra\.weight"):
        convert_lavis_state_dict(lavis, config)


def test_lavis_missing_key_is_named() -> None:
    lavis, config = _lavis_opt()
    del lavis["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
    with pytest.raises(
        ValueError, match=r"1 missing keys:\n  qformer\.encoder\.layer\.0\.crossattention\.attention\.key"
    ):
        convert_lavis_state_dict(lavis, config)
    lavis, config = _lavis_opt()
    del lavis["visual_encoder.blocks.1.attn.v_bias"]
    with pytest.raises(ValueError, match=r"visual_encoder\.blocks\.1\.attn\.v_bias"):
        convert_lavis_state_dict(lavis, config)


def test_lavis_wrong_shape_is_named() -> None:
    lavis, config = _lavis_opt()
    lavis["opt_proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(ValueError, match=r"language_projection\.weight: \(32, 31\) .* \(32, 32\) expected"):
        convert_lavis_state_dict(lavis, config)


def test_lavis_more_than_one_extra_vision_block_is_not_dropped() -> None:
    model = _random_model("opt")
    lavis = to_lavis(model.state_dict(), 2, llm="opt")
    lavis["visual_encoder.blocks.3.norm1.weight"] = torch.ones(32)
    with pytest.raises(ValueError, match=r"visual_encoder\.blocks\.2\.norm1\.weight"):
        convert_lavis_state_dict(lavis, model.config)


def test_lavis_config_and_architecture_are_checked() -> None:
    lavis, _ = _lavis_opt()
    with pytest.raises(ValueError, match="decoder-only OPT"):
        convert_lavis_state_dict(lavis, _our_config("t5"))
    with pytest.raises(ValueError, match="architecture must be one of"):
        convert_lavis_state_dict(lavis, _our_config("opt"), architecture="captioning")
    clip = config_dict("opt")
    clip["vision_config"]["vision_architecture"] = "clip"
    with pytest.raises(ValueError, match="EVA ViT-g"):
        convert_lavis_state_dict(lavis, modeling_blip2.Blip2Config(**clip))


def test_convert_lavis_checkpoint_refuses_pickles_unless_allowed(tmp_path) -> None:
    model = _random_model("opt")
    checkpoint = tmp_path / "blip2_opt.pth"
    torch.save({"model": to_lavis(model.state_dict(), 2, llm="opt"), "epoch": 3}, checkpoint)
    with pytest.raises(ValueError, match="allow_pickle"):
        convert_lavis_checkpoint(checkpoint, model.config, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    convert_lavis_checkpoint(checkpoint, model.config, tmp_path / "out", allow_pickle=True)

    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        "Blip2ForConditionalGeneration"
    ]
    loaded, info = modeling_blip2.Blip2ForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    _assert_clean_load(info)
    inputs = _inputs("opt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, model(**inputs).logits)


def test_trained_parameters_only_checkpoint_takes_frozen_parts_from_an_official_folder(tmp_path) -> None:
    """LAVIS releases only what it trained; the frozen ViT and LLM come from a (e.g. official) safetensors folder."""
    model = _random_model("opt")
    model.save_pretrained(tmp_path / "official")
    lavis = {
        key: value
        for key, value in to_lavis(model.state_dict(), 2, llm="opt").items()
        if not key.startswith(("visual_encoder.", "opt_model."))  # ln_vision, Q-Former, queries, opt_proj stay
    }
    checkpoint = tmp_path / "trained_only.pth"
    torch.save({"model": lavis}, checkpoint)
    with pytest.raises(ValueError, match="missing"):
        convert_lavis_checkpoint(checkpoint, model.config, tmp_path / "refused", allow_pickle=True)

    result = convert_lavis_checkpoint(
        checkpoint, model.config, tmp_path / "out", allow_pickle=True, frozen_weights_from=tmp_path / "official"
    )

    assert result.filled_keys and all(
        key.startswith(("vision_model.", "language_model.")) for key in result.filled_keys
    )
    assert not any(key.startswith("vision_model.post_layernorm") for key in result.filled_keys)
    _assert_same_state_dict(result.state_dict, model.state_dict())


# -- ours -> stock transformers -------------------------------------------------------------------------------------
def _stock_vision_fields() -> set[str]:
    return set(transformers.Blip2VisionConfig().to_dict())


@pytest.mark.parametrize(("family", "shard_size"), [("opt", "40KB"), ("t5", None)])
def test_export_loads_in_the_stock_class_with_the_same_logits(family: str, shard_size: str | None, tmp_path) -> None:
    model = _random_model(family)
    source, target = tmp_path / "ours", tmp_path / "stock"
    model.save_pretrained(source, **({"max_shard_size": shard_size} if shard_size else {}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        shutil.copyfile(ROOT / "hub_configs" / "tiny-random" / name, source / name)
    (source / "remote_code.py").write_text("raise RuntimeError\n")

    result = export_to_transformers(source, target, **({"max_shard_size": shard_size} if shard_size else {}))

    assert result.dropped_keys == [] and result.architecture == "Blip2ForConditionalGeneration"
    assert not list(target.glob("*.py"))
    assert (target / "model.safetensors.index.json").is_file() == (shard_size is not None)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        assert (target / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((target / "processor_config.json").read_text()) == {
        "processor_class": "Blip2Processor",
        "num_query_tokens": model.config.num_query_tokens,
    }
    written = json.loads((target / "config.json").read_text())
    assert written["model_type"] == "blip-2" and "custom_pipelines" not in written and "auto_map" not in written
    assert written["vision_config"]["model_type"] == "blip_2_vision_model"
    assert written["qformer_config"]["model_type"] == "blip_2_qformer"
    assert written["use_decoder_only_language_model"] is (family == "opt")
    assert set(written["vision_config"]) <= _stock_vision_fields()

    stock, info = transformers.Blip2ForConditionalGeneration.from_pretrained(target, output_loading_info=True)
    _assert_clean_load(info)
    assert type(stock.config) is transformers.Blip2Config and stock.config.model_type == "blip-2"
    inputs = _inputs(family)
    with torch.no_grad():
        expected, actual = model(**inputs).logits, stock.eval()(**inputs).logits
    assert torch.allclose(actual, expected, atol=ATOL), (actual - expected).abs().max()


def test_export_refuses_a_generation_model_whose_qformer_reads_the_question(tmp_path) -> None:
    config = modeling_blip2.Blip2Config.from_pretrained(ROOT / "hub_configs" / "tiny-random")
    assert config.qformer_config.use_qformer_text_input
    modeling_blip2.Blip2ForConditionalGeneration(config).save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="use_qformer_text_input=True, weights embeddings"):
        modeling_blip2.conversion.export_to_transformers(tmp_path / "ours", tmp_path / "stock")
    assert not (tmp_path / "stock").exists()


def test_export_refuses_a_clip_image_encoder(tmp_path) -> None:
    clip = config_dict("opt")
    clip["vision_config"]["vision_architecture"] = "clip"
    modeling_blip2.Blip2Config(**clip).save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="vision_architecture='clip'"):
        export_to_transformers(tmp_path / "ours", tmp_path / "stock")
    assert not (tmp_path / "stock").exists()


def test_export_post_layernorm_eps_change_needs_consent(tmp_path) -> None:
    vision = dict(config_dict("opt")["vision_config"], post_layernorm_eps=1e-5)
    model = _random_model("opt", vision_config=vision)
    model.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="allow_post_layernorm_eps_change"):
        export_to_transformers(tmp_path / "ours", tmp_path / "stock")
    with pytest.warns(UserWarning, match="post_layernorm_eps"):
        export_to_transformers(tmp_path / "ours", tmp_path / "stock", allow_post_layernorm_eps_change=True)
    written = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert "post_layernorm_eps" not in written["vision_config"]
    _, info = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "stock", output_loading_info=True)
    _assert_clean_load(info)


def test_export_checks_the_weights(tmp_path) -> None:
    model = _random_model("opt")
    model.save_pretrained(tmp_path / "ours")
    state_dict = modeling_blip2.conversion.load_safetensors(tmp_path / "ours")
    del state_dict["qformer.layernorm.bias"]
    modeling_blip2.conversion.save_safetensors(state_dict, tmp_path / "ours")
    with pytest.raises(ValueError, match=r"missing keys:\n  qformer\.layernorm\.bias"):
        export_to_transformers(tmp_path / "ours", tmp_path / "stock")


# -- command-line examples: LAVIS stage 1 -> ours -> stock retrieval model ------------------------------------------
def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_examples_convert_a_stage1_checkpoint_and_export_it(tmp_path) -> None:
    modeling_blip2.Blip2Config(**_stage1_config_dict()).save_pretrained(tmp_path / "config")
    ours = _stage1_state_dict()
    torch.save({"model": to_lavis(ours, 2)}, tmp_path / "stage1.pth")
    convert = _load_example("convert_lavis")
    args = ["--checkpoint", str(tmp_path / "stage1.pth"), "--config", str(tmp_path / "config")]
    with pytest.raises(ValueError, match="allow_pickle"):
        convert.main([*args, "--output_dir", str(tmp_path / "ours")])
    result = convert.main([*args, "--output_dir", str(tmp_path / "ours"), "--allow_pickle"])
    assert result.architecture == "pretraining"
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == ["Blip2ForPretraining"]

    export = _load_example("export_to_transformers")
    exported = export.main(["--source_dir", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "stock")])

    assert exported.architecture == "Blip2ForImageTextRetrieval"
    assert sorted(exported.dropped_keys) == sorted(name for name in ours if name.startswith(("temp", "qformer_lm_")))
    stock, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "stock", output_loading_info=True)
    _assert_clean_load(info)
    stock_state = stock.state_dict()
    assert all(torch.equal(stock_state[name], ours[name]) for name in stock_state)


# -- bad inputs and the stock processor (issue 11) ------------------------------------------------------------------
def test_lavis_state_dict_with_a_non_tensor_value_or_nothing_is_named(tmp_path) -> None:
    lavis, config = _lavis_opt()
    lavis["temp"] = 0.07
    lavis["Qformer.bert.embeddings.position_ids"] = [0, 1, 2]
    named = r"2 entries do not:\n  'Qformer\.bert\.embeddings\.position_ids': list\n  'temp': float"
    with pytest.raises(ValueError, match=named):
        convert_lavis_state_dict(lavis, config)
    with pytest.raises(ValueError, match="lavis_state_dict is an empty state dict"):
        convert_lavis_state_dict({}, config)

    convert = _load_example("convert_lavis")
    config.save_pretrained(tmp_path / "config")
    for name, content in (("non-tensor", {"model": {"temp": 0.07}}), ("empty", {"model": {}, "epoch": 3})):
        checkpoint = tmp_path / f"{name}.pth"
        torch.save(content, checkpoint)
        args = ["--checkpoint", str(checkpoint), "--config", str(tmp_path / "config"), "--allow_pickle"]
        expected = f"the state dict in {re.escape(str(checkpoint))} \\(under 'model'\\) " + (
            r"must map string names to torch\.Tensors; 1 entries do not:\n  'temp': float"
            if name == "non-tensor"
            else "is an empty state dict"
        )
        with pytest.raises(ValueError, match=expected):
            convert.main([*args, "--output_dir", str(tmp_path / name)])
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("damage", ["truncated", "truncated shard", "missing shard", "corrupt config"])
def test_export_of_a_damaged_checkpoint_names_the_file_and_writes_nothing(tmp_path, damage: str) -> None:
    source, target = tmp_path / "ours", tmp_path / "stock"
    _random_model("opt").save_pretrained(source, **({"max_shard_size": "40KB"} if "shard" in damage else {}))
    shards = sorted(source.glob("model-*.safetensors"))
    broken = {
        "truncated": source / "model.safetensors",
        "truncated shard": shards[-1] if shards else None,
        "missing shard": shards[0] if shards else None,
        "corrupt config": source / "config.json",
    }[damage]
    data = broken.read_bytes()
    if damage == "missing shard":
        broken.unlink()
        expected = f"model.safetensors.index.json lists shards that are not in {source}: {broken.name}"
    elif damage == "corrupt config":
        broken.write_bytes(data[: len(data) // 2])
        expected = f"{broken} is not a valid JSON file"
    else:
        broken.write_bytes(data[: len(data) // 2])
        expected = f"{broken} is not a readable safetensors file (truncated or corrupt?)"
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(expected)):
        export_to_transformers(source, target)
    assert not target.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ours"]


def test_export_source_that_is_not_a_checkpoint_folder_is_named(tmp_path) -> None:
    model = _random_model("opt")
    model.save_pretrained(tmp_path / "ours")
    with pytest.raises(NotADirectoryError, match="got the file .*model.safetensors \\(a weights file\\)"):
        export_to_transformers(tmp_path / "ours" / "model.safetensors", tmp_path / "stock")
    (tmp_path / "ours" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path / 'ours'))} has no config.json"):
        export_to_transformers(tmp_path / "ours", tmp_path / "stock")
    with pytest.raises(FileNotFoundError, match="source_dir .*missing does not exist"):
        export_to_transformers(tmp_path / "missing", tmp_path / "stock")


def test_export_loads_with_the_stock_processor_and_model(tmp_path) -> None:
    """A checkpoint saved with its processor exports to a folder that the stock `Blip2Processor` and
    `Blip2ForConditionalGeneration` both load, and the stock processor prepares inputs exactly as ours did."""
    from PIL import Image
    from tiny import tiny_checkpoint_parts

    _, processor = tiny_checkpoint_parts()
    config = modeling_blip2.Blip2Config.from_pretrained(ROOT / "hub_configs" / "tiny-random")
    config.qformer_config.use_qformer_text_input = False  # the stock generation class has no Q-Former text side
    config.vision_config.post_layernorm_eps = config.vision_config.layer_norm_eps
    model = randomise_(modeling_blip2.Blip2ForConditionalGeneration(config)).eval()
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")

    export = _load_example("export_to_transformers")
    export.main(["--source_dir", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "stock")])

    stock_processor = transformers.Blip2Processor.from_pretrained(tmp_path / "stock")
    auto_processor = transformers.AutoProcessor.from_pretrained(tmp_path / "stock")
    assert type(auto_processor) is transformers.Blip2Processor
    stock_model, info = transformers.Blip2ForConditionalGeneration.from_pretrained(
        tmp_path / "stock", output_loading_info=True
    )
    _assert_clean_load(info)
    assert stock_processor.num_query_tokens == processor.num_query_tokens
    image = Image.new("RGB", (40, 30), (200, 40, 90))
    ours = processor(images=image, text="a photo of")
    stock = stock_processor(images=image, text="a photo of", return_tensors="pt")
    assert torch.equal(stock["input_ids"], ours["input_ids"])
    assert torch.equal(stock["pixel_values"], ours["pixel_values"])
    with torch.no_grad():
        expected = model(**ours).logits
        actual = stock_model.eval()(**{key: stock[key] for key in ("input_ids", "attention_mask", "pixel_values")})
    assert torch.allclose(actual.logits, expected, atol=ATOL)
