"""Caption fine-tuning as in the paper: prompt "a photo of", larger images, LLM frozen, BLEU-4 / CIDEr evaluation.

    python examples/finetune_caption.py --model_name_or_path runs/stage2 --dataset path/to/coco_imagefolder \\
        --eval_dataset path/to/coco_val_imagefolder --image_size 364 --train_vision_encoder \\
        --output_dir runs/caption --learning_rate 1e-5 --warmup_steps 1000 --max_steps 5000

The Q-Former (and with `--train_vision_encoder` the image encoder, under gradient checkpointing) trains; the LLM stays
frozen. `--image_size` resizes the images and interpolates the encoder's position embeddings (224 -> 364 in the
paper). Evaluation generates with 5 beams, at most 30 and at least 8 new tokens (the paper's recipe) and reports
BLEU-4 and CIDEr against all references of each image (`--references_column` may hold a list of captions).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_stage1 import load_image_text_dataset  # noqa: E402

from modeling_blip2 import (  # noqa: E402
    Blip2CaptionCollator,
    Blip2ForConditionalGeneration,
    Blip2ImageTextProcessor,
    Blip2Trainer,
    Blip2TrainingArguments,
    blip2_image_processor,
)
from modeling_blip2.caption_metrics import caption_scores  # noqa: E402
from modeling_blip2.processing import CAPTION_PROMPT  # noqa: E402


@dataclass
class CaptionFinetuneArguments:
    model_name_or_path: str = field(metadata={"help": "stage-2 (or fine-tuned) checkpoint with its processor"})
    dataset: str = field(metadata={"help": "training image folder (metadata.jsonl) / saved dataset / dataset name"})
    eval_dataset: str | None = field(default=None, metadata={"help": "evaluation set; BLEU-4 / CIDEr when given"})
    dataset_split: str = "train"
    eval_split: str = "train"
    image_column: str = "image"
    text_column: str = "text"
    references_column: str | None = field(default=None, metadata={"help": "eval column with all reference captions"})
    prompt: str = CAPTION_PROMPT
    image_size: int | None = field(default=None, metadata={"help": "new input size, e.g. 364 (paper)"})
    train_vision_encoder: bool = field(default=False, metadata={"help": "also train the image encoder"})
    augment: bool = True
    max_length: int = 64
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    eval_batch_size: int = 16


def evaluate_captions(
    model: Blip2ForConditionalGeneration,
    processor: Blip2ImageTextProcessor,
    dataset: Any,
    args: CaptionFinetuneArguments,
) -> dict[str, Any]:
    """Captions every evaluation image and scores them (BLEU-4, CIDEr, x100) against its references."""
    model.eval()
    predictions, references = {}, {}
    for start in range(0, len(dataset), args.eval_batch_size):
        rows = [dataset[i] for i in range(start, min(start + args.eval_batch_size, len(dataset)))]
        inputs = processor(images=[row[args.image_column] for row in rows], text=[args.prompt] * len(rows))
        with torch.no_grad():
            generated = model.generate(
                **inputs,
                num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.min_new_tokens,
            )
        if not model.config.is_encoder_decoder:
            generated = generated[:, inputs["input_ids"].shape[1] :]
        for offset, (row, caption) in enumerate(zip(rows, processor.decode_generated(generated), strict=True)):
            key = start + offset
            refs = row[args.references_column] if args.references_column else [row[args.text_column]]
            predictions[key] = caption
            references[key] = [refs] if isinstance(refs, str) else list(refs)
    return {**caption_scores(predictions, references), "examples": [predictions[k] for k in list(predictions)[:5]]}


def main(argv: list[str] | None = None) -> tuple[Blip2Trainer, dict[str, Any] | None]:
    parser = HfArgumentParser((CaptionFinetuneArguments, Blip2TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(argv)
    model = Blip2ForConditionalGeneration.from_pretrained(args.model_name_or_path)
    processor = Blip2ImageTextProcessor.from_pretrained(args.model_name_or_path)
    if args.image_size is not None and args.image_size != model.config.vision_config.image_size:
        model.vision_model.resize_position_embeddings(args.image_size)
        processor.image_processor = blip2_image_processor(args.image_size)
    model.freeze_language_model()
    training_args.freeze_vision_encoder = not args.train_vision_encoder
    if args.train_vision_encoder:
        model.vision_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    collator = Blip2CaptionCollator(
        processor,
        is_encoder_decoder=model.config.is_encoder_decoder,
        prompt=args.prompt,
        max_length=args.max_length,
        augment=args.augment,
        image_column=args.image_column,
        text_column=args.text_column,
        seed=training_args.seed,
    )
    train_set = load_image_text_dataset(args)
    trainer = Blip2Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=collator)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)
    scores = None
    if args.eval_dataset:
        eval_args = CaptionFinetuneArguments(
            **{**vars(args), "dataset": args.eval_dataset, "dataset_split": args.eval_split}
        )
        scores = evaluate_captions(model, processor, load_image_text_dataset(eval_args), args)
        print(json.dumps({k: v for k, v in scores.items() if k != "examples"}))
        (Path(training_args.output_dir) / "caption_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return trainer, scores


if __name__ == "__main__":
    main(sys.argv[1:])
