"""Sandbox launcher: isolate, limit, drop privileges, then ``execve`` one untrusted command.

This file is run as a script in a fresh interpreter (``python -I -S _jail.py CONFIG -- ARGV``),
never imported, so that the harness never calls Python code between ``fork`` and ``exec`` in its
own multi-threaded process (``subprocess``'s ``preexec_fn`` is unsafe with threads). It uses the
standard library only.

Order of operations (each step is needed by the next):

1. ``unshare`` new network, mount, IPC and PID namespaces (plus a user namespace when not root,
   where unprivileged user namespaces are allowed). The network namespace has only a loopback
   interface, which is down: every connection fails, to the host's loopback too.
2. In the new mount namespace: fresh size-limited ``tmpfs`` on ``/tmp``, ``/var/tmp`` and
   ``/dev/shm`` (so a sample can neither read other users' temporary files nor fill the host's
   memory-backed ``/dev/shm``); the working directory, which lives under ``/tmp``, is bind-mounted
   back at its own path from a file descriptor opened before the ``tmpfs`` hid it.
3. ``fork``: the child is PID 1 of the new PID namespace. When it exits or is killed, the kernel
   kills every process left in the namespace, so nothing a sample starts (fork bombs,
   ``setsid`` + double fork daemons) outlives it.
4. In the child: resource limits, then ``setgroups([])``/``setresgid``/``setresuid`` to the
   sandbox uid (root only), ``PR_SET_NO_NEW_PRIVS`` (no set-uid escalation), parent-death
   signal ``SIGKILL`` (set after the uid change, which clears it), ``chdir``, ``execve``.
5. The launcher (still root, outside the namespace, so the sample cannot signal it) waits and
   exits with the child's status; a child killed by signal N makes the launcher die of N.

``--probe`` reports, as one JSON line, which of these isolations this machine allows;
``--kill-uid UID`` sends ``SIGKILL`` to every process of ``UID`` (run as that uid, so ``kill(-1)``
reaches exactly that user's processes, atomically with respect to ``fork``).

Exit status 125 with a line starting ``aquilachat-sandbox:`` on stderr means the sandbox itself
could not be set up (the harness reports it as a sandbox error, not as a failed sample).
"""

import ctypes
import json
import os
import resource
import signal
import socket  # imported before the uid change: the sandbox user may not be able to read the stdlib
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
EXIT_SETUP = 125
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(msg):
    sys.stderr.write("aquilachat-sandbox: " + msg + "\n")
    sys.stderr.flush()
    os._exit(EXIT_SETUP)


def _errno_text():
    return os.strerror(ctypes.get_errno())


def _unshare(flags):
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _mount(source, target, fstype, flags, data):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    return _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(want_net, want_fs, want_pid):
    """Unshare what is asked and allowed; return the set of namespaces obtained."""
    got = set()
    flags = (CLONE_NEWNET if want_net else 0) | (CLONE_NEWNS | CLONE_NEWIPC if want_fs else 0) \
        | (CLONE_NEWPID if want_pid else 0)
    if not flags:
        return got
    if os.geteuid() != 0:
        # Unprivileged: a user namespace in which we map only our own uid/gid grants the
        # capabilities needed for the other namespaces (where the kernel allows it).
        uid, gid = os.getuid(), os.getgid()
        if not _unshare(CLONE_NEWUSER):
            return got
        try:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", "%d %d 1" % (uid, uid))
            _write("/proc/self/gid_map", "%d %d 1" % (gid, gid))
        except OSError:
            return got
        got.add("user")
    if _unshare(flags):
        return got | {n for n, f in (("net", CLONE_NEWNET), ("mount", CLONE_NEWNS), ("pid", CLONE_NEWPID))
                      if flags & f}
    # One at a time: some kernels or container profiles allow some namespaces only.
    for name, f in (("net", CLONE_NEWNET), ("mount", CLONE_NEWNS | CLONE_NEWIPC), ("pid", CLONE_NEWPID)):
        if flags & f and _unshare(f):
            got.add(name)
    return got


def private_tmp(workdir, tmp_size):
    """Fresh tmpfs on the temporary directories; ``workdir`` bind-mounted back. True on success."""
    if not _mount(None, "/", None, MS_REC | MS_PRIVATE, None):
        return False
    real = os.path.realpath(workdir) if workdir else None
    for d in TMP_DIRS:
        if not os.path.isdir(d) or os.path.islink(d):
            continue
        inside = real is not None and (real == d or real.startswith(d + "/"))
        fd = os.open(real, os.O_PATH | os.O_DIRECTORY) if inside else None
        if not _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%d,mode=1777" % tmp_size):
            return False
        if inside:
            os.makedirs(real, exist_ok=True)
            if not _mount("/proc/self/fd/%d" % fd, real, None, MS_BIND | MS_REC, None):
                return False
            os.close(fd)
    return True


