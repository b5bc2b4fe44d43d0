"""Multi-process training: hostfile commands, and torchrun (gloo) runs equal to one process."""

from __future__ import annotations

import datetime
import re
import shlex
import subprocess
import sys

import pytest
import torch

from aquilachat.cli import main as cli_main
from aquilachat.errors import ConfigError
from aquilachat.train.config import load_config
from aquilachat.train.distributed import Host, node_commands, parse_hostfile
from aquilachat.train.loop import train
from tests.train_helpers import make_setup, read_metrics, subprocess_env, write_config

TORCHRUN_TIMEOUT_S = 300


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- hostfile
def test_parse_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\n10.0.0.1 slots=8\n\n10.0.0.2   slots = 4  # second\nnode3\n")
    assert parse_hostfile(hf) == [Host("10.0.0.1", 8), Host("10.0.0.2", 4), Host("node3", 1)]
    for text, fragment in [("10.0.0.1 slots=x\n", "hostfile:1: slots must be a positive integer"),
                           ("10.0.0.1 slots=8\n10.0.0.1 slots=8\n", "hostfile:2: host 10.0.0.1 is already listed on line 1"),
                           ("10.0.0.1 gpus=8\n", "hostfile:1: expected 'ADDRESS slots=N'"),
                           ("# nothing\n", "no hosts"),
                           ("10.0.0.1 slots=0\n", "hostfile:1: slots must be a positive integer")]:
        hf.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            parse_hostfile(hf)


def test_hostfile_dry_run_prints_per_node_commands(tmp_path, capsys, byte_tokenizer_dir):
    setup = make_setup(tmp_path, byte_tokenizer_dir)
    cfg = write_config(setup / "cfg.yaml", experiment_name="multi")
    hf = tmp_path / "hostfile"
    hf.write_text("192.168.1.10 slots=8\n192.168.1.11 slots=8\n")
    before = datetime.datetime.now().strftime("%Y%m%d%H")
    assert cli_main(["sft", str(cfg), "--hostfile", str(hf), "--dry-run", "--resume"]) == 0
    after = datetime.datetime.now().strftime("%Y%m%d%H")
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("ssh ")]
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[:2] == ["ssh", f"192.168.1.1{rank}"]
        remote = shlex.split(argv[2].replace("&&", " ;; "))
        i = remote.index("torch.distributed.run")
        opts = dict(zip(remote[i + 1:i + 11:2], remote[i + 2:i + 12:2]))
        assert opts == {"--nnodes": "2", "--nproc_per_node": "8", "--node_rank": str(rank),
                        "--master_addr": "192.168.1.10", "--master_port": "23456"}
        assert remote[i + 11:i + 17] == ["-m", "aquilachat", "sft", str(cfg.resolve()), "--resume", ">"]
        log = remote[remote.index(">") + 1]
        m = re.fullmatch(re.escape(str(setup / "runs" / "multi")) + r"/(\d{10})/node(\d)_(\S+)\.log", log)
        assert m and m.group(1) in (before, after) and m.group(2) == str(rank) and m.group(3) == f"192.168.1.1{rank}"
        assert remote[0] == "cd" and remote[3] == "mkdir"
    assert not (setup / "runs").exists()  # a dry run starts nothing


def test_node_commands_uneven_slots(tmp_path):
    cmds = node_commands([Host("a", 2), Host("b", 1)], ["aquilachat", "pretrain", "/c.yaml"],
                         log_dir=tmp_path, master_port=29000, python="/usr/bin/python3", workdir="/w")
    assert [c.node_rank for c in cmds] == [0, 1]
    assert "--nproc_per_node 1 --node_rank 1 --master_addr a --master_port 29000" in cmds[1].remote
    assert cmds[1].remote.startswith("cd /w && ") and cmds[1].argv[:2] == ["ssh", "b"]
    assert "/usr/bin/python3 -m torch.distributed.run" in cmds[0].remote


