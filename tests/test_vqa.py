"""VQA: question-conditioned Q-Former, answer normalisation and accuracy, batched prediction, fine-tuning example."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_RANDOM, config_dict, pixels, randomise_, tiny_checkpoint_parts, tiny_qformer_tokenizer
from transformers import AutoTokenizer

from modeling_blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ImageTextProcessor,
    Blip2Model,
    blip2_image_processor,
)
from modeling_blip2.vqa import (
    Blip2VqaCollator,
    most_common_answer,
    normalize_vqa_answer,
    predict_answers,
    vqa_accuracy,
    vqa_accuracy_batch,
    vqa_prompt_template,
)

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what is this?", "what color is the square on the left?", "is it a cat?", "what?"]
IMAGE_INDEX = [0, 1, 1, 2]  # the second image has two questions
GREEDY = {"num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 3}


# -- models and data ----------------------------------------------------------------------------------------------
def _images(count: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)) for _ in range(count)]


def _processor(with_qformer_tokenizer: bool = True) -> Blip2ImageTextProcessor:
    tokenizer = AutoTokenizer.from_pretrained(TINY_RANDOM)
    return Blip2ImageTextProcessor(
        blip2_image_processor(28),
        tokenizer,
        num_query_tokens=4,
        qformer_tokenizer=tiny_qformer_tokenizer() if with_qformer_tokenizer else None,
    )


def _model(family: str, text_input: bool = True, seed: int = 0) -> Blip2ForConditionalGeneration:
    """A tiny model whose LLM vocabulary is the tiny-random tokenizer's (91 ids, `<image>` = 89, `</s>` = 1)."""
    if family == "opt":
        config = Blip2Config.from_pretrained(TINY_RANDOM)
        config.qformer_config.use_qformer_text_input = text_input
    else:
        raw = config_dict("t5", image_token_index=89)
        raw["text_config"].update({"vocab_size": 91})
        raw["qformer_config"]["use_qformer_text_input"] = text_input
        config = Blip2Config(**raw)
    return randomise_(Blip2ForConditionalGeneration(config), seed=seed).eval()


@pytest.fixture(scope="module")
def opt_model() -> Blip2ForConditionalGeneration:
    return _model("opt")


@pytest.fixture(scope="module")
def t5_model() -> Blip2ForConditionalGeneration:
    return _model("t5")


def _question_ids(questions: list[str]) -> dict[str, torch.Tensor]:
    encoded = _processor()(qformer_text=questions)
    return {
        "qformer_input_ids": encoded["qformer_input_ids"],
        "qformer_attention_mask": encoded["qformer_attention_mask"],
    }


