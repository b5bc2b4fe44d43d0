"""Code evaluation: canonical solutions pass (self-test), completions from an OpenAI-compatible
server are truncated, executed and scored with pass@k, missing toolchains are reported as skipped,
and malformed datasets give errors that name the file, line and field."""

from __future__ import annotations

import json

import pytest

from aquilachat.errors import DataError, ValidationError
from aquilachat.evaluation.backends import BackendError, OpenAIHTTPGenerator
from aquilachat.evaluation.code import CodeEvalConfig, run_code_eval
from aquilachat.evaluation.datasets import KNOWN_BROKEN_CANONICAL, load_code_problems, resolve_code_datasets
from aquilachat.evaluation.languages import LANGUAGE_SPECS
from aquilachat.sampling_params import SamplingParams
from tests.eval_support import FakeOpenAIServer, sandbox_or_skip, shared_data_or_skip

ALL = ["python", "cpp", "java", "js", "go", "rust"]
#: Problem 162 of each language, which needs extra libraries: OpenSSL
#: (CPP/162), the js-md5 stand-in (JavaScript/162), Go packages imported on use (Go/162:
#: crypto/md5), java.security (Java/162), the md5 crate (Rust/162). (Boost, for CPP/22 and
#: CPP/137, is part of the C++ toolchain probe.)
SUBSET = ["162"]


def test_self_test_subset_all_languages():
    """Canonical solutions of a few problems per language pass; absent toolchains are listed as skipped."""
    data = shared_data_or_skip()
    sb = sandbox_or_skip()
    langs = [lang for lang in ALL if lang != "rust" or _rust_crates_built()]
    cfg = CodeEvalConfig(dataset="humaneval-x", languages=langs, self_test=True, tasks=SUBSET, workers=2,
                         data_dir=data)
    report, results = run_code_eval(cfg, sandbox=sb, progress=False)
    assert set(report["languages"]) == set(langs)
    for lang, e in report["languages"].items():
        if e["status"] == "skipped":
            assert e["reason"] and report["skipped"][lang] == e["reason"]
            continue
        assert e["problems"] == len(SUBSET)
        assert e["pass@1"] == 1.0, (lang, [r.detail for r in results if r.language == lang and not r.passed])
        assert e["self_test_ok"] and e["counts"]["passed"] == len(SUBSET)
    # every result belongs to an evaluated language; skipped ones contributed no "failed" samples
    evaluated = {lang for lang, e in report["languages"].items() if e["status"] == "evaluated"}
    assert {r.language for r in results} == evaluated
    assert "python" in evaluated


def _rust_crates_built() -> bool:
    """Rust joins the default suite only once its crates are built (about a minute, cached in
    /var/cache/aquilachat); the slow suite always includes it."""
    from aquilachat.evaluation.languages import cache_root
    import os
    return bool(os.environ.get("AQUILACHAT_RUST_DEPS")) or any(cache_root().glob("rust-deps-*/externs.json"))


@pytest.mark.slow
def test_rust_subset_builds_crates_and_passes():
    data = shared_data_or_skip()
    sb = sandbox_or_skip()
    cfg = CodeEvalConfig(dataset="humaneval-x", languages=["rust"], self_test=True, tasks=["0", "50", "162"], data_dir=data)
    report, results = run_code_eval(cfg, sandbox=sb, progress=False)
    e = report["languages"]["rust"]
    if e["status"] == "skipped":
        pytest.skip(e["reason"])
    assert e["pass@1"] == 1.0, [r.detail for r in results if not r.passed]  # Rust/50 needs rand 0.4's API


def test_known_broken_canonical_solutions_are_listed_not_hidden():
    data = shared_data_or_skip()
    sb = sandbox_or_skip()
    cfg = CodeEvalConfig(dataset="humaneval-x", languages=["js"], self_test=True, tasks=["112", "155", "0"],
                         data_dir=data)
    report, results = run_code_eval(cfg, sandbox=sb, progress=False)
    e = report["languages"]["js"]
    if e["status"] == "skipped":
        pytest.skip(e["reason"])
    assert e["problems"] == 3 and e["pass@1"] == pytest.approx(1 / 3)
    assert set(e["known_broken_canonical"]) == {"JavaScript/112", "JavaScript/155"} == set(KNOWN_BROKEN_CANONICAL)
    assert e["pass@1_excluding_known_broken"] == 1.0 and e["self_test_ok"]


@pytest.mark.parametrize("dataset", ["humaneval", "mbpp"])
def test_self_test_python_datasets_subset(dataset):
    data = shared_data_or_skip()
    sb = sandbox_or_skip()
    cfg = CodeEvalConfig(dataset=dataset, languages=["python"], self_test=True, limit=8, data_dir=data)
    report, results = run_code_eval(cfg, sandbox=sb, progress=False)
    e = report["languages"]["python"]
    assert e["pass@1"] == 1.0, [r.detail for r in results if not r.passed]