def apply_limits(rlimits):
    for name, (soft, hard) in rlimits.items():
        resource.setrlimit(getattr(resource, name), (int(soft), int(hard)))


def drop_privileges(uid, gid):
    if uid is None or os.geteuid() != 0:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        _fail("could not switch to uid %d" % uid)


def probe(cfg):
    """Which isolations work here: run the real sequence in a child and report."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        got = enter_namespaces(True, True, True)
        report = {"root": os.geteuid() == 0, "namespaces": sorted(got), "private_tmp": False,
                  "uid_switch": False, "network_blocked": False}
        if "mount" in got:
            report["private_tmp"] = private_tmp(None, 1 << 20)
        inner = os.fork() if "pid" in got else 0
        if inner == 0:
            try:
                drop_privileges(cfg.get("uid"), cfg.get("gid"))
                report["uid_switch"] = cfg.get("uid") is not None and os.geteuid() == cfg.get("uid")
            except OSError as exc:
                report["uid_error"] = str(exc)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect(("127.0.0.1", int(cfg.get("port", 9))))
            except OSError as exc:
                report["network_blocked"] = exc.errno in (101, 99, 113)  # ENETUNREACH, EADDRNOTAVAIL, EHOSTUNREACH
            os.write(w, json.dumps(report).encode())
            os._exit(0)
        os.waitpid(inner, 0)
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.waitpid(pid, 0)
    sys.stdout.write(data.decode() + "\n")
    return 0


def kill_uid(uid):
    if os.geteuid() != 0 or uid <= 0:
        _fail("--kill-uid needs root and a non-root uid")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    try:
        os.kill(-1, signal.SIGKILL)  # every process of this uid except ourselves
    except ProcessLookupError:
        pass
    return 0


def _exec(workdir, argv):
    try:
        os.chdir(workdir)
        os.execve(argv[0], argv, os.environ)
    except OSError as exc:
        sys.stderr.write("aquilachat-sandbox: cannot execute %s: %s\n" % (argv[0], exc.strerror))
    os._exit(127)


def _reap_until(main_pid):
    """PID 1's job: reap every orphan until ``main_pid`` ends; return its wait status."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 127 << 8
        if pid == main_pid:
            return status


def run(cfg, argv):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    workdir = cfg["cwd"]
    got = enter_namespaces(cfg["net"], cfg["fs"], cfg["pid"])
    for name, key in (("net", "net"), ("mount", "fs"), ("pid", "pid")):
        if cfg[key] and cfg.get("require", True) and name not in got:
            _fail("cannot create a %s namespace (%s); see docs/evaluation.md" % (name, _errno_text()))
    if "mount" in got and not private_tmp(workdir, cfg.get("tmp_size", 64 << 20)):
        _fail("cannot mount a private /tmp: %s" % _errno_text())
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        # PID 1 of the new PID namespace (or the program itself without one).
        os.close(r)
        try:
            if "pid" in got:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            apply_limits(cfg["rlimits"])
            drop_privileges(cfg.get("uid"), cfg.get("gid"))
            _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            os.umask(0o077)
        except OSError as exc:
            _fail("setup failed: %s" % exc)
        if "pid" not in got:
            os.close(w)
            _exec(workdir, argv)
        # The program runs as PID 2 so that it keeps ordinary signal semantics (an init process
        # ignores SIGXCPU and signals it has no handler for); PID 1 only reaps, then reports the
        # program's status. When PID 1 exits, the kernel kills whatever is left in the namespace.
        program = os.fork()
        if program == 0:
            os.close(w)
            _exec(workdir, argv)
        status = _reap_until(program)
        os.write(w, str(status).encode())
        os._exit(0)
    os.close(w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: os.kill(child, signal.SIGKILL))
    _, status = os.waitpid(child, 0)
    data = b""
    while True:
        chunk = os.read(r, 64)
        if not chunk:
            break
        data += chunk
    if data and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        status = int(data)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    return os.WEXITSTATUS(status)


def main():
    args = sys.argv[1:]
    if args[:1] == ["--kill-uid"]:
        return kill_uid(int(args[1]))
    if args[:1] == ["--probe"]:
        return probe(json.loads(args[1]))
    if len(args) < 3 or args[1] != "--":
        _fail("usage: _jail.py CONFIG_JSON -- ARGV...")
    return run(json.loads(args[0]), args[2:])


if __name__ == "__main__":
    sys.exit(main())
