r"""Export a checkpoint folder of this package to the stock transformers `blip-2` layout.

    python examples/export_to_transformers.py --source_dir converted/blip2-opt-2.7b \
        --output_dir exported/blip2-opt-2.7b

The result loads with transformers' built-in `Blip2ForConditionalGeneration` (or `Blip2ForImageTextRetrieval` for
stage-1 and retrieval checkpoints) without remote code, and with engines that read that layout; a processor saved
with the checkpoint is exported for the stock `Blip2Processor`. The output folder is written atomically: if anything
fails (a corrupt source file, a full disk), an earlier export there is left as it was. Checkpoints with a
post-encoder LayerNorm epsilon of their own (LAVIS: 1e-5) need --allow_post_layernorm_eps_change: the stock model
uses the in-block epsilon there, which changes outputs slightly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from modeling_blip2.conversion import ExportResult, export_to_transformers


@dataclass
class ExportArguments:
    source_dir: str = field(metadata={"help": "checkpoint folder of this package (model_type modeling_blip2)"})
    output_dir: str = field(metadata={"help": "folder to write the stock transformers checkpoint into"})
    allow_post_layernorm_eps_change: bool = field(
        default=False, metadata={"help": "export even if the post-encoder LayerNorm epsilon changes (warns)"}
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "largest weight file before sharding"})


def main(argv: list[str] | None = None) -> ExportResult:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(argv)
    result = export_to_transformers(
        args.source_dir,
        args.output_dir,
        allow_post_layernorm_eps_change=args.allow_post_layernorm_eps_change,
        max_shard_size=args.max_shard_size,
    )
    print(f"wrote a stock {result.architecture} checkpoint to {result.output_dir}")
    if result.dropped_keys:
        print(f"dropped (no place in the stock layout): {', '.join(result.dropped_keys)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
