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
                       help="chat template (default aquila-chat)")


def add_engine_args(p: argparse.ArgumentParser, *, max_num_seqs: int | None = None) -> None:
    """The memory plan's knobs (:mod:`aquilachat.memory`), as vLLM names them."""
    g = p.add_argument_group("memory (sized to fit before loading; see docs/generation.md)")
    g.add_argument("--max-num-seqs", type=int, default=max_num_seqs,
                   help="most sequences decoded together, i.e. KV cache slots (default 16, lowered to what "
                        "the KV cache budget holds)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (default: the model's; shortened when not even one slot fits)")
    g.add_argument("--kv-cache-memory", default=None, metavar="SIZE|FRACTION",
                   help="KV cache budget: a size (4GB, 512MiB) or a fraction in (0, 1] of the memory left "
                        "after the weights (default: 90%% of it, no more than the slots need)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """``LLM`` keyword arguments from :func:`add_model_args` and :func:`add_engine_args`."""
    return {"dtype": args.dtype, "device": args.device, "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.max_model_len, "kv_cache_memory": args.kv_cache_memory}


def add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling (OpenAI / vLLM names)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus mass in (0, 1] (default 0.9)")
    g.add_argument("--top-k", type=int, default=0, help="0 disables (default)")
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
