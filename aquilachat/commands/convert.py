"""``aquilachat convert SRC DST --to hf|flagai|gguf [--outtype f32|f16|bf16|q8_0] [--template T]``."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from ..chat_format import TEMPLATES
    p = sub.add_parser("convert", help="convert a checkpoint to Hugging Face, FlagAI or GGUF layout",
                       description="Convert a checkpoint between Hugging Face layout (safetensors, "
                                   "rotate_half q/k) and FlagAI layout (pytorch_model.bin, FlagAI names, "
                                   "interleaved q/k), keeping the weights bit for bit, or write one GGUF "
                                   "file for llama.cpp and Ollama (with an Ollama Modelfile beside it). "
                                   "Hugging Face and GGUF exports carry the chat template; see "
                                   "docs/running-elsewhere.md.")
    p.add_argument("src", help="source checkpoint directory (either layout), bundled name or repo id")
    p.add_argument("dst", help="destination directory (gguf: a directory or a .gguf file path)")
    p.add_argument("--to", required=True, choices=["hf", "flagai", "gguf"], help="layout to write")
    p.add_argument("--outtype", default=None,  # checked by write_gguf (export_gguf.OUTTYPES): no torch import here
                   help="gguf tensor type: f32, f16, bf16 or q8_0 (default: bf16 for a bfloat16 checkpoint, "
                        "else f16); norms stay f32")
    p.add_argument("--template", choices=list(TEMPLATES), default=None,
                   help="chat template the export declares (default: the source's, else aquila-chat)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.to != "gguf":
        from ..checkpoint import convert
        out = convert(args.src, args.dst, to=args.to, outtype=args.outtype, template=args.template)
        print(f"wrote {args.to} checkpoint to {out}")
        return 0
    from ..export_gguf import write_gguf
    result = write_gguf(args.src, args.dst, outtype=args.outtype, template=args.template)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {result.path} ({result.outtype}, {result.path.stat().st_size / 2**20:.1f} MiB, "
          f"pre-tokenizer {result.pre_tokenizer!r}, chat template {result.template}) and {result.modelfile}")
    return 0
