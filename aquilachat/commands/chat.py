"""``aquilachat chat [PROMPT]``: one streamed answer, or an interactive chat with history."""

from __future__ import annotations

import argparse
import sys

from ._common import GENERATION_DEFAULTS, add_engine_args, add_model_args, add_sampling_args, load_llm, sampling_params

HELP_TEXT = ("commands: /reset clears the history, /exit (or Ctrl-D) quits; the oldest exchanges are "
             "dropped when the history outgrows the context window, and an answer is cut at the window")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model (one answer, or interactive)",
                       description="Chat with a model in its chat template. With PROMPT: print one "
                                   "streamed answer and exit. Without: an interactive chat that keeps "
                                   "the history (" + HELP_TEXT + ").")
    p.add_argument("prompt", nargs="?", help="a single question; omit for an interactive chat")
    p.add_argument("--system", default=None, help="replace the template's system message")
    add_model_args(p)
    add_engine_args(p, max_num_seqs=1)
    add_sampling_args(p, **GENERATION_DEFAULTS)
    p.set_defaults(func=run)


def _fit_history(llm, system, history, line, params) -> list[dict]:
    """Drop the oldest exchanges until the prompt leaves room for an answer (at least a quarter of
    the context window, or max_tokens if smaller); says so on stderr."""
    dropped = 0
    room = min(params.max_tokens, llm.engine.max_model_len // 4)
    while history and len(llm.encode_chat(system + history + [{"role": "user", "content": line}])) + room > llm.engine.max_model_len:
        history[:2] = []
        dropped += 1
    if dropped:
        print(f"(the {dropped} oldest exchange(s) no longer fit the {llm.engine.max_model_len}-token "
              "context and were dropped)", file=sys.stderr)
    return system + history + [{"role": "user", "content": line}]


def _answer(llm, messages, params, out) -> tuple[str, object]:
    text = []
    for delta in llm.stream_chat(messages, params, cap_to_context=True):
        if not text:  # the answer starts after "Assistant:" with a space; not worth printing
            delta = delta.lstrip()
            if not delta:
                continue
        out.write(delta)
        out.flush()
        text.append(delta)
    out.write("\n")
    out.flush()
    return "".join(text), llm.last_output


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate before loading the model
    llm = load_llm(args, "chat", template=args.template)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    if args.prompt is not None:
        _, output = _answer(llm, system + [{"role": "user", "content": args.prompt}], params, sys.stdout)
        if output.finish_reason == "error":
            print(f"aquilachat chat: error: {output.error}", file=sys.stderr)
            return 1
        return 0
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"aquilachat chat with {args.model} ({llm.template.name}); {HELP_TEXT}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        messages = _fit_history(llm, system, history, line, params)
        try:
            text, output = _answer(llm, messages, params, sys.stdout)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            continue
        if output.finish_reason == "error":
            print(f"aquilachat chat: error: {output.error}", file=sys.stderr)
            continue
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]
