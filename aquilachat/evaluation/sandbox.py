"""Run untrusted programs (model-written code) with time, memory and process limits, no network,
and a throw-away working directory.

Every command runs through the launcher :mod:`aquilachat.evaluation._jail` in a fresh interpreter
(no ``preexec_fn`` in this multi-threaded process). What each run gets:

- **No network**: a new network namespace whose only interface (loopback) is down; a connection
  to any address, the host's loopback included, fails with ``ENETUNREACH``.
- **Its own processes only**: a new PID namespace; the program is PID 2 under a tiny reaper, and
  when the program ends (or the harness kills it on timeout) the kernel kills everything it
  started. When running as root, each concurrently running sample also gets its own unused uid
  (``61000 + k`` by default, locked with ``flock`` across processes), so ``RLIMIT_NPROC`` — which
  the kernel counts per user and never enforces for root — bounds a fork bomb, samples cannot
  signal each other, and after each step every process of that uid is killed.
- **Files**: the working directory is a fresh directory owned by the sample's uid (mode 0700);
  ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are private size-limited ``tmpfs`` mounts (new mount
  namespace), so nothing is left behind and other users' temporary files are invisible. Files
  outside are protected by ordinary permissions: the sample's uid owns nothing else.
- **Limits** (``setrlimit``): CPU seconds, data segment (``RLIMIT_DATA``: heap and private
  writable mappings, which the JVM, Go and V8 tolerate, unlike ``RLIMIT_AS`` with their large
  address-space reservations), optionally address space, file size, open files, processes/threads,
  no core dumps; ``PR_SET_NO_NEW_PRIVS`` so set-uid programs cannot regain privileges.

Without root, the launcher uses an unprivileged user namespace for the same namespaces where the
kernel allows it; there is then no separate uid, so files the invoking user owns are writable by
the sample and ``RLIMIT_NPROC`` is counted together with the user's other processes (the limit
is set to their current count plus the budget). :attr:`Sandbox.isolation` says what was obtained.
If the network cannot be isolated, :class:`Sandbox` refuses to start unless ``allow_network``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import AquilaChatError

__all__ = ["Limits", "RunResult", "Sandbox", "SandboxError", "Workspace", "SAFE_PATH"]

JAIL = Path(__file__).with_name("_jail.py")
#: The PATH a sandboxed program sees (plus the directories of resolved toolchains).
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: First uid handed to samples when running as root; override with $AQUILACHAT_SANDBOX_UID_BASE.
DEFAULT_UID_BASE = 61000
UID_RANGE = 1000
#: Bytes of stdout/stderr kept per command (the rest is cut, marked with "...[truncated]").
OUTPUT_KEEP_BYTES = 64 * 1024
EXIT_SETUP = 125
#: Seconds the launcher gets to tear down a timed-out namespace before it is SIGKILLed itself.
KILL_GRACE_S = 5.0
_MB = 1 << 20


class SandboxError(AquilaChatError, RuntimeError):
    """The sandbox cannot be set up on this machine (no namespaces, no free uid, ...)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed command.

    Attributes:
        timeout_s: wall-clock seconds before the whole process tree is killed.
        cpu_s: CPU seconds per process (``RLIMIT_CPU``); default ``ceil(timeout_s) + 1``.
        memory_mb: ``RLIMIT_DATA`` in MiB (heap, ``mmap``-ed private writable memory, thread stacks).
        address_space_mb: ``RLIMIT_AS`` in MiB, or ``None`` for no limit (JVM, Go and V8 reserve
            several GiB of address space they never touch).
        max_processes: ``RLIMIT_NPROC``: processes *and threads* of the sample's uid.
        max_file_mb: ``RLIMIT_FSIZE`` in MiB (largest file a process may write).
        max_open_files: ``RLIMIT_NOFILE``.
        tmp_mb: size of each private ``tmpfs`` (``/tmp``, ``/var/tmp``, ``/dev/shm``).
    """

    timeout_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 1024
    address_space_mb: int | None = None
    max_processes: int = 64
    max_file_mb: int = 64
    max_open_files: int = 1024
    tmp_mb: int = 64

    def rlimits(self, nproc_offset: int = 0) -> dict[str, tuple[int, int]]:
        cpu = int(self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1)
        out = {
            "RLIMIT_CPU": (cpu, cpu + 1),  # soft: SIGXCPU, hard: SIGKILL
            "RLIMIT_DATA": (self.memory_mb * _MB,) * 2,
            "RLIMIT_FSIZE": (self.max_file_mb * _MB,) * 2,
            "RLIMIT_NOFILE": (self.max_open_files,) * 2,
            "RLIMIT_NPROC": (self.max_processes + nproc_offset,) * 2,
            "RLIMIT_CORE": (0, 0),
        }
        if self.address_space_mb is not None:
            out["RLIMIT_AS"] = (self.address_space_mb * _MB,) * 2
        return out


@dataclass
class RunResult:
    """What one sandboxed command did.

    ``returncode`` is negative (``-signal``) when the program was killed by a signal;
    ``timed_out`` is true when the harness killed it at ``Limits.timeout_s``; ``sandbox_error``
    holds the launcher's message when the sandbox itself failed (then the sample is not judged).
    """

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    sandbox_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.sandbox_error is None

    def describe(self) -> str:
        """One short line: exit status or signal, or timeout."""
        if self.sandbox_error:
            return f"sandbox error: {self.sandbox_error}"
        if self.timed_out:
            return f"timed out after {self.wall_s:.1f}s"
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return f"exit status {self.returncode}"


@dataclass
class Workspace:
    """A throw-away working directory owned by the uid one sample runs as."""

    path: Path
    uid: int | None
    gid: int | None
    _sandbox: "Sandbox" = field(repr=False)

    def write(self, name: str, text: str | bytes) -> Path:
        """Write a file (relative to the workspace) that the sample's uid owns."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8") if isinstance(text, str) else text
        target.write_bytes(data)
        self._own(target)
        return target

    def copy_tree(self, src: Path, name: str) -> Path:
        """Copy a directory into the workspace (e.g. a warm Go build cache), owned by the sample."""
        target = self.path / name
        shutil.copytree(src, target, symlinks=True)
        if self.uid is not None:
            for root, dirs, files in os.walk(target):
                for n in (*dirs, *files):
                    os.lchown(os.path.join(root, n), self.uid, self.gid)
            os.lchown(target, self.uid, self.gid)
        return target

    def _own(self, path: Path) -> None:
        if self.uid is not None:
            for p in [path, *[q for q in path.parents if self.path in q.parents]]:
                os.lchown(p, self.uid, self.gid)

    def run(self, argv: list[str], *, env: dict[str, str] | None = None,
            limits: Limits | None = None) -> RunResult:
        """Run ``argv`` (``argv[0]`` an absolute path) in this workspace; see :meth:`Sandbox.run`."""
        return self._sandbox.run(self, argv, env=env, limits=limits)


