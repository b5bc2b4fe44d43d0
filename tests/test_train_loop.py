"""The training loop: schedule, data plan, accumulation equivalence, learning, LoRA export,
activation checkpointing, pretraining from scratch, guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aquilachat.cli import main as cli_main
from aquilachat.errors import ConfigError
from aquilachat.train.config import TrainConfig, load_config
from aquilachat.train.loop import DataPlan, lr_at, train
from tests.train_helpers import load_weights, make_setup, read_metrics, write_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def setup(tmp_path, byte_tokenizer_dir):
    return make_setup(tmp_path, byte_tokenizer_dir)


def _run(setup, name, mode="sft", resume=False, **fields):
    cfg, _ = load_config(write_config(setup / f"{name}.yaml", experiment_name=name, **fields))
    return train(cfg, mode=mode, resume=resume, progress=False, log=lambda m: None)


# ---------------------------------------------------------------------------- schedule
def test_lr_schedule():
    kw = dict(total_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert [lr_at(s, **kw) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert lr_at(9, **kw) == pytest.approx(1e-3)   # warm-up ends at the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-4) / 2)  # half way: the mean
    assert lr_at(110, **kw) == pytest.approx(1e-4) and lr_at(500, **kw) == pytest.approx(1e-4)
    lrs = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    assert lr_at(0, total_steps=5, warmup_steps=0, lr=0.1) == 0.1
    for s in range(0, 110, 7):  # the cosine formula itself
        if s >= 10:
            p = (s - 10) / 100
            assert lr_at(s, **kw) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------------------- data plan
def test_data_plan_is_a_pure_function():
    lengths = np.random.default_rng(0).integers(5, 50, size=37)
    a = DataPlan(lengths, batch_size=2, grad_accum=3, world_size=2, seed=11)
    b = DataPlan(lengths, batch_size=2, grad_accum=3, world_size=2, seed=11)
    assert a.global_batch == 12 and a.steps_per_epoch == 3
    # the same at any step, whatever was asked before (a resumed run needs no history)
    for step in (7, 0, 4, 3):
        assert [b.micro_batches(step, r) for r in range(2)] == [a.micro_batches(step, r) for r in range(2)]
    # an epoch visits distinct rows; epochs differ; seeds differ
    seen = np.concatenate([a.global_rows(s) for s in range(3)])
    assert len(set(seen.tolist())) == 36
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), DataPlan(lengths, batch_size=2, grad_accum=3, world_size=2, seed=12).order(0))
    # the ranks' micro-batches partition the global batch, longest rows first
    for step in range(5):
        parts = [i for r in range(2) for m in a.micro_batches(step, r) for i in m]
        assert sorted(parts) == sorted(a.global_rows(step).tolist())
        assert list(lengths[a.global_rows(step)]) == sorted(lengths[a.global_rows(step)], reverse=True)
    # the global batch does not depend on how it is split
    one = DataPlan(lengths, batch_size=12, grad_accum=1, world_size=1, seed=11)
    assert all(set(one.global_rows(s).tolist()) == set(a.global_rows(s).tolist()) for s in range(6))
    plain = DataPlan(lengths, batch_size=4, grad_accum=1, world_size=1, seed=1, shuffle=False)
    assert sorted(plain.global_rows(0).tolist()) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- equivalences
def test_accumulation_equals_large_batch(setup):
    """4 x 1 and 1 x 4 (and 2 x 2) give the same parameters after a step, on rows of unequal
    length with unequal numbers of supervised tokens."""
    # Adam's first update is lr * g / (|g| + eps): for an entry whose gradient is ~1e-8 (= the
    # default eps) float rounding of g (summation order) moves the update by ~lr * 1e-3. A larger
    # eps keeps that amplification out, so the comparison sees the gradients themselves.
    common = dict(max_steps=1, lr=1e-2, weight_decay=0.1, clip_grad_norm=0.5, eps=1e-4)
    r1 = _run(setup, "b4a1", batch_size=4, gradient_accumulation_steps=1, **common)
    r2 = _run(setup, "b1a4", batch_size=1, gradient_accumulation_steps=4, **common)
    r3 = _run(setup, "b2a2", batch_size=2, gradient_accumulation_steps=2, **common)
    w1, w2, w3 = (load_weights(r.final_dir) for r in (r1, r2, r3))
    start = load_weights(setup / "model")
    moved = max(float((w1[k] - start[k]).abs().max()) for k in w1)
    assert moved > 1e-3  # the step did something
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(w3[k], w1[k], atol=1e-6, rtol=0)
    assert r1.losses[0] == pytest.approx(r2.losses[0], abs=1e-6) == pytest.approx(r3.losses[0], abs=1e-6)
    m = read_metrics(r2.run_dir)[0]
    assert m["step"] == 1 and m["supervised_tokens"] == read_metrics(r1.run_dir)[0]["supervised_tokens"]
    # the step's rows really differ in length and in supervised tokens
    from aquilachat.tokenizer import Tokenizer
    from aquilachat.train.data import build_sft_dataset
    ds = build_sft_dataset([setup / "data.jsonl"], Tokenizer.from_dir(setup / "model"), template="aquila-chat",
                           max_seq_len=128)
    rows = DataPlan(ds.lengths, batch_size=4, grad_accum=1, world_size=1, seed=7).global_rows(0)
    assert len({len(ds[int(i)]) for i in rows}) > 1 and len({ds[int(i)].num_targets for i in rows}) > 1


def test_loss_is_mean_over_supervised_tokens(setup):
    """The logged loss of step 1 equals an independent computation on the initial model."""
    from aquilachat.checkpoint import load_model
    from aquilachat.tokenizer import Tokenizer
    from aquilachat.train.data import build_sft_dataset
    res = _run(setup, "oracle", max_steps=1, batch_size=3, gradient_accumulation_steps=2)
    cfg = TrainConfig.from_dict({"model": "m"})
    tok = Tokenizer.from_dir(setup / "model")
    ds = build_sft_dataset([setup / "data.jsonl"], tok, template=cfg.template, max_seq_len=128)
    plan = DataPlan(ds.lengths, batch_size=6, grad_accum=1, world_size=1, seed=7)
    model = load_model(setup / "model", dtype=torch.float32, device="cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in plan.global_rows(0):
            u = ds[int(i)]
            ids = torch.tensor(u.ids, dtype=torch.long)[None]
            logp = torch.log_softmax(model(ids)[0].double(), -1)  # (T, V)
            for t in range(1, len(u)):
                if u.mask[t]:
                    total -= float(logp[t - 1, u.ids[t]])
                    count += 1
    assert res.losses[0] == pytest.approx(total / count, abs=1e-5)
    assert read_metrics(res.run_dir)[0]["supervised_tokens"] == count


def test_gradient_checkpointing_same_losses(setup):
    a = _run(setup, "plain", max_steps=3)
    b = _run(setup, "ckpt", max_steps=3, gradient_checkpointing=True)
    assert b.losses == pytest.approx(a.losses, abs=1e-6)


# ---------------------------------------------------------------------------- learning + chat
def test_thirty_steps_lower_the_loss_and_chat_works(setup, capsys):
    res = _run(setup, "learn", max_steps=30, batch_size=4, lr=5e-3, warm_up=0.1, save_interval=10,
               log_interval=1)
    rows = read_metrics(res.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 1.0, (first, last)
    assert rows[0]["lr"] == pytest.approx(5e-3 / 3) and rows[2]["lr"] == pytest.approx(5e-3)
    assert (res.run_dir / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000010", "step_00000020", "step_00000030"]
    capsys.readouterr()
    assert cli_main(["chat", "What is 2 plus 3?", "--model", str(res.final_dir), "--max-tokens", "12",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.strip()  # the fine-tuned model answers through the engine


def test_gzipped_jsonl_trains_like_the_plain_file(setup, capsys):
    """``aquilachat sft`` on ``data.jsonl.gz`` (with a BOM and CRLF line ends, through
    aquilachat.io) sees the same rows as on ``data.jsonl``: the same losses and weights."""
    import gzip
    raw = (setup / "data.jsonl").read_bytes()
    (setup / "data.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n")))
    cfg = write_config(setup / "gz.yaml", experiment_name="gz", data="data.jsonl.gz", max_steps=3)
    assert cli_main(["sft", str(cfg), "--no-progress"]) == 0
    assert "data.jsonl.gz: conversations, 24 rows" in capsys.readouterr().err
    plain = _run(setup, "plain", max_steps=3)
    gz = read_metrics(setup / "runs" / "gz")
    assert [r["loss"] for r in gz] == plain.losses
    a, b = load_weights(setup / "runs" / "gz" / "final"), load_weights(plain.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume(setup):
    _run(setup, "once", max_steps=1)
    with pytest.raises(ConfigError, match="--resume"):
        _run(setup, "once", max_steps=1)
    res = _run(setup, "once", max_steps=1, resume=True)  # already complete: nothing to redo
    assert res.losses == [] and res.final_dir.is_dir()


def test_too_little_data(setup):
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        _run(setup, "small", batch_size=16, gradient_accumulation_steps=2)


# ---------------------------------------------------------------------------- LoRA
def test_lora_merged_export_loads_in_transformers_and_llm(setup):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from aquilachat.checkpoint import load_model
    from aquilachat.llm import LLM
    from aquilachat.train.lora import apply_lora, merge_lora_state_dict
    res = _run(setup, "lora", lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=2e-2,
               lora_target_modules=["q_proj", "v_proj", "down_proj"], max_steps=3, save_interval=3)
    ckpt = res.run_dir / "checkpoints" / "step_00000003"
    adapter = load_file(str(ckpt / "adapter.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)
    # oracle: the base model with the trained adapter, through peft
    cfg = TrainConfig.from_dict({"model": "m", "lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                 "lora_target_modules": ["q_proj", "v_proj", "down_proj"]})
    peft_model, scaling = apply_lora(load_model(setup / "model", dtype=torch.float32, device="cpu"), cfg)
    missing, unexpected = peft_model.load_state_dict(adapter, strict=False)
    assert not unexpected
    peft_model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 31]])
    with torch.no_grad():
        want = peft_model(ids)
        exported = load_model(res.final_dir, dtype=torch.float32, device="cpu")(ids)
        in_ckpt = load_model(ckpt, dtype=torch.float32, device="cpu")(ids)
        hf = AutoModelForCausalLM.from_pretrained(res.final_dir).eval()(ids).logits.float()
        base = load_model(setup / "model", dtype=torch.float32, device="cpu")(ids)
    assert (want - base).abs().max() > 1e-4  # the adapter changed the model
    torch.testing.assert_close(exported, want, atol=1e-5, rtol=1e-5)  # merge_and_unload export
    torch.testing.assert_close(in_ckpt, want, atol=1e-5, rtol=1e-5)   # checkpoint (manual merge)
    torch.testing.assert_close(hf, want, atol=1e-4, rtol=1e-4)        # loadable by transformers
    sd = merge_lora_state_dict(peft_model.state_dict(), scaling)
    assert set(sd) == set(load_weights(setup / "model"))
    from aquilachat.sampling import SamplingParams
    out = LLM(str(res.final_dir), device="cpu").generate("hello", SamplingParams(max_tokens=8, temperature=0))
    assert out[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------- pretraining
def test_pretrain_from_scratch_cli(tmp_path, byte_tokenizer_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    cfg = write_config(tmp_path / "pt.yaml", model=None, architecture={"preset": "tiny", "num_hidden_layers": 1},
                       tokenizer=str(byte_tokenizer_dir), data="corpus", max_seq_len=32, batch_size=8,
                       max_steps=8, lr=1e-2, experiment_name="pt")
    assert cli_main(["pretrain", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "runs" / "pt"
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    from aquilachat.checkpoint import load_model
    model = load_model(run / "final", device="cpu")
    from aquilachat.tokenizer import Tokenizer
    assert model.config.num_hidden_layers == 1
    assert model.config.vocab_size == Tokenizer.from_dir(byte_tokenizer_dir).vocab_size
    err = capsys.readouterr().err
    assert "documents: 1" in err and "pretrain: 8 steps" in err


def test_cli_errors_are_one_line(setup, capsys):
    bad = setup / "bad.yaml"
    bad.write_text("model: model\ndata: data.jsonl\nbatch_sise: 4\n")
    assert cli_main(["sft", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("aquilachat sft: error:") and "unknown key 'batch_sise'" in err and "\n" not in err


def test_logits_mask_selects_positions(byte_tokenizer_dir, tmp_path):
    """``forward(..., logits_mask=m)`` equals the full logits indexed by ``m`` (row-major)."""
    from tests.helpers import make_tiny_model
    model = make_tiny_model(tmp_path / "m", byte_tokenizer_dir)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        full = model(ids)
        part = model(ids, logits_mask=mask)
    assert part.shape == (int(mask.sum()), model.config.vocab_size) and part.dtype == torch.float32
    torch.testing.assert_close(part, full[mask], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_on_cpu(setup):
    res = _run(setup, "bf16", max_steps=2, bf16=True)
    assert all(math.isfinite(x) for x in res.losses)
    w = load_weights(res.final_dir)
    assert all(v.dtype == torch.float32 for v in w.values())  # fp32 master weights and export
    ref = _run(setup, "fp32", max_steps=2)
    assert res.losses[0] == pytest.approx(ref.losses[0], abs=0.05)  # same model, bf16 rounding only


def test_packing_run(setup):
    res = _run(setup, "packed", max_steps=2, packing=True, batch_size=2)
    assert res.report.packing and res.report.units < res.report.samples
    assert len(res.losses) == 2
