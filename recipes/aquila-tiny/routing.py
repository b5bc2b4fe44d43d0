"""Step 9 of the aquila-tiny recipe (not run by default): how often requests are routed to an image instruction.

On ``routing_eval.json`` (``instructions.py``): 50 held-out drawing requests, each answered
greedily (temperature 0, at most 96 tokens) in the aquila-chat template; correct when the answer
holds a ``#text2image#`` block that :func:`aquilachat.instructions.parse_instruction` accepts.
50 ordinary questions: a false route is any instruction block in the answer. Target (issue 18):
at least 80 % correct routes, no false routes. Also counted: the routed answers whose image prompt
is taken from the request (:func:`prompt_from_request`: every word of the prompt, every character
for Chinese, occurs in the request), a rough measure of whether the prompt names the right subject.
Writes ``routing.json`` next to the model's run.

With ``--context system`` or ``--context exchange`` every request (drawing and ordinary) comes after
a system message, or after one earlier user turn and answer, taken in turn from the evaluation
file's ``systems`` / ``exchanges`` lists (``pools.py --pool 5`` writes them): request ``i`` gets entry
``i mod len``. This is how the server and the chat page send a request inside a conversation.

    python recipes/aquila-tiny/routing.py [--model DIR] [--eval FILE] [--out FILE] [--context none|system|exchange]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from aquilachat.instructions import TEXT2IMAGE, parse_instruction
from aquilachat.llm import LLM
from aquilachat.sampling_params import SamplingParams


def prompt_from_request(prompt: str, request: str) -> bool:
    """Whether every word of ``prompt`` (Latin letters and digits) and every CJK character of it
    occurs in ``request`` (case-insensitive); punctuation and spaces are ignored. An empty prompt
    is not taken from anything: ``False``."""
    units = re.findall(r"[a-z0-9]+|[\u4e00-\u9fff]", prompt.lower())
    words = set(re.findall(r"[a-z0-9]+", request.lower()))
    return bool(units) and all(u in words if u.isascii() else u in request for u in units)


def in_context(requests: list[str], questions: dict, context: str, source: str = "the evaluation file"
               ) -> list[list[dict]]:
    """Each request as an OpenAI-form conversation: alone (``"none"``), after a system message
    (``"system"``) or after an earlier exchange (``"exchange"``), entry ``i mod len`` of the
    evaluation file's ``systems`` (strings) / ``exchanges`` (``[question, answer]`` pairs).

    Raises:
        SystemExit: ``source`` has no such list, or an entry of the wrong shape (named by index).
    """
    if context == "none":
        return [[{"role": "user", "content": r}] for r in requests]
    key = {"system": "systems", "exchange": "exchanges"}[context]
    pool = questions.get(key)
    if not pool or not isinstance(pool, list):
        raise SystemExit(f"routing.py: --context {context} needs a non-empty {key!r} list in {source}")
    before = []  # the messages before each entry's request
    for i, entry in enumerate(pool):
        if context == "system" and isinstance(entry, str):
            before.append([{"role": "system", "content": entry}])
        elif context == "exchange" and isinstance(entry, list) and len(entry) == 2 and all(isinstance(s, str) for s in entry):
            before.append([{"role": "user", "content": entry[0]}, {"role": "assistant", "content": entry[1]}])
        else:
            shape = "a string" if context == "system" else "a [question, answer] pair of strings"
            raise SystemExit(f"routing.py: {source}: {key}[{i}] must be {shape}, got {entry!r}")
    return [before[i % len(before)] + [{"role": "user", "content": r}] for i, r in enumerate(requests)]


def main() -> None:
    run = Path(__file__).resolve().parents[2] / "runs" / "aquila-tiny"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(run / "instructions" / "final"))
    ap.add_argument("--eval", type=Path, default=run / "data" / "routing_eval.json")
    ap.add_argument("--out", type=Path, default=run / "routing.json")
    ap.add_argument("--context", choices=("none", "system", "exchange"), default="none",
                    help="put each request after a system message or an earlier exchange of the evaluation file")
    args = ap.parse_args()
    questions = json.loads(args.eval.read_text(encoding="utf-8"))
    llm = LLM(args.model, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=96)
    started = time.perf_counter()
    report: dict = {"model": args.model, "context": args.context, "answers": {}}
    for group in ("drawing", "ordinary"):
        outs = llm.chat(in_context(questions[group], questions, args.context, str(args.eval)), params)
        report["answers"][group] = []
        for q, o in zip(questions[group], outs):
            found = parse_instruction(o.text)
            report["answers"][group].append({"request": q, "answer": o.text, "kind": found.kind if found else None,
                                             "prompt_from_request": bool(found) and prompt_from_request(found.prompt, q)})
    drawing, ordinary = report["answers"]["drawing"], report["answers"]["ordinary"]
    report["drawing_routed"] = f"{sum(a['kind'] == TEXT2IMAGE for a in drawing)}/{len(drawing)}"
    report["drawing_prompt_from_request"] = (f"{sum(a['kind'] == TEXT2IMAGE and a['prompt_from_request'] for a in drawing)}"
                                             f"/{len(drawing)}")
    report["ordinary_false_routes"] = f"{sum(a['kind'] is not None for a in ordinary)}/{len(ordinary)}"
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "answers"}, ensure_ascii=False))


if __name__ == "__main__":
    main()
