"""Stage 1 -> stage 2 hand-off: what is carried, dropped and left, and that the queries come out the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny import TEXT, config_dict, pixels, randomise_
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2ForPretraining
from modeling_blip2.conversion import load_safetensors
from modeling_blip2.handoff import build_stage2_from_stage1, load_stage1_into, stage2_state_dict_from_stage1

DEC = 99
STAGE1_ONLY = ("embeddings.", "vision_projection.", "text_projection.", "itm_head.", "qformer_lm_head.")
TEXT_FEED_FORWARD = re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..+")


def _stage1(seed: int = 0) -> Blip2ForPretraining:
    config = config_dict()
    config["qformer_config"].update({"use_qformer_text_input": True, "bos_token_id": DEC})
    config["image_text_hidden_size"] = 16
    config["image_token_index"] = None
    torch.manual_seed(seed)
    model = randomise_(Blip2ForPretraining(Blip2Config(**config)), std=0.1, seed=seed).eval()
    with torch.no_grad():
        model.temp.fill_(0.07)
    return model


def _query_outputs(stage1: Blip2ForPretraining, stage2: Blip2ForConditionalGeneration) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        expected = stage1.query_outputs(stage1.image_embeddings(pixels())).last_hidden_state
        actual = stage2.eval().encode_images(pixels()).query_output
    return expected, actual


def _expected_accounting(stage1_keys: list[str], stage2: Blip2ForConditionalGeneration, text_input: bool) -> dict:
    """The accounting, stated independently of the implementation."""
    # A stage-2 Q-Former that reads text keeps the stage-1 text embeddings.
    stage1_only = tuple(prefix for prefix in STAGE1_ONLY if not (text_input and prefix == "embeddings."))
    dropped = [
        key
        for key in stage1_keys
        if key.startswith(stage1_only) or key == "temp" or (not text_input and TEXT_FEED_FORWARD.fullmatch(key))
    ]
    stage2_keys = list(stage2.state_dict())
    carried_prefixes = ("query_tokens", "qformer.", "vision_model.") + (("embeddings.",) if text_input else ())
    return {
        "carried": [key for key in stage1_keys if key not in dropped],
        "dropped": dropped,
        "left": [key for key in stage2_keys if key.startswith(("language_projection.", "language_model."))],
        "stage2_carried": [key for key in stage2_keys if key.startswith(carried_prefixes)],
    }


@pytest.mark.parametrize("text_input", [False, True])
def test_handoff_carries_the_queries_qformer_and_vision_model(text_input: bool) -> None:
    stage1 = _stage1()
    stage2 = build_stage2_from_stage1(stage1, TEXT["opt"], use_qformer_text_input=text_input)
    assert stage2.config.qformer_config.use_qformer_text_input is text_input
    expected, actual = _query_outputs(stage1, stage2)
    assert torch.equal(actual, expected)

    stage1_state = stage1.state_dict()
    report = stage2_state_dict_from_stage1(stage1_state, stage2.config)
    accounting = _expected_accounting(list(stage1_state), stage2, text_input)
    assert report.carried_keys == accounting["carried"] == list(report.state_dict)
    assert sorted(report.carried_keys) == sorted(accounting["stage2_carried"])
    assert report.dropped_keys == accounting["dropped"]
    assert report.left_keys == accounting["left"]
    stage2_state = stage2.state_dict()
    for key in report.carried_keys:
        assert torch.equal(stage2_state[key], stage1_state[key]), key
    # The trained post-LayerNorm comes from stage 1; the query feed-forward stays whatever the text input.
    assert "vision_model.post_layernorm.weight" in report.carried_keys
    assert "qformer.encoder.layer.1.output_query.dense.weight" in report.carried_keys
    assert "qformer.encoder.layer.1.attention.output.dense.weight" in report.carried_keys
    for text_key in ("qformer.encoder.layer.1.output.dense.weight", "embeddings.word_embeddings.weight"):
        assert (text_key in report.carried_keys) is text_input
        assert (text_key in report.dropped_keys) is not text_input


def test_handoff_from_a_saved_folder_leaves_the_llm_alone(tmp_path: Path) -> None:
    stage1 = _stage1(seed=1)
    stage1.save_pretrained(tmp_path)
    config = build_stage2_from_stage1(stage1, TEXT["opt"]).config
    stage2 = Blip2ForConditionalGeneration(config)
    own = {key: tensor.clone() for key, tensor in stage2.state_dict().items() if key.startswith("language_")}
    report = load_stage1_into(stage2, tmp_path)
    saved_keys = list(load_safetensors(tmp_path))
    accounting = _expected_accounting(saved_keys, stage2, text_input=False)
    assert sorted(report.dropped_keys) == sorted(accounting["dropped"])
    assert sorted(report.carried_keys) == sorted(accounting["stage2_carried"])
    assert sorted(report.left_keys) == sorted(own)
    assert all(torch.equal(stage2.state_dict()[key], tensor) for key, tensor in own.items())
    expected, actual = _query_outputs(stage1, stage2)
    assert torch.equal(actual, expected)


def test_a_loaded_llm_is_plugged_in_as_is() -> None:
    stage1 = _stage1()
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TEXT["opt"])).eval()
    stage2 = build_stage2_from_stage1(stage1, language_model=llm, image_token_index=110)
    assert stage2.language_model is llm and stage2.config.text_config is llm.config
    assert stage2.config.image_token_index == 110
    assert abs(stage2.language_projection.weight.std().item() - 0.02) < 0.005
    assert torch.equal(stage2.language_projection.bias, torch.zeros_like(stage2.language_projection.bias))
    expected, actual = _query_outputs(stage1, stage2)
    assert torch.equal(actual, expected)
    with torch.no_grad():
        logits = stage2(pixels(), input_ids=torch.tensor([[2, 5, 6], [2, 7, 8]])).logits
    assert logits.shape == (2, 4 + 3, TEXT["opt"]["vocab_size"]) and torch.isfinite(logits).all()


def _stage2_config(**qformer: object) -> Blip2Config:
    config = config_dict()
    config["qformer_config"].update(qformer)
    return Blip2Config(**config)


def test_a_stage1_qformer_of_another_width_is_refused(tmp_path: Path) -> None:
    stage1 = _stage1()
    wider = _stage2_config(hidden_size=48)
    with pytest.raises(ValueError, match=r"Q-Former width \(hidden_size\) is 32, the stage-2 config's is 48"):
        stage2_state_dict_from_stage1(stage1.state_dict(), wider)
    with pytest.raises(ValueError, match=r"qformer_config.hidden_size: stage 1 32, stage 2 48"):
        load_stage1_into(Blip2ForConditionalGeneration(wider), stage1)
    with pytest.raises(ValueError, match=r"number of Q-Former layers is 3, the stage-2 config's is 2"):
        stage2_state_dict_from_stage1(stage1.state_dict(), _stage2_config(num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"number of query tokens is 4, the stage-2 config's is 8"):
        stage2_state_dict_from_stage1(stage1.state_dict(), Blip2Config(**config_dict(num_query_tokens=8)))


def test_configs_are_compared_beyond_the_shapes() -> None:
    stage1 = _stage1()
    # Same tensor shapes, another function: only the configs tell.
    other = _stage2_config(hidden_act="relu", num_attention_heads=8)
    with pytest.raises(ValueError, match=r"num_attention_heads: stage 1 4, stage 2 8; .*hidden_act: stage 1 'gelu'"):
        load_stage1_into(Blip2ForConditionalGeneration(other), stage1)


def test_keys_of_neither_stage_and_missing_keys_are_refused() -> None:
    stage1_state = dict(_stage1().state_dict())
    config = _stage2_config()
    with pytest.raises(ValueError, match=r"keys of neither stage in the stage-1 checkpoint: language_model.lm_head"):
        stage2_state_dict_from_stage1({**stage1_state, "language_model.lm_head.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match=r"missing from the stage-1 checkpoint: qformer.encoder.layer.2.output.dense"):
        stage2_state_dict_from_stage1(
            {
                key: value
                for key, value in stage1_state.items()
                if key != "qformer.encoder.layer.2.output.dense.weight"
            },
            _stage2_config(use_qformer_text_input=True),
        )
    stage1_state["vision_model.post_layernorm.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"vision_model.post_layernorm.weight: stage 1 \(7,\), stage 2 \(32,\)"):
        stage2_state_dict_from_stage1(stage1_state, config)
    with pytest.raises(ValueError, match=r"not a stage-1 state dict: it has no query_tokens"):
        stage2_state_dict_from_stage1(Blip2ForConditionalGeneration(config).language_model.state_dict(), config)


def test_build_needs_an_llm_and_the_stage1_config() -> None:
    stage1 = _stage1()
    with pytest.raises(ValueError, match=r"needs an LLM: pass text_config or language_model"):
        build_stage2_from_stage1(stage1)
    with pytest.raises(ValueError, match=r"needs the stage-1 config"):
        build_stage2_from_stage1(stage1.state_dict(), TEXT["opt"])
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TEXT["opt"]))
    with pytest.raises(ValueError, match=r"either text_config or language_model"):
        build_stage2_from_stage1(stage1, TEXT["opt"], language_model=llm)


def test_a_stage1_on_another_vision_family_hands_off_its_encoder_and_feature_layer() -> None:
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
    )
    config = config_dict()
    config["qformer_config"].update({"use_qformer_text_input": True, "bos_token_id": DEC})
    config.update(vision_config=vision, vision_feature_layer=-2, image_token_index=None)
    stage1 = randomise_(Blip2ForPretraining(Blip2Config(**config)), std=0.1).eval()
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TEXT["llama"]))
    # With a loaded LLM the other parts are built around it (SigLIP's position-id buffer must be real, not empty).
    stage2 = build_stage2_from_stage1(stage1, language_model=llm)
    assert stage2.config.vision_feature_layer == -2 and isinstance(stage2.config.vision_config, SiglipVisionConfig)
    expected, actual = _query_outputs(stage1, stage2)
    assert torch.allclose(expected, actual, atol=1e-6)
    with pytest.raises(ValueError, match=r"config.vision_feature_layer: stage 1 -2, stage 2 -1"):
        build_stage2_from_stage1(stage1, text_config=TEXT["llama"], vision_feature_layer=-1)
    with pytest.raises(ValueError, match=r"vision_config.hidden_act: stage 1 'gelu_pytorch_tanh', stage 2 'gelu'"):
        load_stage1_into(
            Blip2ForConditionalGeneration(
                Blip2Config(
                    **{
                        **config_dict("llama"),
                        "vision_config": {**vision.to_dict(), "hidden_act": "gelu"},
                        "vision_feature_layer": -2,
                    }
                )
            ),
            stage1,
        )
