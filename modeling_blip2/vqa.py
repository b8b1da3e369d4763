"""Visual question answering: the VQAv2 answer normalisation and accuracy, and batched answer prediction.

- `normalize_vqa_answer` / `vqa_accuracy` / `vqa_accuracy_batch`: the VQAv2 evaluation protocol (answer processing
  as the VQA evaluation page describes it; accuracy `min(1, #humans who gave the answer / 3)` averaged over the
  10-choose-9 subsets of the human answers).
- `predict_answers`: zero-shot (or fine-tuned) answers with the paper's prompts and decoding settings, batched with
  left-padded prompts, encoding every distinct image once however many questions it has.
- `Blip2VqaCollator`: training batches for VQA fine-tuning (prompt -> answer, question also to the Q-Former).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from .columns import column_value, text_values
from .end_token import EndTokenFromModel
from .modeling import Blip2ImageEncodingOutput
from .processing import VQA_PROMPT_DECODER_ONLY, VQA_PROMPT_ENCODER_DECODER, to_rgb_image

# Zero-shot VQA decoding of the paper. LAVIS' OPT models default to length_penalty 0 instead of the paper's -1
# (a negative penalty favours the short answers VQA wants).
VQA_NUM_BEAMS = 5
VQA_MAX_NEW_TOKENS = 10
VQA_LENGTH_PENALTY = -1.0
# Humans who must give an answer for full credit.
VQA_FULL_CREDIT_VOTES = 3
IGNORE_INDEX = -100

# -- answer normalisation ---------------------------------------------------------------------------------------------

# Punctuation the VQA scorer deletes or turns into a space; apostrophes (possessives, contractions), colons (times
# such as 2:50) and periods (decimals, handled on their own) are kept.
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions in their written form; every spelling with one or more apostrophes missing maps back to it.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd", "i'd've", "i'm",
    "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd", "she'd've", "she's", "should've",
    "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
    "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't",
    "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
    "where've", "who'd", "who'd've", "who'll", "who're", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll",
    "you're", "you've",
)  # fmt: skip
# Spellings that are words of their own once the apostrophe is gone ("well", "its", "ill", ...) are left alone.
_CONTRACTION_WORD_CLASHES = frozenset(
    {"hell", "id", "ill", "its", "lets", "shed", "shell", "twas", "wed", "well", "were"}
)


def _apostrophe_variants(word: str) -> set[str]:
    """Every spelling of `word` with a non-empty subset of its apostrophes dropped."""
    pieces = word.split("'")
    variants = {""}
    for index, piece in enumerate(pieces):
        joints = ("", "'") if index < len(pieces) - 1 else ("",)
        variants = {prefix + piece + joint for prefix in variants for joint in joints}
    return variants - {word}


_CONTRACTION_FIXES = {
    variant: word
    for word in _CONTRACTIONS
    for variant in _apostrophe_variants(word)
    if variant not in _CONTRACTION_WORD_CLASHES
}


def normalize_vqa_answer(text: str) -> str:
    """Normalises an answer as the VQAv2 evaluation does before comparing it with the human answers.

    In order: line breaks and tabs become spaces; punctuation (`_PUNCTUATION`) is deleted when it touches a space
    or when the answer has a comma between digits ("100,978" -> "100978"), and becomes a space otherwise ("x-ray" ->
    "x ray"); periods are removed unless a digit follows (decimals such as "2.5" stay); then, word by word, the text
    is lowercased, number words become digits ("two" -> "2", and "none" -> "0" as in the official scorer), articles
    (a, an, the) are dropped and contractions missing an apostrophe are fixed ("dont" -> "don't"). Apostrophes and
    colons are kept.

    Examples: "Two dogs." -> "2 dogs", "a cat" -> "cat", "Yes!" -> "yes", "dont" -> "don't".
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an answer string, got {type(text).__name__}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out)
    words = [_NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [_CONTRACTION_FIXES.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, ground_truth_answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers (10 per question in VQAv2).

    Both sides are normalised (`normalize_vqa_answer`). For each human, the prediction scores
    `min(1, #other humans who gave it / 3)`; the result is the mean over humans, i.e. over the 10-choose-9 subsets.
    With 10 answers, a prediction given by k humans scores 0.3 (k=1), 0.6 (k=2), 0.9 (k=3) and 1.0 (k>=4). With a
    single human answer, there is no subset to leave out: the score is `min(1, matches / 3)`.
    """
    if isinstance(ground_truth_answers, str) or not isinstance(ground_truth_answers, Sequence):
        raise ValueError(f"ground_truth_answers must be a list of strings, got {type(ground_truth_answers).__name__}")
    if len(ground_truth_answers) == 0:
        raise ValueError("ground_truth_answers is empty: VQA accuracy needs at least one human answer")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in ground_truth_answers]
    total = sum(matches)
    if len(matches) == 1:
        return min(1.0, total / VQA_FULL_CREDIT_VOTES)
    # Leaving out human i removes one match exactly when human i gave the predicted answer.
    scores = [min(1.0, (total - match) / VQA_FULL_CREDIT_VOTES) for match in matches]
    return sum(scores) / len(scores)


def vqa_accuracy_batch(predictions: Sequence[str], ground_truth_answers: Sequence[Sequence[str]]) -> float:
    """Mean `vqa_accuracy` over questions: `predictions[j]` is scored against `ground_truth_answers[j]`."""
    if len(predictions) != len(ground_truth_answers):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(ground_truth_answers)} ground-truth answer lists"
        )
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    pairs = zip(predictions, ground_truth_answers, strict=True)
    scores = [vqa_accuracy(prediction, answers) for prediction, answers in pairs]
    return sum(scores) / len(scores)


class VqaMetrics:
    """A `compute_metrics` for `Blip2Trainer(predict_with_generate=True)` on VQA: accuracy of the generated answers.

    `Blip2Trainer` hands it decoded text (`EvalPrediction.predictions` the generated answers, `label_ids` the target
    answers, in evaluation-set order). With `answers` (the human answers of each evaluation question, in order) it
    reports the VQA accuracy (`vqa_accuracy`); without, `vqa_exact_match`: the share of generated answers equal to
    the target after VQA normalisation (a single target is not the VQA accuracy, which needs the human answers).
    """

    def __init__(self, answers: Sequence[Sequence[str]] | None = None) -> None:
        self.answers = answers

    def __call__(self, prediction: Any) -> dict[str, float]:
        predicted = list(prediction.predictions)
        if not all(isinstance(answer, str) for answer in predicted):
            raise ValueError(
                "VqaMetrics scores decoded answers: use it with Blip2Trainer and predict_with_generate=True"
            )
        if self.answers is not None:
            return {"vqa_accuracy": 100 * vqa_accuracy_batch(predicted, self.answers)}
        if prediction.label_ids is None:
            raise ValueError("no target answers: the evaluation batches have no labels and no answers were given")
        targets = list(prediction.label_ids)
        if len(targets) != len(predicted) or not predicted:
            raise ValueError(f"{len(predicted)} generated answers but {len(targets)} targets")
        matches = [normalize_vqa_answer(p) == normalize_vqa_answer(t) for p, t in zip(predicted, targets, strict=True)]
        return {"vqa_exact_match": 100 * sum(matches) / len(matches)}


# -- prediction -------------------------------------------------------------------------------------------------------


def vqa_prompt_template(model: Any) -> str:
    """The paper's zero-shot VQA prompt for the model's LLM family (`model` or its config)."""
    config = getattr(model, "config", model)
    decoder_only = getattr(config, "use_decoder_only_language_model", True)
    return VQA_PROMPT_DECODER_ONLY if decoder_only else VQA_PROMPT_ENCODER_DECODER


def uses_qformer_text(model: Any, processor: Any, use_qformer_text: bool | None = None) -> bool:
    """Whether questions go to the Q-Former: by default when the model's Q-Former reads text and the processor has
    a Q-Former tokenizer; `True` insists on it (and says what is missing), `False` turns it off."""
    model_reads_text = bool(getattr(model, "has_qformer_text_input", False))
    has_tokenizer = getattr(processor, "qformer_tokenizer", None) is not None
    if use_qformer_text is None:
        return model_reads_text and has_tokenizer
    if use_qformer_text and not model_reads_text:
        raise ValueError(
            "use_qformer_text=True but the model's Q-Former reads no text "
            "(config.qformer_config.use_qformer_text_input=False)"
        )
    if use_qformer_text and not has_tokenizer:
        raise ValueError("use_qformer_text=True but the processor has no qformer_tokenizer")
    return bool(use_qformer_text)


@torch.no_grad()
def predict_answers(
    model: Any,
    processor: Any,
    images: Any,
    questions: str | Sequence[str],
    image_index: Sequence[int] | None = None,
    prompt: str | None = None,
    num_beams: int = VQA_NUM_BEAMS,
    max_new_tokens: int = VQA_MAX_NEW_TOKENS,
    length_penalty: float = VQA_LENGTH_PENALTY,
    use_qformer_text: bool | None = None,
    batch_size: int = 16,
    reuse_image_encoding: bool = True,
    qformer_max_length: int = 32,
    **generate_kwargs: Any,
) -> list[str]:
    """Answers questions about images with a `Blip2ForConditionalGeneration`.

    Args:
        model: The model (put in eval mode for the call, then restored).
        processor: A `Blip2ImageTextProcessor` (left-pads prompts for generation); its `qformer_tokenizer`, if any,
            encodes the questions for a question-conditioned Q-Former.
        images: One image or a list (anything the processor takes: PIL, arrays, tensors, paths, URLs).
        questions: One question or a list.
        image_index: `image_index[j]` is the position in `images` of question j's image, so several questions can
            share one image. Default: one image per question (`len(images) == len(questions)`).
        prompt: Template with one `{}` for the question. Default: the paper's for the LLM family, "Question: {}
            Answer:" (decoder-only) or "Question: {} Short answer:" (encoder-decoder).
        num_beams, max_new_tokens: Decoding; the paper's zero-shot VQA uses 5 beams and 10 new tokens.
        length_penalty: Beam-search length penalty: -1 in the paper (favours short answers); LAVIS' OPT default is
            0. Ignored with `num_beams=1`.
        use_qformer_text: Feed the question to the Q-Former too. None: when the model has Q-Former text input and
            the processor a Q-Former tokenizer.
        batch_size: Images encoded together and questions generated together.
        reuse_image_encoding: Encode each distinct image once and share it among its questions: the vision encoder
            and the Q-Former run once per image, or, with a question-conditioned Q-Former, the vision encoder and
            the Q-Former's cross-attention projections of the image run once per image and the Q-Former once per
            question. False: every question encodes its image again.
        qformer_max_length: Longest Q-Former question (32 in the paper).
        generate_kwargs: Further `generate` arguments (e.g. `min_new_tokens`, `do_sample`).

    Returns:
        One answer per question, in order: decoded, stripped, without the prompt.
    """
    question_list = _check_questions(questions)
    image_list = list(images) if isinstance(images, (list, tuple)) else [images]
    index = _check_image_index(image_index, len(image_list), len(question_list))
    template = prompt if prompt is not None else vqa_prompt_template(model)
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"prompt must be a template with exactly one {{}} for the question, got {template!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with_text = uses_qformer_text(model, processor, use_qformer_text)
    settings = {"num_beams": num_beams, "max_new_tokens": max_new_tokens}
    if num_beams > 1:
        settings["length_penalty"] = length_penalty
    generate_kwargs = {**settings, **generate_kwargs}
    prompts = [template.format(question) for question in question_list]

    def answer(rows: list[int], **image_inputs: Any) -> list[str]:
        text = processor(
            text=[prompts[row] for row in rows],
            qformer_text=[question_list[row] for row in rows] if with_text else None,
            qformer_max_length=qformer_max_length,
            return_tensors="pt",
        )
        return _generate_answers(model, processor, text, image_inputs, generate_kwargs)

    answers = [""] * len(question_list)
    was_training = model.training
    model.eval()
    try:
        if reuse_image_encoding:
            used = sorted(set(index))
            for start in range(0, len(used), batch_size):
                chunk = used[start : start + batch_size]
                pixel_values = _pixel_values(model, processor, [image_list[i] for i in chunk])
                if with_text:
                    # The vision features and their cross-attention keys and values are shared: the Q-Former runs
                    # per question, on its question.
                    image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
                    encoding = Blip2ImageEncodingOutput(
                        image_embeds=image_embeds, image_key_values=model.qformer.image_key_values(image_embeds)
                    )
                else:
                    encoding = model.encode_images(pixel_values)
                position = {image: row for row, image in enumerate(chunk)}
                rows = [row for row, image in enumerate(index) if image in position]
                for first in range(0, len(rows), batch_size):
                    batch_rows = rows[first : first + batch_size]
                    selected = encoding.select([position[index[row]] for row in batch_rows])
                    for row, text in zip(batch_rows, answer(batch_rows, image_encoding=selected), strict=True):
                        answers[row] = text
        else:
            for first in range(0, len(question_list), batch_size):
                batch_rows = list(range(first, min(first + batch_size, len(question_list))))
                pixel_values = _pixel_values(model, processor, [image_list[index[row]] for row in batch_rows])
                for row, text in zip(batch_rows, answer(batch_rows, pixel_values=pixel_values), strict=True):
                    answers[row] = text
    finally:
        model.train(was_training)
    return answers


def _generate_answers(
    model: Any, processor: Any, text: Any, image_inputs: dict[str, Any], generate_kwargs: dict[str, Any]
) -> list[str]:
    """Runs `generate` on one batch and decodes the new tokens."""
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = text["input_ids"].to(device), text["attention_mask"].to(device)
    qformer = {}
    if "qformer_input_ids" in text:
        qformer_device = model.embeddings.word_embeddings.weight.device
        qformer = {
            "qformer_input_ids": text["qformer_input_ids"].to(qformer_device),
            "qformer_attention_mask": text["qformer_attention_mask"].to(qformer_device),
        }
    encoding = image_inputs.get("image_encoding")
    if encoding is not None and qformer:
        # The vision features are shared; the question-conditioned Q-Former runs for each question.
        encoding = model.encode_images(
            image_embeds=encoding.image_embeds, image_key_values=encoding.image_key_values, **qformer
        )
        image_inputs, qformer = {"image_encoding": encoding}, {}
    outputs = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, **image_inputs, **qformer, **generate_kwargs
    )
    sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
    if model.config.use_decoder_only_language_model:
        sequences = sequences[:, input_ids.shape[1] :]  # generate gives the prompt back first
    return [answer.strip() for answer in processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def _pixel_values(model: Any, processor: Any, images: list[Any]) -> torch.Tensor:
    """`(len(images), 3, H, W)` pixels on the vision encoder's device (the image processor alone: no prompts)."""
    rgb = [to_rgb_image(image) for image in images]
    pixel_values = processor.image_processor(rgb, return_tensors="pt")["pixel_values"]
    return pixel_values.to(next(model.vision_model.parameters()).device)


def _check_questions(questions: str | Sequence[str]) -> list[str]:
    question_list = [questions] if isinstance(questions, str) else list(questions)
    if not question_list:
        raise ValueError("expected at least one question, got none")
    for position, question in enumerate(question_list):
        if not isinstance(question, str):
            raise ValueError(f"question {position} must be a string, got {type(question).__name__}")
        if not question.strip():
            raise ValueError(f"question {position} is empty; expected a non-empty string")
    return [question.strip() for question in question_list]


def _check_image_index(image_index: Sequence[int] | None, num_images: int, num_questions: int) -> list[int]:
    if image_index is None:
        if num_images != num_questions:
            raise ValueError(
                f"got {num_images} images but {num_questions} questions: pass one image per question, or "
                "image_index (the image of each question) to ask several questions about one image"
            )
        return list(range(num_questions))
    index = [int(position) for position in image_index]
    if len(index) != num_questions:
        raise ValueError(f"image_index has {len(index)} entries but there are {num_questions} questions")
    bad = [position for position in index if not 0 <= position < num_images]
    if bad:
        raise ValueError(f"image_index entries must be in [0, {num_images}) (the images given), got {bad}")
    return index


# -- fine-tuning batches ----------------------------------------------------------------------------------------------


def most_common_answer(answers: str | Sequence[str]) -> str:
    """The training target of a question: the answer itself, or the most frequent human answer (first on ties)."""
    if isinstance(answers, str):
        return answers.strip()
    counts = Counter(answer.strip() for answer in answers if isinstance(answer, str) and answer.strip())
    if not counts:
        raise ValueError(f"no non-empty answer in {answers!r}")
    return counts.most_common(1)[0][0]


class Blip2VqaCollator(EndTokenFromModel):
    """Batches `{image, question, answer(s)}` rows for VQA fine-tuning of `Blip2ForConditionalGeneration`.

    - Decoder-only LLMs: `input_ids` = prompt + " " + answer + end token, labels -100 on the prompt and padding.
    - Encoder-decoder LLMs: `input_ids` = prompt (encoder), `labels` = the answer (the tokenizer's EOS included).
    Prompts carry no image tokens: the model puts the queries first (right padding, as for training). With
    `use_qformer_text`, the question also goes to the Q-Former (`qformer_input_ids` / `qformer_attention_mask`).
    The answer column holds one answer or the list of human answers (the most frequent one is the target).

    Args:
        processor: A `Blip2ImageTextProcessor`; its `qformer_tokenizer` encodes the questions for the Q-Former.
        is_encoder_decoder: The LLM family (`model.config.is_encoder_decoder`).
        eos_token_id: End of answer for decoder-only LLMs; None takes `model.generation_config.eos_token_id` (the
            official OPT checkpoints end with "\\n", not the tokenizer's `</s>`) when the collator meets the model
            (`Blip2Trainer`, `bind_model`). An id the model does not stop at is refused there.
        prompt: Template with one `{}` for the question (default: the paper's zero-shot prompt of the LLM family).
        use_qformer_text: Also feed the question to the Q-Former.
        max_prompt_length, max_answer_length: LLM tokens kept of the prompt and of the answer.
        qformer_max_length: Longest Q-Former question.
    """

    def __init__(
        self,
        processor: Any,
        is_encoder_decoder: bool,
        eos_token_id: int | None = None,
        prompt: str | None = None,
        use_qformer_text: bool = False,
        image_column: str = "image",
        question_column: str = "question",
        answer_column: str = "answers",
        max_prompt_length: int = 64,
        max_answer_length: int = 16,
        qformer_max_length: int = 32,
    ) -> None:
        tokenizer = processor.tokenizer
        if prompt is None:
            prompt = VQA_PROMPT_ENCODER_DECODER if is_encoder_decoder else VQA_PROMPT_DECODER_ONLY
        if not isinstance(prompt, str) or prompt.count("{}") != 1:
            raise ValueError(f"prompt must be a template with exactly one {{}} for the question, got {prompt!r}")
        if use_qformer_text and getattr(processor, "qformer_tokenizer", None) is None:
            raise ValueError("use_qformer_text=True but the processor has no qformer_tokenizer")
        self.processor, self.tokenizer = processor, tokenizer
        self.is_encoder_decoder, self.eos_token_id = is_encoder_decoder, eos_token_id
        self.prompt, self.use_qformer_text = prompt, use_qformer_text
        self.image_column, self.question_column, self.answer_column = image_column, question_column, answer_column
        self.max_prompt_length, self.max_answer_length = max_prompt_length, max_answer_length
        self.qformer_max_length = qformer_max_length
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        questions = text_values(examples, self.question_column, "question")
        answers = [
            most_common_answer(column_value(example, index, self.answer_column, "answer") or "")
            for index, example in enumerate(examples)
        ]
        images = [
            to_rgb_image(column_value(example, index, self.image_column, "image"))
            for index, example in enumerate(examples)
        ]
        batch = {"pixel_values": self.processor.image_processor(images, return_tensors="pt")["pixel_values"]}
        prompt_ids = self.tokenizer(
            [self.prompt.format(question) for question in questions],
            truncation=True,
            max_length=self.max_prompt_length,
        ).input_ids
        if self.is_encoder_decoder:
            answer_ids = self.tokenizer(answers, truncation=True, max_length=self.max_answer_length).input_ids
            batch["input_ids"], batch["attention_mask"] = _right_pad(prompt_ids, self.pad_id)
            batch["labels"], _ = _right_pad(answer_ids, IGNORE_INDEX)
        else:
            # The space generation produces after "Answer:"; the end token is appended by id.
            answer_ids = self.tokenizer(
                [f" {answer}" for answer in answers],
                add_special_tokens=False,
                truncation=True,
                max_length=self.max_answer_length,
            ).input_ids
            end_token = self._end_token()
            targets = [answer + [end_token] for answer in answer_ids]
            rows = [prompt + target for prompt, target in zip(prompt_ids, targets, strict=True)]
            labels = [
                [IGNORE_INDEX] * len(prompt) + target for prompt, target in zip(prompt_ids, targets, strict=True)
            ]
            batch["input_ids"], batch["attention_mask"] = _right_pad(rows, self.pad_id)
            batch["labels"], _ = _right_pad(labels, IGNORE_INDEX)
        if self.use_qformer_text:
            qformer = self.processor(qformer_text=questions, qformer_max_length=self.qformer_max_length)
            batch["qformer_input_ids"] = qformer["qformer_input_ids"]
            batch["qformer_attention_mask"] = qformer["qformer_attention_mask"]
        return batch


def _right_pad(rows: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, longest)` ids and their padding mask, padded on the right."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad_value] * (width - len(row)) for row in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    return ids, mask
