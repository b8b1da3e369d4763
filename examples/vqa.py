"""Zero-shot visual question answering with a BLIP-2 checkpoint (local folder or Hub id).

    python examples/vqa.py --model Salesforce/blip2-flan-t5-xl --images cat.jpg --questions "what animal is this?"
    python examples/vqa.py --model hub_configs/tiny-random --random_init --questions "what is it?"   # noise

The prompt is the paper's: "Question: {} Answer:" for OPT-style LLMs, "Question: {} Short answer:" for Flan-T5;
5 beams and 10 new tokens by default. One question for all images, or one per image.
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

from modeling_blip2 import Blip2VisualQuestionAnsweringPipeline  # noqa: E402


@dataclass
class VqaArguments:
    model: str = field(default="hub_configs/tiny-random", metadata={"help": "checkpoint folder or Hub id"})
    images: list[str] = field(default_factory=list, metadata={"help": "image files or URLs (default: a test image)"})
    questions: list[str] = field(default_factory=lambda: ["what is in the picture?"])
    num_beams: int = field(default=5, metadata={"help": "1 = greedy search"})
    max_new_tokens: int = 10
    batch_size: int = 8
    random_init: bool = field(default=False, metadata={"help": "random weights from the checkpoint's config"})
    seed: int = 0


def main(argv: list[str] | None = None) -> list[str]:
    (args,) = HfArgumentParser(VqaArguments).parse_args_into_dataclasses(argv)
    model, processor = load_model_and_processor(args.model, args.random_init, args.seed)
    answerer = Blip2VisualQuestionAnsweringPipeline(model=model, processor=processor)
    images = args.images or [Image.fromarray(np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8))]
    questions = args.questions * len(images) if len(args.questions) == 1 else args.questions
    outputs = answerer(
        list(images),
        question=questions,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        generate_kwargs={"num_beams": args.num_beams},
    )
    answers = [output[0]["answer"] for output in outputs]
    for name, question, answer in zip(args.images or ["<test image>"] * len(answers), questions, answers, strict=True):
        print(f"{name}: Q: {question} A: {answer}")
    return answers


if __name__ == "__main__":
    main(sys.argv[1:])
