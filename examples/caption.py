"""Caption images with a BLIP-2 checkpoint folder.

    python examples/caption.py --model hub_configs/tiny-random --random-init

`--random-init` builds the model from the folder's config with random weights (the `tiny-random` folder ships no
weights): the pipeline runs end to end, the captions are noise. Without it the folder must hold weights (ours or an
official transformers-layout BLIP-2 checkpoint).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BlipImageProcessorPil, HfArgumentParser

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration


@dataclass
class CaptionArguments:
    model: str = field(default="hub_configs/tiny-random", metadata={"help": "checkpoint folder"})
    images: list[str] = field(default_factory=list, metadata={"help": "image files (default: a synthetic image)"})
    prompt: str = field(default="", metadata={"help": 'text the caption continues, e.g. "a photo of"'})
    random_init: bool = field(default=False, metadata={"help": "random weights from the folder's config"})
    num_beams: int = 1
    max_new_tokens: int = 20
    seed: int = 0


def load_images(paths: list[str]) -> list[Image.Image]:
    if not paths:
        gradient = np.linspace(0, 255, 64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
        return [Image.fromarray(gradient.astype(np.uint8))]
    return [Image.open(Path(path)).convert("RGB") for path in paths]


def main(argv: list[str] | None = None) -> list[str]:
    (args,) = HfArgumentParser(CaptionArguments).parse_args_into_dataclasses(argv)
    torch.manual_seed(args.seed)
    if args.random_init:
        model = Blip2ForConditionalGeneration(Blip2Config.from_pretrained(args.model))
        print("NOTE: randomly initialised model; the captions below are noise, not a trained model's output.")
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(args.model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    image_processor = BlipImageProcessorPil.from_pretrained(args.model)

    images = load_images(args.images)
    pixel_values = image_processor(images=images, return_tensors="pt").pixel_values
    generate_kwargs = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    if args.prompt:
        prompt = tokenizer([args.prompt] * len(images), return_tensors="pt", padding=True)
        generate_kwargs.update(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask)
    generated = model.generate(pixel_values, **generate_kwargs)
    captions = [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    for name, caption in zip(args.images or ["<synthetic image>"], captions, strict=True):
        print(f"{name}: {caption}")
    return captions


if __name__ == "__main__":
    main(sys.argv[1:])
