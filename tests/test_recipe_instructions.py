"""The aquila-tiny recipe's instruction data (recipes/aquila-tiny/instructions.py): the minimal pairs
(``--pairs``) ask about a drawing request's own subject in words that want text, never a picture,
and get ordinary answers; the evaluation set does not depend on the training mix."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aquilachat.instructions import parse_instruction
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "aquila-tiny" / "instructions.py"
# Words that ask for a picture, written here independently of the recipe (its drawing phrasings use
# 画/图/绘/draw/paint/picture/image/sketch/render/artwork/painting; 照片/photo/illustrat for good measure).
PICTURE = re.compile(r"画|图|绘|照片|draw|paint|picture|image|sketch|render|artwork|photo|illustrat", re.IGNORECASE)


@pytest.fixture(scope="module")
def recipe():
    return load_script(SCRIPT, "aquila_tiny_instructions")


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


@pytest.mark.parametrize("zh, text, wanted", [
    (False, "Describe a cat.", "describe a cat"), (False, "Write a poem about the sea.", "write a poem about the sea"),
    (True, "请介绍一下长城。", "介绍一下长城"), (True, "写一首关于春天的诗", "写一首关于春天的诗")])
def test_polite_asks_the_same_request(recipe, zh, text, wanted):
    rng = random.Random(0)
    for _ in range(20):
        question = recipe.polite(rng, zh, text)
        assert wanted in question and question != text
        if zh:
            assert question.endswith("？") and question.startswith(("你", "能", "可以"))
        else:
            assert question.endswith("?") and re.match(r"(Can|Could|Would) you ", question)


@pytest.mark.parametrize("zh, text", [(False, "What is a cat?"), (False, "Can you describe a cat?"),
                                         (False, "Hi there"), (True, "我想了解长城"), (True, "长城有多长？")])
def test_polite_leaves_non_imperatives(recipe, zh, text):
    assert recipe.polite(random.Random(0), zh, text) is None


def _fake_real_sft(out: Path) -> list[dict]:
    """An sft.jsonl of imperative questions with prose answers in both languages, a poem request,
    one identity answer and one photo question (neither may give a pair answer or a polite row)."""
    prose_en = "This is a long enough English answer about the topic, written in plain sentences for the test. "
    prose_zh = "这是一个足够长的中文回答，用几句普通的话介绍这个话题，供测试使用，内容完整而且通顺。"
    rows = [("Explain topic %d." % i, prose_en + str(i)) for i in range(12)]
    rows += [("介绍一下话题%d。" % i, prose_zh + str(i)) for i in range(12)]
    rows += [("Write a poem about leaves.", "Leaves fall down,\nred and brown, " + prose_en),
             ("Tell me who you are.", "I am Vicuna, a language model trained by researchers from LMSYS. " + prose_en),
             ("Describe this photo of a dog.", prose_en + "photo")]
    convs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
             for i, (q, a) in enumerate(rows)]
    (out / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in convs), encoding="utf-8")
    return convs


def test_wide_real_pairs_and_polite_rows(tmp_path, recipe):
    shared, out = _fake_inputs(tmp_path)
    convs = _fake_real_sft(out)
    answer_of = {c["conversations"][0]["value"]: c["conversations"][1]["value"] for c in convs}
    usable = {a for q, a in answer_of.items() if "LMSYS" not in a and "photo" not in q}
    rows = _run(shared, out, "--draw", "10", "--wide", "6", "--pairs", "40", "--pair-answers", "real",
                "--can", "8", "--name", "mix.jsonl")
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 10 + 6 + 40 + 8 + len(convs)
    for i in range(6):  # drawing requests about subjects outside the drawing set, prompt = the subject
        request, answer = (t["value"] for t in by_id[f"wide:{i}"]["conversations"])
        found = parse_instruction(answer)
        subject = re.split(r"，|, ", found.prompt)[0]
        assert subject in (recipe.WIDE_ZH if i % 2 == 0 else recipe.WIDE_EN) and subject in request
    subjects = [re.split(r"，|, ", parse_instruction(by_id[k]["conversations"][1]["value"]).prompt)[0]
                for k in [f"draw:{i}" for i in range(10)] + [f"wide:{i}" for i in range(6)]]
    for i in range(40):  # pair i: subject i mod 16, a text request, a real answer in the request's language
        request, answer = (t["value"] for t in by_id[f"pair:{i}"]["conversations"])
        assert subjects[i % 16] in request and not PICTURE.search(request)
        assert answer in usable and parse_instruction(answer) is None
        assert recipe.is_zh(answer) == recipe.is_zh(request)
    for i in range(8):  # polite rows: a real imperative question asked politely, with its own answer
        question, answer = (t["value"] for t in by_id[f"can:{i}"]["conversations"])
        originals = [q for q, a in answer_of.items() if a == answer]
        assert len(originals) == 1 and answer in usable
        core = originals[0].removeprefix("请").rstrip("。.")
        assert (core if recipe.is_zh(core) else core[0].lower() + core[1:]) in question
    # the new rows have their own generators: the drawing examples are those of the same seed without them
    draws = {r["id"]: r for r in _run(shared, out, "--draw", "10", "--name", "mix.jsonl") if r["id"].startswith("draw:")}
    assert draws == {k: v for k, v in by_id.items() if k.startswith("draw:")}
