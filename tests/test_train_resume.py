"""Checkpoints: killed with SIGKILL and resumed, the losses equal an uninterrupted run's;
a crash during a save never breaks the latest checkpoint; checkpoints are servable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from aquilachat.train import checkpoint as ckpt_mod
from aquilachat.train.checkpoint import find_latest, list_checkpoints
from aquilachat.train.config import load_config
from aquilachat.train.loop import STEP_SLEEP_ENV, train
from tests.train_helpers import make_setup, read_metrics, subprocess_env, write_config

KILL_WAIT_S = 240  # bounded wait for the first checkpoint of the child run


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def setup(tmp_path, byte_tokenizer_dir):
    return make_setup(tmp_path, byte_tokenizer_dir, n_rows=20)


def _config(setup, name, **fields):
    # 12 steps over 20 rows with batch 4: the run crosses an epoch boundary (5 steps per epoch);
    # LoRA dropout makes the RNG state matter too
    base = dict(experiment_name=name, max_steps=12, batch_size=4, lr=5e-3, warm_up=0.2, save_interval=3,
                log_interval=1, weight_decay=0.01, deterministic=True)
    base.update(fields)
    return write_config(setup / f"{name}.yaml", **base)


def _train(path, resume=False):
    cfg, _ = load_config(path)
    return train(cfg, resume=resume, progress=False, log=lambda m: None)


def test_sigkill_and_resume_equals_uninterrupted(setup):
    reference = _train(_config(setup, "straight"))
    assert len(reference.losses) == 12

    path = _config(setup, "killed")
    run = setup / "runs" / "killed"
    child = subprocess.Popen([sys.executable, "-m", "aquilachat", "sft", str(path), "--no-progress"],
                             cwd=setup, env=subprocess_env(**{STEP_SLEEP_ENV: "0.3"}),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while find_latest(run) is None:
            if child.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint appeared in time")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    killed_at = int(find_latest(run).name.split("_")[1])
    assert killed_at < 12 and not (run / "final").exists()

    resumed = _train(path, resume=True)
    assert resumed.start_step == killed_at
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))  # no step twice, none missing
    # every step after the resume point: exactly the uninterrupted run's loss
    assert [r["loss"] for r in rows[killed_at:]] == reference.losses[killed_at:]
    assert resumed.losses == reference.losses[killed_at:]
    assert [r["lr"] for r in rows] == [r["lr"] for r in read_metrics(reference.run_dir)]
    from safetensors.torch import load_file
    a = load_file(str(reference.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_lora_run_resumes_exactly(setup, monkeypatch):
    """LoRA with dropout: the adapter, optimizer and RNG states make the resumed losses exact."""
    extra = dict(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.1, lr=2e-2)
    reference = _train(_config(setup, "lora_straight", **extra))
    path = _config(setup, "lora_cut", **extra)

    import aquilachat.train.loop as loop_mod
    real_save = loop_mod.save_checkpoint

    def save_then_die(run_dir, step, **kwargs):
        out = real_save(run_dir, step, **kwargs)
        if step == 6:
            raise KeyboardInterrupt("simulated kill after the step-6 checkpoint")
        return out
    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(path)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    resumed = _train(path, resume=True)
    assert resumed.start_step == 6
    assert resumed.losses == reference.losses[6:]
    rows = read_metrics(setup / "runs" / "lora_cut")
    assert [r["loss"] for r in rows] == reference.losses


def test_crash_during_save_keeps_latest(setup, monkeypatch):
    path = _config(setup, "crash", max_steps=6, save_interval=3, deterministic=False)
    real_write = ckpt_mod.write_hf
    calls = {"n": 0}

    def failing_write(sd, config, p, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 6): die half-way through
            real_write(sd, config, p, **kw)
            (p / "model.safetensors").write_bytes(b"truncated")
            raise KeyboardInterrupt("simulated crash")
        return real_write(sd, config, p, **kw)

    monkeypatch.setattr(ckpt_mod, "write_hf", failing_write)
    with pytest.raises(KeyboardInterrupt):
        _train(path)
    run = setup / "runs" / "crash"
    latest = find_latest(run)
    assert latest.name == "step_00000003"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert (run / "checkpoints" / ".tmp-step_00000006").exists()  # the broken one is not a checkpoint
    from aquilachat.checkpoint import load_model
    load_model(latest, device="cpu")  # the latest checkpoint is complete and loads
    monkeypatch.setattr(ckpt_mod, "write_hf", real_write)
    res = _train(path, resume=True)
    assert res.start_step == 3 and [s for s, _ in list_checkpoints(run)] == [3, 6]
    assert not (run / "checkpoints" / ".tmp-step_00000006").exists()


def test_stale_latest_pointer_falls_back(setup):
    res = _train(_config(setup, "ptr", max_steps=4, save_interval=2, deterministic=False, keep_checkpoints=1))
    ckpts = res.run_dir / "checkpoints"
    assert [s for s, _ in list_checkpoints(res.run_dir)] == [4]  # keep_checkpoints: 1
    (ckpts / "latest").write_text("step_00000099\n")
    assert find_latest(res.run_dir).name == "step_00000004"


def test_checkpoint_is_servable_and_holds_training_state(setup):
    from transformers import AutoModelForCausalLM

    from aquilachat.checkpoint import load_model
    res = _train(_config(setup, "serve", max_steps=2, save_interval=2, deterministic=False))
    ck = find_latest(res.run_dir)
    state = torch.load(ck / "training_state.pt", weights_only=False)
    assert state["step"] == 2 and state["global_batch"] == 4 and state["rows_consumed"] == 8
    assert state["schedule"]["total_steps"] == 2
    optim = torch.load(ck / "optimizer.pt", weights_only=False)
    assert len(optim["state"]) == sum(1 for _ in load_model(ck).parameters())  # AdamW moments of every weight
    assert (ck / "rng_rank0.pt").exists() and (ck / "tokenizer.json").exists()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    ours = load_model(ck, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(ck).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), ours(ids), atol=1e-5, rtol=1e-5)
