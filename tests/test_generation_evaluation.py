"""Blip2Trainer on conditional-generation models: evaluation that generates, decoded metrics, and the end token."""

from __future__ import annotations

import pytest
from PIL import Image
from tiny import config_dict, randomise_, tiny_checkpoint_parts, tiny_t5_like_tokenizer

from modeling_blip2 import (
    Blip2CaptionCollator,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ImageTextProcessor,
    Blip2Trainer,
    Blip2TrainingArguments,
    Blip2VqaCollator,
    CaptionMetrics,
    VqaMetrics,
    blip2_image_processor,
)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _captions() -> list[dict]:
    return [{"image": Image.new("RGB", (30, 30), rgb), "text": f"a {name} ball"} for name, rgb in COLORS.items()]


def _args(tmp_path, **overrides) -> Blip2TrainingArguments:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 3,
        "per_device_eval_batch_size": 2,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 0,
    }
    settings.update(overrides)
    return Blip2TrainingArguments(**settings)


class _Recorder:
    """A compute_metrics that keeps what it was given."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, prediction) -> dict[str, float]:
        self.calls.append(prediction)
        return {"calls": float(len(self.calls))}


def test_evaluate_and_predict_generate_and_metrics_receive_text(tmp_path) -> None:
    model, processor = tiny_checkpoint_parts()
    collator = Blip2CaptionCollator(processor, is_encoder_decoder=False, prompt="a photo of")
    recorder = _Recorder()
    args = _args(tmp_path, predict_with_generate=True, generation_max_new_tokens=4, generation_num_beams=2)
    trainer = Blip2Trainer(
        model=model, args=args, eval_dataset=_captions(), data_collator=collator, compute_metrics=recorder
    )
    metrics = trainer.evaluate()
    assert metrics["eval_calls"] == 1.0 and "eval_loss" in metrics
    (received,) = recorder.calls
    assert received.label_ids == ["a red ball", "a green ball", "a blue ball"]
    # The predictions are what generate gives from each prompt, decoded and cut at the model's end token.
    prompt = processor(images=[example["image"] for example in _captions()], text=["a photo of"] * 3)
    expected = model.generate(**prompt, max_new_tokens=4, num_beams=2)[:, prompt.input_ids.shape[1] :]
    end = model.generation_config.eos_token_id
    texts = []
    for row in expected.tolist():
        row = row[: row.index(end)] if end in row else row
        texts.append(processor.tokenizer.decode(row, skip_special_tokens=True).strip())
    assert received.predictions == texts

    # Scoring ready-made: BLEU-4 and CIDEr against the given references, in evaluation-set order.
    references = [[example["text"], "a ball"] for example in _captions()]
    scored = Blip2Trainer(
        model=model, args=args, eval_dataset=_captions(), data_collator=collator,
        compute_metrics=CaptionMetrics(references),
    ).evaluate(max_new_tokens=3)  # fmt: skip
    assert {"eval_bleu4", "eval_cider", "eval_loss"} <= set(scored)

    output = trainer.predict(_captions())
    assert output.predictions.shape[0] == 3 and output.predictions.shape[1] <= 4  # new tokens only
    assert output.metrics["test_calls"] == 2.0


def test_evaluate_without_generation_ignores_the_llm_cache(tmp_path) -> None:
    """compute_metrics on logits used to fail on the LLM's cache object inside the model's outputs."""
    model, processor = tiny_checkpoint_parts()
    collator = Blip2CaptionCollator(processor, is_encoder_decoder=False)
    recorder = _Recorder()
    trainer = Blip2Trainer(
        model=model, args=_args(tmp_path), eval_dataset=_captions(), data_collator=collator, compute_metrics=recorder
    )
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and recorder.calls[0].predictions.ndim == 3  # (examples, length, vocab) logits
    assert trainer.predict(_captions()).predictions.shape[0] == 3


def test_t5_and_vqa_evaluation_generate(tmp_path) -> None:
    tokenizer = tiny_t5_like_tokenizer()
    config = config_dict("t5", image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    config["text_config"]["vocab_size"] = len(tokenizer)
    model = randomise_(Blip2ForConditionalGeneration(Blip2Config(**config)), std=0.1).eval()
    processor = Blip2ImageTextProcessor(blip2_image_processor(28), tokenizer, num_query_tokens=4)
    rows = [
        {"image": example["image"], "question": "what colour is it?", "answers": [name] * 3 + ["red"]}
        for example, name in zip(_captions(), COLORS, strict=True)
    ]
    collator = Blip2VqaCollator(processor, is_encoder_decoder=True)
    args = _args(tmp_path, predict_with_generate=True, generation_max_new_tokens=3)
    answers = [row["answers"] for row in rows]
    trainer = Blip2Trainer(
        model=model, args=args, eval_dataset=rows, data_collator=collator, compute_metrics=VqaMetrics(answers)
    )
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_vqa_accuracy"] <= 100.0
    exact = Blip2Trainer(
        model=model, args=args, eval_dataset=rows, data_collator=collator, compute_metrics=VqaMetrics()
    ).evaluate()
    assert 0.0 <= exact["eval_vqa_exact_match"] <= 100.0


def test_generation_arguments_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="generation_max_new_tokens must be a positive integer"):
        _args(tmp_path, generation_max_new_tokens=0)
    model, processor = tiny_checkpoint_parts()
    with pytest.raises(ValueError, match="has a tokenizer: pass processing_class"):
        Blip2Trainer(
            model=model,
            args=_args(tmp_path, predict_with_generate=True),
            eval_dataset=_captions(),
            data_collator=lambda rows: rows,
            compute_metrics=CaptionMetrics(),
        )


# -- the end token ------------------------------------------------------------------------------------------------


def test_the_collator_takes_the_end_token_from_the_model(tmp_path) -> None:
    model, processor = tiny_checkpoint_parts()
    model_end, tokenizer_end = model.generation_config.eos_token_id, processor.tokenizer.eos_token_id
    assert model_end != tokenizer_end  # the official OPT checkpoints too: "\n" versus </s>
    collator = Blip2CaptionCollator(processor, is_encoder_decoder=False)
    with pytest.raises(ValueError, match="no end token yet"):
        collator(_captions())
    Blip2Trainer(model=model, args=_args(tmp_path), train_dataset=_captions(), data_collator=collator)
    labels = collator(_captions())["labels"]
    assert all(row[row != -100][-1] == model_end for row in labels)

    wrong = Blip2CaptionCollator(processor, is_encoder_decoder=False, eos_token_id=tokenizer_end)
    with pytest.raises(ValueError, match=f"token {tokenizer_end}.*eos_token_id is {model_end}"):
        Blip2Trainer(model=model, args=_args(tmp_path), train_dataset=_captions(), data_collator=wrong)
    vqa = Blip2VqaCollator(processor, is_encoder_decoder=False, eos_token_id=tokenizer_end)
    with pytest.raises(ValueError, match=f"token {tokenizer_end}.*eos_token_id is {model_end}"):
        vqa.bind_model(model)
    family = Blip2CaptionCollator(processor, is_encoder_decoder=True)
    with pytest.raises(ValueError, match="is_encoder_decoder=True, but the model's LLM is decoder-only"):
        family.bind_model(model)


def test_processing_class_does_not_rewrite_the_models_end_token(tmp_path) -> None:
    model, processor = tiny_checkpoint_parts()
    before = (model.generation_config.eos_token_id, model.config.text_config.eos_token_id)
    collator = Blip2CaptionCollator(processor, is_encoder_decoder=False)
    trainer = Blip2Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_captions(),
        data_collator=collator,
        processing_class=processor,
    )
    trainer.train()
    assert (model.generation_config.eos_token_id, model.config.text_config.eos_token_id) == before
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "saved"))
    assert (reloaded.generation_config.eos_token_id, reloaded.config.text_config.eos_token_id) == before
