"""Writing evaluation: the grade parser, judge prompts built from FastChat's templates, and an end
to end run in which a fake OpenAI-compatible server on 127.0.0.1 plays both the model and the judge.

When the lead's `aquilachat serve` exists, `test_writing_end_to_end_against_server` should start
that server with a tiny model as the judge instead of FakeOpenAIServer (see the report).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aquilachat.errors import DataError
from aquilachat.evaluation.backends import OpenAIHTTPGenerator
from aquilachat.evaluation.writing import (WritingEvalConfig, build_judge_messages, load_judge_prompts,
                                           load_questions, parse_grade, run_writing_eval)
from tests.eval_support import FakeOpenAIServer, shared_data_or_skip


@pytest.mark.parametrize("text,expected", [
    ("The answer is helpful.\n\nRating: [[8]]", 8.0),
    ("Rating: [[8.5]]", 8.5),
    ('I must answer as "Rating: [[5]]". The response is great. Rating: [[9]]', 9.0),  # last wins
    ("Verdict [7]", 7.0),  # FastChat's backup pattern
    ("Rating: 6", 6.0),
    ("Overall score: 7/10.", 7.0),
    ("I would give it 8 out of 10.", 8.0),
    ("评分：7分", 7.0),
    ("这个回答很好。得分: 9", 9.0),
    ("The response is fine but I will not rate it.", None),
    ("Rating: [[11]]", None),  # outside 1-10
    ("Rating: 0", None),
    ("Score: 4/5", None),  # another scale: not a 1-10 grade
    ("", None),
])
def test_parse_grade_mt_bench_scale(text, expected):
    assert parse_grade(text) == expected


@pytest.mark.parametrize("text,expected", [("得分: 0.8\n理由：……", 0.8), ("得分：1", 1.0), ("得分: 7", None), ("很好", None)])
def test_parse_grade_belle_scale(text, expected):
    assert parse_grade(text, low=0.0, high=1.0) == expected


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_question_file_errors_name_line(tmp_path):
    f = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "writing", "turns": ["Hi"]},
                                            {"question_id": 2, "category": "writing", "turns": []}])
    with pytest.raises(DataError, match=r"q.jsonl:2: field 'turns'"):
        load_questions(f)
    _write_jsonl(f, [{"prompt": "no"}])
    with pytest.raises(DataError, match=r"q.jsonl:1: expected 'turns'"):
        load_questions(f)


def test_real_question_sets_and_judge_templates():
    data = shared_data_or_skip()
    w = data / "eval_writing"
    mt = load_questions(w / "mt_bench/question.jsonl")
    assert len(mt) == 80 and all(len(q.turns) == 2 for q in mt)
    assert len(load_questions(w / "vicuna_bench/question.jsonl")) == 80
    belle = load_questions(w / "belle/eval_set.json")
    assert len(belle) == 1000 and belle[0].lang == "zh"
    assert "closed qa" in {q.category for q in belle}  # the non-breaking space normalised
    prompts = load_judge_prompts(w / "mt_bench/judge_prompts.jsonl")
    q = mt[0]
    m1 = build_judge_messages(q, ["ANSWER-ONE"], 0, prompts)
    assert m1[0]["content"] == prompts["single-v1"]["system_prompt"]
    assert q.turns[0] in m1[1]["content"] and "ANSWER-ONE" in m1[1]["content"] and "[[rating]]" in m1[1]["content"]
    m2 = build_judge_messages(q, ["ANSWER-ONE", "ANSWER-TWO"], 1, prompts)
    assert m2[0]["content"] == prompts["single-v1-multi-turn"]["system_prompt"]
    assert f"### User:\n{q.turns[1]}" in m2[1]["content"] and "ANSWER-TWO" in m2[1]["content"]


def _fake_model_and_judge(grades: dict[str, str]):
    """chat(body): the 'student' answers with a marker naming the question; the 'judge' answers
    according to the marker it finds in its prompt."""
    def chat(body):
        msgs = body["messages"]
        if body["model"] == "student":
            turn = sum(m["role"] == "user" for m in msgs)
            return f"ANSWER turn {turn} to <{msgs[-1]['content'][:24]}>"
        prompt = msgs[-1]["content"]
        for marker, reply in grades.items():
            if marker in prompt:
                return reply
        return "Fine. Rating: [[5]]"
    return chat


def test_writing_end_to_end_against_server(tmp_path):
    """Model and judge behind OpenAI-compatible HTTP (a fake server here); two-turn questions,
    a reference-graded category, a judge answer with no grade and one in a fallback format."""
    data = shared_data_or_skip()
    judge_prompts = data / "eval_writing/mt_bench/judge_prompts.jsonl"
    qfile = _write_jsonl(tmp_path / "question.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rivers. Q1", "Now make it rhyme. Q1b"]},
        {"question_id": 2, "category": "math", "turns": ["What is 2+2? Q2"]},
        {"question_id": 3, "category": "roleplay", "turns": ["Pretend to be a cat. Q3"]},
    ])
    refs = _write_jsonl(tmp_path / "reference_answer_gpt-4.jsonl", [
        {"question_id": 2, "choices": [{"index": 0, "turns": ["REFERENCE: 4"]}]}])
    grades = {"Q1b": "Good follow-up. Rating: [[9]]", "Q1": "Nice. Rating: [[8]]", "REFERENCE: 4": "Score: 6/10",
              "Q3": "I refuse to grade role-play."}
    with FakeOpenAIServer(chat=_fake_model_and_judge(grades)) as server:
        student = OpenAIHTTPGenerator(server.url, "student", concurrency=2)
        judge = OpenAIHTTPGenerator(server.url, "judge", concurrency=2)
        cfg = WritingEvalConfig(questions=qfile, judge_prompts=judge_prompts)
        report, records = run_writing_eval(cfg, student, judge, progress=False)
    assert report["references_file"] == str(refs)
    assert len(records) == 4
    by = {(r["question_id"], r["turn"]): r for r in records}
    assert by[("1", 1)]["score"] == 8 and by[("1", 2)]["score"] == 9 and by[("2", 1)]["score"] == 6
    assert by[("3", 1)]["score"] is None and by[("3", 1)]["judge_output"] == "I refuse to grade role-play."
    o = report["overall"]
    assert o["graded"] == 3 and o["no_grade"] == 1 and o["mean"] == pytest.approx((8 + 9 + 6) / 3)
    assert report["per_category"]["roleplay"] == {"mean": None, "graded": 0, "no_grade": 1, "total": 1}
    # turn 2 of the model saw its own turn-1 answer; the judge saw both turns
    student_turn2 = [b for p, b in server.requests if b["model"] == "student" and len(b["messages"]) == 3]
    assert student_turn2 and student_turn2[0]["messages"][1]["content"].startswith("ANSWER turn 1")
    assert "ANSWER turn 2" in by[("1", 2)]["judge_messages"][1]["content"]
    # the math question is graded against the reference with the math template
    math_prompt = by[("2", 1)]["judge_messages"][1]["content"]
    assert "REFERENCE: 4" in math_prompt and "[The Start of Reference Answer]" in math_prompt
    # FastChat temperatures: writing/roleplay 0.7, math 0.0; the judge greedy
    temps = {b["messages"][0]["content"][:12]: b["temperature"] for p, b in server.requests if b["model"] == "student"}
    assert temps["Write a haik"] == 0.7 and temps["What is 2+2?"] == 0.0
    assert all(b["temperature"] == 0.0 for p, b in server.requests if b["model"] == "judge")


def test_cli_writing_belle_and_mt_bench(tmp_path, capsys):
    data = shared_data_or_skip()
    from aquilachat.cli import main
    grades = {"Write": "Rating: [[7]]"}
    with FakeOpenAIServer(chat=_fake_model_and_judge(grades)) as server:
        out = tmp_path / "mt"
        rc = main(["eval", "writing", "--questions", "mt_bench", "--limit", "2", "--url", server.url,
                   "--model-name", "student", "--judge-url", server.url, "--judge-model", "judge",
                   "--output", str(out), "--data-dir", str(data), "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        rep = json.loads((out / "writing_eval.json").read_text())
        assert rep["questions"] == 2 and rep["overall"]["total"] == 4
        assert rep["metadata"]["judge"]["model"] == "judge" and rep["metadata"]["model"]["model"] == "student"
        assert len(rep["metadata"]["datasets"]) >= 2  # questions + judge prompts, with hashes
        lines = [json.loads(x) for x in (out / "writing_judgments.jsonl").read_text().splitlines()]
        assert all(r["judge_messages"] and isinstance(r["judge_output"], str) for r in lines)
        assert (out / "writing_eval.png").read_bytes()[:4] == b"\x89PNG"
        assert "Mean score" in (out / "writing_eval.md").read_text()

        # BELLE's Chinese questions with BELLE's own prompts (0-1 scale)
        belle_grades = {"标准回答": "得分: 0.6", "模型回答": "得分：1"}
        server.chat_fn = _fake_model_and_judge(belle_grades)
        out2 = tmp_path / "belle"
        rc = main(["eval", "writing", "--questions", "belle", "--limit", "3", "--judge-style", "belle", "--url", server.url,
                   "--model-name", "student", "--judge-url", server.url, "--judge-model", "judge",
                   "--output", str(out2), "--data-dir", str(data), "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        rep = json.loads((out2 / "writing_eval.json").read_text())
        assert rep["scale"] == [0.0, 1.0] and rep["overall"]["graded"] == 3
        recs = [json.loads(x) for x in (out2 / "writing_judgments.jsonl").read_text().splitlines()]
        assert all("请针对模型回答给出得分" in r["judge_messages"][0]["content"] for r in recs)


def test_writing_end_to_end_against_our_own_server(tmp_path, byte_tokenizer_dir):
    """Student and judge are both our real server (uvicorn on 127.0.0.1) with a tiny random model:
    the pipeline runs end to end, keeps every prompt and raw judge output, and a judge answer
    without a grade is counted as "no grade", not as a score."""
    from aquilachat.sampling_params import SamplingParams
    from aquilachat.llm import LLM
    from aquilachat.server.app import ServerSettings
    from tests.helpers import make_tiny_model
    from tests.server_utils import serve
    data = shared_data_or_skip()
    model_dir = tmp_path / "tiny"
    make_tiny_model(model_dir, byte_tokenizer_dir, max_position_embeddings=2048)
    qfile = _write_jsonl(tmp_path / "question.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rivers.", "Now make it rhyme."]},
        {"question_id": 2, "category": "humanities", "turns": ["用golang实现冒泡排序算法"]}])
    with serve(lambda: LLM(str(model_dir), device="cpu", max_num_seqs=4), ServerSettings(model_name="tiny")) as s:
        student = OpenAIHTTPGenerator(s.url, "tiny", concurrency=2)
        judge = OpenAIHTTPGenerator(s.url, "tiny", concurrency=2)
        cfg = WritingEvalConfig(questions=qfile, judge_prompts=data / "eval_writing/mt_bench/judge_prompts.jsonl",
                                params=SamplingParams(temperature=0.0, max_tokens=16), judge_params=SamplingParams(temperature=0.0, max_tokens=16))
        report, records = run_writing_eval(cfg, student, judge, progress=False)
    assert len(records) == 3
    for r in records:
        assert r["judge_messages"] and isinstance(r["judge_output"], str)
        assert r["score"] is None or 1 <= r["score"] <= 10
    o = report["overall"]
    assert o["graded"] + o["no_grade"] == 3
