"""Writing quality graded by a judge model (``aquilachat eval writing``), MT-Bench style.

Single-answer grading as in lm-sys/FastChat ``fastchat/llm_judge`` (Zheng et al. 2023, "Judging
LLM-as-a-Judge with MT-Bench and Chatbot Arena"): the judge sees the question and the answer (for
turn 2, the whole two-turn conversation) in the templates of ``judge_prompts.jsonl`` —
``single-v1`` / ``single-v1-multi-turn``, or ``single-math-v1`` / ``single-math-v1-multi-turn``
with a reference answer for the categories that need one (MT-Bench: math, reasoning, coding;
BELLE: math, code, using its ``std_answer``) — and rates it 1-10 as ``[[rating]]``.

Question sets: MT-Bench (80 two-turn English questions), Vicuna bench (80 one-turn English) and
BELLE's Chinese ``eval_set.json`` (1000 one-turn). Chinese questions are graded with the same
MT-Bench templates by default (one scale for all sets); ``judge_style="belle"`` uses BELLE's own
per-class Chinese prompts instead (``eval_prompt.json``, scores 0-1 as ``得分: x``, assembled as in
BELLE's ``eval/ChatGPT_Score.html``).

Answer temperatures follow FastChat's per-category table (writing/roleplay 0.7, stem/humanities
0.1, math/coding/reasoning/extraction 0.0, others 0.7) unless a fixed temperature is given.
Every judge prompt and raw judge output is kept; an output without a parsable grade counts as
"no grade", never as 0.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DataError, ValidationError
from ..io import iter_objects
from ..sampling_params import SamplingParams
from .backends import Generator
from .datasets import shared_data_dir

__all__ = ["WritingQuestion", "load_questions", "load_judge_prompts", "load_references", "parse_grade",
           "build_judge_messages", "run_writing_eval", "CATEGORY_TEMPERATURE", "resolve_questions"]

#: FastChat ``llm_judge/common.py`` ``temperature_config``.
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
#: Categories graded against a reference answer (FastChat ``NEED_REF_CATS`` plus BELLE's math/code).
NEED_REF_CATS = {"math", "reasoning", "coding", "code"}
#: BELLE classes judged without the standard answer (``ChatGPT_Score.html``).
BELLE_NO_REF_CLASSES = {"generation", "brainstorming", "rewrite"}
#: Named question sets under ``<data>/eval_writing``.
NAMED_SETS = {"mt_bench": "mt_bench/question.jsonl", "vicuna_bench": "vicuna_bench/question.jsonl",
              "belle": "belle/eval_set.json"}
JUDGE_MAX_TOKENS = 2048


@dataclass
class WritingQuestion:
    """One question: ``turns`` are the user messages (MT-Bench has two), ``reference`` the
    reference answers per turn (or ``None``), ``lang`` ``"en"`` or ``"zh"``."""

    question_id: str
    category: str
    turns: list[str]
    reference: list[str] | None = None
    lang: str = "en"
    source: str = ""


def _norm_class(name: str) -> str:
    """BELLE writes ``closed qa`` with a non-breaking space and ``closed QA`` in the prompts."""
    return " ".join(unicodedata.normalize("NFKC", name).split()).casefold()


def resolve_questions(spec: str, data_dir: Path | None = None) -> Path:
    """A question file from a name (``mt_bench``, ``vicuna_bench``, ``belle``) or a path.

    Raises:
        DataError: unknown name with no data directory, or a missing file.
    """
    if spec in NAMED_SETS:
        base = data_dir or shared_data_dir()
        if base is None:
            raise DataError(f"question set {spec!r}: no data directory (set $AQUILACHAT_SHARED_DATA or pass --data-dir)")
        path = Path(base) / "eval_writing" / NAMED_SETS[spec]
    else:
        path = Path(spec)
    if not path.is_file():
        raise DataError(f"{path}: question file not found (names: {', '.join(NAMED_SETS)})")
    return path


def load_questions(path: str | Path) -> list[WritingQuestion]:
    """MT-Bench / Vicuna ``question.jsonl`` (``question_id``, ``category``, ``turns``) or BELLE
    ``eval_set.json`` rows (``question``, ``class``, ``std_answer``), detected per row.

    Raises:
        DataError: a row of neither form, empty turns, wrong types; naming ``file:line``.
    """
    path = Path(path)
    out: list[WritingQuestion] = []
    for lineno, row in iter_objects(path):
        where = f"{path}:{lineno}"
        if "turns" in row:
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise DataError(f"{where}: field 'turns' must be a non-empty list of non-empty strings")
            if len(turns) > 2:
                raise DataError(f"{where}: {len(turns)} turns; MT-Bench grading supports 1 or 2")
            qid = row.get("question_id", lineno)
            cat = row.get("category", "general")
            if not isinstance(cat, str):
                raise DataError(f"{where}: field 'category' must be a string")
            lang = "zh" if any(_has_cjk(t) for t in turns) else "en"
            out.append(WritingQuestion(str(qid), cat, list(turns), None, lang, where))
        elif "question" in row:
            q = row["question"]
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"{where}: field 'question' must be a non-empty string")
            cls = row.get("class", "general")
            if not isinstance(cls, str):
                raise DataError(f"{where}: field 'class' must be a string")
            std = row.get("std_answer") or ""
            if not isinstance(std, str):
                raise DataError(f"{where}: field 'std_answer' must be a string")
            out.append(WritingQuestion(str(row.get("id", lineno)), _norm_class(cls), [q], [std] if std.strip() else None,
                                       "zh" if _has_cjk(q) else "en", where))
        else:
            raise DataError(f"{where}: expected 'turns' (MT-Bench) or 'question' (BELLE), got fields {', '.join(sorted(row))}")
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def load_references(path: str | Path) -> dict[str, list[str]]:
    """FastChat reference answers (``reference_answer/gpt-4.jsonl``): question id -> turns."""
    refs: dict[str, list[str]] = {}
    for lineno, row in iter_objects(path):
        try:
            refs[str(row["question_id"])] = list(row["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{path}:{lineno}: expected question_id and choices[0].turns") from None
    return refs


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, str]]:
    """FastChat ``judge_prompts.jsonl``: name -> ``{system_prompt, prompt_template, ...}``.

    Raises:
        DataError: a row without ``name``/``system_prompt``/``prompt_template``, or a missing
            single-answer template.
    """
    prompts: dict[str, dict[str, str]] = {}
    for lineno, row in iter_objects(path):
        for key in ("name", "system_prompt", "prompt_template"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{path}:{lineno}: missing string field {key!r}")
        prompts[row["name"]] = row
    for name in ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"):
        if name not in prompts:
            raise DataError(f"{path}: no {name!r} judge prompt")
    return prompts


def load_belle_prompts(path: str | Path) -> dict[str, str]:
    """BELLE ``eval_prompt.json`` (JSON Lines): normalised class -> scoring prompt."""
    out = {}
    for lineno, row in iter_objects(path):
        if not isinstance(row.get("class"), str) or not isinstance(row.get("prompt"), str):
            raise DataError(f"{path}:{lineno}: expected string fields 'class' and 'prompt'")
        out[_norm_class(row["class"])] = row["prompt"]
    return out


# --------------------------------------------------------------------------------------- grades
_BRACKET2 = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_BRACKET1 = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")
_LABELLED = re.compile(r"(?:rating|score|grade|评分|得分|分数|打分)\s*(?:is|of|为|是)?\s*[:：=]?\s*\**\s*(\d+(?:\.\d+)?)"
                       r"\s*(?:/\s*(\d+(?:\.\d+)?)|分)?", re.IGNORECASE)
_OUT_OF = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE)


def parse_grade(text: str, *, low: float = 1.0, high: float = 10.0) -> float | None:
    """The grade in a judge's answer, or ``None`` when there is none.

    Looks for, in order: ``[[8]]`` / ``[[8.5]]`` (the MT-Bench format), ``[8]`` (FastChat's
    backup pattern), ``Rating: 8`` / ``Score: 7/10`` / ``评分：8`` / ``得分: 0.8`` style labels, and
    ``8/10`` / ``8 out of 10``. The *last* match of the first pattern that matches wins (judges
    sometimes quote the format's example first). A value outside ``[low, high]`` is rejected, as
    is a ``x/y`` with ``y`` different from ``high``.
    """
    if not isinstance(text, str):
        return None
    for pattern in (_BRACKET2, _BRACKET1):
        found = [float(m.group(1)) for m in pattern.finditer(text)]
        found = [v for v in found if low <= v <= high]
        if found:
            return found[-1]
    labelled = []
    for m in _LABELLED.finditer(text):
        value = float(m.group(1))
        if m.group(2) is not None and float(m.group(2)) != high:
            continue
        if low <= value <= high:
            labelled.append(value)
    if labelled:
        return labelled[-1]
    if high == 10.0:
        found = [float(m.group(1)) for m in _OUT_OF.finditer(text)]
        found = [v for v in found if low <= v <= high]
        if found:
            return found[-1]
    return None


# --------------------------------------------------------------------------------------- prompts
def build_judge_messages(q: WritingQuestion, answers: Sequence[str], turn: int, prompts: dict[str, dict[str, str]],
                         *, style: str = "mt-bench", belle_prompts: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The judge's chat messages for turn ``turn`` (0-based) of ``q`` answered with ``answers``.

    ``mt-bench``: FastChat ``run_judge_single`` — system prompt and the template filled with
    ``question``/``answer`` (turn 1) or ``question_1``/``answer_1``/``question_2``/``answer_2``
    (turn 2), plus ``ref_answer_*`` for reference categories that have references.
    ``belle``: one user message, ``{prompt} {question} [标准回答:{std}]  模型回答：'{answer}'。...``.
    """
    if style == "belle":
        if belle_prompts is None:
            raise ValidationError("judge style 'belle' needs BELLE's eval_prompt.json")
        prompt = belle_prompts.get(q.category) or belle_prompts.get("generation", "")
        if q.category in BELLE_NO_REF_CLASSES or not q.reference:
            text = f"{prompt} {q.turns[0]}  模型回答： '{answers[0]}'。请针对模型回答给出得分，顺便给出理由："
        else:
            text = f"{prompt} {q.turns[0]} 标准回答:{q.reference[0]}  模型回答：' {answers[0]}'。请针对模型回答给出得分，顺便给出理由："
        return [{"role": "user", "content": text}]
    use_ref = q.category in NEED_REF_CATS and bool(q.reference)
    multi = turn == 1
    name = ("single-math-v1" if use_ref else "single-v1") + ("-multi-turn" if multi else "")
    tmpl = prompts[name]
    kwargs: dict[str, str] = {}
    if multi:
        kwargs.update(question_1=q.turns[0], question_2=q.turns[1], answer_1=answers[0], answer_2=answers[1])
        if use_ref:
            refs = list(q.reference) + [""] * (2 - len(q.reference))
            kwargs.update(ref_answer_1=refs[0], ref_answer_2=refs[1])
    else:
        kwargs.update(question=q.turns[0], answer=answers[0])
        if use_ref:
            kwargs["ref_answer_1"] = q.reference[0]
    user = tmpl["prompt_template"].format(**kwargs)
    return [{"role": "system", "content": tmpl["system_prompt"]}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------- run
@dataclass
class WritingEvalConfig:
    """Settings of ``aquilachat eval writing``.

    Attributes:
        questions: question file (see :func:`resolve_questions`).
        judge_prompts: FastChat ``judge_prompts.jsonl`` (default: beside the questions or in
            ``<data>/eval_writing/mt_bench``).
        references: reference answers file (default: ``reference_answer_gpt-4.jsonl`` beside
            MT-Bench's questions).
        judge_style: ``mt-bench`` (1-10) or ``belle`` (BELLE prompts, 0-1).
        params: answer sampling (``temperature=None``: FastChat's per-category temperatures).
        limit: only the first ``limit`` questions.
    """

    questions: Path
    judge_prompts: Path | None = None
    references: Path | None = None
    belle_prompts: Path | None = None
    judge_style: str = "mt-bench"
    temperature: float | None = None
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=1024))
    judge_params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0,
                                                                                max_tokens=JUDGE_MAX_TOKENS))
    limit: int | None = None
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.judge_style not in ("mt-bench", "belle"):
            raise ValidationError(f"--judge-style must be mt-bench or belle, got {self.judge_style!r}")
        if self.limit is not None and self.limit < 1:
            raise ValidationError(f"--limit must be >= 1, got {self.limit}")