def test_truncation_keeps_canonical_functions_and_restores_stopped_braces():
    """Each language's cut rule applied to canonical solutions plus trailing junk gives the
    canonical solution back; and a completion cut by the stop string "\\n}" gets its brace back."""
    data = shared_data_or_skip()
    junk = {"python": "\n\ndef extra():\n    pass\n\nprint(1)\n", "cpp": "\n\nint main(){ return 1; }\n",
            "java": "\n\nclass Junk { }\n", "js": "\n\nconsole.log('junk')\n", "go": "\n\nfunc main() {\n}\n",
            "rust": "\n\nfn main(){}\n"}
    for ds in resolve_code_datasets("humaneval-x", ALL, data_dir=data):
        spec = LANGUAGE_SPECS[ds.language]
        same = 0
        for p in ds.problems:
            out = spec.truncate(p.canonical_solution + junk[ds.language], p)
            same += out.rstrip() == p.canonical_solution.rstrip()
            canon = p.canonical_solution.rstrip()
            if ds.language != "python" and canon.endswith("\n}") and canon.count("\n}") == 1:
                stopped = p.canonical_solution.rstrip()[:-2]  # what generation returns at stop "\n}"
                restored = spec.truncate(stopped, p)
                assert _squash(restored) == _squash(p.canonical_solution), p.task_id
        # a helper function defined after the main one (Go/72, some Rust) is cut, as in CodeGeeX
        assert same >= len(ds.problems) - 6, (ds.language, same)


def _squash(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())


def _mixed_completions(problem, junk):
    good = problem.canonical_solution
    if problem.language == "python":
        wrong = "    raise ValueError('wrong')\n"
    else:
        wrong = "    throw 1;\n}\n" if problem.language in ("js", "cpp") else good.replace("return", "return 0 *", 1)
    return [good + junk, wrong, good + junk]


def test_http_backend_end_to_end_pass_at_k():
    """Completions come from a fake OpenAI-compatible server on 127.0.0.1: two of three pass."""
    data = shared_data_or_skip()
    sb = sandbox_or_skip()
    problems = {}
    for lang in ("python", "js"):
        for p in resolve_code_datasets("humaneval-x", [lang], data_dir=data)[0].problems[:3]:
            problems[p.prompt] = p
    junk = {"python": "\n\nif __name__ == '__main__':\n    print(broken(\n", "js": "\n\nconsole.log('junk')\n"}

    def completion(body):
        p = problems[body["prompt"]]
        return _mixed_completions(p, junk[p.language])[: body["n"]]

    with FakeOpenAIServer(completion=completion, fail_first=1) as server:
        gen = OpenAIHTTPGenerator(server.url, "fake-coder", api_key="k", concurrency=2)
        cfg = CodeEvalConfig(dataset="humaneval-x", languages=["python", "js"], n=3, ks=[1, 2, 3, 10], limit=3,
                             params=SamplingParams(temperature=0.8, top_p=0.95, max_tokens=300, seed=1), data_dir=data)
        report, results = run_code_eval(cfg, gen, sandbox=sb, progress=False)
        gen.close()
    for lang in ("python", "js"):
        e = report["languages"][lang]
        if e["status"] == "skipped":
            continue
        assert e["samples"] == 9 and e["counts"]["passed"] == 6
        assert e["pass@1"] == pytest.approx(2 / 3)
        assert e["pass@2"] == pytest.approx(1.0) and e["pass@3"] == pytest.approx(1.0)
        assert "pass@10" not in e and e["omitted_k"] == [10]
    bodies = [b for path, b in server.requests if path == "/v1/completions"]
    assert len(bodies) == 6 + 1  # one retried after HTTP 503
    for b in bodies:  # the fields that differ from their defaults, and each language's own stop strings
        assert set(b) == {"model", "prompt", "n", "temperature", "top_p", "max_tokens", "seed", "stop"}
        assert b["model"] == "fake-coder" and b["n"] == 3 and b["max_tokens"] == 300 and b["seed"] == 1
        assert b["temperature"] == 0.8 and b["top_p"] == 0.95
        assert b["stop"] == list(LANGUAGE_SPECS[problems[b["prompt"]].language].stop)
    # the stored completions are the truncated ones
    kept = [r.completion for r in results if r.passed]
    assert kept and not any("junk" in c or "broken(" in c for c in kept)


