"""Step 9 of the aquila-tiny recipe: how often the model routes a request to an image instruction.

On ``routing_eval.json`` (``instructions.py``): 50 held-out drawing requests, each answered
greedily (temperature 0, at most 96 tokens) in the aquila-chat template; correct when the answer
holds a ``#text2image#`` block that :func:`aquilachat.instructions.parse_instruction` accepts.
50 ordinary questions: a false route is any instruction block in the answer. Target (issue 18):
at least 80 % correct routes, no false routes. Writes ``routing.json`` next to the model's run.

    python recipes/aquila-tiny/routing.py [--model DIR] [--eval FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aquilachat.instructions import TEXT2IMAGE, parse_instruction
from aquilachat.llm import LLM
from aquilachat.sampling_params import SamplingParams


def main() -> None:
    run = Path(__file__).resolve().parents[2] / "runs" / "aquila-tiny"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(run / "instructions" / "final"))
    ap.add_argument("--eval", type=Path, default=run / "data" / "routing_eval.json")
    ap.add_argument("--out", type=Path, default=run / "routing.json")
    args = ap.parse_args()
    questions = json.loads(args.eval.read_text(encoding="utf-8"))
    llm = LLM(args.model, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=96)
    started = time.perf_counter()
    report: dict = {"model": args.model, "answers": {}}
    for group in ("drawing", "ordinary"):
        outs = llm.chat([[{"role": "user", "content": q}] for q in questions[group]], params)
        report["answers"][group] = [{"request": q, "answer": o.text,
                                     "kind": (found.kind if (found := parse_instruction(o.text)) else None)}
                                    for q, o in zip(questions[group], outs)]
    drawing, ordinary = report["answers"]["drawing"], report["answers"]["ordinary"]
    report["drawing_routed"] = f"{sum(a['kind'] == TEXT2IMAGE for a in drawing)}/{len(drawing)}"
    report["ordinary_false_routes"] = f"{sum(a['kind'] is not None for a in ordinary)}/{len(ordinary)}"
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "answers"}, ensure_ascii=False))


if __name__ == "__main__":
    main()
