"""Stage 1 of BLIP-2: train the Q-Former against a frozen image encoder with ITC, ITM and ITG.

    python examples/pretrain_stage1.py --dataset path/to/imagefolder --config hub_configs/blip2-pretrain-vit-g \\
        --qformer_init_from path/to/bert --vision_model_from Salesforce/blip2-itm-vit-g \\
        --output_dir runs/stage1 --per_device_train_batch_size 32 --max_steps 1000 --cache_image_features

    python examples/pretrain_stage1.py --dataset path/to/imagefolder --vision_model google/siglip-base-patch16-224 \\
        --qformer_init_from google-bert/bert-base-uncased [--vision_feature_layer -2] [--num_query_tokens 32] \\
        --output_dir runs/stage1 --per_device_train_batch_size 32 --max_steps 1000 --cache_image_features

    python examples/pretrain_stage1.py --dataset webdataset --data_files 'shards/*.tar' --streaming \
        --config hub_configs/blip2-pretrain-vit-g --qformer_init_from path/to/bert --output_dir runs/stage1 \
        --per_device_train_batch_size 32 --max_steps 1000 --save_steps 500

`--dataset` is an image folder with a `metadata.jsonl` (`{"file_name": ..., "text": ...}` per line), any `datasets`
dataset name / saved dataset with an image column and a text column, or a packaged builder over `--data_files`
(`webdataset` .tar shards, `parquet` ...). `--streaming` reads it as a stream (shards shuffled and examples shuffled in
a buffer of `--shuffle_buffer_size`, reshuffled every pass; needs `--max_steps`); a run resumed with
`--resume_from_checkpoint` continues the stream where the checkpoint stopped. Webdataset samples train from their image
member (jpg / png ...) and the caption list of their `.json` (`{"captions": [...]}`, one caption drawn per step) or
their `.txt`, with `json.image_id` or the sample's `__key__` as image id; `--image_column`, `--text_column` (dotted
names read nested values: `json.captions`) and `--image_id_column` override. A caption column may hold a list of
captions in any dataset. The model comes from one of:

- `--config` (a BLIP-2 config folder): the EVA image encoder, whose weights come from a BLIP-2 checkpoint
  (`--vision_model_from`) or stay random (useful for smoke runs only);
- `--vision_model` (any transformers vision checkpoint, or a dual encoder such as CLIP / SigLIP whose vision tower is
  taken): `Blip2ForPretraining.from_unimodal_pretrained`, with that checkpoint's own image processor and the
  hidden state of `--vision_feature_layer` (`--vision_feature_select_strategy default` drops the class token);
- `--model_name_or_path`: a stage-1 checkpoint to continue from.

The Q-Former starts from a BERT checkpoint (`--qformer_init_from`, with `[DEC]` added to its tokenizer; random
BERT-base dimensions without one under `--vision_model`). The output folder holds the model, the Q-Former tokenizer
and the image processor; `pretrain_stage2.py --stage1` reads it. Every `Blip2TrainingArguments` option works
(`--itm_weight`, `--layer_wise_lr_decay`, ...).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import AutoImageProcessor, AutoTokenizer, HfArgumentParser

from modeling_blip2 import (
    Blip2Config,
    Blip2ForPretraining,
    Blip2ImageTextCollator,
    Blip2Trainer,
    Blip2TrainingArguments,
    Blip2VisionConfig,
    FrozenFeatureDataset,
    blip2_image_processor,
    init_qformer_from_bert,
)
from modeling_blip2.checkpoint_io import check_local_checkpoint
from modeling_blip2.conversion import load_safetensors
from modeling_blip2.processing import QFORMER_START_TOKEN, with_qformer_start_token

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _common import StreamingArguments, check_streaming_options, load_training_data  # noqa: E402


@dataclass
class Stage1Arguments:
    dataset: str = field(
        metadata={
            "help": "image folder (with metadata.jsonl), saved dataset, dataset name, or a builder over --data_files "
            "(webdataset, parquet ...)"
        }
    )
    dataset_split: str = "train"
    image_column: str | None = field(
        default=None, metadata={"help": "image column ('image'; webdataset: its jpg / jpeg / png / webp member)"}
    )
    text_column: str | None = field(
        default=None,
        metadata={
            "help": "caption column, a string or a list of captions (one drawn per step); dotted names read nested "
            "values ('text'; webdataset: json.captions when present, else txt)"
        },
    )
    image_id_column: str | None = field(
        default=None,
        metadata={
            "help": "column grouping captions of one image, integers or strings (none; webdataset: json.image_id "
            "when present, else __key__)"
        },
    )
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
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "keep the cached features on disk there: built once, read back by later runs and ranks"},
    )


@dataclass
class VisionModelArguments:
    """A frozen image encoder from any transformers vision checkpoint (`from_unimodal_pretrained`)."""

    vision_model: str | None = field(
        default=None,
        metadata={"help": "vision checkpoint (or dual encoder such as CLIP / SigLIP) to compose the model from"},
    )
    num_query_tokens: int | None = field(
        default=None, metadata={"help": "with --vision_model: number of query tokens (32 when not given)"}
    )
    vision_feature_layer: int | None = field(
        default=None,
        metadata={
            "help": "with --vision_model: encoder hidden state the Q-Former reads (-1, the last, when not given)"
        },
    )
    vision_feature_select_strategy: str | None = field(
        default=None,
        metadata={
            "help": "with --vision_model: 'full' keeps every token (when not given), 'default' drops the class token"
        },
    )

    def composition_options(self) -> dict[str, Any]:
        """`num_query_tokens` and the `Blip2Config` overrides given on the command line, for
        `from_unimodal_pretrained`; refused without `--vision_model`, where the config or checkpoint fixes them."""
        options = {
            name: getattr(self, name)
            for name in ("num_query_tokens", "vision_feature_layer", "vision_feature_select_strategy")
            if getattr(self, name) is not None
        }
        if options and self.vision_model is None:
            flags = ", ".join(f"--{name}" for name in options)
            raise ValueError(f"{flags} only apply with --vision_model (a config or checkpoint fixes them otherwise)")
        return {"num_query_tokens": 32, **options}


def load_image_text_dataset(args: Any) -> datasets.Dataset:
    """The (map-style) dataset of `args.dataset` / `args.dataset_split`, checked to hold `args.image_column` and
    `args.text_column` (used by `finetune_caption.py`; the pretraining scripts also stream, see `_common`)."""
    dataset = _common.load_image_text_dataset(args.dataset, args.dataset_split)
    _common.resolve_columns(dataset, args.image_column, args.text_column, None)
    return dataset


def build_model(args: Stage1Arguments, vision: VisionModelArguments) -> tuple[Blip2ForPretraining, Any, Any]:
    """The stage-1 model, its Q-Former tokenizer (with `[DEC]`) and its image processor."""
    options = vision.composition_options()
    if vision.vision_model is not None:
        others = {
            "--config": args.config,
            "--model_name_or_path": args.model_name_or_path,
            "--vision_model_from": args.vision_model_from,
        }
        given = [flag for flag, value in others.items() if value]
        if given:
            raise ValueError(
                f"--vision_model composes the model from unimodal checkpoints; it cannot be combined with "
                f"{', '.join(given)} (pass one way of building the model)"
            )
        tokenizer_source = args.qformer_tokenizer or args.qformer_init_from
        if tokenizer_source is None:
            raise ValueError(
                "pass --qformer_init_from (a BERT folder, whose tokenizer is used) or --qformer_tokenizer"
            )
        image_processor = vision_image_processor(vision.vision_model)
        model = Blip2ForPretraining.from_unimodal_pretrained(vision.vision_model, args.qformer_init_from, **options)
    elif args.model_name_or_path:
        model = Blip2ForPretraining.from_pretrained(args.model_name_or_path)
        tokenizer_source = args.qformer_tokenizer or args.model_name_or_path
        image_processor = saved_image_processor(args.model_name_or_path, model.config)
    else:
        if not args.config:
            raise ValueError(
                "pass --config (a stage-1 config folder), --vision_model (a vision checkpoint) or "
                "--model_name_or_path (a stage-1 checkpoint)"
            )
        model = Blip2ForPretraining(Blip2Config.from_pretrained(args.config))
        tokenizer_source = args.qformer_tokenizer or args.qformer_init_from
        if tokenizer_source is None:
            raise ValueError("pass --qformer_tokenizer (or --qformer_init_from, whose tokenizer is used)")
        image_processor = blip2_image_processor(model.config.vision_config.image_size)
    tokenizer = with_qformer_start_token(AutoTokenizer.from_pretrained(tokenizer_source))
    if args.qformer_init_from and vision.vision_model is None:  # from_unimodal_pretrained has initialised it
        print(init_qformer_from_bert(model, args.qformer_init_from, tokenizer=tokenizer).summary())
    check_qformer_tokenizer(tokenizer, model)
    if args.vision_model_from:
        weights = load_safetensors(args.vision_model_from)
        vision_weights = {
            key.removeprefix("vision_model."): value
            for key, value in weights.items()
            if key.startswith("vision_model.")
        }
        if not vision_weights:
            raise ValueError(f"{args.vision_model_from} holds no vision_model.* weights")
        model.vision_model.load_state_dict(vision_weights, strict=True)
    return model, tokenizer, image_processor


def vision_image_processor(vision_model: str) -> Any:
    """The image processor a vision checkpoint was trained with (its `preprocessor_config.json`)."""
    check_local_checkpoint(vision_model, "--vision_model (its image processor)", ("preprocessor_config.json",))
    return AutoImageProcessor.from_pretrained(vision_model)


def saved_image_processor(checkpoint: str, config: Blip2Config) -> Any:
    """The image processor saved with a checkpoint (this script saves it); BLIP-2's for a checkpoint without one,
    which only fits BLIP-2's own encoder."""
    try:
        return AutoImageProcessor.from_pretrained(checkpoint)
    except OSError:
        if not isinstance(config.vision_config, Blip2VisionConfig):
            raise ValueError(
                f"{checkpoint} holds no image processor and its encoder is a {type(config.vision_config).__name__}, "
                "not BLIP-2's: save the image processor of its vision checkpoint there"
            ) from None
        return blip2_image_processor(config.vision_config.image_size)


