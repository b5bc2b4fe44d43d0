"""The aquila-tiny recipe's routing evaluation in conversations (recipes/aquila-tiny/routing.py
``--context``) and pool 5 (recipes/aquila-tiny/pools.py), whose contexts it reads.

The oracle for ``--context`` is the engine answering the same conversations, written out here by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aquilachat.checkpoint import BUNDLED_MODELS
from aquilachat.llm import LLM
from aquilachat.sampling_params import SamplingParams
from tests.helpers import load_script, make_tiny_model

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "aquila-tiny"
EVAL = {"drawing": ["画一只猫", "Draw a cat.", "给我画一座山"],
        "ordinary": ["What is the capital of France?", "介绍一下北京。", "Could you write a poem?"],
        "systems": ["Answer briefly.", "你是一个助手。"],
        "exchanges": [["Hi!", "Hello! How can I help?"], ["1 + 1?", "2."]]}


def by_hand(request: str, i: int, context: str) -> list[dict]:
    """Request ``i`` of a group in ``context``, as routing.py's docstring says it is sent."""
    if context == "system":
        return [{"role": "system", "content": EVAL["systems"][i % 2]}, {"role": "user", "content": request}]
    q, a = EVAL["exchanges"][i % 2]
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}, {"role": "user", "content": request}]


@pytest.fixture(scope="module")
def routing():
    return load_script(RECIPE / "routing.py", "aquila_tiny_routing")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("routing_tiny")
    make_tiny_model(out, BUNDLED_MODELS["aquila-tiny"], seed=5)
    return out


def test_in_context_takes_contexts_in_turn(routing):
    reqs = EVAL["drawing"]
    assert routing.in_context(reqs, EVAL, "none") == [[{"role": "user", "content": r}] for r in reqs]
    system = routing.in_context(reqs, EVAL, "system")
    assert [c[0]["content"] for c in system] == ["Answer briefly.", "你是一个助手。", "Answer briefly."]
    assert all(c[0]["role"] == "system" and c[1] == {"role": "user", "content": r} for c, r in zip(system, reqs))
    for context in ("system", "exchange"):
        assert routing.in_context(reqs, EVAL, context) == [by_hand(r, i, context) for i, r in enumerate(reqs)]
    with pytest.raises(SystemExit, match="'systems' list in eval.json"):
        routing.in_context(reqs, {"drawing": reqs, "ordinary": []}, "system", "eval.json")
    with pytest.raises(SystemExit, match=r"eval.json: exchanges\[1\] must be a \[question, answer\] pair"):
        routing.in_context(reqs, {**EVAL, "exchanges": [["Hi!", "Hello!"], "Hi!"]}, "exchange", "eval.json")


@pytest.mark.parametrize("context", ["system", "exchange"])
def test_context_answers_are_the_engines_answers_to_those_conversations(routing, tiny, tmp_path, context):
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps(EVAL, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "routing.json"
    subprocess.run([sys.executable, str(RECIPE / "routing.py"), "--model", str(tiny), "--eval", str(ev),
                    "--out", str(out), "--context", context], check=True, capture_output=True, cwd=REPO)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["context"] == context
    llm = LLM(str(tiny), device="cpu")
    params = SamplingParams(temperature=0, max_tokens=96)
    for group in ("drawing", "ordinary"):
        convs = [by_hand(r, i, context) for i, r in enumerate(EVAL[group])]
        expected = [o.text for o in llm.chat(convs, params)]
        assert [a["answer"] for a in report["answers"][group]] == expected
    alone = [o.text for o in llm.chat([[{"role": "user", "content": q}] for q in EVAL["ordinary"]], params)]
    assert alone != [a["answer"] for a in report["answers"]["ordinary"]]  # the context reached the model


def _pool5(shared_data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPE / "pools.py"), "--pool", "5", *extra, str(out)],
                          env={**os.environ, "AQUILACHAT_SHARED_DATA": str(shared_data)}, capture_output=True, text=True)


def test_pool_5_has_new_contexts_and_mbpp_questions(shared_data, tmp_path):
    decision = load_script(RECIPE / "decision.py", "aquila_tiny_decision_for_pools")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
                              ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "pool5.json"
    done = _pool5(shared_data, out, "--sft", str(sft))
    assert done.returncode == 0, done.stderr
    pool = json.loads(out.read_text(encoding="utf-8"))
    assert len(pool["drawing"]) == 50 and len(pool["ordinary"]) == 50
    assert len(pool["systems"]) == 3 and len(pool["exchanges"]) == 3
    assert not set(pool["systems"]) & set(decision.SYSTEMS)
    mbpp = {json.loads(line)["text"] for line in (shared_data / "code_eval" / "mbpp.jsonl").open(encoding="utf-8")}
    assert sum(q in mbpp for q in pool["ordinary"]) == 25
    # an sft.jsonl that holds one of the exchanges is refused, and --sft is required
    sft.write_text(json.dumps({"conversations": [{"from": "human", "value": pool["exchanges"][0][0]},
                                                 {"from": "gpt", "value": pool["exchanges"][0][1]}]}) + "\n",
                   encoding="utf-8")
    clash = _pool5(shared_data, tmp_path / "clash.json", "--sft", str(sft))
    assert clash.returncode != 0 and "pool 5 exchange in sft.jsonl" in clash.stderr
    missing = _pool5(shared_data, tmp_path / "missing.json")
    assert missing.returncode == 2 and "--pool 5 needs --sft" in missing.stderr