def test_nproc_per_node_dry_run_and_local_rank_flag(tmp_path, capsys, byte_tokenizer_dir):
    setup = make_setup(tmp_path, byte_tokenizer_dir)
    cfg = write_config(setup / "cfg.yaml")
    assert cli_main(["sft", str(cfg), "--nproc-per-node", "4", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "-m torch.distributed.run --standalone --nproc_per_node 4 -m aquilachat sft " + str(cfg.resolve()) in err
    # a single process too: --dry-run alone starts no training
    assert cli_main(["sft", str(cfg), "--dry-run", "--set", "max_steps=3"]) == 0
    err = capsys.readouterr().err
    assert f"aquilachat sft {cfg.resolve()} --set max_steps=3" in err and "nothing started" in err
    assert not (setup / "runs").exists()
    # torch.distributed.launch's legacy flag parses (and is ignored: LOCAL_RANK is read instead)
    from aquilachat.cli import build_parser
    for flag in ("--local-rank=3", "--local_rank=3"):
        args = build_parser().parse_args(["pretrain", str(cfg), flag])
        assert args.local_rank == 3


# ---------------------------------------------------------------------------- torchrun
def _torchrun(setup, cfg, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "aquilachat", "sft", str(cfg), "--no-progress", *extra]
    proc = subprocess.run(cmd, cwd=setup, env=subprocess_env(), capture_output=True, text=True,
                          timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _single(setup, name, **fields):
    cfg, _ = load_config(write_config(setup / f"{name}.yaml", experiment_name=name, **fields))
    return train(cfg, progress=False, log=lambda m: None)


def test_two_process_ddp_equals_one_process(tmp_path, byte_tokenizer_dir):
    """2 ranks x batch 2 x accumulation 2 == 1 rank x batch 8 (the same global batch)."""
    setup = make_setup(tmp_path, byte_tokenizer_dir, n_rows=32)
    common = dict(max_steps=4, lr=5e-3, warm_up=0.25)
    cfg = write_config(setup / "ddp.yaml", experiment_name="ddp", batch_size=2, gradient_accumulation_steps=2,
                       strategy="ddp", **common)
    proc = _torchrun(setup, cfg)
    assert "global batch 8 = 2 x 2 accumulation x 2 processes" in proc.stderr and "ddp on cpu" in proc.stderr
    single = _single(setup, "one", batch_size=8, **common)
    dist_rows = read_metrics(setup / "runs" / "ddp")
    assert [r["step"] for r in dist_rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in dist_rows] == pytest.approx(single.losses, abs=1e-5)
    assert [r["supervised_tokens"] for r in dist_rows] == [r["supervised_tokens"] for r in read_metrics(single.run_dir)]
    assert (setup / "runs" / "ddp" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_resumes(tmp_path, byte_tokenizer_dir):
    """FSDP2 (fully_shard) on gloo: the same losses as one process; resumable."""
    setup = make_setup(tmp_path, byte_tokenizer_dir, n_rows=32)
    common = dict(max_steps=4, lr=5e-3, warm_up=0.25)
    cfg = write_config(setup / "fsdp.yaml", experiment_name="fsdp", batch_size=2, gradient_accumulation_steps=2,
                       strategy="fsdp", save_interval=2, **common)
    proc = _torchrun(setup, cfg)
    assert "fsdp on cpu" in proc.stderr
    single = _single(setup, "one", batch_size=8, **common)
    run = setup / "runs" / "fsdp"
    first = [r["loss"] for r in read_metrics(run)]
    assert first == pytest.approx(single.losses, abs=1e-5)
    # as if the job had died after the step-2 checkpoint: resume the sharded optimizer from it
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "final")
    proc = _torchrun(setup, cfg, "--resume")
    assert "resumed from" in proc.stderr and "step_00000002" in proc.stderr
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx(first, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_lora_equals_one_process(tmp_path, byte_tokenizer_dir, strategy):
    """LoRA under DDP and FSDP2: the same losses as one process, and the same merged export
    (the one LoRA merge runs on the full state dict the strategy gathers)."""
    from tests.train_helpers import load_weights
    setup = make_setup(tmp_path, byte_tokenizer_dir, n_rows=32)
    common = dict(max_steps=3, lr=2e-2, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                  lora_target_modules=["q_proj", "v_proj", "down_proj"])
    cfg = write_config(setup / "lora.yaml", experiment_name="lora", batch_size=2, gradient_accumulation_steps=2,
                       strategy=strategy, **common)
    proc = _torchrun(setup, cfg)
    assert f"(LoRA), {strategy} on cpu" in proc.stderr
    single = _single(setup, "one", batch_size=8, **common)
    assert [r["loss"] for r in read_metrics(setup / "runs" / "lora")] == pytest.approx(single.losses, abs=1e-5)
    got, want = load_weights(setup / "runs" / "lora" / "final"), load_weights(single.final_dir)
    assert got.keys() == want.keys() == load_weights(setup / "model").keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_hostfile_launch_two_local_nodes(tmp_path, byte_tokenizer_dir, monkeypatch, capsys):
    """--hostfile without --dry-run, with an ``ssh`` that runs the command locally: two
    one-process "nodes" train together and equal one process."""
    import socket
    setup = make_setup(tmp_path, byte_tokenizer_dir, n_rows=32)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"
    fake_ssh.write_text('#!/bin/sh\nshift\nexec /bin/sh -c "$*"\n')
    fake_ssh.chmod(0o755)
    for key, value in subprocess_env().items():
        if key in ("PYTHONPATH", "OMP_NUM_THREADS"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{bin_dir}:{subprocess_env()['PATH']}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    common = dict(max_steps=3, lr=5e-3)
    cfg = write_config(setup / "nodes.yaml", experiment_name="nodes", batch_size=4, **common)
    monkeypatch.chdir(setup)
    assert cli_main(["sft", str(cfg), "--hostfile", str(hf), "--master-port", str(port), "--no-progress"]) == 0
    logs = sorted((setup / "runs" / "nodes").glob("*/node*.log"))
    assert [p.name for p in logs] == ["node0_127.0.0.1.log", "node1_localhost.log"]
    assert "global batch 8 = 4 x 1 accumulation x 2 processes" in logs[0].read_text()
    single = _single(setup, "one", batch_size=8, **common)
    rows = read_metrics(setup / "runs" / "nodes")
    assert [r["loss"] for r in rows] == pytest.approx(single.losses, abs=1e-5)
