"""``aquilachat quantize SRC DST --method int8|int4 [--group-size G] [--dtype bfloat16|float32]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..chat_format import TEMPLATES
    p = sub.add_parser("quantize", help="write a weight-only int8 / int4 copy of a checkpoint",
                       description="Quantize the linear layers of a float checkpoint (weight-only: int8 per "
                                   "output channel, or int4 in groups) and write a Hugging Face directory with "
                                   "a quantization_config in config.json that loads directly with --model DST. "
                                   "Weights are converted one at a time. See docs/generation.md (Quantization).")
    p.add_argument("src", help="float checkpoint directory (HF or FlagAI layout), bundled name or repo id")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--method", required=True, choices=["int8", "int4"], help="weight format")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 only: inputs per scale and zero, 32, 64, 128 or 256 (default 32)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the other weights and of the scales (default bfloat16); load with the same "
                        "--dtype to run in it (--dtype auto runs a quantized model in bfloat16)")
    p.add_argument("--template", choices=list(TEMPLATES), default=None,
                   help="chat template the serving files declare (default: the source's, else aquila-chat)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import quantize_checkpoint
    from ..memory import format_bytes
    from pathlib import Path
    qconfig = quantize_checkpoint(args.src, args.dst, method=args.method, group_size=args.group_size,
                                  dtype=args.dtype, template=args.template)
    size = sum(f.stat().st_size for f in Path(args.dst).glob("*.safetensors"))
    print(f"wrote {qconfig.description} checkpoint to {args.dst} ({format_bytes(size)} of weights)")
    return 0
