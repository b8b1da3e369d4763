"""Fine-tune BLIP-2 for visual question answering, then score VQA accuracy on an evaluation split.

    python examples/finetune_vqa.py --model_name_or_path path/to/blip2-checkpoint --dataset path/to/vqa_folder \\
        --eval_split validation --output_dir runs/vqa --per_device_train_batch_size 16 --num_train_epochs 5

The paper's recipe: the image encoder and the LLM stay frozen (the post-encoder LayerNorm trains), the queries,
Q-Former and language projection train; when the model's Q-Former reads text (`qformer_config.use_qformer_text_input`,
e.g. a stage-2 model built with `build_stage2_from_stage1(..., use_qformer_text_input=True)`) and the processor has a
Q-Former tokenizer (or `--qformer_tokenizer` names one), the question also goes to the Q-Former.

`--dataset` is an image folder with one sub-folder per split (`train/`, `validation/`), each holding the images and a
`metadata.jsonl` (`{"file_name": ..., "question": ..., "answers": [...]}` per line), a dataset saved with
`save_to_disk`, or a dataset name. The answer column holds one answer or the list of human answers; training uses
the most frequent one, evaluation all of them (VQAv2 accuracy, `modeling_blip2.vqa.vqa_accuracy`).

Training examples (`modeling_blip2.vqa.Blip2VqaCollator`):
- decoder-only LLM: `[queries; prompt + " " + answer + EOS]`, labels -100 on the queries, the prompt and padding;
  EOS is the model's generation EOS (for the official OPT checkpoints "\\n", as in LAVIS);
- encoder-decoder LLM: encoder input `[queries; prompt]`, decoder labels the answer (+ EOS from the tokenizer).
The prompt is the paper's zero-shot template ("Question: {} Answer:" / "Question: {} Short answer:") unless `--prompt`.
Training runs on `Blip2Trainer` (no weight decay on biases and norms; cosine schedule); every
`Blip2TrainingArguments` option works, with VQA fine-tuning defaults (peak LR 1e-5, 1000 warm-up steps).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import HfArgumentParser

from modeling_blip2 import (
    Blip2ForConditionalGeneration,
    Blip2ImageTextProcessor,
    Blip2Trainer,
    Blip2TrainingArguments,
    load_qformer_tokenizer,
)
from modeling_blip2.vqa import (
    VQA_LENGTH_PENALTY,
    VQA_MAX_NEW_TOKENS,
    VQA_NUM_BEAMS,
    Blip2VqaCollator,
    predict_answers,
    uses_qformer_text,
    vqa_accuracy_batch,
    vqa_prompt_template,
)


@dataclass
class VqaArguments:
    model_name_or_path: str = field(metadata={"help": "checkpoint folder or Hub id (model + processor)"})
    dataset: str = field(metadata={"help": "image folder with split folders, saved dataset or dataset name"})
    train_split: str = "train"
    eval_split: str | None = field(default=None, metadata={"help": "split scored with VQA accuracy after training"})
    max_eval_samples: int | None = None
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = field(default="answers", metadata={"help": "one answer or the list of human answers"})
    image_id_column: str | None = field(
        default=None, metadata={"help": "eval column naming each row's image: its questions share one encoding"}
    )
    qformer_tokenizer: str | None = field(
        default=None, metadata={"help": "BERT tokenizer for the Q-Former, if the processor has none"}
    )
    use_qformer_text: bool | None = field(
        default=None, metadata={"help": "question to the Q-Former too (default: when the model and processor can)"}
    )
    prompt: str | None = field(default=None, metadata={"help": "template with one {} (default: the paper's)"})
    max_prompt_length: int = field(default=64, metadata={"help": "LLM tokens of the prompt"})
    max_answer_length: int = field(default=16, metadata={"help": "LLM tokens of the answer"})
    qformer_max_length: int = 32
    eval_num_beams: int = VQA_NUM_BEAMS
    eval_max_new_tokens: int = VQA_MAX_NEW_TOKENS
    eval_length_penalty: float = field(
        default=VQA_LENGTH_PENALTY, metadata={"help": "-1 as in the paper; LAVIS' OPT default is 0"}
    )
    eval_batch_size: int = 16


@dataclass
class VqaTrainingArguments(Blip2TrainingArguments):
    """`Blip2TrainingArguments` with the paper's fine-tuning schedule (peak LR 1e-5, 1000 warm-up steps)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate (paper fine-tuning: 1e-5)"})
    warmup_steps: float = field(default=1000, metadata={"help": "linear warm-up steps (paper fine-tuning: 1000)"})
    min_lr: float = field(default=0.0, metadata={"help": "floor of the cosine schedule"})