def _find_beside(questions: Path, names: Sequence[str], data_dir: Path | None, sub: str) -> Path | None:
    """``names`` in the questions' directory, else in ``<data>/eval_writing/<sub>``."""
    dirs = [questions.parent]
    base = data_dir or shared_data_dir()
    if base is not None:
        dirs.append(Path(base) / "eval_writing" / sub)
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def run_writing_eval(cfg: WritingEvalConfig, generator: Generator, judge: Generator, *,
                     progress: bool = True, log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer every question with ``generator`` (turn by turn), grade every turn with ``judge``.

    Returns the report data (scores overall, per category, per turn; counts of "no grade") and
    one record per graded turn (question, answers, judge messages, raw judge output, score).

    Raises:
        DataError: missing or malformed question, reference or judge-prompt files.
        BackendError: the model or the judge cannot be reached.
    """
    log = log or (lambda msg: None)
    questions = load_questions(cfg.questions)
    if cfg.limit:
        questions = questions[: cfg.limit]
    judge_path = cfg.judge_prompts or _find_beside(cfg.questions, ["judge_prompts.jsonl"], cfg.data_dir, "mt_bench")
    prompts: dict[str, dict[str, str]] = {}
    belle_prompts = None
    if cfg.judge_style == "mt-bench":
        if judge_path is None:
            raise DataError("judge_prompts.jsonl (FastChat) not found beside the questions or in the data directory; "
                            "pass --judge-prompts FILE")
        prompts = load_judge_prompts(judge_path)
    else:
        bp = cfg.belle_prompts or _find_beside(cfg.questions, ["eval_prompt.json"], cfg.data_dir, "belle")
        if bp is None:
            raise DataError("BELLE eval_prompt.json not found; pass --belle-prompts FILE")
        belle_prompts = load_belle_prompts(bp)
        judge_path = bp
    # References: an explicit file, or MT-Bench's beside the questions (never from elsewhere:
    # question ids of different sets overlap).
    ref_path = cfg.references
    if ref_path is None:
        for name in ("reference_answer_gpt-4.jsonl", "reference_answer/gpt-4.jsonl"):
            if (cfg.questions.parent / name).is_file():
                ref_path = cfg.questions.parent / name
                break
    if ref_path is not None:
        refs = load_references(ref_path)
        used = False
        for q in questions:
            if q.reference is None and q.question_id in refs:
                q.reference, used = refs[q.question_id], True
        if not used and cfg.references is None:
            ref_path = None

    # 1. answers, turn by turn (a turn's conversation includes the model's earlier answers)
    answers: dict[str, list[str]] = {q.question_id: [] for q in questions}
    max_turns = max(len(q.turns) for q in questions)
    bar = _bar(sum(len(q.turns) for q in questions) * 2, "answers + judgments", progress)
    for turn in range(max_turns):
        active = [q for q in questions if len(q.turns) > turn]
        groups: dict[float, list[WritingQuestion]] = {}
        for q in active:
            t = cfg.temperature if cfg.temperature is not None else CATEGORY_TEMPERATURE.get(q.category, DEFAULT_TEMPERATURE)
            groups.setdefault(t, []).append(q)
        for temp, qs in groups.items():
            convs = []
            for q in qs:
                msgs = []
                for i in range(turn):
                    msgs += [{"role": "user", "content": q.turns[i]}, {"role": "assistant", "content": answers[q.question_id][i]}]
                msgs.append({"role": "user", "content": q.turns[turn]})
                convs.append(msgs)
            outs = generator.chat(convs, replace(cfg.params, temperature=temp))
            for q, a in zip(qs, outs):
                answers[q.question_id].append(a)
            bar.update(len(qs))

    # 2. judgments
    records: list[dict[str, Any]] = []
    jobs = []
    for q in questions:
        for turn in range(len(q.turns)):
            msgs = build_judge_messages(q, answers[q.question_id], turn, prompts, style=cfg.judge_style,
                                        belle_prompts=belle_prompts)
            jobs.append((q, turn, msgs))
    raw = judge.chat([m for _, _, m in jobs], cfg.judge_params)
    low, high = (0.0, 1.0) if cfg.judge_style == "belle" else (1.0, 10.0)
    for (q, turn, msgs), out in zip(jobs, raw):
        score = parse_grade(out, low=low, high=high)
        records.append({"question_id": q.question_id, "category": q.category, "lang": q.lang, "turn": turn + 1,
                        "question": q.turns[turn], "answers": answers[q.question_id][: turn + 1],
                        "reference": q.reference, "judge_messages": msgs, "judge_output": out, "score": score})
    bar.update(len(jobs))
    bar.close()

    def summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
        scores = [r["score"] for r in recs if r["score"] is not None]
        return {"mean": statistics.fmean(scores) if scores else None, "graded": len(scores),
                "no_grade": len(recs) - len(scores), "total": len(recs)}

    by_cat: dict[str, list[dict[str, Any]]] = {}
    by_turn: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_cat.setdefault(r["category"], []).append(r)
        by_turn.setdefault(f"turn {r['turn']}", []).append(r)
    report = {
        "kind": "writing",
        "questions_file": str(cfg.questions),
        "questions": len(questions),
        "judge_style": cfg.judge_style,
        "scale": [low, high],
        "judge_prompts_file": str(judge_path) if judge_path else None,
        "references_file": str(ref_path) if ref_path else None,
        "overall": summary(records),
        "per_category": {c: summary(rs) for c, rs in sorted(by_cat.items())},
        "per_turn": {t: summary(rs) for t, rs in sorted(by_turn.items())},
        "answer_temperature": cfg.temperature if cfg.temperature is not None else "per-category (FastChat)",
    }
    o = report["overall"]
    log(f"writing: mean score {o['mean'] if o['mean'] is None else round(o['mean'], 3)} "
        f"over {o['graded']} graded turns ({o['no_grade']} without a grade)")
    return report, records


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc)


def writing_report_markdown(report: dict[str, Any], meta_md: str) -> str:
    """The Markdown version of a writing report."""
    lo, hi = report["scale"]
    o = report["overall"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# Writing evaluation (single-answer grading by a judge model)", "",
             f"Questions `{report['questions_file']}` ({report['questions']}), judge style `{report['judge_style']}`, "
             f"scale {lo:g}-{hi:g}.", "",
             f"**Mean score: {fmt(o['mean'])}** over {o['graded']} graded turns; {o['no_grade']} judge outputs had no grade "
             "(excluded from the mean, not counted as 0).", "",
             "| category | mean | graded | no grade |", "|---|---|---|---|"]
    for c, s in report["per_category"].items():
        lines.append(f"| {c} | {fmt(s['mean'])} | {s['graded']} | {s['no_grade']} |")
    lines += ["", "| turn | mean | graded | no grade |", "|---|---|---|---|"]
    for t, s in report["per_turn"].items():
        lines.append(f"| {t} | {fmt(s['mean'])} | {s['graded']} | {s['no_grade']} |")
    lines += ["", f"Judge prompts: `{report['judge_prompts_file']}`; references: `{report['references_file']}`; "
              f"answer temperature: {report['answer_temperature']}.", "", meta_md]
    return "\n".join(lines)
