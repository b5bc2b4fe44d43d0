"""Arguments shared by several commands (model choice, sampling fields with OpenAI names)."""

from __future__ import annotations

import argparse
import sys

from ..chat_format import CHAT_SAMPLING_DEFAULTS
from ..errors import ValidationError
from ..sampling_params import CLI_FIELDS, PARAMS, SamplingParams

#: Sampling defaults of ``chat`` and ``generate``: a little more focused than SamplingParams's
#: neutral 1.0 / 1.0, as chat front ends default to.
#: The chat/generate sampling defaults, the same that exports declare (generation_config.json, GGUF).
GENERATION_DEFAULTS = dict(CHAT_SAMPLING_DEFAULTS)


def add_model_args(p: argparse.ArgumentParser, *, template: bool = True) -> None:
    p.add_argument("--model", default="aquila-tiny",
                   help="bundled model name, checkpoint directory (HF or FlagAI layout) or HF repo id "
                        "(default: the bundled aquila-tiny)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the linear layers at load time (CPU; activations in "
                        "bfloat16 with --dtype auto); a checkpoint written by 'aquilachat quantize' loads "
                        "quantized without it. See docs/generation.md")
    if template:
        from ..chat_format import TEMPLATES
        p.add_argument("--template", default=None, choices=list(TEMPLATES),
                       help="chat template (default: the one the checkpoint declares, else aquila-chat)")


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
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the keys and values of prompt prefixes across requests (prefix caching "
                        "is on by default; outputs are the same either way)")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode steps the engine may run in one call while every answer decodes greedily "
                        "(vLLM's multi-step decoding): the same tokens, faster for small models, streamed in "
                        "bursts of this many tokens (default 1)")


#: Models at least this large (bytes of weights) get their memory plan printed when a command loads them.
REPORT_PLAN_BYTES = 10**9


def load_llm(args: argparse.Namespace, command: str, **kwargs):
    """The ``LLM`` of :func:`add_model_args` / :func:`add_engine_args`; for a model of at least
    :data:`REPORT_PLAN_BYTES` its memory plan goes to stderr (what was decided, and why)."""
    from ..llm import LLM
    llm = LLM(args.model, **engine_kwargs(args), **kwargs)
    plan = llm.memory_plan
    if plan.weight_bytes >= REPORT_PLAN_BYTES:
        print(f"aquilachat {command}: {plan.summary()}; dtype: {plan.dtype_reason}", file=sys.stderr)
    return llm


def engine_kwargs(args: argparse.Namespace) -> dict:
    """``LLM`` keyword arguments from :func:`add_model_args` and :func:`add_engine_args`."""
    return {"dtype": args.dtype, "device": args.device, "quantization": args.quantization,
            "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.max_model_len, "kv_cache_memory": args.kv_cache_memory,
            "enable_prefix_caching": args.enable_prefix_caching, "num_scheduler_steps": args.num_scheduler_steps}


def add_sampling_args(p: argparse.ArgumentParser, **defaults) -> dict[str, argparse.Action]:
    """One option per :class:`~aquilachat.sampling_params.SamplingParams` field the command line
    takes (:data:`~aquilachat.sampling_params.CLI_FIELDS`; ``--top-p`` for ``top_p``), its help
    giving the field's meaning, range and default. ``defaults`` replaces SamplingParams's defaults
    for this command. Returns the options by field name (a caller may reword a help).

    The values are checked when :func:`sampling_params` builds the parameters, with the ranges
    every other entry point uses.
    """
    g = p.add_argument_group("sampling (OpenAI / vLLM names)")
    actions = {}
    for name in CLI_FIELDS:
        spec = PARAMS[name]
        default = defaults.get(name, spec.default)
        flag = "--" + name.replace("_", "-")
        help = (spec.doc + (f" Range: {spec.range}." if spec.range is not None else "")).replace("%", "%%")
        if spec.kind is list:
            actions[name] = g.add_argument(flag, action="append", default=default, help=help + " Repeatable.")
        elif spec.kind is dict:  # logit_bias: --logit-bias ID=BIAS, repeatable
            actions[name] = g.add_argument(flag, action="append", default=default, metavar="ID=VALUE",
                                           help=help + " Repeatable: --logit-bias 1234=-100.")
        elif spec.kind is bool:
            actions[name] = g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            actions[name] = g.add_argument(flag, type=spec.kind, default=default,
                                           help=help + f" Default: {'none' if default is None else default}.")
    return actions


def sampling_params(args: argparse.Namespace, **overrides) -> SamplingParams:
    """The :class:`SamplingParams` of the options :func:`add_sampling_args` added, with ``overrides``.

    Raises:
        ValidationError: a value out of range or a malformed ``ID=VALUE``, naming the field.
    """
    values = {name: getattr(args, name) for name in CLI_FIELDS}
    for name in CLI_FIELDS:
        if PARAMS[name].kind is dict and isinstance(values[name], list):
            values[name] = _pairs(name, values[name])
    return SamplingParams(**{**values, **overrides})


def _pairs(name: str, items: list[str]) -> dict[str, float]:
    """``["1234=-100", ...]`` -> ``{"1234": -100.0}`` (ids are checked by SamplingParams)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValidationError(name, f"{name}: --{name.replace('_', '-')} takes ID=VALUE (e.g. 1234=-100), got {item!r}")
    return out