class _UidPool:
    """Unused uids for samples, reserved across processes with ``flock`` on lock files."""

    def __init__(self, base: int, count: int) -> None:
        self.base, self.count = base, count
        self.lock_dir = Path(tempfile.gettempdir()) / f"aquilachat-sandbox-uids-{os.geteuid()}"
        self.lock_dir.mkdir(mode=0o700, exist_ok=True)
        st = self.lock_dir.lstat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise SandboxError(f"{self.lock_dir}: lock directory must be owned by us with mode 0700")
        self._mutex = threading.Lock()

    def acquire(self) -> tuple[int, int]:
        """A uid no user and no live process has, locked for us; returns ``(uid, lock fd)``."""
        with self._mutex:
            for uid in range(self.base, self.base + self.count):
                try:
                    pwd.getpwuid(uid)
                    continue  # a real account
                except KeyError:
                    pass
                fd = os.open(self.lock_dir / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                if _pids_of_uid(uid):  # leftovers of a crashed run: clean them before use
                    _kill_uid(uid)
                    if _pids_of_uid(uid):
                        os.close(fd)
                        continue
                return uid, fd
        raise SandboxError(f"no free sandbox uid in {self.base}..{self.base + self.count - 1}")

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing drops the flock


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real or effective uid is ``uid`` (``/proc/*/status``)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"State:") and line.split()[1:2] == [b"Z"]:
                        break  # a zombie holds nothing but its pid; its parent reaps it
                    if line.startswith(b"Uid:"):
                        ids = [int(x) for x in line.split()[1:3]]
                        if uid in ids:
                            pids.append(int(entry.name))
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def _kill_uid(uid: int, attempts: int = 20) -> None:
    """SIGKILL every process of ``uid``, using ``kill(-1)`` run as that uid (atomic w.r.t. fork)."""
    for _ in range(attempts):
        if not _pids_of_uid(uid):
            return
        subprocess.run([sys.executable, "-I", "-S", str(JAIL), "--kill-uid", str(uid)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=30, check=False)
        time.sleep(0.02)


def _user_task_count(uid: int) -> int:
    """Threads of all processes of ``uid`` (what ``RLIMIT_NPROC`` counts)."""
    total = 0
    for pid in _pids_of_uid(uid):
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return total


def _read_head(path: Path, limit: int = OUTPUT_KEEP_BYTES) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n...[truncated]" if len(data) > limit else text


class Sandbox:
    """Creates workspaces and runs commands in them (see the module docstring for what is isolated).

    Args:
        allow_network: run even where the network cannot be isolated (then samples *can* reach
            the network; recorded in :attr:`isolation`).
        uid_base: first uid for samples when root (default ``$AQUILACHAT_SANDBOX_UID_BASE`` or 61000).

    Raises:
        SandboxError: the network cannot be isolated and ``allow_network`` is false, or the
            launcher does not work at all.
    """

    def __init__(self, *, allow_network: bool = False, uid_base: int | None = None) -> None:
        self.root = os.geteuid() == 0
        base = uid_base or int(os.environ.get("AQUILACHAT_SANDBOX_UID_BASE", DEFAULT_UID_BASE))
        self._uids = _UidPool(base, UID_RANGE) if self.root else None
        self._dir = Path(tempfile.mkdtemp(prefix="aquilachat-eval-"))
        os.chmod(self._dir, 0o711)  # samples may traverse to their own 0700 directory, not list
        self._out_dir = self._dir / ".out"
        self._out_dir.mkdir(mode=0o700)
        self._counter = itertools.count()
        self._closed = False
        # removes the directory at interpreter exit too, if close() was never called
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self.isolation = self._probe()
        self.network_isolated = bool(self.isolation.get("network_blocked"))
        if not self.network_isolated and not allow_network:
            self.close()
            raise SandboxError(
                "cannot isolate the network for untrusted code on this machine (no network namespace: "
                "run as root, or enable unprivileged user namespaces); pass --allow-network to run anyway")
        self.allow_network = allow_network

    # ------------------------------------------------------------------ setup
    def _probe(self) -> dict:
        uid, fd = self._uids.acquire() if self._uids else (None, None)
        try:
            cfg = {"uid": uid, "gid": uid}
            proc = subprocess.run([sys.executable, "-I", "-S", str(JAIL), "--probe", json.dumps(cfg)],
                                  capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        finally:
            if fd is not None:
                _UidPool.release(fd)
        try:
            report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise SandboxError(f"sandbox launcher probe failed: {proc.stderr.decode(errors='replace').strip()[:500]}") from None
        report["uid_separation"] = bool(report.get("uid_switch"))
        return report

    def describe(self) -> dict:
        """What this sandbox isolates, for reports."""
        return {
            "network_isolated": self.network_isolated,
            "namespaces": self.isolation.get("namespaces", []),
            "private_tmp": self.isolation.get("private_tmp", False),
            "separate_uid_per_sample": self.isolation.get("uid_separation", False),
            "running_as_root": self.root,
            "launcher": "aquilachat.evaluation._jail (unshare + setrlimit + setresuid + no_new_privs)",
        }

    def private_dir(self, name: str) -> Path:
        """A directory only this process's user can read (templates, logs), removed on :meth:`close`."""
        path = self._out_dir / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    # ------------------------------------------------------------------ workspaces
    @contextlib.contextmanager
    def workspace(self) -> Iterator[Workspace]:
        """A fresh working directory (and, as root, a fresh uid) for one sample; everything the
        sample left behind (files, processes) is removed on exit."""
        if self._closed:
            raise SandboxError("sandbox is closed")
        uid, fd = self._uids.acquire() if self._uids and self.isolation.get("uid_switch") else (None, None)
        path = self._dir / f"w{next(self._counter)}"
        path.mkdir(mode=0o700)
        if uid is not None:
            os.chown(path, uid, uid)
        ws = Workspace(path, uid, uid, self)
        try:
            yield ws
        finally:
            try:
                if uid is not None:
                    _kill_uid(uid)
                shutil.rmtree(path, ignore_errors=True)
            finally:
                if fd is not None:
                    _UidPool.release(fd)

    # ------------------------------------------------------------------ running
    def run(self, ws: Workspace, argv: list[str], *, env: dict[str, str] | None = None,
            limits: Limits | None = None) -> RunResult:
        """Run ``argv`` in ``ws`` under ``limits`` and wait for it (at most ``limits.timeout_s``).

        ``env`` is the *whole* environment of the program (nothing is inherited from this process,
        so API keys never reach samples); ``PATH``, ``HOME`` and ``TMPDIR`` get safe defaults.
        """
        limits = limits or Limits()
        run_env = {"PATH": SAFE_PATH, "HOME": str(ws.path), "TMPDIR": str(ws.path),
                   "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        run_env.update(env or {})
        nproc_offset = 0 if ws.uid is not None else _user_task_count(os.getuid())
        use = set(self.isolation.get("namespaces", []))
        cfg = {
            "cwd": str(ws.path), "uid": ws.uid, "gid": ws.gid,
            "net": "net" in use and self.network_isolated,
            "fs": "mount" in use and bool(self.isolation.get("private_tmp")),
            "pid": "pid" in use,
            "require": True,
            "tmp_size": limits.tmp_mb * _MB,
            "rlimits": limits.rlimits(nproc_offset),
        }
        n = next(self._counter)
        out_path, err_path = self._out_dir / f"{n}.out", self._out_dir / f"{n}.err"
        timed_out = False
        t0 = time.monotonic()
        # Output goes to files, not pipes: a grandchild holding a pipe open cannot block us.
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(JAIL), json.dumps(cfg), "--", *argv],
                                    cwd=str(ws.path), env=run_env, stdin=subprocess.DEVNULL,
                                    stdout=out_f, stderr=err_f, start_new_session=True, close_fds=True)
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                # SIGTERM to the launcher only: it SIGKILLs the namespace's PID 1 and reaps it, so
                # the kernel tears the namespace down before the launcher exits (no orphans).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # anything left in the session
                proc.wait()
        wall = time.monotonic() - t0
        if ws.uid is not None:
            _kill_uid(ws.uid)
        stdout, stderr = _read_head(out_path), _read_head(err_path)
        for p in (out_path, err_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        sandbox_error = None
        if proc.returncode == EXIT_SETUP and stderr.startswith("aquilachat-sandbox:"):
            sandbox_error = stderr.strip().splitlines()[0].removeprefix("aquilachat-sandbox:").strip()
        return RunResult(list(argv), proc.returncode, stdout, stderr, timed_out, wall, sandbox_error)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Remove the sandbox's directory (idempotent)."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
