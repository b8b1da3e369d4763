"""The contracts transformers 5 holds every model to, checked on our classes in the manner of its model tests.

A model tester builds tiny configs and inputs; the checks below are the common ones: the getters' output types and
shapes, `return_dict` (argument and config) against tuples, hidden-state and attention counts, save/load, eager vs
SDPA, static cache and `torch.compile` vs eager, batched vs single, and parity with the built-in classes.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers
from tiny import (
    NUM_QUERY_TOKENS,
    QFORMER,
    TEXT,
    VISION,
    config_dict,
    pixels,
    prompt_with_image_tokens,
    randomise_,
    stage1_config_dict,
)
from transformers import AutoModel, AutoModelForTextEncoding
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

import modeling_blip2
from modeling_blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2ForPretraining,
    Blip2ImageFeaturesOutput,
    Blip2Model,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

ATOL = 1e-5
GENERATIVE = (Blip2Model, Blip2ForConditionalGeneration)
STAGE1 = (Blip2ForImageTextRetrieval, Blip2ForPretraining)
EVERY_CLASS = (*GENERATIVE, *STAGE1, Blip2TextModelWithProjection, Blip2VisionModelWithProjection)


class ModelTester:
    """Tiny configs and inputs for one LLM family (and the stage-1 layout for the Q-Former-only classes)."""

    def __init__(self, family: str = "opt") -> None:
        self.family = family
        self.batch_size = 2
        self.num_vision_layers = VISION["num_hidden_layers"]
        self.num_qformer_layers = QFORMER["num_hidden_layers"]
        text = TEXT[family]
        self.num_text_layers = text.get("num_hidden_layers", text.get("num_layers"))
        self.pad_token_id = text["pad_token_id"]

    def config(self, model_class: type) -> Blip2Config:
        if model_class in (*STAGE1, Blip2TextModelWithProjection, Blip2VisionModelWithProjection):
            return Blip2Config(**stage1_config_dict())
        return Blip2Config(**config_dict(self.family))

    def model(self, model_class: type, config: Blip2Config | None = None) -> torch.nn.Module:
        return randomise_(model_class(config or self.config(model_class))).eval()

    def pixel_values(self) -> torch.Tensor:
        return pixels(self.batch_size)

    def prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts in the processor layout (`num_query_tokens` image tokens per row)."""
        return prompt_with_image_tokens([[5, 6, 7, 8], [9, 10]], self.pad_token_id)

    def text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded text without image tokens."""
        return torch.tensor([[5, 6, 7, 8], [9, 10, 1, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])

    def forward_inputs(self) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self.prompt()
        inputs = {"pixel_values": self.pixel_values(), "input_ids": input_ids, "attention_mask": attention_mask}
        if self.family == "t5":
            inputs["decoder_input_ids"] = torch.tensor([[0, 11, 12], [0, 13, 14]])
        return inputs


def _getter_classes() -> list[tuple[str, type]]:
    return [
        *((family, model_class) for family in ("opt", "t5") for model_class in GENERATIVE),
        *(("opt", model_class) for model_class in STAGE1),
    ]


def _with_outputs(config: Blip2Config, **flags: bool) -> Blip2Config:
    config = copy.deepcopy(config)
    for sub in (config, config.vision_config, config.qformer_config, config.text_config):
        for key, value in flags.items():
            setattr(sub, key, value)
    return config


# -- get_image_features / get_text_features / get_qformer_features ----------------------------------------------------
@pytest.mark.parametrize(("family", "model_class"), _getter_classes())
@pytest.mark.parametrize("return_dict", [True, False, None])
def test_get_image_features_output(family: str, model_class: type, return_dict: bool | None) -> None:
    tester = ModelTester(family)
    config = tester.config(model_class)
    if return_dict is not None:
        config.return_dict = return_dict
    model = tester.model(model_class, config)
    with torch.no_grad():
        outputs = model.get_image_features(tester.pixel_values())
    if return_dict is False:
        assert isinstance(outputs, tuple)
        return
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    assert outputs.last_hidden_state.shape == (2, 1 + patches, VISION["hidden_size"])
    if model_class is Blip2Model:
        # transformers' Blip2Model gives the vision output: the pooler is the class token.
        assert isinstance(outputs, BaseModelOutputWithPooling)
        assert outputs.pooler_output.shape == (2, VISION["hidden_size"])
        return
    assert isinstance(outputs, Blip2ImageFeaturesOutput)
    if model_class is Blip2ForConditionalGeneration:
        # The soft visual prompts, one (num_query_tokens, llm_hidden) block per image.
        assert outputs.pooler_output.shape == (2, NUM_QUERY_TOKENS, config.text_config.hidden_size)
    else:
        assert outputs.pooler_output.shape == (2, NUM_QUERY_TOKENS, config.image_text_hidden_size)
        torch.testing.assert_close(outputs.pooler_output.norm(dim=-1), torch.ones(2, NUM_QUERY_TOKENS))
    assert outputs.qformer_outputs.last_hidden_state.shape == (2, NUM_QUERY_TOKENS, QFORMER["hidden_size"])
    assert torch.equal(outputs.vision_outputs.last_hidden_state, outputs.last_hidden_state)
    # return_dict=False as an argument overrides the config, and the tuple holds the same tensors.
    with torch.no_grad():
        as_tuple = model.get_image_features(tester.pixel_values(), return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], outputs.last_hidden_state)
    assert torch.equal(as_tuple[1], outputs.pooler_output)


@pytest.mark.parametrize(("family", "model_class"), _getter_classes())
@pytest.mark.parametrize("through", ["argument", "config"])
def test_get_image_features_hidden_states_and_attentions(family: str, model_class: type, through: str) -> None:
    tester = ModelTester(family)
    config = tester.config(model_class)
    flags = {"output_hidden_states": True, "output_attentions": True}
    if through == "config":
        config = _with_outputs(config, **flags)
        flags = {}
    model = tester.model(model_class, config)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        outputs = model.get_image_features(tester.pixel_values(), **flags)
    assert len(outputs.hidden_states) == tester.num_vision_layers + 1
    assert len(outputs.attentions) == tester.num_vision_layers
    if model_class is Blip2Model:
        return  # the vision output alone
    assert len(outputs.qformer_outputs.hidden_states) == tester.num_qformer_layers + 1
    assert len(outputs.qformer_outputs.attentions) == tester.num_qformer_layers
    # Asking for hidden states changes nothing else.
    with torch.no_grad():
        plain = tester.model(model_class).get_image_features(tester.pixel_values())
    torch.testing.assert_close(plain.pooler_output, outputs.pooler_output)


@pytest.mark.parametrize(("family", "model_class"), _getter_classes())
def test_get_image_features_lets_gradients_flow(family: str, model_class: type) -> None:
    tester = ModelTester(family)
    model = tester.model(model_class)
    model.get_image_features(tester.pixel_values()).pooler_output.sum().backward()
    trained = model.vision_model.post_layernorm.weight if model_class is Blip2Model else model.query_tokens
    assert trained.grad is not None and trained.grad.abs().sum() > 0


@pytest.mark.parametrize(("family", "model_class"), _getter_classes())
def test_get_image_features_batched_equals_single(family: str, model_class: type) -> None:
    tester = ModelTester(family)
    model = tester.model(model_class)
    images = tester.pixel_values()
    with torch.no_grad():
        batched = model.get_image_features(images).pooler_output
        single = torch.cat([model.get_image_features(images[i : i + 1]).pooler_output for i in range(2)])
    torch.testing.assert_close(batched, single, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["opt", "t5"])
@pytest.mark.parametrize("return_dict", [True, False, None])
def test_get_text_features_output(family: str, return_dict: bool | None) -> None:
    tester = ModelTester(family)
    config = tester.config(Blip2Model)
    if return_dict is not None:
        config.return_dict = return_dict
    model = tester.model(Blip2Model, config)
    input_ids, attention_mask = tester.text()
    with torch.no_grad():
        outputs = model.get_text_features(input_ids, attention_mask)
    if return_dict is False:
        assert isinstance(outputs, tuple)
        return
    assert isinstance(outputs, BaseModelOutputWithPooling)
    assert outputs.last_hidden_state.shape == (2, 4, config.text_config.hidden_size)
    model.set_attn_implementation("eager")  # attention weights exist on the eager path only
    with torch.no_grad():
        counted = model.get_text_features(input_ids, attention_mask, output_hidden_states=True, output_attentions=True)
    assert len(counted.hidden_states) == tester.num_text_layers + 1
    assert len(counted.attentions) == tester.num_text_layers
    assert isinstance(model.get_text_features(input_ids, return_dict=False), tuple)


def test_stage1_getters_agree_with_forward_and_honour_outputs() -> None:
    tester = ModelTester()
    model = tester.model(Blip2ForImageTextRetrieval)
    input_ids, attention_mask = tester.text()
    images = tester.pixel_values()
    with torch.no_grad():
        text = model.get_text_embeddings(input_ids, attention_mask, output_hidden_states=True)
        image = model.get_image_features(images)
        scores = model(images, input_ids, attention_mask)
    assert isinstance(text, BaseModelOutputWithPooling) and text.pooler_output.shape == (2, 16)
    assert len(text.hidden_states) == tester.num_qformer_layers + 1
    expected = torch.matmul(image.pooler_output, text.pooler_output.t()).max(dim=1).values
    torch.testing.assert_close(scores.logits_per_image, expected)
    # As transformers' class, no get_text_features (its common tests read it as the LLM's text features);
    # the stage-1 model has it, as the same embeddings.
    assert not hasattr(Blip2ForImageTextRetrieval, "get_text_features")
    pretraining = tester.model(Blip2ForPretraining)
    with torch.no_grad():
        torch.testing.assert_close(
            pretraining.get_text_features(input_ids, attention_mask).pooler_output,
            pretraining.get_text_embeddings(input_ids, attention_mask).pooler_output,
        )


def test_get_qformer_features_is_the_builtin_tensor(tmp_path) -> None:
    tester = ModelTester()
    stock = randomise_(transformers.Blip2Model(transformers.Blip2Config(**config_dict("opt")))).eval()
    stock.save_pretrained(tmp_path)
    ours = Blip2Model.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = stock.get_qformer_features(tester.pixel_values())
        actual = ours.get_qformer_features(tester.pixel_values())
    assert isinstance(actual, torch.Tensor)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


# -- forward: outputs, tuples, attention implementations -------------------------------------------------------------
@pytest.mark.parametrize("model_class", [Blip2ForImageTextRetrieval, Blip2TextModelWithProjection])
def test_stage1_forward_honours_output_flags(model_class: type) -> None:
    tester = ModelTester()
    model = tester.model(model_class)
    model.set_attn_implementation("eager")
    input_ids, attention_mask = tester.text()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model_class is Blip2ForImageTextRetrieval:
        inputs["pixel_values"] = tester.pixel_values()
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
    text_outputs = outputs.text_model_output if model_class is Blip2ForImageTextRetrieval else outputs
    assert len(text_outputs.hidden_states) == tester.num_qformer_layers + 1
    assert len(text_outputs.attentions) == tester.num_qformer_layers
    if model_class is Blip2ForImageTextRetrieval:
        assert len(outputs.vision_model_output.attentions) == tester.num_vision_layers
        with torch.no_grad():
            matched = model(**inputs, use_image_text_matching_head=True, output_attentions=True)
        # One per layer that cross-attends (every cross_attention_frequency-th), as transformers' class reports.
        frequency = model.config.qformer_config.cross_attention_frequency
        expected = len(range(0, tester.num_qformer_layers, frequency))
        assert len(matched.text_model_output.cross_attentions) == expected


@pytest.mark.parametrize("model_class", EVERY_CLASS)
def test_eager_and_sdpa_agree(model_class: type) -> None:
    tester = ModelTester()
    model = tester.model(model_class)
    input_ids, attention_mask = tester.prompt() if model_class in GENERATIVE else tester.text()
    inputs = {"pixel_values": tester.pixel_values(), "input_ids": input_ids, "attention_mask": attention_mask}
    if model_class is Blip2TextModelWithProjection:
        del inputs["pixel_values"]
    if model_class is Blip2VisionModelWithProjection:
        inputs = {"pixel_values": tester.pixel_values()}
    results = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        torch.manual_seed(0)  # the same hard negatives for the stage-1 losses
        with torch.no_grad():
            results[implementation] = model(**inputs, return_dict=False)
    for eager, sdpa in zip(results["eager"], results["sdpa"], strict=True):
        if not isinstance(eager, torch.Tensor):
            continue
        if model_class in GENERATIVE and eager.dim() == 3:
            # Logits at left-padding positions attend to nothing: the kernels may fill them differently.
            eager, sdpa = eager[attention_mask.bool()], sdpa[attention_mask.bool()]
        torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_class", EVERY_CLASS)
def test_tuple_and_dict_outputs_hold_the_same_tensors(model_class: type) -> None:
    tester = ModelTester()
    model = tester.model(model_class)
    if model_class is Blip2VisionModelWithProjection:
        inputs = {"pixel_values": tester.pixel_values()}
    else:
        input_ids, attention_mask = tester.prompt() if model_class in GENERATIVE else tester.text()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if model_class is not Blip2TextModelWithProjection:
            inputs["pixel_values"] = tester.pixel_values()
    with torch.no_grad():
        torch.manual_seed(0)  # the same hard negatives for the stage-1 losses
        as_dict = model(**inputs)
        torch.manual_seed(0)
        as_tuple = model(**inputs, return_dict=False)
    model.config.return_dict = False
    with torch.no_grad():
        torch.manual_seed(0)
        from_config = model(**inputs)
    assert isinstance(as_dict, ModelOutput) and isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    first = next(value for value in as_dict.values() if isinstance(value, torch.Tensor))
    assert torch.equal(first, as_tuple[0]) and torch.equal(first, from_config[0])


# -- the embedding models: parity with the built-in classes both ways, Auto classes ----------------------------------
def _stage1_stock_config() -> transformers.Blip2Config:
    return transformers.Blip2Config(**stage1_config_dict())


@pytest.mark.parametrize("name", ["Blip2TextModelWithProjection", "Blip2VisionModelWithProjection"])
def test_embedding_models_match_the_builtin_both_ways(name: str, tmp_path) -> None:
    tester = ModelTester()
    stock = randomise_(getattr(transformers, name)(_stage1_stock_config())).eval()
    stock.save_pretrained(tmp_path / "stock")
    ours, info = getattr(modeling_blip2, name).from_pretrained(tmp_path / "stock", output_loading_info=True)
    assert not any(info.values()), info
    ours.eval()
    if name == "Blip2TextModelWithProjection":
        input_ids, attention_mask = tester.text()
        inputs, field = {"input_ids": input_ids, "attention_mask": attention_mask}, "text_embeds"
    else:
        inputs, field = {"pixel_values": tester.pixel_values()}, "image_embeds"
    with torch.no_grad():
        expected, actual = getattr(stock(**inputs), field), getattr(ours(**inputs), field)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    back = getattr(transformers, name).from_pretrained(tmp_path / "ours").eval()
    assert set(back.state_dict()) == set(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(getattr(back(**inputs), field), actual, atol=ATOL, rtol=0)


def test_embedding_models_load_from_the_retrieval_checkpoint_layout(tmp_path) -> None:
    """Each embedding model is a key subset of the `blip2-itm-vit-g` layout and computes what retrieval computes."""
    tester = ModelTester()
    retrieval = tester.model(Blip2ForImageTextRetrieval)
    retrieval.save_pretrained(tmp_path)
    text_model = Blip2TextModelWithProjection.from_pretrained(tmp_path).eval()
    vision_model = Blip2VisionModelWithProjection.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = tester.text()
    with torch.no_grad():
        text = text_model(input_ids, attention_mask).text_embeds[:, 0]
        image = vision_model(tester.pixel_values()).image_embeds
        expected = retrieval(tester.pixel_values(), input_ids, attention_mask)
    torch.testing.assert_close(text, expected.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(image, expected.image_embeds, atol=ATOL, rtol=0)


def test_text_embedding_model_round_trips_through_its_auto_class(tmp_path) -> None:
    tester = ModelTester()
    model = tester.model(Blip2TextModelWithProjection)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForTextEncoding.from_pretrained(tmp_path).eval()
    assert type(loaded) is Blip2TextModelWithProjection
    input_ids, attention_mask = tester.text()
    with torch.no_grad():
        expected = model(input_ids, attention_mask).text_embeds
        torch.testing.assert_close(loaded(input_ids, attention_mask).text_embeds, expected)
    assert type(AutoModel.from_config(tester.config(Blip2Model))) is Blip2Model


# -- generation: embeddings, static cache, compile -----------------------------------------------------------------
@pytest.mark.parametrize("family", ["opt", "llama", "t5"])
def test_generate_from_inputs_embeds_matches_ids_and_the_builtin(family: str, tmp_path) -> None:
    tester = ModelTester(family)
    stock = randomise_(transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config_dict(family))))
    stock.eval().save_pretrained(tmp_path)
    ours = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = tester.prompt()
    images = tester.pixel_values()
    embeds = ours.get_input_embeddings()(input_ids)
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    from_ids = ours.generate(pixel_values=images, input_ids=input_ids, attention_mask=attention_mask, **settings)
    from_embeds = ours.generate(pixel_values=images, inputs_embeds=embeds, attention_mask=attention_mask, **settings)
    both = ours.generate(
        pixel_values=images, input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **settings
    )
    stock_embeds = stock.generate(pixel_values=images, inputs_embeds=embeds, attention_mask=attention_mask, **settings)
    assert torch.equal(both, from_ids)
    assert torch.equal(from_embeds, stock_embeds)
    new_tokens = from_ids if family == "t5" else from_ids[:, input_ids.shape[1] :]
    assert torch.equal(from_embeds, new_tokens)


def test_forward_from_inputs_embeds_without_image_tokens_prepends_the_queries() -> None:
    tester = ModelTester()
    model = tester.model(Blip2ForConditionalGeneration)
    text_ids, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        from_ids = model(tester.pixel_values(), text_ids, mask).logits
        from_embeds = model(
            tester.pixel_values(), inputs_embeds=model.get_input_embeddings()(text_ids), attention_mask=mask
        ).logits
    assert from_ids.shape[1] == 3 + NUM_QUERY_TOKENS
    torch.testing.assert_close(from_embeds, from_ids)


def test_inputs_embeds_of_the_wrong_width_are_refused() -> None:
    tester = ModelTester()
    model = tester.model(Blip2ForConditionalGeneration)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(tester.pixel_values(), inputs_embeds=torch.zeros(2, 3, 7))


@pytest.mark.parametrize("family", ["opt", "llama", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_cache_generation_equals_dynamic(family: str, num_beams: int) -> None:
    tester = ModelTester(family)
    model = tester.model(Blip2ForConditionalGeneration)
    input_ids, attention_mask = tester.prompt()
    inputs = {"pixel_values": tester.pixel_values(), "input_ids": input_ids, "attention_mask": attention_mask}
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "num_beams": num_beams}
    dynamic = model.generate(**inputs, **settings)
    static = model.generate(**inputs, cache_implementation="static", **settings)
    assert torch.equal(dynamic, static)


def _compile_equals_eager(family: str) -> None:
    tester = ModelTester(family)
    config = Blip2Config(
        **config_dict(
            family,
            vision_config={**VISION, "num_hidden_layers": 1},
            qformer_config={**QFORMER, "num_hidden_layers": 1},
        )
    )
    model = tester.model(Blip2ForConditionalGeneration, config)
    assert model._can_compile_fullgraph
    inputs = tester.forward_inputs()
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True)(**inputs).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_compiled_forward_equals_eager() -> None:
    _compile_equals_eager("llama")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["opt", "t5"])
def test_compiled_forward_equals_eager_other_families(family: str) -> None:
    _compile_equals_eager(family)


# -- precision policy ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", EVERY_CLASS)
def test_fp32_lists_are_disjoint_and_name_real_modules(model_class: type) -> None:
    model = ModelTester().model(model_class)
    assert not model._keep_in_fp32_modules & model._keep_in_fp32_modules_strict
    assert model._keep_in_fp32_modules_strict
    names = [name for name, _ in model.named_parameters()]
    for pattern in model._keep_in_fp32_modules_strict:
        assert any(re.search(rf"(?:^|\.){pattern}(?:\.|$)", name) for name in names), pattern


@pytest.mark.parametrize("model_class", [*STAGE1, Blip2ForConditionalGeneration, Blip2VisionModelWithProjection])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading_keeps_the_trained_parts_in_fp32(model_class: type, dtype, tmp_path) -> None:
    tester = ModelTester()
    tester.model(model_class).save_pretrained(tmp_path)
    model = model_class.from_pretrained(tmp_path, dtype=dtype)
    assert model.query_tokens.dtype == torch.float32
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
    assert model.vision_model.post_layernorm.weight.dtype == torch.float32
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == dtype
    if model_class in STAGE1:
        assert model.embeddings.word_embeddings.weight.dtype == torch.float32
        assert model.vision_model.embeddings.patch_embedding.weight.dtype == dtype
    # transformers' own rule: exactly the names its fp32 lists match are fp32, everything else is in `dtype`.
    fp32_names = set(model._keep_in_fp32_modules_strict)
    if dtype is torch.float16:
        fp32_names |= model._keep_in_fp32_modules
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            matched = any(re.search(rf"(?:^|\.){pattern}(?:\.|$)", name) for pattern in fp32_names)
            assert tensor.dtype == (torch.float32 if matched else dtype), name
    if dtype is torch.bfloat16 and model_class is Blip2ForImageTextRetrieval:
        input_ids, attention_mask = tester.text()
        with torch.no_grad():
            scores = model(tester.pixel_values().to(dtype), input_ids, attention_mask).logits_per_image
        assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


# -- one prompt pass for all beams -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize(
    "settings",
    [
        {"num_beams": 4},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "num_return_sequences": 3},
    ],
)
def test_shared_prompt_cache_gives_the_same_ids_with_one_prompt_pass(family: str, settings: dict) -> None:
    tester = ModelTester(family)
    model = tester.model(Blip2ForConditionalGeneration)
    # No explicit use_cache, as in most saved generation configs.
    model.generation_config = transformers.GenerationConfig(**model.generation_config.to_diff_dict())
    model.generation_config.use_cache = None
    input_ids, attention_mask = tester.prompt()
    inputs = {"pixel_values": tester.pixel_values(), "input_ids": input_ids, "attention_mask": attention_mask}
    rows_per_prompt_pass = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            rows_per_prompt_pass.append(embeds.shape[0])

    handle = model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    runs = {}
    for share in (False, True):
        rows_per_prompt_pass.clear()
        torch.manual_seed(0)
        runs[share] = model.generate(**inputs, max_new_tokens=5, share_prompt_cache=share, **settings)
        copies = settings.get("num_beams", 1) if settings.get("num_beams", 1) > 1 else settings["num_return_sequences"]
        assert rows_per_prompt_pass == ([2] if share else [2 * copies]), rows_per_prompt_pass
    handle.remove()
    assert torch.equal(runs[False], runs[True])
