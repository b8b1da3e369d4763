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
    with pytest.raises(ValueError, match=r"encoder_hidden_size \(48\) must equal .*vision_config.hidden_size \(32\)"):
        Blip2Config(**config)


def test_config_of_another_sub_model_type_is_an_error() -> None:
    config = config_dict()
    config["vision_config"]["model_type"] = "clip_vision_model"
    with pytest.raises(ValueError, match="expected a Blip2VisionConfig dict"):
        Blip2Config(**config)
