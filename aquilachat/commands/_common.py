"""Arguments shared by several commands (model choice, sampling fields with OpenAI names)."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, *, template: bool = True) -> None:
    p.add_argument("--model", default="aquila-tiny",
                   help="bundled model name, checkpoint directory (HF or FlagAI layout) or HF repo id "
                        "(default: the bundled aquila-tiny)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    if template:
        from ..chat_format import TEMPLATES
        p.add_argument("--template", default=None, choices=list(TEMPLATES),
                       help="chat template (default: the one the checkpoint declares, else aquila-chat)")


def add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int = 256) -> None:
    from ..chat_format import CHAT_SAMPLING_DEFAULTS as d  # also what exports declare
    g = p.add_argument_group("sampling (OpenAI / vLLM names)")
    g.add_argument("--temperature", type=float, default=d["temperature"], help=f"0 = greedy (default {d['temperature']})")
    g.add_argument("--top-p", type=float, default=d["top_p"], help=f"nucleus mass in (0, 1] (default {d['top_p']})")
    g.add_argument("--top-k", type=int, default=d["top_k"], help=f"0 disables (default {d['top_k']})")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"default {max_tokens}")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    from ..sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop)
