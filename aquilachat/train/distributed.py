"""Distributed setup (one function), hostfile parsing and the per-node torchrun commands.

Processes are started by ``torchrun`` (``python -m torch.distributed.run``), which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; the
trainer reads them in :func:`setup_distributed` and never parses ``--local-rank`` itself (the
legacy ``torch.distributed.launch`` flag is accepted and ignored by the command line).

Multi-node: FlagAI's hostfile has one ``IP slots=N`` line per node. :func:`node_commands` builds,
for node ``i``, ``torchrun --nnodes K --nproc_per_node N_i --node_rank i --master_addr <first
host> --master_port 23456 -m aquilachat sft CONFIG`` wrapped in ``ssh``; the master address is the
first host of the file (no ``ifconfig`` guessing), and each node's output goes to
``<output_dir>/<experiment_name>/<YYYYMMDDHH>/node<i>_<host>.log``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError

__all__ = ["DistInfo", "setup_distributed", "Host", "parse_hostfile", "NodeCommand", "node_commands",
           "launch_nodes", "DEFAULT_MASTER_PORT"]

#: FlagAI's master port.
DEFAULT_MASTER_PORT = 23456


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank, world_size: global rank and number of processes (1 when not distributed).
        local_rank, local_world_size: rank and process count on this node.
        device: the device this process trains on (``cuda:<local_rank>`` or ``cpu``).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (single process).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: "object"
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Read torchrun's environment, pick the device and start the process group.

    NCCL when training on CUDA, gloo on the CPU. Idempotent: a second call reuses the group.
    Without torchrun's variables (``WORLD_SIZE`` unset or 1) nothing is initialised.

    Args:
        device: ``"auto"`` (``cuda:<LOCAL_RANK>`` when CUDA is available, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.
        timeout_s: collective timeout in seconds.

    Raises:
        ConfigError: CUDA requested but unavailable, or fewer GPUs than local processes.
    """
    import datetime

    import torch
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        if device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"local rank {local_rank} needs a GPU, but only "
                                  f"{torch.cuda.device_count()} are visible")
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    dev = torch.device(device)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local_rank, local_world, dev, backend)


# ---------------------------------------------------------------------------- hostfile
@dataclass(frozen=True)
class Host:
    """One hostfile line: address and process slots (GPUs) on that node."""

    address: str
    slots: int


_HOST_LINE = re.compile(r"^(?P<addr>\S+)(?:\s+slots\s*=\s*(?P<slots>\S+))?\s*$")


def parse_hostfile(path: str | os.PathLike) -> list[Host]:
    """Parse FlagAI's / DeepSpeed's hostfile: ``IP slots=N`` per line; ``#`` starts a comment,
    blank lines are ignored; ``slots`` defaults to 1 when absent.

    Raises:
        ConfigError: missing file, a malformed line or a repeated host (naming ``file:line``), or
            no host at all.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: hostfile not found") from None
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m:
            raise ConfigError(f"{path}:{lineno}: expected 'ADDRESS slots=N', got {raw.strip()!r}")
        slots_text = m.group("slots")
        try:
            slots = 1 if slots_text is None else int(slots_text)
        except ValueError:
            raise ConfigError(f"{path}:{lineno}: slots must be a positive integer, got {slots_text!r}") from None
        if slots < 1:
            raise ConfigError(f"{path}:{lineno}: slots must be a positive integer, got {slots}")
        addr = m.group("addr")
        if addr in seen:
            raise ConfigError(f"{path}:{lineno}: host {addr} is already listed on line {seen[addr]}")
        seen[addr] = lineno
        hosts.append(Host(addr, slots))
    if not hosts:
        raise ConfigError(f"{path}: no hosts (expected lines like '10.0.0.1 slots=8')")
    return hosts


@dataclass(frozen=True)
class NodeCommand:
    """What runs on one node: the ssh argv, the remote shell command and its log file."""

    node_rank: int
    host: Host
    remote: str
    log: Path

    @property
    def argv(self) -> list[str]:
        return ["ssh", self.host.address, self.remote]

    def shell(self) -> str:
        """The ssh command as one line to paste in a shell."""
        return " ".join(shlex.quote(a) for a in self.argv)


def node_commands(hosts: Sequence[Host], args: Sequence[str], *, log_dir: Path,
                  master_port: int = DEFAULT_MASTER_PORT, python: str | None = None,
                  workdir: str | os.PathLike | None = None) -> list[NodeCommand]:
    """The per-node torchrun commands of a multi-node job.

    Args:
        hosts: from :func:`parse_hostfile`; the first is the master (rank-0 node).
        args: arguments after ``-m`` for each process, e.g. ``["aquilachat", "sft", "/abs/cfg.yaml"]``.
        log_dir: directory for the per-node logs (``node<i>_<address>.log``).
        master_port: rendezvous port on the master (FlagAI's 23456).
        python: interpreter on the nodes (default: this one, the same environment everywhere).
        workdir: directory each node changes to first (default: the current one).
    """
    python = python or sys.executable
    workdir = str(workdir or os.getcwd())
    master = hosts[0].address
    out = []
    for i, host in enumerate(hosts):
        log = Path(log_dir) / f"node{i}_{host.address}.log"
        torchrun = [python, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)),
                    "--nproc_per_node", str(host.slots), "--node_rank", str(i),
                    "--master_addr", master, "--master_port", str(master_port), "-m", *args]
        remote = (f"cd {shlex.quote(workdir)} && mkdir -p {shlex.quote(str(log_dir))} && "
                  + " ".join(shlex.quote(a) for a in torchrun)
                  + f" > {shlex.quote(str(log))} 2>&1")
        out.append(NodeCommand(i, host, remote, log))
    return out


def launch_nodes(commands: Sequence[NodeCommand], *, poll_s: float = 1.0) -> int:
    """Start every node's command over ssh and wait for all; if one fails, stop the others.

    Returns:
        0 when every node succeeded, else the first non-zero exit status.
    """
    procs = [(c, subprocess.Popen(c.argv)) for c in commands]
    status = 0
    try:
        while procs:
            for c, p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove((c, p))
                if rc != 0 and status == 0:
                    status = rc
                    print(f"node {c.node_rank} ({c.host.address}) exited with status {rc}; see {c.log}",
                          file=sys.stderr)
                    for _, other in procs:
                        other.terminate()
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for _, p in procs:
            p.terminate()
        raise
    return status