def check_qformer_tokenizer(tokenizer: Any, model: Blip2ForPretraining) -> None:
    """The tokenizer's `[DEC]` must be the Q-Former's start token and its ids must fit the Q-Former's vocabulary."""
    qformer = model.config.qformer_config
    start = tokenizer.convert_tokens_to_ids(QFORMER_START_TOKEN)
    if start != qformer.bos_token_id or len(tokenizer) > qformer.vocab_size:
        raise ValueError(
            f"the Q-Former tokenizer ({len(tokenizer)} tokens, {QFORMER_START_TOKEN} id {start}) does not fit the "
            f"Q-Former (vocab_size {qformer.vocab_size}, bos_token_id {qformer.bos_token_id}): pass the tokenizer "
            "of the BERT it starts from"
        )


def main(argv: list[str] | None = None) -> Blip2Trainer:
    parser = HfArgumentParser((Stage1Arguments, VisionModelArguments, StreamingArguments, Blip2TrainingArguments))
    args, vision, streaming, training_args = parser.parse_args_into_dataclasses(argv)
    args.cache_image_features = args.cache_image_features or args.feature_cache_dir is not None
    if args.augment and args.cache_image_features:
        raise ValueError(
            "--augment changes every image every epoch: it cannot be combined with --cache_image_features"
        )
    check_streaming_options(streaming, training_args.max_steps, args.cache_image_features)
    torch.manual_seed(training_args.seed)  # the new parts' initialisation
    model, tokenizer, image_processor = build_model(args, vision)
    dataset, image_column, text_column, image_id_column = load_training_data(args, streaming, training_args.seed)
    if args.cache_image_features:
        model.freeze_vision_encoder()
        dataset = FrozenFeatureDataset(
            dataset,
            model.vision_model,
            image_processor,
            image_column=image_column,
            image_id_column=image_id_column,
            batch_size=training_args.per_device_train_batch_size,
            dtype=getattr(torch, args.cache_dtype),
            cache_dir=args.feature_cache_dir,
        )
    collator = Blip2ImageTextCollator(
        image_processor,
        tokenizer,
        max_length=args.max_text_length,
        augment=args.augment,
        image_column=image_column,
        text_column=text_column,
        image_id_column=image_id_column,
        seed=training_args.seed,
    )
    trainer = Blip2Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)
    image_processor.save_pretrained(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
