"""``aquilachat sft CONFIG.yaml`` and ``aquilachat pretrain CONFIG.yaml``.

Run directly (one process), under ``torchrun`` (one process per device; torchrun's environment
is read, ``--local-rank`` is accepted and ignored), with ``--nproc-per-node N`` (this command
starts torchrun on this machine), or with ``--hostfile FILE`` (prints and starts one torchrun per
node over ssh; ``--dry-run`` only prints).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

DESCRIPTIONS = {
    "sft": "Supervised fine-tuning on conversations (FlagAI conversations / ShareGPT / OpenAI messages / "
           "Alpaca); the loss is taken on the assistant answers and their end-of-turn marker only.",
    "pretrain": "Causal language-model training on plain text (.txt, or JSONL with a text field), from a "
                "checkpoint or from scratch ('architecture' in the YAML).",
}


def register(sub: argparse._SubParsersAction) -> None:
    for name, help_text in (("sft", "fine-tune a model on conversations (YAML config)"),
                            ("pretrain", "train a language model on text (YAML config)")):
        p = sub.add_parser(name, help=help_text, description=DESCRIPTIONS[name] +
                           " See docs/training.md for every YAML key.")
        p.add_argument("config", help="training YAML (FlagAI field names accepted)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run from its newest complete checkpoint")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a YAML key (repeatable), e.g. --set max_steps=100")
        p.add_argument("--hostfile", default=None,
                       help="FlagAI hostfile ('IP slots=N' per line): start one torchrun per node over ssh")
        p.add_argument("--dry-run", action="store_true",
                       help="print what would run (the per-node or torchrun commands with --hostfile or "
                            "--nproc-per-node), start nothing")
        p.add_argument("--nproc-per-node", type=int, default=None,
                       help="start torchrun with this many processes on this machine")
        p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default 23456)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        # torch.distributed.launch (legacy) appends --local-rank=N / --local_rank=N; LOCAL_RANK is used
        p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                       help=argparse.SUPPRESS)
        p.set_defaults(func=partial(run, mode=name))


def _passthrough(args: argparse.Namespace, mode: str, config: Path) -> list[str]:
    out = ["aquilachat", mode, str(config)]
    if args.resume:
        out.append("--resume")
    for item in args.set:
        out += ["--set", item]
    if args.no_progress:
        out.append("--no-progress")
    return out


def run(args: argparse.Namespace, *, mode: str) -> int:
    from ..train.config import load_config
    cfg, ignored = load_config(args.config, args.set)
    config_path = Path(args.config).resolve()
    in_torchrun = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0") or 0)
    if ignored and rank == 0:
        print(f"aquilachat {mode}: note: FlagAI keys without effect here were ignored: {', '.join(ignored)}",
              file=sys.stderr)

    if args.hostfile and not in_torchrun:
        from ..train.distributed import DEFAULT_MASTER_PORT, launch_nodes, node_commands, parse_hostfile
        hosts = parse_hostfile(args.hostfile)
        log_dir = cfg.run_dir / datetime.datetime.now().strftime("%Y%m%d%H")
        cmds = node_commands(hosts, _passthrough(args, mode, config_path), log_dir=log_dir.resolve(),
                             master_port=args.master_port or DEFAULT_MASTER_PORT)
        world = sum(h.slots for h in hosts)
        print(f"# {len(hosts)} nodes, {world} processes, master {hosts[0].address}:"
              f"{args.master_port or DEFAULT_MASTER_PORT}; logs in {log_dir.resolve()}")
        for c in cmds:
            print(c.shell())
        if args.dry_run:
            return 0
        return launch_nodes(cmds)

    if args.nproc_per_node and not in_torchrun:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(args.nproc_per_node)]
        if args.master_port:
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                    "--nproc_per_node", str(args.nproc_per_node), "--master_addr", "127.0.0.1",
                    "--master_port", str(args.master_port)]
        argv += ["-m", *_passthrough(args, mode, config_path)]
        print(" ".join(argv), file=sys.stderr)
        if args.dry_run:
            return 0
        return subprocess.call(argv)

    if args.dry_run:  # a single process: say what would run, start nothing
        print(" ".join(_passthrough(args, mode, config_path)), file=sys.stderr)
        print(f"aquilachat {mode}: --dry-run: one process on this machine, output in {cfg.run_dir}; nothing started",
              file=sys.stderr)
        return 0

    from ..train.loop import train
    try:
        train(cfg, mode=mode, resume=args.resume, progress=not args.no_progress)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