# -- answer normalisation and accuracy ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("a cat", "cat"),
        ("Yes!", "yes"),
        ("dont", "don't"),
        ("don't", "don't"),  # apostrophes are kept
        ("couldntve", "couldn't've"),
        ("The Man's hat", "man's hat"),  # a possessive stays a possessive
        ("2:50 pm", "2:50 pm"),  # colons are kept (times)
        ("100,978", "100978"),  # no space for a comma between digits
        ("2.5 meters", "2.5 meters"),  # decimal point kept
        ("x-ray", "x ray"),  # punctuation inside a word becomes a space
        ("hello, world", "hello world"),  # punctuation next to a space is deleted
        ("none", "0"),
        ("  Ten\tApples\n", "10 apples"),
        ("an Apple", "apple"),
        ("well", "well"),  # a word of its own, not "we'll"
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_follows_the_ten_choose_nine_average() -> None:
    def humans(votes: int) -> list[str]:
        return ["yes"] * votes + ["no"] * (10 - votes)

    # k humans gave the answer: the k subsets without one of them hold k-1 matches, the others k.
    # mean = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    for votes, value in expected.items():
        assert vqa_accuracy("yes", humans(votes)) == pytest.approx(value, abs=1e-12), votes
    # Both sides are normalised: "Two." matches "2" and "two".
    assert vqa_accuracy("Two.", ["2", "two", "2", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["yes"]) == pytest.approx(1 / 3)  # a single answer: nothing to leave out
    assert vqa_accuracy_batch(["yes", "no"], [humans(4), humans(10)]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="must be a list of strings"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="2 predictions but 1 ground-truth"):
        vqa_accuracy_batch(["a", "b"], [["a"]])


# -- question-conditioned Q-Former ----------------------------------------------------------------------------------
def test_qformer_text_input_layout_and_errors() -> None:
    plain, conditioned = _model("opt", text_input=False), _model("opt")
    assert not any(key.startswith("embeddings.") for key in plain.state_dict())  # official layout unchanged
    assert {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"} <= set(
        conditioned.state_dict()
    )
    questions = _question_ids(QUESTIONS[:2])
    with pytest.raises(ValueError, match="Q-Former reads no text"):
        plain(pixels(), **questions)
    with pytest.raises(ValueError, match="qformer_input_ids have batch size 2 but there are 3 images"):
        conditioned(pixels(3), **questions)
    with pytest.raises(ValueError, match="qformer_attention_mask must have the shape"):
        conditioned(
            pixels(),
            qformer_input_ids=questions["qformer_input_ids"],
            qformer_attention_mask=questions["qformer_attention_mask"][:, :-1],
        )
    with pytest.raises(ValueError, match="without qformer_input_ids"):
        conditioned(pixels(), qformer_attention_mask=questions["qformer_attention_mask"])
    encoding = conditioned.encode_images(pixels())
    with pytest.raises(ValueError, match="pass the Q-Former question to encode_images"):
        conditioned.generate(image_encoding=encoding, **questions)
    with pytest.raises(ValueError, match="not both"):
        conditioned.generate(pixels(), image_encoding=encoding)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_query_outputs_depend_on_the_question_and_match_a_manual_qformer_pass(family: str) -> None:
    model = _model(family)
    images = pixels(2)
    first = _question_ids(["what is this?", "what is this?"])
    second = _question_ids(["is it a red square on the left?", "what color is the dog?"])
    extra = {"decoder_input_ids": torch.tensor([[0, 5], [0, 6]])} if family == "t5" else {}
    with torch.no_grad():
        unconditioned = model(images, **extra).logits
        logits_first = model(images, **first, **extra).logits
        logits_second = model(images, **second, **extra).logits
        assert not torch.allclose(logits_first, logits_second, atol=1e-4)
        assert not torch.allclose(logits_first, unconditioned, atol=1e-4)

        # By hand: [queries; question] through qformer(...) with a 3-d mask (every position sees every real one),
        # queries alone cross-attending to the image; the query positions projected.
        image_embeds = model.vision_model(images).last_hidden_state
        ids, mask = second["qformer_input_ids"], second["qformer_attention_mask"]
        sequence = model.embeddings(ids, query_embeds=model.query_tokens.expand(2, -1, -1))
        padding = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], dim=1)  # (B, Q + T)
        square = padding[:, None, :].expand(-1, padding.shape[1], -1)  # (B, Q + T, Q + T)
        manual = model.qformer(sequence, query_length=4, attention_mask=square, encoder_hidden_states=image_embeds)
        encoding = model.encode_images(images, **second)
        assert encoding.qformer_outputs.last_hidden_state.shape == (2, 4 + ids.shape[1], 32)
        assert torch.allclose(encoding.query_output, manual.last_hidden_state[:, :4], atol=1e-6)
        projected = model.language_projection(manual.last_hidden_state[:, :4])
        assert torch.allclose(encoding.language_model_inputs, projected, atol=1e-6)
        # Question padding changes nothing for the queries.
        alone = model.encode_images(images[1:], **_question_ids(["what color is the dog?"])).query_output
        assert torch.allclose(alone, encoding.query_output[1:], atol=1e-5)


