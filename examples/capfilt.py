"""CapFilt, the caption bootstrapping BLIP-2 pre-trains with: sample captions per web image, rank them together with
the web caption by image-text similarity, keep the best.

    python examples/capfilt.py --data_files 'shards/*.tar' --captioner runs/stage2 --scorer runs/stage1 \\
        --num_captions 10 --keep 2 --output_dir shards-capfilt
    python examples/capfilt.py --data_files 'shards/*.tar' --captioner runs/stage1 --scorer path/to/clip \\
        --output_format parquet --output_dir shards-capfilt

`--captioner`: a stage-2 folder (`Blip2ForConditionalGeneration` and its processor) or a stage-1 folder
(`Blip2ForPretraining`, captioning with its ITG head; `pretrain_stage1.py` saves its tokenizer and image processor
there). `--scorer`: a stage-1 folder (ITC similarity) or any CLIP-style dual encoder folder of transformers (CLIP,
SigLIP: model, tokenizer and image processor). Captions are sampled with nucleus sampling (`--top_p 0.9`, seeded per
shard from `--seed`). The inputs are webdataset `.tar` or `.parquet` shards; each gets an output shard of the same name
in `--output_dir`, written atomically: rerunning the same command after a stop skips the finished shards. The run's
throughput is printed and written, with its settings, to `capfilt_report.json` there. See `modeling_blip2.capfilt`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser

from modeling_blip2.capfilt import (
    CapFiltReport,
    SamplingOptions,
    check_capfilt_settings,
    load_captioner_and_scorer,
    run_capfilt,
)


@dataclass
class CapFiltArguments:
    data_files: list[str] = field(metadata={"help": "input shards: .tar / .parquet paths, glob patterns or folders"})
    captioner: str = field(metadata={"help": "stage-2 or stage-1 (ITG) model folder"})
    scorer: str = field(metadata={"help": "stage-1 (ITC) or CLIP-style dual encoder folder"})
    output_dir: str = field(metadata={"help": "folder of the output shards (one per input shard)"})
    num_captions: int = field(default=10, metadata={"help": "captions sampled per image"})
    keep: int = field(default=2, metadata={"help": "captions kept per image (the web caption competes)"})
    batch_size: int = field(default=16, metadata={"help": "images per batch (batch_size * num_captions samples)"})
    output_format: str = field(default="webdataset", metadata={"help": "webdataset (.tar) or parquet"})
    image_column: str | None = field(default=None, metadata={"help": "image column (default: the image feature)"})
    text_column: str | None = field(default=None, metadata={"help": "web caption column (default: txt/text/caption)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "also sample only from the top k tokens (0: off)"})
    temperature: float = 1.0
    max_new_tokens: int = field(default=30, metadata={"help": "longest caption, in tokens"})
    prompt: str = field(default="", metadata={"help": "stage-2 captioner: text the captions continue"})
    max_text_length: int | None = field(default=None, metadata={"help": "scorer's text truncation (model default)"})
    save_candidates: bool = field(default=False, metadata={"help": "also store every candidate with its score"})
    seed: int = 0
    device: str | None = field(default=None, metadata={"help": "default: cuda when available, else cpu"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch (default: torch's; 1 is steadiest on a busy machine)"}
    )
    no_progress: bool = field(default=False, metadata={"help": "hide the progress bars"})


def main(argv: list[str] | None = None) -> CapFiltReport:
    (args,) = HfArgumentParser(CapFiltArguments).parse_args_into_dataclasses(argv)
    # Wrong counts or no input shards are reported before any model loads.
    check_capfilt_settings(args.data_files, args.num_captions, args.keep, args.batch_size, args.output_format)
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise ValueError(f"--num_threads must be >= 1, got {args.num_threads}")
        torch.set_num_threads(args.num_threads)
    sampling = SamplingOptions(
        top_p=args.top_p,
        temperature=args.temperature,
        top_k=args.top_k or None,
        max_new_tokens=args.max_new_tokens,
    )
    captioner, scorer = load_captioner_and_scorer(
        args.captioner,
        args.scorer,
        sampling,
        prompt=args.prompt,
        max_text_length=args.max_text_length,
        device=args.device,
        dtype=getattr(torch, args.dtype),
    )
    report = run_capfilt(
        args.data_files,
        captioner,
        scorer,
        args.output_dir,
        num_captions=args.num_captions,
        keep=args.keep,
        batch_size=args.batch_size,
        output_format=args.output_format,
        image_column=args.image_column,
        text_column=args.text_column,
        seed=args.seed,
        save_candidates=args.save_candidates,
        progress=not args.no_progress,
        settings={
            "captioner": args.captioner,
            "scorer": args.scorer,
            **asdict(sampling),
            "device": str(scorer.model.device),
            "dtype": args.dtype,
            "num_threads": torch.get_num_threads(),
        },
    )
    print(json.dumps(asdict(report), indent=2))
    if report.images_per_second is not None:
        print(f"CapFilt: {report.images} images in {report.seconds:.1f} s = {report.images_per_second:.2f} images/s")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
