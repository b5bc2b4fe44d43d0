"""The sandbox: hostile samples fail alone, and neither the harness nor other samples notice.

Planted samples (Python, and C++ where g++ is present): a wrong answer, an infinite loop, a fork
bomb, a memory hog, a write outside the working directory and a network connection to a loopback
listener this test opens in the parent's namespace. They run mixed with correct samples through
the real pipeline (two workers in parallel); each must fail, every correct sample must pass, the
protected file must be untouched, the listener must see no connection and no process of a sample
uid may survive.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from aquilachat.sampling_params import SamplingParams
from aquilachat.evaluation.code import CodeEvalConfig, execute_sample, run_code_eval
from aquilachat.evaluation.datasets import Problem
from aquilachat.evaluation.sandbox import Limits, _pids_of_uid
from tests.eval_support import sandbox_or_skip, toolchain

PY_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
PY_TEST = "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n"
GOOD = "    return a + b\n"


def _hostile_bodies(protected: Path, port: int) -> dict[str, str]:
    """Function bodies (indented; they run when check() calls add) that misbehave."""
    return {
        "wrong": "    return a - b\n",
        "infinite_loop": "    while True:\n        pass\n",
        "fork_bomb": ("    import os\n    while True:\n        try:\n            os.fork()\n"
                      "        except OSError:\n            pass\n"),
        "memory_hog": "    chunks = []\n    while True:\n        chunks.append(bytearray(64 * 1024 * 1024))\n",
        "write_outside": (f"    with open({str(protected)!r}, 'w') as f:\n        f.write('pwned')\n    return a + b\n"),
        "network": ("    import socket\n"
                    f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                    "    s.sendall(b'exfiltrated')\n    return a + b\n"),
    }


class _ScriptedGenerator:
    """Returns, for every prompt, the completions planted for it."""

    def __init__(self, by_prompt: dict[str, list[str]]) -> None:
        self.by_prompt = by_prompt
        self.description = {"backend": "scripted"}

    def complete(self, prompts, n, params):
        return [self.by_prompt[p][:n] for p in prompts]

    def chat(self, conversations, params):  # pragma: no cover - unused
        raise NotImplementedError


def _dataset(path: Path, names: list[str]) -> dict[str, str]:
    """A HumanEval-X Python file with one copy of the add() problem per name (distinct prompts)."""
    prompts = {}
    with open(path, "w", encoding="utf-8") as f:
        for i, name in enumerate(names):
            prompt = f"# sample: {name}\n" + PY_PROMPT
            prompts[name] = prompt
            f.write(json.dumps({"task_id": f"Python/{i}", "prompt": prompt, "canonical_solution": GOOD,
                                "test": PY_TEST, "declaration": PY_PROMPT, "example_test": ""}) + "\n")
    return prompts


def _visible_dir() -> Path:
    """A parent directory the sandbox does not replace with a private tmpfs (unlike /tmp), so that
    the write is refused by file permissions, not by invisibility."""
    for cand in (Path("/run"), Path(__file__).resolve().parents[1]):
        if cand.is_dir() and os.access(cand, os.W_OK) and cand.stat().st_mode & 0o001:
            return cand
    return Path(tempfile.gettempdir())


@pytest.fixture
def protected_file():
    d = Path(tempfile.mkdtemp(prefix="aquilachat-protected-", dir=_visible_dir()))
    os.chmod(d, 0o755)
    f = d / "precious.txt"
    f.write_text("original\n")
    os.chmod(f, 0o644)
    yield f
    f.unlink(missing_ok=True)
    d.rmdir()


@pytest.fixture
def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def _accepted_any(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_isolation_is_complete_here():
    sb = sandbox_or_skip()
    d = sb.describe()
    assert d["network_isolated"]
    if os.geteuid() != 0:
        pytest.skip("not root: no per-sample uid (see docs/evaluation.md)")
    assert d["separate_uid_per_sample"] and "pid" in d["namespaces"] and d["private_tmp"]


def test_hostile_python_samples_fail_alone(tmp_path, protected_file, listener):
    sb = sandbox_or_skip()
    if os.geteuid() != 0:
        pytest.skip("the write-protection and fork-bomb guarantees need root (a separate uid per sample)")
    tc = toolchain("python")
    if not tc.available:
        pytest.skip(f"python toolchain unusable in the sandbox: {tc.reason}")
    port = listener.getsockname()[1]
    hostile = _hostile_bodies(protected_file, port)
    names = []
    for name in hostile:  # a correct sample next to each hostile one
        names += [name, f"good_after_{name}"]
    prompts = _dataset(tmp_path / "planted.jsonl", names)
    by_prompt = {prompts[n]: [hostile.get(n, GOOD)] for n in names}
    cfg = CodeEvalConfig(dataset=str(tmp_path / "planted.jsonl"), languages=["python"], n=1, ks=[1],
                         workers=2, timeout_s=5.0, memory_mb=256, params=SamplingParams(temperature=0.0, max_tokens=64))
    t0 = time.monotonic()
    report, results = run_code_eval(cfg, _ScriptedGenerator(by_prompt), sandbox=sb, progress=False)
    elapsed = time.monotonic() - t0
    status = {names[int(r.task_id.split("/")[1])]: r for r in results}
    for name in hostile:
        assert not status[name].passed, f"{name} passed: {status[name]}"
        assert status[f"good_after_{name}"].passed, f"good sample next to {name}: {status[f'good_after_{name}'].detail}"
    assert status["wrong"].status == "failed" and "AssertionError" in status["wrong"].detail
    assert status["infinite_loop"].status == "timeout"
    assert status["fork_bomb"].status in ("timeout", "failed")
    assert status["memory_hog"].status == "failed" and "MemoryError" in status["memory_hog"].detail
    assert status["write_outside"].status == "failed" and "Permission denied" in status["write_outside"].detail
    assert status["network"].status == "failed" and "Network is unreachable" in status["network"].detail
    assert protected_file.read_text() == "original\n"
    assert stat.S_IMODE(protected_file.stat().st_mode) == 0o644
    assert not _accepted_any(listener), "a sample reached the parent's loopback listener"
    assert report["languages"]["python"]["pass@1"] == pytest.approx(0.5)
    assert elapsed < 120
    # nothing is still running under any sample uid not in use by someone else right now
    base = sb._uids.base
    for uid in range(base, base + 8):
        fd = os.open(sb._uids.lock_dir / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # another evaluation (another process) holds it
        finally:
            os.close(fd)
        assert _pids_of_uid(uid) == [], f"processes of uid {uid} survived"


def test_escaped_daemon_is_killed_with_its_sample():
    """A grandchild that leaves the session (setsid + fork) dies when the sample ends."""
    sb = sandbox_or_skip()
    tc = toolchain("python")
    if not tc.available:
        pytest.skip(tc.reason)
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\nprint('parent done')\n")
    with sb.workspace() as ws:
        ws.write("d.py", code)
        r = ws.run([tc.tools["python"], "d.py"], limits=Limits(timeout_s=10))
        uid = ws.uid
        assert r.ok and r.stdout.strip() == "parent done"
        if uid is not None:
            assert _pids_of_uid(uid) == []


def test_private_tmp_and_clean_environment(monkeypatch):
    sb = sandbox_or_skip()
    tc = toolchain("python")
    if not tc.available:
        pytest.skip(tc.reason)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-never-leak")
    marker = Path(tempfile.gettempdir()) / f"aquilachat-visible-{os.getpid()}"
    marker.write_text("host tmp")
    try:
        code = (f"import os\nprint(os.path.exists({str(marker)!r}))\nprint('OPENAI_API_KEY' in os.environ)\n"
                "open('/tmp/left-behind', 'w').write('x')\nprint(os.getcwd())\n")
        with sb.workspace() as ws:
            ws.write("t.py", code)
            r = ws.run([tc.tools["python"], "t.py"])
            assert r.ok, r.stderr
            lines = r.stdout.split()
            if sb.describe()["private_tmp"]:
                assert lines[0] == "False"  # the host's /tmp is invisible
                assert not Path("/tmp/left-behind").exists()
            assert lines[1] == "False"
            assert lines[2] == str(ws.path)
    finally:
        marker.unlink()


def test_hostile_cpp_samples_fail_alone():
    sb = sandbox_or_skip()
    tc = toolchain("cpp")
    if not tc.available:
        pytest.skip(f"C++ skipped: {tc.reason}")
    prompt = "#include<stdlib.h>\n#include<unistd.h>\nint add(int a, int b){\n"
    test = "#include<assert.h>\nint main(){ assert(add(2, 3) == 5); }\n"
    bodies = {
        "good": "    return a + b;\n}\n",
        "fork_bomb": "    while (1) fork();\n}\n",
        "memory_hog": ("    while (1) { char* p = (char*)malloc(1 << 26); if (!p) abort(); "
                       "for (int i = 0; i < (1 << 26); i += 4096) p[i] = 1; }\n}\n"),
        "crash": "    int* p = 0; *p = 1; return 0;\n}\n",
    }
    problem = Problem("CPP/0", "cpp", "humaneval-x", prompt, bodies["good"], {"test": test, "prompt": prompt})
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        futs = {name: pool.submit(execute_sample, sb, tc, problem, body, timeout_s=4.0) for name, body in bodies.items()}
        res = {name: f.result() for name, f in futs.items()}
    assert res["good"].passed, res["good"].detail
    for name in ("fork_bomb", "memory_hog", "crash"):
        assert not res[name].passed and res[name].status in ("failed", "timeout"), (name, res[name])
    assert "SIGSEGV" in res["crash"].detail