def test_without_a_question_the_model_is_unchanged() -> None:
    conditioned = _model("opt")
    plain = _model("opt", text_input=False)
    shared = {key: value for key, value in conditioned.state_dict().items() if key in plain.state_dict()}
    plain.load_state_dict(shared, strict=True)
    with torch.no_grad():
        assert torch.equal(conditioned(pixels()).logits, plain(pixels()).logits)
    assert torch.equal(conditioned.generate(pixels(), **GREEDY), plain.generate(pixels(), **GREEDY))

    # Blip2Model shares the plumbing; a training step reaches the Q-Former text embeddings.
    base = Blip2Model(conditioned.config)
    base.load_state_dict(conditioned.state_dict(), strict=True)
    questions = _question_ids(["what is this?", "is it a cat?"])
    with torch.no_grad():
        assert torch.allclose(base.eval()(pixels(), **questions).logits, conditioned(pixels(), **questions).logits)
    labels = torch.tensor([[-100, 5, 6], [-100, 7, 8]])
    conditioned.train()
    conditioned(pixels(), input_ids=torch.tensor([[1, 5, 6], [1, 7, 8]]), labels=labels, **questions).loss.backward()
    conditioned.eval()
    assert conditioned.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_generate_from_a_shared_image_encoding(opt_model) -> None:
    images, index = pixels(2), [1, 0, 1]
    ids = torch.tensor([[0, 1, 82, 85], [1, 82, 72, 85], [0, 0, 1, 83]])  # left-padded prompts
    mask = (torch.arange(4)[None] >= torch.tensor([[1], [0], [2]])).long()
    expected = opt_model.generate(images[index], ids, mask, **GREEDY)
    encoding = opt_model.encode_images(images).select(index)
    assert torch.equal(
        opt_model.generate(input_ids=ids, attention_mask=mask, image_encoding=encoding, **GREEDY), expected
    )
    # A question-conditioned encoding from shared vision features equals one from the pixels.
    questions = _question_ids(["what is this?", "is it a cat?", "what color is the dog?"])
    features = opt_model.encode_images(images).select(index).image_embeds
    from_features = opt_model.encode_images(image_embeds=features, **questions)
    assert torch.allclose(
        from_features.language_model_inputs,
        opt_model.encode_images(images[index], **questions).language_model_inputs,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match=r"index must hold row numbers in \[0, 2\)"):
        opt_model.encode_images(images).select([2])


# -- predict_answers ------------------------------------------------------------------------------------------------
def test_prompt_templates_follow_the_llm_family(opt_model, t5_model) -> None:
    assert vqa_prompt_template(opt_model) == "Question: {} Answer:"
    assert vqa_prompt_template(t5_model) == "Question: {} Short answer:"


@pytest.mark.parametrize("family", ["opt", "t5"])
@pytest.mark.parametrize("use_qformer_text", [False, True])
def test_batched_answers_equal_one_at_a_time(family: str, use_qformer_text: bool, request) -> None:
    model = request.getfixturevalue(f"{family}_model")
    processor, images = _processor(), _images()
    kwargs = {"image_index": IMAGE_INDEX, "use_qformer_text": use_qformer_text, **GREEDY}
    batched = predict_answers(model, processor, images, QUESTIONS, batch_size=4, **kwargs)
    assert len(batched) == len(QUESTIONS) and all(isinstance(answer, str) and answer for answer in batched)
    assert predict_answers(model, processor, images, QUESTIONS, batch_size=1, **kwargs) == batched
    assert predict_answers(model, processor, images, QUESTIONS, batch_size=3, **kwargs) == batched


def test_answers_are_the_new_tokens_of_a_plain_generate_call(opt_model) -> None:
    processor, image = _processor(with_qformer_tokenizer=False), _images(1)[0]
    answer = predict_answers(opt_model, processor, image, "what is this?", **GREEDY)
    inputs = processor(images=image, text="Question: what is this? Answer:")  # image tokens placed by the processor
    sequences = opt_model.generate(**inputs, **GREEDY)
    expected = processor.tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == [expected.strip()]
    # The paper's beam search settings run as the defaults.
    assert len(predict_answers(opt_model, processor, [image], ["what is this?"])) == 1


