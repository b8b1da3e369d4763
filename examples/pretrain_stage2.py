"""Stage 2 of BLIP-2: connect a stage-1 Q-Former to a frozen LLM and train it to caption (generative learning).

    python examples/pretrain_stage2.py --dataset path/to/imagefolder --stage1 runs/stage1 \\
        --language_model facebook/opt-2.7b --output_dir runs/stage2 --max_steps 1000 --llm_dtype bfloat16

Decoder-only LLMs learn with the LM loss (captions end with the LLM's end token), encoder-decoder LLMs with the
prefix-LM loss (each caption split at a random word). The image encoder and the LLM are frozen (and kept in
`--llm_dtype`); the query tokens, Q-Former, post-LayerNorm and projection train in fp32. A GGUF LLM file loads with
`--gguf_file`. Every `Blip2TrainingArguments` option works.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_stage1 import load_image_text_dataset  # noqa: E402

from modeling_blip2 import (  # noqa: E402
    Blip2CaptionCollator,
    Blip2ForPretraining,
    Blip2ImageTextProcessor,
    Blip2Trainer,
    Blip2TrainingArguments,
    blip2_image_processor,
    build_stage2_from_stage1,
)
from modeling_blip2.processing import IMAGE_TOKEN  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Stage2Arguments:
    dataset: str = field(metadata={"help": "image folder (with metadata.jsonl), saved dataset or dataset name"})
    stage1: str = field(metadata={"help": "stage-1 checkpoint folder (Blip2ForPretraining)"})
    language_model: str = field(metadata={"help": "LLM folder or Hub id (OPT, Llama-family, T5 ...)"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside --language_model"})
    tokenizer: str | None = field(default=None, metadata={"help": "LLM tokenizer (default: the LLM's)"})
    llm_dtype: str = field(default="float32", metadata={"help": f"frozen parts' dtype, one of {sorted(DTYPES)}"})
    dataset_split: str = "train"
    image_column: str = "image"
    text_column: str = "text"
    image_id_column: str | None = None
    prompt: str = field(default="", metadata={"help": "text before every caption"})
    max_length: int = 64


def load_language_model(name_or_path: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """The frozen LLM in `dtype` (GGUF files are dequantised; their quantization_config is dropped)."""
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(name_or_path, **gguf)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    language_model = model_class.from_pretrained(name_or_path, dtype=dtype, **gguf)
    if hasattr(language_model.config, "quantization_config"):
        del language_model.config.quantization_config  # the weights are dequantised; the config must not say otherwise
    return language_model


def main(argv: list[str] | None = None) -> Blip2Trainer:
    parser = HfArgumentParser((Stage2Arguments, Blip2TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(argv)
    if args.llm_dtype not in DTYPES:
        raise ValueError(f"--llm_dtype must be one of {sorted(DTYPES)}, got {args.llm_dtype!r}")
    stage1 = Blip2ForPretraining.from_pretrained(args.stage1)
    language_model = load_language_model(args.language_model, args.gguf_file, DTYPES[args.llm_dtype])
    tokenizer_source = args.tokenizer or args.language_model
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_source, **({"gguf_file": args.gguf_file} if args.gguf_file and not args.tokenizer else {})
    )
    processor = Blip2ImageTextProcessor(
        blip2_image_processor(stage1.config.vision_config.image_size),
        tokenizer,
        num_query_tokens=stage1.config.num_query_tokens,
    )
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))  # room for <image>
    model = build_stage2_from_stage1(
        stage1, language_model=language_model, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    )
    model.apply_precision_policy(DTYPES[args.llm_dtype])
    model.freeze_vision_encoder()
    model.freeze_language_model()
    collator = Blip2CaptionCollator(
        processor,
        is_encoder_decoder=model.config.is_encoder_decoder,
        prompt=args.prompt,
        max_length=args.max_length,
        prefix_lm=model.config.is_encoder_decoder,
        image_column=args.image_column,
        text_column=args.text_column,
        seed=training_args.seed,
    )
    training_args.freeze_vision_encoder = True
    trainer = Blip2Trainer(
        model=model, args=training_args, train_dataset=load_image_text_dataset(args), data_collator=collator
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