def test_http_backend_errors_name_the_url():
    with FakeOpenAIServer(completion=lambda body: []) as server:
        gen = OpenAIHTTPGenerator(server.url, "m")
        with pytest.raises(BackendError, match="/v1/completions"):
            gen.complete(["x"], 1, SamplingParams())
        gen.close()
    gen = OpenAIHTTPGenerator("http://127.0.0.1:9/v1", "m")  # nothing listens on the discard port
    import aquilachat.evaluation.backends as backends
    old = backends.HTTP_RETRIES
    backends.HTTP_RETRIES = 1
    try:
        with pytest.raises(BackendError, match="127.0.0.1:9"):
            gen.chat([[{"role": "user", "content": "hi"}]], SamplingParams())
    finally:
        backends.HTTP_RETRIES = old
        gen.close()
    with pytest.raises(ValidationError):
        OpenAIHTTPGenerator("127.0.0.1:7000", "m")


def test_dataset_errors_name_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"task_id": "CPP/0", "prompt": "int f(){\n", "canonical_solution": "}\n", "test": ""}) + "\n"
                 + json.dumps({"task_id": "CPP/1", "prompt": "int g(){\n", "canonical_solution": "}\n"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'test'"):
        load_code_problems(f)
    f.write_text(json.dumps({"task_id": "Cobol/0", "prompt": "", "canonical_solution": "", "test": ""}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*Cobol/0"):
        load_code_problems(f)
    row = {"task_id": "Go/0", "prompt": "", "canonical_solution": "", "test": "", "import": ""}
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'test_setup'"):
        load_code_problems(f)
    row = {"task_id": "Python/0", "prompt": "", "canonical_solution": "", "test": ""}
    f.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: duplicate task_id 'Python/0' \(first at .*bad.jsonl:1\)"):
        load_code_problems(f)
    f.write_text('{"task_id": "Python/0",\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON"):
        load_code_problems(f)
    with pytest.raises(DataError, match="no java problems"):
        f.write_text(json.dumps(row) + "\n")
        resolve_code_datasets(str(f), ["java"])
    with pytest.raises(DataError, match="unknown language 'cobol'"):
        resolve_code_datasets("humaneval-x", ["cobol"], data_dir=tmp_path)
    with pytest.raises(ValidationError, match="model"):
        run_code_eval(CodeEvalConfig(dataset=str(f), languages=["python"]))


def test_cli_self_test_reports_skipped_language(tmp_path, monkeypatch, capsys):
    """`eval code --self-test` writes JSON, Markdown, PNG and samples; a language whose toolchain
    is missing is listed as skipped in all of them and does not fail the self-test."""
    data = shared_data_or_skip()
    sandbox_or_skip()
    from aquilachat.cli import main
    monkeypatch.setattr(LANGUAGE_SPECS["go"], "find_tools", lambda: "go not found (install Debian package golang-go)")
    out = tmp_path / "rep"
    rc = main(["eval", "code", "--self-test", "--languages", "python,go", "--limit", "2", "--output", str(out),
               "--data-dir", str(data), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rep = json.loads((out / "code_eval.json").read_text())
    assert rep["languages"]["python"]["pass@1"] == 1.0
    assert rep["languages"]["go"]["status"] == "skipped" and "golang-go" in rep["skipped"]["go"]
    md = (out / "code_eval.md").read_text()
    assert "**skipped**" in md and "go not found" in md
    meta = rep["metadata"]
    assert meta["datasets"] and all(len(d["sha256"]) == 64 for d in meta["datasets"])
    assert meta["packages"]["aquilachat"] and meta["date"] and rep["sandbox"]["network_isolated"]
    assert (out / "code_eval.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "code_eval_samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["status"] == "passed" for x in lines)
    assert "go: skipped" in captured.out


def test_cli_code_needs_a_model(capsys):
    from aquilachat.cli import main
    assert main(["eval", "code", "--languages", "python", "--limit", "1"]) == 1
    assert "--model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("dataset,language", [("humaneval-x", lang) for lang in ALL]
                         + [("humaneval", "python"), ("mbpp", "python")])
def test_full_self_test(dataset, language):
    """Every problem of a dataset and language (minutes per language on two cores): pass@1 = 1.0
    except the documented upstream-broken canonical solutions; skipped without the toolchain."""
    data = shared_data_or_skip()
    sb = sandbox_or_skip()
    cfg = CodeEvalConfig(dataset=dataset, languages=[language], self_test=True, workers=2, data_dir=data)
    report, results = run_code_eval(cfg, sandbox=sb, progress=False)
    e = report["languages"][language]
    if e["status"] == "skipped":
        pytest.skip(f"{language}: {e['reason']}")
    assert e["problems"] == (974 if dataset == "mbpp" else 164)
    assert e["self_test_ok"], (e["not_passed"], [r.detail[:300] for r in results if not r.passed][:5])
    assert set(e["not_passed"]) <= set(KNOWN_BROKEN_CANONICAL)