@pytest.mark.parametrize("use_qformer_text", [False, True])
def test_reusing_image_encodings_gives_the_same_answers_with_one_vision_pass_per_image(
    opt_model, use_qformer_text: bool
) -> None:
    processor, images = _processor(), _images()
    images_seen: list[int] = []  # batch sizes of the vision encoder's calls
    qformer_rows: list[int] = []  # and of the Q-Former's
    projected_rows: list[int] = []  # images projected to cross-attention keys (first cross-attention layer)
    cross_attention = next(layer for layer in opt_model.qformer.encoder.layer if layer.has_cross_attention)
    hooks = [
        opt_model.vision_model.register_forward_hook(lambda module, args, output: images_seen.append(len(args[0]))),
        opt_model.qformer.register_forward_hook(
            lambda module, args, output: qformer_rows.append(len(output.last_hidden_state))
        ),
        cross_attention.crossattention.attention.key.register_forward_hook(
            lambda module, args, output: projected_rows.append(len(args[0]))
        ),
    ]
    kwargs = {"image_index": IMAGE_INDEX, "use_qformer_text": use_qformer_text, **GREEDY}
    try:
        reused = predict_answers(opt_model, processor, images, QUESTIONS, batch_size=2, **kwargs)
        assert sum(images_seen) == 3  # each distinct image once (in chunks of 2)
        # The queries of a question-conditioned Q-Former depend on the question: it runs once per question.
        assert sum(qformer_rows) == (4 if use_qformer_text else 3)
        assert sum(projected_rows) == 3  # the image side of the Q-Former, too, once per distinct image
        images_seen.clear()
        again = predict_answers(opt_model, processor, images, QUESTIONS, reuse_image_encoding=False, **kwargs)
        assert sum(images_seen) == 4  # once per question
    finally:
        for hook in hooks:
            hook.remove()
    assert reused == again
    # One image per question (the default mapping) gives the same answers.
    per_question = [images[index] for index in IMAGE_INDEX]
    default_mapping = predict_answers(
        opt_model, processor, per_question, QUESTIONS, use_qformer_text=use_qformer_text, **GREEDY
    )
    assert default_mapping == reused


def test_predict_answers_errors(opt_model) -> None:
    processor, images = _processor(), _images(2)
    plain_processor = _processor(with_qformer_tokenizer=False)
    with pytest.raises(ValueError, match="got 2 images but 3 questions"):
        predict_answers(opt_model, processor, images, ["a?", "b?", "c?"])
    with pytest.raises(ValueError, match="question 1 is empty"):
        predict_answers(opt_model, processor, images, ["what?", "  "])
    with pytest.raises(ValueError, match="at least one question"):
        predict_answers(opt_model, processor, images, [])
    with pytest.raises(ValueError, match=r"image_index entries must be in \[0, 2\)"):
        predict_answers(opt_model, processor, images, ["a?", "b?"], image_index=[0, 2])
    with pytest.raises(ValueError, match="image_index has 1 entries but there are 2 questions"):
        predict_answers(opt_model, processor, images, ["a?", "b?"], image_index=[0])
    with pytest.raises(ValueError, match="exactly one"):
        predict_answers(opt_model, processor, images, ["a?", "b?"], prompt="Q: A:")
    with pytest.raises(ValueError, match="processor has no qformer_tokenizer"):
        predict_answers(opt_model, plain_processor, images, ["a?", "b?"], use_qformer_text=True)
    with pytest.raises(ValueError, match="reads no text"):
        predict_answers(_model("opt", text_input=False), processor, images, ["a?", "b?"], use_qformer_text=True)
    opt_model.train()
    try:
        predict_answers(opt_model, processor, images, ["a?", "b?"], **GREEDY)
        assert opt_model.training  # the mode is restored
    finally:
        opt_model.eval()


# -- fine-tuning example --------------------------------------------------------------------------------------------
def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _vqa_folder(root: Path) -> Path:
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    for split in ("train", "validation"):
        folder = root / split
        folder.mkdir(parents=True)
        with open(folder / "metadata.jsonl", "w") as metadata:
            for name, rgb in colors.items():
                Image.new("RGB", (36, 30), rgb).save(folder / f"{name}.png")
                answers = [name] * 7 + ["orange"] * 3
                row = {"file_name": f"{name}.png", "question": "what color is the square?", "answers": answers}
                metadata.write(json.dumps(row) + "\n")
    return root