def load_split(args: VqaArguments, split: str) -> datasets.Dataset:
    """One split of an image folder (split sub-folders), a dataset saved with save_to_disk, or a dataset name."""
    if os.path.isdir(args.dataset) and any(
        os.path.isfile(os.path.join(args.dataset, name)) for name in ("dataset_dict.json", "dataset_info.json")
    ):
        dataset = datasets.load_from_disk(args.dataset)
    elif os.path.isdir(args.dataset):
        dataset = datasets.load_dataset("imagefolder", data_dir=args.dataset)
    else:
        dataset = datasets.load_dataset(args.dataset)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{args.dataset} has no split {split!r}; it has {list(dataset)}")
        dataset = dataset[split]
    missing = {args.image_column, args.question_column, args.answer_column} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the {split} split has no column(s) {sorted(missing)}; it has {dataset.column_names}")
    return dataset


def evaluate_vqa(
    model: Blip2ForConditionalGeneration,
    processor: Any,
    dataset: datasets.Dataset,
    args: VqaArguments,
    prompt: str,
    use_qformer_text: bool,
) -> dict[str, float]:
    """VQA accuracy of `predict_answers` on `dataset`; rows with the same image id share one image encoding."""
    images: list[Any] = []
    image_index: list[int] = []
    first_row_of: dict[Any, int] = {}
    for row, example in enumerate(dataset):
        key = example[args.image_id_column] if args.image_id_column else row
        if key not in first_row_of:
            first_row_of[key] = len(images)
            images.append(example[args.image_column])
        image_index.append(first_row_of[key])
    references = [[answers] if isinstance(answers, str) else list(answers) for answers in dataset[args.answer_column]]
    predictions = predict_answers(
        model,
        processor,
        images,
        list(dataset[args.question_column]),
        image_index=image_index,
        prompt=prompt,
        num_beams=args.eval_num_beams,
        max_new_tokens=args.eval_max_new_tokens,
        length_penalty=args.eval_length_penalty,
        use_qformer_text=use_qformer_text,
        batch_size=args.eval_batch_size,
    )
    return {"vqa_accuracy": vqa_accuracy_batch(predictions, references), "num_questions": float(len(predictions))}


def main(argv: list[str] | None = None) -> tuple[Blip2Trainer, dict[str, float]]:
    parser = HfArgumentParser((VqaArguments, VqaTrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(argv)
    model = Blip2ForConditionalGeneration.from_pretrained(args.model_name_or_path)
    processor = Blip2ImageTextProcessor.from_pretrained(args.model_name_or_path)
    if args.qformer_tokenizer:
        processor.qformer_tokenizer = load_qformer_tokenizer(args.qformer_tokenizer)
    use_qformer_text = uses_qformer_text(model, processor, args.use_qformer_text)
    prompt = args.prompt if args.prompt is not None else vqa_prompt_template(model)
    print(f"prompt: {prompt!r}; question also to the Q-Former: {use_qformer_text}")

    model.freeze_vision_encoder()
    model.freeze_language_model()
    collator = Blip2VqaCollator(
        processor,
        is_encoder_decoder=not model.config.use_decoder_only_language_model,
        prompt=prompt,
        use_qformer_text=use_qformer_text,
        image_column=args.image_column,
        question_column=args.question_column,
        answer_column=args.answer_column,
        max_prompt_length=args.max_prompt_length,
        max_answer_length=args.max_answer_length,
        qformer_max_length=args.qformer_max_length,
    )
    torch.manual_seed(training_args.seed)
    trainer = Blip2Trainer(
        model=model, args=training_args, train_dataset=load_split(args, args.train_split), data_collator=collator
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)

    metrics: dict[str, float] = {}
    if args.eval_split:
        eval_dataset = load_split(args, args.eval_split)
        if args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(args.max_eval_samples, len(eval_dataset))))
        metrics = evaluate_vqa(model, processor, eval_dataset, args, prompt, use_qformer_text)
        print(
            f"VQA accuracy on {args.eval_split} ({int(metrics['num_questions'])} questions): "
            f"{100 * metrics['vqa_accuracy']:.2f}"
        )
    return trainer, metrics


if __name__ == "__main__":
    main(sys.argv[1:])
