"""Stage 2 and caption fine-tuning: batches for decoder-only (LM) and encoder-decoder (prefix-LM) LLMs, training."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny import config_dict, pixels, randomise_, tiny_checkpoint_parts, tiny_t5_like_tokenizer

from modeling_blip2 import (
    Blip2CaptionCollator,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ImageTextProcessor,
    Blip2Trainer,
    Blip2TrainingArguments,
    blip2_image_processor,
)

QUERIES = 4


def _examples() -> list[dict]:
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    return [
        {"image": Image.new("RGB", (30, 30), rgb), "text": f"a {name} square on the left"}
        for name, rgb in colors.items()
    ]


@pytest.fixture(scope="module")
def opt_parts():
    return tiny_checkpoint_parts()


def test_decoder_only_batches_mask_queries_prompt_and_padding(opt_parts) -> None:
    model, processor = opt_parts
    eos = model.config.text_config.eos_token_id
    collator = Blip2CaptionCollator(processor, is_encoder_decoder=False, eos_token_id=eos, prompt="a photo of")
    examples = _examples()
    examples[1]["text"] = "a cat"
    batch = collator(examples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (ids[:, :QUERIES] == processor.image_token_id).all() and (labels[:, :QUERIES] == -100).all()
    prompt_length = len(processor.tokenizer("a photo of").input_ids)
    assert (labels[:, QUERIES : QUERIES + prompt_length] == -100).all()
    assert (labels[mask == 0] == -100).all() and mask[1, -1] == 0  # right padding, never a target
    for row in range(3):
        targets = labels[row][labels[row] != -100]
        assert int(targets[-1]) == eos  # the caption ends with the LLM's end token, appended by id
        caption = processor.tokenizer(" " + examples[row]["text"], add_special_tokens=False).input_ids
        assert targets[:-1].tolist() == caption
    short = Blip2CaptionCollator(processor, False, eos_token_id=eos, max_length=QUERIES + 4)(examples)
    assert short["input_ids"].shape[1] == QUERIES + 4 and (short["labels"][:, -1] == eos).all()  # truncated, end kept
    with pytest.raises(ValueError, match="example 0 has an empty or missing caption"):
        collator([{"image": Image.new("RGB", (5, 5)), "text": ""}])


def test_encoder_decoder_prefix_lm_splits_captions() -> None:
    tokenizer = tiny_t5_like_tokenizer()
    processor = Blip2ImageTextProcessor(blip2_image_processor(28), tokenizer, num_query_tokens=QUERIES)
    examples = _examples()
    plain = Blip2CaptionCollator(processor, is_encoder_decoder=True, prompt="a photo of")(examples)
    assert tokenizer.decode(plain["labels"][0][plain["labels"][0] != -100]) == "a red square on the left </s>"
    splits = set()
    collator = Blip2CaptionCollator(processor, is_encoder_decoder=True, prefix_lm=True, seed=3)
    for _ in range(10):
        batch = collator(examples[:1])
        encoder = tokenizer.decode(batch["input_ids"][0][QUERIES:], skip_special_tokens=True).split()
        target = tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100], skip_special_tokens=True).split()
        assert encoder + target == ["a", "red", "square", "on", "the", "left"] and target  # prefix + suffix = caption
        splits.add(len(encoder))
    assert len(splits) > 2  # the split point is random


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_stage2_training_moves_only_the_bridge(family: str, tmp_path) -> None:
    if family == "opt":
        model, processor = tiny_checkpoint_parts()
    else:
        tokenizer = tiny_t5_like_tokenizer()
        config = config_dict("t5", image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
        config["text_config"]["vocab_size"] = len(tokenizer)
        model = randomise_(Blip2ForConditionalGeneration(Blip2Config(**config)), std=0.1)
        processor = Blip2ImageTextProcessor(blip2_image_processor(28), tokenizer, num_query_tokens=QUERIES)
    model.freeze_language_model()
    collator = Blip2CaptionCollator(
        processor, model.config.is_encoder_decoder, model.config.text_config.eos_token_id, prefix_lm=family == "t5"
    )
    args = Blip2TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=6, learning_rate=3e-3, warmup_steps=0,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
    )  # fmt: skip
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = Blip2Trainer(model=model, args=args, train_dataset=_examples() * 2, data_collator=collator)
    trainer.train()
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert any(name.startswith("qformer.") for name in changed) and "language_projection.weight" in changed
    assert not any(name.startswith(("language_model.", "vision_model.encoder")) for name in changed)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]


def test_bf16_frozen_parts_train_on_cpu() -> None:
    model, processor = tiny_checkpoint_parts()
    model.apply_precision_policy(torch.bfloat16)
    model.freeze_vision_encoder()
    model.freeze_language_model()
    batch = Blip2CaptionCollator(processor, False, model.config.text_config.eos_token_id)(_examples())
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.qformer.encoder.layer[0].attention.attention.query.weight.grad is not None
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_finetuning_image_size_change_interpolates_positions() -> None:
    model, _ = tiny_checkpoint_parts()
    images = pixels(size=42)
    with torch.no_grad():
        expected = model.encode_images(images, interpolate_pos_encoding=True).language_model_inputs
        model.vision_model.resize_position_embeddings(42)
        actual = model.encode_images(images).language_model_inputs
    assert torch.allclose(expected, actual, atol=1e-6) and model.config.vision_config.image_size == 42
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.vision_model.resize_position_embeddings(40)


def test_stage2_pad_token_equal_to_eos_is_still_learned() -> None:
    """Labels come from positions, not from the pad id: with pad == eos (SmolLM2) the end token stays a target."""
    model, processor = tiny_checkpoint_parts()
    processor.tokenizer.pad_token = processor.tokenizer.convert_ids_to_tokens(model.config.text_config.eos_token_id)
    collator = Blip2CaptionCollator(processor, False, model.config.text_config.eos_token_id)
    examples = _examples()
    examples[0]["text"] = "a red square on the left of the blue square"
    batch = collator(examples)
    assert (batch["labels"] == model.config.text_config.eos_token_id).sum() == 3
    assert batch["attention_mask"][1, -1] == 0  # padded rows end in masked, unlearned pads


def test_stage2_with_cached_frozen_features_matches_the_pixel_path() -> None:
    from modeling_blip2 import FrozenFeatureDataset

    model, processor = tiny_checkpoint_parts()
    collator = Blip2CaptionCollator(processor, False, model.config.text_config.eos_token_id, prompt="a photo of")
    examples = _examples()
    model.freeze_vision_encoder()
    cached = FrozenFeatureDataset(examples, model.vision_model, processor.image_processor, progress=False)
    plain, from_cache = collator(examples), collator([cached[i] for i in range(len(cached))])
    assert "pixel_values" not in from_cache and torch.equal(plain["labels"], from_cache["labels"])
    with torch.no_grad():
        assert torch.allclose(model(**plain).loss, model(**from_cache).loss, atol=1e-6)
    prompt = processor(images=[example["image"] for example in examples], text=["a photo of"] * 3)
    expected = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4)
    features = from_cache["frozen_image_features"]
    actual = model.generate(
        input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, frozen_image_features=features,
        max_new_tokens=4, min_new_tokens=4,
    )  # fmt: skip
    assert torch.equal(expected, actual)
    with pytest.raises(ValueError, match="one of pixel_values, image_embeds and frozen_image_features"):
        model(pixel_values=prompt.pixel_values, frozen_image_features=features, input_ids=prompt.input_ids)