def test_finetune_vqa_example_runs_and_scores(tmp_path) -> None:
    model, processor = tiny_checkpoint_parts()
    processor.qformer_tokenizer = tiny_qformer_tokenizer()
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    data = _vqa_folder(tmp_path / "data")
    finetune = _load_example("finetune_vqa")
    args = [
        "--model_name_or_path", str(tmp_path / "checkpoint"), "--dataset", str(data), "--eval_split", "validation",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
        "--save_strategy", "no", "--eval_num_beams", "2", "--eval_max_new_tokens", "3", "--learning_rate", "1e-3",
        "--warmup_steps", "0",
    ]  # fmt: skip
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer, metrics = finetune.main(args)
    assert trainer.state.global_step == 2 and "loss" in trainer.state.log_history[0]
    assert 0.0 <= metrics["vqa_accuracy"] <= 1.0 and metrics["num_questions"] == 4
    after = trainer.model.state_dict()
    # Frozen: the ViT blocks and the LLM; trained: queries, Q-Former, its text embeddings, projection.
    assert torch.equal(
        after["vision_model.encoder.layers.0.mlp.fc1.weight"], before["vision_model.encoder.layers.0.mlp.fc1.weight"]
    )
    assert torch.equal(after["language_model.lm_head.weight"], before["language_model.lm_head.weight"])
    for name in ("query_tokens", "language_projection.weight", "embeddings.word_embeddings.weight"):
        assert not torch.equal(after[name], before[name]), name
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert reloaded.has_qformer_text_input


def test_vqa_collator_layouts() -> None:
    processor = _processor()
    image = _images(1)[0]
    rows = [
        {"image": image, "question": "what is this?", "answers": ["cat", "dog", "cat"]},
        {"image": image, "question": "is it a red square on the left?", "answers": "yes"},
    ]
    assert most_common_answer(rows[0]["answers"]) == "cat" and most_common_answer(["a", "b"]) == "a"
    batch = Blip2VqaCollator(processor, is_encoder_decoder=False, eos_token_id=90, use_qformer_text=True)(rows)
    prompt = processor.tokenizer("Question: what is this? Answer:")["input_ids"]
    answer = processor.tokenizer(" cat", add_special_tokens=False)["input_ids"]
    length, width = len(prompt) + len(answer) + 1, batch["input_ids"].shape[1]
    assert batch["input_ids"][0, :length].tolist() == prompt + answer + [90]
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + answer + [90] + [-100] * (width - length)
    assert batch["attention_mask"][0].tolist() == [1] * length + [0] * (width - length)
    expected_qformer = _question_ids(["what is this?", "is it a red square on the left?"])
    assert torch.equal(batch["qformer_input_ids"], expected_qformer["qformer_input_ids"])
    assert batch["pixel_values"].shape == (2, 3, 28, 28)

    batch = Blip2VqaCollator(processor, is_encoder_decoder=True)(rows)
    assert "qformer_input_ids" not in batch
    assert (
        batch["input_ids"][1].tolist()
        == processor.tokenizer("Question: is it a red square on the left? Short answer:")["input_ids"]
    )
    target = processor.tokenizer("yes")["input_ids"]
    assert batch["labels"][1, : len(target)].tolist() == target
    with torch.no_grad():
        assert torch.isfinite(_model("t5")(**batch).loss)
    with pytest.raises(ValueError, match="example 1 has an empty or missing question"):
        Blip2VqaCollator(processor, is_encoder_decoder=True)([rows[0], {**rows[1], "question": " "}])
    with pytest.raises(ValueError, match="no qformer_tokenizer"):
        Blip2VqaCollator(_processor(with_qformer_tokenizer=False), is_encoder_decoder=True, use_qformer_text=True)
