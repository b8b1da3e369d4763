"""Caption images with a BLIP-2 checkpoint (local folder or Hub id); images from files or URLs.

    python examples/caption.py --model Salesforce/blip2-opt-2.7b --images cat.jpg https://example.com/dog.png
    python examples/caption.py --model hub_configs/tiny-random --random_init     # no weights: noise

`--num_beams 1` is greedy search; `--prompt "a photo of"` is the paper's prompt for fine-tuned captioning models
(zero-shot models caption from an empty prompt); the paper decodes with 5 beams, at most 30 and at least 8 tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_model_and_processor  # noqa: E402

from modeling_blip2 import Blip2ImageToTextPipeline  # noqa: E402


@dataclass
class CaptionArguments:
    model: str = field(default="hub_configs/tiny-random", metadata={"help": "checkpoint folder or Hub id"})
    images: list[str] = field(default_factory=list, metadata={"help": "image files or URLs (default: a test image)"})
    prompt: str = field(default="", metadata={"help": 'text the caption continues, e.g. "a photo of"'})
    num_beams: int = field(default=1, metadata={"help": "1 = greedy search"})
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    batch_size: int = 8
    random_init: bool = field(default=False, metadata={"help": "random weights from the checkpoint's config"})
    seed: int = 0


def main(argv: list[str] | None = None) -> list[str]:
    (args,) = HfArgumentParser(CaptionArguments).parse_args_into_dataclasses(argv)
    model, processor = load_model_and_processor(args.model, args.random_init, args.seed)
    captioner = Blip2ImageToTextPipeline(model=model, processor=processor)
    images = args.images or [Image.fromarray(np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8))]
    outputs = captioner(
        list(images),
        text=args.prompt or None,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        generate_kwargs={"num_beams": args.num_beams, "min_new_tokens": args.min_new_tokens},
    )
    captions = [output[0]["generated_text"].strip() for output in outputs]
    for name, caption in zip(args.images or ["<test image>"], captions, strict=True):
        print(f"{name}: {caption}")
    return captions


if __name__ == "__main__":
    main(sys.argv[1:])
