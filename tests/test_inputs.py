"""Prompt conventions, batching, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
from tiny import (
    IMAGE_TOKEN,
    NUM_QUERY_TOKENS,
    TEXT,
    config_dict,
    left_pad,
    pixels,
    prompt_with_image_tokens,
    randomise_,
)

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration


def _model(family: str = "opt", **overrides: object) -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    return randomise_(Blip2ForConditionalGeneration(Blip2Config(**config_dict(family, **overrides))), std=0.1).eval()


@pytest.fixture(scope="module")
def opt_model() -> Blip2ForConditionalGeneration:
    return _model("opt")


@pytest.mark.parametrize("family", ["opt", "llama", "t5"])
def test_prompt_without_image_tokens_equals_prompt_with_them(family: str) -> None:
    model = _model(family)
    pad = TEXT[family]["pad_token_id"]
    texts = [[5, 6, 7, 8], [9, 10]]
    with_tokens, with_mask = prompt_with_image_tokens(texts, pad)
    without_tokens, without_mask = left_pad(texts, pad)
    images = pixels()
    kwargs = {"decoder_input_ids": torch.tensor([[0, 11], [0, 12]])} if family == "t5" else {}
    with torch.no_grad():
        expected = model(images, with_tokens, with_mask, **kwargs).logits
        actual = model(images, without_tokens, without_mask, **kwargs).logits
    assert torch.allclose(expected, actual, atol=1e-5)
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    generated_with = model.generate(images, with_tokens, with_mask, **settings)
    generated_without = model.generate(images, without_tokens, without_mask, **settings)
    if family == "t5":
        assert torch.equal(generated_with, generated_without)
    else:  # the prompt comes back as given, followed by the same new tokens
        assert torch.equal(generated_without[:, : without_tokens.shape[1]], without_tokens)
        assert torch.equal(generated_with[:, with_tokens.shape[1] :], generated_without[:, without_tokens.shape[1] :])


def test_labels_without_image_tokens_ignore_the_query_positions(opt_model) -> None:
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10]], 1)
    labels = ids.clone()
    with_ids, with_mask = prompt_with_image_tokens([[5, 6, 7], [8, 9, 10]], 1)
    with torch.no_grad():
        prepended = opt_model(pixels(), ids, mask, labels=labels).loss
        # Image positions never count, even when the labels hold the image token there.
        stock_layout = opt_model(pixels(), with_ids, with_mask, labels=with_ids.clone()).loss
    assert torch.allclose(prepended, stock_layout, atol=1e-6)


@pytest.mark.parametrize("family", ["opt", "llama", "t5"])
def test_left_padded_batch_generates_what_single_prompts_do(family: str) -> None:
    model = _model(family)
    pad = TEXT[family]["pad_token_id"]
    texts = [[5, 6, 7, 8, 9], [10, 11]]
    images = pixels()
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    ids, mask = left_pad(texts, pad) if family != "t5" else _right_pad(texts, pad)
    batched = model.generate(images, ids, mask, **settings)
    for row, text in enumerate(texts):
        single = model.generate(images[row : row + 1], torch.tensor([text]), **settings)
        if family == "t5":
            assert torch.equal(batched[row, : single.shape[1]], single[0])
        else:
            assert torch.equal(batched[row, ids.shape[1] :], single[0, len(text) :])


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    return (
        torch.tensor([row + [pad] * (width - len(row)) for row in rows]),
        torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
    )


def test_generate_without_prompt_starts_from_bos(opt_model) -> None:
    generated = opt_model.generate(pixels(), max_new_tokens=4, min_new_tokens=4)
    assert generated.shape == (2, 5) and bool((generated[:, 0] == TEXT["opt"]["bos_token_id"]).all())


def test_sampling_and_generation_config_defaults(opt_model) -> None:
    torch.manual_seed(3)
    sampled = opt_model.generate(pixels(), do_sample=True, top_k=5, max_new_tokens=6, min_new_tokens=6)
    assert sampled.shape == (2, 7)
    opt_model.generation_config.max_new_tokens = 3
    try:
        assert opt_model.generate(pixels(), min_new_tokens=3).shape == (2, 4)
    finally:
        opt_model.generation_config.max_new_tokens = None


def test_pixel_values_errors(opt_model) -> None:
    ids, mask = prompt_with_image_tokens([[5], [6]], 1)
    with pytest.raises(ValueError, match="pixel_values are required"):
        opt_model(None, ids, mask)
    with pytest.raises(ValueError, match="must be a 4-d tensor"):
        opt_model(torch.randn(3, 28, 28), ids, mask)
    with pytest.raises(ValueError, match="must have 3 channels"):
        opt_model(torch.randn(2, 1, 28, 28), ids, mask)
    with pytest.raises(ValueError, match="must be 28x28 .* interpolate_pos_encoding=True"):
        opt_model(torch.randn(2, 3, 35, 35), ids, mask)
    with torch.no_grad():  # asked for, another size works
        assert opt_model(torch.randn(2, 3, 35, 35), ids, mask, interpolate_pos_encoding=True).logits.shape[0] == 2


def test_batch_size_mismatch_is_an_error(opt_model) -> None:
    ids, mask = prompt_with_image_tokens([[5], [6], [7]], 1)
    with pytest.raises(ValueError, match="got 2 images but 3 texts"):
        opt_model(pixels(), ids, mask)
    with pytest.raises(ValueError, match="got 2 images but 3 texts"):
        opt_model.generate(pixels(), ids, mask)


def test_image_token_count_mismatch_names_the_row(opt_model) -> None:
    ids = torch.tensor([[IMAGE_TOKEN] * NUM_QUERY_TOKENS + [5], [IMAGE_TOKEN] * 2 + [5, 6, 7]])
    with pytest.raises(ValueError, match=r"row 1 of input_ids has 2 image tokens .* Counts per row: \[4, 2\]"):
        opt_model(pixels(), ids)
    mixed = torch.tensor([[IMAGE_TOKEN] * NUM_QUERY_TOKENS + [5], [5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match=r"row 1 of input_ids has 0 image tokens"):
        opt_model(pixels(), mixed)


def test_prompt_longer_than_llm_positions_is_an_error(opt_model) -> None:
    long_prompt = torch.full((2, 61), 5)  # + 4 queries > 64 positions
    with pytest.raises(ValueError, match="65 positions .* max_position_embeddings \\(64\\)"):
        opt_model(pixels(), long_prompt)
    with pytest.raises(ValueError, match="prompt \\+ new tokens"):
        opt_model.generate(pixels(), torch.full((2, 50), 5), max_new_tokens=20)


def test_labels_shape_must_match_input_ids(opt_model) -> None:
    ids, mask = prompt_with_image_tokens([[5, 6], [7, 8]], 1)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        opt_model(pixels(), ids, mask, labels=ids[:, :-1])


def test_right_padded_batch_generation_is_refused(opt_model) -> None:
    ids = torch.tensor([[5, 6, 7], [8, 1, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="row 1 .* right-padded; batched generation needs left padding"):
        opt_model.generate(pixels(), ids, mask, max_new_tokens=2)


def test_qformer_width_that_disagrees_with_vision_is_an_error() -> None:
    config = config_dict()
    config["qformer_config"]["encoder_hidden_size"] = 48
    with pytest.raises(
        ValueError, match=r"encoder_hidden_size \(48\) must equal the width of the image features \(32"
    ):
        Blip2Config(**config)


def test_config_of_another_sub_model_type_is_an_error() -> None:
    config = config_dict()
    config["qformer_config"]["model_type"] = "bert"
    with pytest.raises(ValueError, match="expected a Blip2QFormerConfig dict"):
        Blip2Config(**config)
    config = config_dict()
    config["vision_config"]["model_type"] = "bert"  # a transformers model, but not one that reads images
    with pytest.raises(ValueError, match="BertModel, which does not read images"):
        Blip2Config(**config)
    config["vision_config"]["model_type"] = "no_such_model"
    with pytest.raises(ValueError, match="model_type 'no_such_model', which this transformers version does not know"):
        Blip2Config(**config)


# -- issue 11 bad inputs: every entry point into the image encoder goes through one pixel check -------------------
def _stage1_models() -> dict[str, torch.nn.Module]:
    from tiny import stage1_config_dict

    from modeling_blip2 import Blip2ForImageTextRetrieval, Blip2ForPretraining, Blip2VisionModelWithProjection

    config = Blip2Config(**stage1_config_dict())
    return {
        "pretraining": Blip2ForPretraining(config).eval(),
        "retrieval": Blip2ForImageTextRetrieval(config).eval(),
        "vision_with_projection": Blip2VisionModelWithProjection(config).eval(),
    }


def _entry_points(opt_model) -> dict:
    """Every public path from pixels into the model, as `name -> call(pixel_values)`."""
    from modeling_blip2.retrieval import encode_images

    stage1 = _stage1_models()
    ids, mask = prompt_with_image_tokens([[5, 6], [7, 8]], 1)
    text = torch.tensor([[2, 5, 6], [2, 7, 8]])
    return {
        "forward": lambda px: opt_model(px, ids, mask, labels=ids),
        "generate": lambda px: opt_model.generate(px, max_new_tokens=2),
        "encode_images": lambda px: opt_model.encode_images(px),
        "get_image_features": lambda px: opt_model.get_image_features(px),
        "vision_model": lambda px: opt_model.vision_model(px),
        "forward_features": lambda px: opt_model.vision_model.forward_features(px),
        "stage1_forward": lambda px: stage1["pretraining"](text, pixel_values=px, losses=("itc",)),
        "stage1_generate": lambda px: stage1["pretraining"].generate(px, max_new_tokens=2),
        "retrieval_forward": lambda px: stage1["retrieval"](px, text),
        "retrieval_encode_images": lambda px: encode_images(stage1["retrieval"], px, progress=False),
        "vision_with_projection": lambda px: stage1["vision_with_projection"](px),
    }


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixel_values_are_refused_on_every_path(opt_model, bad_value: float) -> None:
    images = pixels()
    images[1, 2, 3, 4] = bad_value
    for name, call in _entry_points(opt_model).items():
        with pytest.raises(
            ValueError, match=r"pixel_values must hold finite values, got 1 NaN or inf .* row\(s\) \[1\]"
        ):
            call(images)
        assert call(pixels()) is not None, name  # finite pixels still pass


def test_integer_pixel_values_are_refused_with_a_pointer_to_the_processor(opt_model) -> None:
    as_bytes = (pixels().abs() * 60).clamp(0, 255).to(torch.uint8)
    for call in _entry_points(opt_model).values():
        with pytest.raises(
            ValueError, match=r"pixel_values must be a floating-point .* got dtype torch.uint8: .*processor"
        ):
            call(as_bytes)
        with pytest.raises(ValueError, match="got dtype torch.int64"):
            call(as_bytes.long())
    with torch.no_grad():  # half and bfloat16 pixels are floats: fine
        assert opt_model.vision_model(pixels().to(torch.bfloat16)).last_hidden_state.shape[0] == 2


def test_non_finite_frozen_image_features_are_refused(opt_model) -> None:
    features = opt_model.vision_model.forward_features(pixels()).detach()
    features[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="frozen_image_features must hold finite values"):
        opt_model(frozen_image_features=features, input_ids=torch.tensor([[5], [6]]))
    stage1 = _stage1_models()["pretraining"]
    with pytest.raises(ValueError, match="frozen_image_features must hold finite values"):
        stage1(torch.tensor([[2, 5], [2, 6]]), frozen_image_features=features, losses=("itc",))
    with pytest.raises(ValueError, match=r"frozen_image_features must be \(batch, tokens, vision hidden size 32\)"):
        stage1(torch.tensor([[2, 5], [2, 6]]), frozen_image_features=features[..., :8], losses=("itc",))


def test_the_pixel_check_stays_out_of_compiled_graphs() -> None:
    vision = _model("opt").vision_model
    compiled = torch.compile(vision, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(pixels()).last_hidden_state, vision(pixels()).last_hidden_state)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_labels_that_ignore_every_position_are_refused(family: str) -> None:
    model = _model(family)
    ids, mask = prompt_with_image_tokens([[5, 6, 7], [8, 9, 10]], TEXT[family]["pad_token_id"])
    kwargs = {"decoder_input_ids": torch.tensor([[0, 11], [0, 12]])} if family == "t5" else {}
    labels = torch.full((2, 2), -100) if family == "t5" else torch.full_like(ids, -100)
    with pytest.raises(ValueError, match=r"labels of shape .* hold no target: every position is -100"):
        model(pixels(), ids, mask, labels=labels, **kwargs)
    # One row without targets is fine when another row has some (only an all-ignored batch gives NaN).
    labels[0, -1] = 12
    with torch.no_grad():
        assert torch.isfinite(model(pixels(), ids, mask, labels=labels, **kwargs).loss)


def test_labels_with_a_target_only_at_the_first_position_are_refused(opt_model) -> None:
    # The first label is never predicted (labels shift by one), so this batch has no target either.
    ids = torch.tensor([[5] + [IMAGE_TOKEN] * NUM_QUERY_TOKENS + [6, 7]] * 2)
    labels = torch.full_like(ids, -100)
    labels[:, 0] = 5
    with pytest.raises(ValueError, match="hold no target"):
        opt_model(pixels(), ids, labels=labels)
    # Without image tokens the queries go first, and the first text label is then predicted from them: a target.
    with torch.no_grad():
        text_only = torch.tensor([[6, 7], [6, 7]])
        assert torch.isfinite(opt_model(pixels(), text_only, labels=torch.tensor([[6, -100], [6, -100]])).loss)
    # Under gradient accumulation a micro-batch without targets adds 0 to a sum over the whole batch's targets.
    with torch.no_grad():
        loss = opt_model(pixels(), ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    assert float(loss) == 0.0


def test_image_token_index_outside_the_llm_vocabulary_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"image_token_index \(500\) is outside the LLM vocabulary of 120 tokens"):
        Blip2Config(**config_dict(image_token_index=500))
    with pytest.raises(ValueError, match=r"image_token_index \(-1\) is outside"):
        Blip2Config(**config_dict(image_token_index=-1))
    config = Blip2Config(**config_dict())
    config.image_token_index = 120  # edited after the config checked it: the model refuses it
    with pytest.raises(ValueError, match=r"image_token_index \(120\) is outside the LLM vocabulary of 120 tokens"):
        Blip2ForConditionalGeneration(config)


def test_input_ids_outside_the_llm_vocabulary_are_named(opt_model) -> None:
    with pytest.raises(ValueError, match=r"input_ids must be ids of the LLM vocabulary \(0..119\), got 120 in row 1"):
        opt_model(pixels(), torch.tensor([[5, 6], [7, 120]]))
    with pytest.raises(ValueError, match="got -100 in row 0: -100 marks ignored positions in labels"):
        opt_model.generate(pixels(), torch.tensor([[-100, 6], [7, 8]]), max_new_tokens=2)
