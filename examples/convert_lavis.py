r"""Convert a Salesforce LAVIS BLIP-2 checkpoint (.pth, EVA ViT-g) into a checkpoint folder of this package.

    python examples/convert_lavis.py --checkpoint blip2_pretrained_opt2.7b_full.pth \
        --config hub_configs/blip2-opt-2.7b --output_dir converted/blip2-opt-2.7b --allow_pickle

LAVIS's released checkpoints keep only the trained parameters: --frozen_weights_from <folder> (e.g. a download of
the official Hugging Face checkpoint) supplies the frozen ViT and LLM tensors. `.pth` files are pickles: pass
--allow_pickle only for a file you trust (it is then read with torch.load(weights_only=True)). The target layout is
inferred from the keys unless --architecture is given. The output folder is written atomically: a failed conversion
leaves an earlier one there as it was.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from modeling_blip2.conversion import ARCHITECTURES, ConversionResult, convert_lavis_checkpoint


@dataclass
class ConvertLavisArguments:
    checkpoint: str = field(metadata={"help": "LAVIS .pth file"})
    config: str = field(metadata={"help": "folder with this package's config.json, e.g. hub_configs/blip2-opt-2.7b"})
    output_dir: str = field(metadata={"help": "folder to write config.json and model.safetensors into"})
    architecture: str | None = field(
        default=None, metadata={"help": f"target layout, one of {tuple(ARCHITECTURES)} (default: inferred)"}
    )
    allow_pickle: bool = field(default=False, metadata={"help": "read the .pth pickle (trusted files only)"})
    max_shard_size: str = field(default="5GB", metadata={"help": "largest weight file before sharding"})
    frozen_weights_from: str | None = field(
        default=None, metadata={"help": "safetensors checkpoint folder supplying the frozen ViT / LLM tensors"}
    )


def main(argv: list[str] | None = None) -> ConversionResult:
    (args,) = HfArgumentParser(ConvertLavisArguments).parse_args_into_dataclasses(argv)
    result = convert_lavis_checkpoint(
        args.checkpoint,
        args.config,
        args.output_dir,
        architecture=args.architecture,
        allow_pickle=args.allow_pickle,
        max_shard_size=args.max_shard_size,
        frozen_weights_from=args.frozen_weights_from,
    )
    if result.filled_keys:
        print(f"took {len(result.filled_keys)} frozen-part tensors from {args.frozen_weights_from}")
    print(f"wrote {len(result.state_dict)} tensors ({result.architecture}) to {args.output_dir}")
    if result.dropped_keys:
        print(f"dropped {len(result.dropped_keys)} LAVIS keys: {', '.join(result.dropped_keys)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
