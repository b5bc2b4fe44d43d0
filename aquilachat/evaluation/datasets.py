"""Evaluation datasets: locating them, reading them strictly, hashing them.

Code: HumanEval-X (THUDM/CodeGeeX ``codegeex/benchmark/humaneval-x/<lang>/data/humaneval_<lang>.jsonl.gz``;
fields ``task_id`` ``prompt`` ``declaration`` ``canonical_solution`` ``test``, plus ``import`` and
``test_setup`` for Go), OpenAI HumanEval (``HumanEval.jsonl.gz``: ``task_id`` ``prompt``
``canonical_solution`` ``test`` ``entry_point``) and MBPP (``mbpp.jsonl``: ``task_id`` ``text``
``code`` ``test_list`` ``test_setup_code``). Writing: MT-Bench / Vicuna-bench ``question.jsonl``
(``question_id`` ``category`` ``turns``) and BELLE ``eval_set.json`` (JSON Lines despite the name:
``question`` ``class`` ``std_answer``).

Files are read by :func:`aquilachat.io.iter_objects` (JSON Lines or a JSON array, ``.gz`` or not);
every reader names the file and line of a malformed row (:class:`~aquilachat.errors.DataError`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import iter_objects

__all__ = ["KNOWN_BROKEN_CANONICAL", "shared_data_dir", "file_sha256", "Problem", "load_code_problems",
           "LANGUAGES", "TASK_PREFIX", "CodeDataset", "resolve_code_datasets"]

#: Languages the code evaluation knows, in report order.
LANGUAGES = ("python", "cpp", "java", "js", "go", "rust")
#: HumanEval-X ``task_id`` prefix of each language (``"CPP/0"``, ``"JavaScript/0"``).
TASK_PREFIX = {"python": "Python", "cpp": "CPP", "java": "Java", "js": "JavaScript", "go": "Go", "rust": "Rust"}
_PREFIX_TO_LANG = {v.lower(): k for k, v in TASK_PREFIX.items()}

#: Canonical solutions of HumanEval-X (THUDM/CodeGeeX data, as in ``<data>/code_eval``) that fail
#: their own tests: the *tests* are right, so model completions are judged normally, but the
#: self-test lists these separately instead of counting them against the harness.
KNOWN_BROKEN_CANONICAL = {
    "JavaScript/112": "reverseDelete returns `(z, false)` / `(z, true)`: the comma operator yields a bare "
                      "boolean, while the test expects the array [string, boolean]",
    "JavaScript/155": "evenOddCount(0) loops `while (num > 0)`, so it returns [0, 0]; the test expects [1, 0] "
                      "(0 has one even digit)",
}
_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """The shared data folder: ``$AQUILACHAT_SHARED_DATA``, ``<repo root>/../shared/data``, or
    ``/work/shared/data``; ``None`` when none exists."""
    for candidate in (os.environ.get("AQUILACHAT_SHARED_DATA"), _REPO_ROOT.parent / "shared" / "data",
                      Path("/work/shared/data")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (as stored, compressed or not)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Problem:
    """One code problem, normalised across datasets.

    Attributes:
        task_id: the dataset's id (``"CPP/12"``, ``"HumanEval/0"``, ``"MBPP/11"``).
        language: one of :data:`LANGUAGES`.
        kind: ``"humaneval-x"``, ``"humaneval"`` or ``"mbpp"`` (decides program assembly).
        prompt: what the model is asked to continue.
        canonical_solution: the reference completion of ``prompt``.
        fields: the raw row (``test``, ``import``, ``test_setup``, ``entry_point``, ...).
        source: ``"file:line"`` of the row, for error messages.
    """

    task_id: str
    language: str
    kind: str
    prompt: str
    canonical_solution: str
    fields: dict[str, Any] = field(repr=False)
    source: str = ""


_REQUIRED = {
    "humaneval-x": ("task_id", "prompt", "canonical_solution", "test"),
    "humaneval": ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
    "mbpp": ("task_id", "text", "code", "test_list"),
}
_EXTRA_REQUIRED = {"go": ("import", "test_setup"), "rust": ("declaration",)}


def _detect_kind(row: dict[str, Any]) -> str:
    if "test_list" in row:
        return "mbpp"
    task = str(row.get("task_id", ""))
    if task.split("/")[0].lower() in _PREFIX_TO_LANG:
        return "humaneval-x"
    if "entry_point" in row:
        return "humaneval"
    if "/" in task and "canonical_solution" in row:
        return "humaneval-x"  # with an unknown language prefix: reported as such below
    return "unknown"


def mbpp_prompt(row: dict[str, Any]) -> str:
    """The MBPP prompt of the bigcode-evaluation-harness (``tasks/mbpp.py``): the description and
    the first test as a docstring; the model writes the whole function after it."""
    return f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n'


def load_code_problems(path: str | os.PathLike, *, kind: str | None = None) -> list[Problem]:
    """Read a HumanEval-X, HumanEval or MBPP file (format detected from the first row unless
    ``kind`` is given); rows of a HumanEval-X file may mix languages (by ``task_id`` prefix).

    Raises:
        DataError: unknown format, a missing or mistyped field, an unknown language prefix or a
            duplicate ``task_id``, naming ``file:line`` and the field.
    """
    path = Path(path)
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for lineno, row in iter_objects(path):
        where = f"{path}:{lineno}"
        k = kind or _detect_kind(row)
        if k not in _REQUIRED:
            raise DataError(f"{where}: not a HumanEval-X, HumanEval or MBPP row (fields: {', '.join(sorted(row))})")
        kind = k
        for name in _REQUIRED[k]:
            if name not in row:
                raise DataError(f"{where}: missing field {name!r} for a {k} row")
        if k == "mbpp":
            if not isinstance(row["test_list"], list) or not row["test_list"] or \
                    not all(isinstance(t, str) for t in row["test_list"]):
                raise DataError(f"{where}: field 'test_list' must be a non-empty list of strings")
            task_id = f"MBPP/{row['task_id']}"
            lang, prompt, canonical = "python", mbpp_prompt(row), row["code"]
        elif k == "humaneval":
            task_id, lang, prompt, canonical = str(row["task_id"]), "python", row["prompt"], row["canonical_solution"]
        else:
            task_id = str(row["task_id"])
            prefix = task_id.split("/")[0].lower()
            if prefix not in _PREFIX_TO_LANG:
                raise DataError(f"{where}: field 'task_id' {task_id!r} does not start with a known language "
                                f"({', '.join(TASK_PREFIX.values())})")
            lang = _PREFIX_TO_LANG[prefix]
            for name in _EXTRA_REQUIRED.get(lang, ()):
                if name not in row:
                    raise DataError(f"{where}: missing field {name!r} for a {TASK_PREFIX[lang]} row")
            prompt = row["prompt"] + (row["declaration"] if lang == "rust" else "")
            canonical = row["canonical_solution"]
        for name in ("prompt", "canonical_solution", "test", "code", "text", "test_setup", "import"):
            if name in row and not isinstance(row[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
        if task_id in seen:
            raise DataError(f"{where}: duplicate task_id {task_id!r} (first at {seen[task_id]})")
        seen[task_id] = where
        problems.append(Problem(task_id, lang, k, prompt, canonical, row, where))
    if not problems:
        raise DataError(f"{path}: no problems in the file")
    return problems


@dataclass
class CodeDataset:
    """The problems of one language from one file."""

    name: str
    language: str
    path: Path
    problems: list[Problem]

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def resolve_code_datasets(dataset: str, languages: list[str], *, data_dir: Path | None = None) -> list[CodeDataset]:
    """Find and read the problems of ``languages`` in ``dataset``.

    ``dataset`` is ``humaneval-x`` (``<data>/code_eval/humaneval-x/humaneval_<lang>.jsonl.gz``),
    ``humaneval`` or ``mbpp`` (Python only), a directory laid out like ``humaneval-x/``, or a file
    of any of these formats. ``data_dir`` defaults to :func:`shared_data_dir`.

    Raises:
        DataError: unknown language, a language the dataset does not have, missing files.
    """
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise DataError(f"unknown language {unknown[0]!r}; known: {', '.join(LANGUAGES)}")
    named = {"humaneval-x", "humaneval", "mbpp"}
    if dataset in named:
        data_dir = data_dir or shared_data_dir()
        if data_dir is None:
            raise DataError(f"dataset {dataset!r}: no data directory (set $AQUILACHAT_SHARED_DATA or pass --data-dir)")
        base = Path(data_dir) / "code_eval"
        if dataset == "humaneval":
            files = {"python": base / "HumanEval.jsonl.gz"}
        elif dataset == "mbpp":
            files = {"python": base / "mbpp.jsonl"}
        else:
            files = {lang: base / "humaneval-x" / f"humaneval_{lang}.jsonl.gz" for lang in LANGUAGES}
    elif Path(dataset).is_dir():
        files = {}
        for lang in LANGUAGES:
            for name in (f"humaneval_{lang}.jsonl.gz", f"humaneval_{lang}.jsonl"):
                if (Path(dataset) / name).exists():
                    files[lang] = Path(dataset) / name
                    break
    elif Path(dataset).is_file():
        problems = load_code_problems(dataset)
        out = []
        for lang in languages:
            chosen = [p for p in problems if p.language == lang]
            if not chosen:
                have = sorted({p.language for p in problems})
                raise DataError(f"{dataset}: no {lang} problems (the file has: {', '.join(have)})")
            out.append(CodeDataset(Path(dataset).name, lang, Path(dataset), chosen))
        return out
    else:
        raise DataError(f"dataset {dataset!r}: not humaneval-x, humaneval, mbpp, a directory or a file")
    out = []
    for lang in languages:
        if lang not in files:
            raise DataError(f"dataset {dataset!r} has no {lang} problems (languages: {', '.join(files)})")
        if not files[lang].exists():
            raise DataError(f"{files[lang]}: dataset file not found")
        problems = [p for p in load_code_problems(files[lang]) if p.language == lang]
        out.append(CodeDataset(dataset if dataset in named else Path(dataset).name, lang, files[lang], problems))
    return out
