"""Stage 2 of BLIP-2: connect a Q-Former to a frozen LLM and train it to caption (generative learning).

    python examples/pretrain_stage2.py --dataset path/to/imagefolder --stage1 runs/stage1 \\
        --language_model facebook/opt-2.7b --output_dir runs/stage2 --max_steps 1000 --llm_dtype bfloat16

    python examples/pretrain_stage2.py --dataset path/to/imagefolder --vision_model google/siglip-base-patch16-224 \\
        --language_model Qwen/Qwen2.5-0.5B --qformer_init_from google-bert/bert-base-uncased \\
        [--vision_feature_layer -2] [--num_query_tokens 32] --output_dir runs/stage2 --max_steps 1000

The Q-Former and image encoder come from a stage-1 checkpoint (`--stage1`, the output of `pretrain_stage1.py`, with
its image processor), or the model is composed without stage 1 from unimodal checkpoints
(`--vision_model`: any transformers vision model or a dual encoder's vision tower, with its own image processor; the
Q-Former from the BERT of `--qformer_init_from`, random without one) by
`Blip2ForConditionalGeneration.from_unimodal_pretrained`. Either way the LLM is `--language_model`, with `<image>`
added to its tokenizer.

Decoder-only LLMs learn with the LM loss (captions end with the LLM's end token), encoder-decoder LLMs with the
prefix-LM loss (each caption split at a random word). The image encoder and the LLM are frozen (and kept in
`--llm_dtype`); the query tokens, Q-Former, post-LayerNorm and projection train in fp32. A GGUF LLM file loads with
`--gguf_file` (with `--stage1`). `--cache_image_features` runs the frozen encoder once per image, `--augment` applies
the paper's random resized crop and flip. The output folder (model + processor) captions with
`pipeline("image-to-text", model=output_dir, trust_remote_code=True)`. Every `Blip2TrainingArguments` option works.

The data options are `pretrain_stage1.py`'s: an image folder, saved dataset or dataset name, or a builder over
`--data_files` (`--dataset webdataset --data_files 'shards/*.tar'`), optionally `--streaming` (needs `--max_steps`;
resumes where a checkpoint stopped); webdataset samples default to their image member and their `.json` caption list
(one caption drawn per step) or `.txt`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import StreamingArguments, check_streaming_options, load_training_data  # noqa: E402
from pretrain_stage1 import VisionModelArguments, saved_image_processor  # noqa: E402

from modeling_blip2 import (  # noqa: E402
    Blip2CaptionCollator,
    Blip2ForConditionalGeneration,
    Blip2ForPretraining,
    Blip2ImageTextProcessor,
    Blip2Trainer,
    Blip2TrainingArguments,
    FrozenFeatureDataset,
    build_stage2_from_stage1,
)
from modeling_blip2.processing import IMAGE_TOKEN  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Stage2Arguments:
    dataset: str = field(
        metadata={
            "help": "image folder (with metadata.jsonl), saved dataset, dataset name, or a builder over --data_files "
            "(webdataset, parquet ...)"
        }
    )
    language_model: str = field(metadata={"help": "LLM folder or Hub id (OPT, Llama-family, T5 ...)"})
    stage1: str | None = field(
        default=None, metadata={"help": "stage-1 checkpoint folder (Blip2ForPretraining); or pass --vision_model"}
    )
    qformer_init_from: str | None = field(
        default=None, metadata={"help": "with --vision_model: BERT folder to initialise the Q-Former"}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside --language_model"})
    tokenizer: str | None = field(default=None, metadata={"help": "LLM tokenizer (default: the LLM's)"})
    llm_dtype: str = field(default="float32", metadata={"help": f"frozen parts' dtype, one of {sorted(DTYPES)}"})
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
        default=None, metadata={"help": "images sharing an id share one cached feature (--cache_image_features)"}
    )
    prompt: str = field(default="", metadata={"help": "text before every caption"})
    max_length: int = 64
    augment: bool = field(default=False, metadata={"help": "random resized crop + flip (the paper's augmentation)"})
    cache_image_features: bool = field(default=False, metadata={"help": "run the frozen encoder once per image"})
    cache_dtype: str = field(
        default="float16", metadata={"help": "storage dtype of cached features (float16 halves RAM)"}
    )


def load_language_model(name_or_path: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """The frozen LLM in `dtype` (GGUF files are dequantised; their quantization_config is dropped)."""
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(name_or_path, **gguf)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    language_model = model_class.from_pretrained(name_or_path, dtype=dtype, **gguf)
    if hasattr(language_model.config, "quantization_config"):
        del language_model.config.quantization_config  # the weights are dequantised; the config must not say otherwise
    return language_model


def build_from_stage1(args: Stage2Arguments, dtype: torch.dtype) -> tuple[Blip2ForConditionalGeneration, Any]:
    """The stage-1 Q-Former and image encoder connected to `--language_model`, and the processor."""
    if args.qformer_init_from:
        raise ValueError(
            "--qformer_init_from only applies with --vision_model: with --stage1 the Q-Former is stage 1's"
        )
    stage1 = Blip2ForPretraining.from_pretrained(args.stage1)
    language_model = load_language_model(args.language_model, args.gguf_file, dtype)
    tokenizer_source = args.tokenizer or args.language_model
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_source, **({"gguf_file": args.gguf_file} if args.gguf_file and not args.tokenizer else {})
    )
    processor = Blip2ImageTextProcessor(
        saved_image_processor(args.stage1, stage1.config), tokenizer, num_query_tokens=stage1.config.num_query_tokens
    )
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))  # room for <image>
    model = build_stage2_from_stage1(
        stage1,
        language_model=language_model,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )  # stage 1's encoder, feature layer and selection come over with it
    return model, processor


def build_from_unimodal(
    args: Stage2Arguments, vision: VisionModelArguments
) -> tuple[Blip2ForConditionalGeneration, Any]:
    """The model composed from `--vision_model`, `--language_model` and `--qformer_init_from`, and its processor."""
    others = {"--stage1": args.stage1, "--gguf_file": args.gguf_file, "--tokenizer": args.tokenizer}
    given = [flag for flag, value in others.items() if value]
    if given:
        raise ValueError(
            f"--vision_model composes the model from unimodal checkpoints (the LLM and its tokenizer from "
            f"--language_model); it cannot be combined with {', '.join(given)}"
        )
    options = vision.composition_options()
    processor = Blip2ImageTextProcessor.from_unimodal_pretrained(
        vision.vision_model, args.language_model, num_query_tokens=options["num_query_tokens"]
    )
    model = Blip2ForConditionalGeneration.from_unimodal_pretrained(
        vision.vision_model, args.language_model, args.qformer_init_from, **options
    )
    if processor.image_token_id != model.config.image_token_index:
        raise ValueError(
            f"<image> is {processor.image_token_id} in the processor's tokenizer but {model.config.image_token_index} "
            "in the model"
        )
    return model, processor


def main(argv: list[str] | None = None) -> Blip2Trainer:
    parser = HfArgumentParser((Stage2Arguments, VisionModelArguments, StreamingArguments, Blip2TrainingArguments))
    args, vision, streaming, training_args = parser.parse_args_into_dataclasses(argv)
    if args.llm_dtype not in DTYPES:
        raise ValueError(f"--llm_dtype must be one of {sorted(DTYPES)}, got {args.llm_dtype!r}")
    if args.augment and args.cache_image_features:
        raise ValueError(
            "--augment changes every image every epoch: it cannot be combined with --cache_image_features"
        )
    check_streaming_options(streaming, training_args.max_steps, args.cache_image_features)
    torch.manual_seed(training_args.seed)  # the new parts' initialisation
    if vision.vision_model is not None:
        model, processor = build_from_unimodal(args, vision)
    elif args.stage1 is not None:
        vision.composition_options()  # refuses the composition flags without --vision_model
        model, processor = build_from_stage1(args, DTYPES[args.llm_dtype])
    else:
        raise ValueError("pass --stage1 (a stage-1 checkpoint) or --vision_model (a vision checkpoint)")
    model.apply_precision_policy(DTYPES[args.llm_dtype])
    model.freeze_vision_encoder()
    model.freeze_language_model()
    dataset, image_column, text_column, image_id_column = load_training_data(args, streaming, training_args.seed)
    if args.cache_image_features:
        dataset = FrozenFeatureDataset(
            dataset,
            model.vision_model,
            processor.image_processor,
            image_column=image_column,
            image_id_column=image_id_column,
            batch_size=training_args.per_device_train_batch_size,
            dtype=getattr(torch, args.cache_dtype),
        )
    collator = Blip2CaptionCollator(
        processor,
        is_encoder_decoder=model.config.is_encoder_decoder,
        prompt=args.prompt,
        max_length=args.max_length,
        prefix_lm=model.config.is_encoder_decoder,
        augment=args.augment,
        image_column=image_column,
        text_column=text_column,
        seed=training_args.seed,
        # several processes reading a stream concatenate their batches (accelerate's dispatch): one shape
        pad_to_max_length=streaming.streaming and training_args.world_size > 1,
    )
    training_args.freeze_vision_encoder = True
    trainer = Blip2Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
