"""``aquilachat convert SRC DST --to hf|flagai``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between Hugging Face and FlagAI layouts",
                       description="Convert a checkpoint between Hugging Face layout (safetensors, "
                                   "rotate_half q/k) and FlagAI layout (pytorch_model.bin, FlagAI names, "
                                   "interleaved q/k). Weights keep their dtype bit for bit.")
    p.add_argument("src", help="source checkpoint directory (either layout), bundled name or repo id")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--to", required=True, choices=["hf", "flagai"], help="layout to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import convert
    out = convert(args.src, args.dst, to=args.to)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
