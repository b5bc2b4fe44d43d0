"""``aquilachat generate --prompt P``: raw completion, no chat template."""

from __future__ import annotations

import argparse
import json
import sys

from ._common import GENERATION_DEFAULTS, add_engine_args, add_model_args, add_sampling_args, load_llm, sampling_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a raw prompt (no chat template)",
                       description="Complete a raw prompt with no chat template applied.")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: a batch)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--n", type=int, default=1, help="answers per prompt")
    add_model_args(p, template=False)
    add_engine_args(p)
    add_sampling_args(p, **GENERATION_DEFAULTS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args).replace(n=args.n)
    from ..memory import DEFAULT_MAX_NUM_SEQS
    if args.max_num_seqs is None:  # as many slots as answers, not a server's 16 (less KV cache)
        args.max_num_seqs = min(len(args.prompt) * args.n, DEFAULT_MAX_NUM_SEQS)
    llm = load_llm(args, "generate")
    outputs = llm.generate(args.prompt, params)
    status = 0
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "outputs": [
                {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                 **({"error": c.error} if c.error else {})} for c in out.outputs]}, ensure_ascii=False))
        else:
            for c in out.outputs:
                print(c.text)
        for c in out.outputs:
            if c.finish_reason == "error":
                print(f"aquilachat generate: error: {c.error}", file=sys.stderr)
                status = 1
    return status
