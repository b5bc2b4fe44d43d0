"""The aquila-tiny recipe's instruction data (recipes/aquila-tiny/instructions.py): the minimal pairs
(``--pairs``) ask about a drawing request's own subject in words that want text, never a picture,
and get ordinary answers; the evaluation set does not depend on the training mix."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aquilachat.instructions import parse_instruction

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "aquila-tiny" / "instructions.py"
# Words that ask for a picture, written here independently of the recipe (its drawing phrasings use
# 画/图/绘/draw/paint/picture/image/sketch/render/artwork/painting; 照片/photo/illustrat for good measure).
PICTURE = re.compile(r"画|图|绘|照片|draw|paint|picture|image|sketch|render|artwork|photo|illustrat", re.IGNORECASE)


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("aquila_tiny_instructions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("zh", [True, False])
def test_pair_asks_for_text_about_the_same_subject(recipe, zh):
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        subject = recipe.compose_subject(rng, zh)
        request, answer = recipe.pair_example(rng, zh, subject)
        assert subject in request
        assert not PICTURE.search(request), request
        assert subject.lower() in answer.lower()
        assert parse_instruction(answer) is None
        assert "#text2image#" not in answer and recipe.DRAW_PREFACE not in answer
        kinds.add(next(k for k, ts in (recipe.PAIR_REQUESTS_ZH if zh else recipe.PAIR_REQUESTS_EN).items()
                       if any(t.format(s=subject) == request for t in ts)))
    assert kinds == {"poem", "describe", "story", "words"}


def _fake_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A shared-data folder with 30 English and 30 Chinese evaluation questions and an sft.jsonl
    of 40 ordinary conversations (5 of them mentioning pictures)."""
    shared, out = tmp_path / "shared", tmp_path / "out"
    (shared / "eval_writing" / "vicuna_bench").mkdir(parents=True)
    (shared / "eval_writing" / "belle").mkdir(parents=True)
    out.mkdir()
    with open(shared / "eval_writing" / "vicuna_bench" / "question.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question_id": i, "turns": [f"Question number {i}?"]}) + "\n" for i in range(30))
    (shared / "eval_writing" / "belle" / "eval_set.json").write_text(
        json.dumps([{"question": f"第{i}个问题是什么？"} for i in range(30)], ensure_ascii=False), encoding="utf-8")
    rows = [{"id": f"o{i}", "conversations": [{"from": "human", "value": ("Describe this photo " if i < 5 else "Hi ") + str(i)},
                                                {"from": "gpt", "value": f"Answer {i}."}]} for i in range(40)]
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return shared, out


def _run(shared: Path, out: Path, *args: str) -> list[dict]:
    subprocess.run([sys.executable, str(SCRIPT), "--shared", str(shared), "--out", str(out), "--edit", "0",
                    "--replay", "100", "--mix-seed", "5", *args], check=True, capture_output=True, cwd=REPO)
    return [json.loads(line) for line in (out / "mix.jsonl").read_text(encoding="utf-8").splitlines()]


def test_pairs_in_the_mix(tmp_path):
    shared, out = _fake_inputs(tmp_path)
    rows = _run(shared, out, "--draw", "10", "--pairs", "25", "--name", "mix.jsonl")
    evaluation = (out / "routing_eval.json").read_bytes()
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 10 + 25 + 40 and len(by_id) == len(rows)
    for i in range(25):
        request = by_id[f"pair:{i}"]["conversations"][0]["value"]
        # pair i is about drawing example i % 10's subject: its prompt line, less any style
        prompt = parse_instruction(by_id[f"draw:{i % 10}"]["conversations"][1]["value"]).prompt
        subject = re.split(r"，|, ", prompt)[0]
        assert subject in request and not PICTURE.search(request)
    # the evaluation set depends only on --seed, not on the mix
    _run(shared, out, "--draw", "7", "--name", "mix.jsonl")
    assert (out / "routing_eval.json").read_bytes() == evaluation
    # without --pairs the drawing examples are those of the same seed with pairs (own generator)
    draws = {r["id"]: r for r in _run(shared, out, "--draw", "10", "--name", "mix.jsonl") if r["id"].startswith("draw:")}
    assert draws == {k: v for k, v in by_id.items() if k.startswith("draw:")}
