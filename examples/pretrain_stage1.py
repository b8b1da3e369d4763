"""Stage 1 of BLIP-2: train the Q-Former against a frozen image encoder with ITC, ITM and ITG.

    python examples/pretrain_stage1.py --dataset path/to/imagefolder --config hub_configs/blip2-pretrain-vit-g \\
        --qformer_init_from path/to/bert --vision_model_from Salesforce/blip2-itm-vit-g \\
        --output_dir runs/stage1 --per_device_train_batch_size 32 --max_steps 1000 --cache_image_features

`--dataset` is an image folder with a `metadata.jsonl` (`{"file_name": ..., "text": ...}` per line) or any `datasets`
dataset name / saved dataset with an image column and a text column. The Q-Former starts from a BERT checkpoint
(`--qformer_init_from`, with `[DEC]` added to its tokenizer) or from a stage-1 checkpoint (`--model_name_or_path`);
the image encoder's weights come from a BLIP-2 checkpoint (`--vision_model_from`) or stay random (useful for smoke
runs only). Every `Blip2TrainingArguments` option works (`--itm_weight`, `--layer_wise_lr_decay`, ...).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer, HfArgumentParser

from modeling_blip2 import (
    Blip2Config,
    Blip2ForPretraining,
    Blip2ImageTextCollator,
    Blip2Trainer,
    Blip2TrainingArguments,
    FrozenFeatureDataset,
    blip2_image_processor,
    init_qformer_from_bert,
)
from modeling_blip2.conversion import load_safetensors
from modeling_blip2.processing import with_qformer_start_token


@dataclass
class Stage1Arguments:
    dataset: str = field(metadata={"help": "image folder (with metadata.jsonl), saved dataset or dataset name"})
    dataset_split: str = "train"
    image_column: str = "image"
    text_column: str = "text"
    image_id_column: str | None = field(default=None, metadata={"help": "column grouping captions of one image"})
    config: str | None = field(default=None, metadata={"help": "folder with our config.json (e.g. hub_configs/...)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "stage-1 checkpoint to continue from"})
    qformer_init_from: str | None = field(default=None, metadata={"help": "BERT folder to initialise the Q-Former"})
    qformer_tokenizer: str | None = field(default=None, metadata={"help": "BERT tokenizer (default: the BERT's)"})
    vision_model_from: str | None = field(default=None, metadata={"help": "checkpoint whose vision_model.* to load"})
    max_text_length: int = 32
    augment: bool = field(default=False, metadata={"help": "random resized crop + flip (the paper's augmentation)"})
    cache_image_features: bool = field(default=False, metadata={"help": "run the frozen encoder once per image"})
    cache_dtype: str = field(
        default="float16", metadata={"help": "storage dtype of cached features (float16 halves RAM)"}
    )


def load_image_text_dataset(args: Stage1Arguments) -> datasets.Dataset:
    """An image folder with metadata.jsonl, a dataset saved with save_to_disk, or a dataset name."""
    if os.path.isdir(args.dataset) and os.path.isfile(os.path.join(args.dataset, "dataset_info.json")):
        dataset = datasets.load_from_disk(args.dataset)
    elif os.path.isdir(args.dataset):
        dataset = datasets.load_dataset("imagefolder", data_dir=args.dataset, split=args.dataset_split)
    else:
        dataset = datasets.load_dataset(args.dataset, split=args.dataset_split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[args.dataset_split]
    missing = {args.image_column, args.text_column} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the dataset has no column(s) {sorted(missing)}; it has {dataset.column_names}")
    return dataset


def build_model(args: Stage1Arguments) -> tuple[Blip2ForPretraining, Any]:
    """The stage-1 model and its Q-Former tokenizer (with `[DEC]`)."""
    if args.model_name_or_path:
        model = Blip2ForPretraining.from_pretrained(args.model_name_or_path)
        tokenizer_source = args.qformer_tokenizer or args.model_name_or_path
    else:
        if not args.config:
            raise ValueError("pass --config (a stage-1 config folder) or --model_name_or_path (a stage-1 checkpoint)")
        model = Blip2ForPretraining(Blip2Config.from_pretrained(args.config))
        tokenizer_source = args.qformer_tokenizer or args.qformer_init_from
        if tokenizer_source is None:
            raise ValueError("pass --qformer_tokenizer (or --qformer_init_from, whose tokenizer is used)")
    tokenizer = with_qformer_start_token(AutoTokenizer.from_pretrained(tokenizer_source))
    if args.qformer_init_from:
        print(init_qformer_from_bert(model, args.qformer_init_from, tokenizer=tokenizer).summary())
    if args.vision_model_from:
        weights = load_safetensors(args.vision_model_from)
        vision = {
            key.removeprefix("vision_model."): value
            for key, value in weights.items()
            if key.startswith("vision_model.")
        }
        if not vision:
            raise ValueError(f"{args.vision_model_from} holds no vision_model.* weights")
        model.vision_model.load_state_dict(vision, strict=True)
    return model, tokenizer


def main(argv: list[str] | None = None) -> Blip2Trainer:
    parser = HfArgumentParser((Stage1Arguments, Blip2TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(argv)
    if args.augment and args.cache_image_features:
        raise ValueError(
            "--augment changes every image every epoch: it cannot be combined with --cache_image_features"
        )
    model, tokenizer = build_model(args)
    image_processor = blip2_image_processor(model.config.vision_config.image_size)
    dataset = load_image_text_dataset(args)
    if args.cache_image_features:
        model.freeze_vision_encoder()
        dataset = FrozenFeatureDataset(
            dataset,
            model.vision_model,
            image_processor,
            image_column=args.image_column,
            image_id_column=args.image_id_column,
            batch_size=training_args.per_device_train_batch_size,
            dtype=getattr(torch, args.cache_dtype),
        )
    collator = Blip2ImageTextCollator(
        image_processor,
        tokenizer,
        max_length=args.max_text_length,
        augment=args.augment,
        image_column=args.image_column,
        text_column=args.text_column,
        image_id_column=args.image_id_column,
        seed=training_args.seed,
    )
    torch.manual_seed(training_args.seed)
    trainer = Blip2Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)
    image_processor.save_pretrained(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
