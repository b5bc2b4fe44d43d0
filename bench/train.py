"""Benchmark (not a test): SFT tokens/s and peak memory, ours vs transformers ``Trainer``.

    python bench/train.py [--preset bench-20m] [--batch-size 8] [--steps 10] [--warmup-steps 2]
                          [--max-seq-len 512] [--threads 1] [--data FILE]

Both sides train the same random model (``ModelConfig`` preset, saved once in Hugging Face
layout) on the same rows in the same batches:

* data: a real SFT file (default ``../shared/data/sft/aquila_chat/alpaca_data_train.jsonl``)
  rendered with ``render_for_training`` (template ``aquila-chat``) and the Aquila tokenizer;
* batches: the rows of our ``DataPlan`` for each step, in that order; transformers gets them
  through a sequential sampler, padded to the longest row, ``labels = -100`` outside the loss mask;
* optimiser: AdamW, same lr, betas, eps, no weight decay, gradient clipping at 1.0, fp32.

Ours runs the real ``aquilachat.train.loop.train``; theirs ``transformers.Trainer`` on
``LlamaForCausalLM``. Each side runs in its own process; tokens/s is (non-padding tokens) / (time
of the optimizer steps after ``--warmup-steps``), peak memory is the process's peak RSS
(``ru_maxrss``), also shown minus the RSS measured just before training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sft" / "aquila_chat" / "alpaca_data_train.jsonl"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "aquila"


def rss_mb() -> float:
    """Current resident set size in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------- preparation
def prepare(work: Path, args) -> dict:
    """Random model + tokenizer in HF layout, and the data file; returns paths."""
    import torch

    from aquilachat.checkpoint import save_hf
    from aquilachat.config import ModelConfig
    from aquilachat.model import AquilaForCausalLM
    from aquilachat.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(args.tokenizer)
    cfg = ModelConfig.from_preset(args.preset)
    cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": max(cfg.vocab_size, tok.vocab_size),
                         "max_position_embeddings": max(cfg.max_position_embeddings, args.max_seq_len),
                         "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                         "pad_token_id": tok.pad_token_id, "torch_dtype": "float32"})
    model = AquilaForCausalLM(cfg)
    model.init_weights(0)
    save_hf(model, work / "model", tokenizer=tok)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"model": str(work / "model"), "data": str(args.data), "params": cfg.num_parameters()}


def ours_config(work: Path, info: dict, args) -> dict:
    return dict(model=info["model"], data=[info["data"]], max_seq_len=args.max_seq_len,
                batch_size=args.batch_size, gradient_accumulation_steps=1, lr=1e-4, warm_up=0.0,
                max_steps=args.warmup_steps + args.steps, save_interval=10 ** 9, output_dir=str(work / "runs"),
                experiment_name="ours", weight_decay=0.0, clip_grad_norm=1.0, seed=1234, bf16=False,
                device="cpu")


# ---------------------------------------------------------------------------- one side
def run_ours(work: Path, info: dict, args) -> dict:
    from aquilachat.train.config import TrainConfig
    from aquilachat.train.loop import train
    cfg = TrainConfig.from_dict(ours_config(work, info, args))
    rss0 = rss_mb()
    res = train(cfg, progress=False, log=lambda m: None)
    rows = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = rows[args.warmup_steps:]
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["step_time_s"] for r in rows)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "loss": [r["loss"] for r in rows], "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0}


def run_hf(work: Path, info: dict, args) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from aquilachat.tokenizer import Tokenizer
    from aquilachat.train.config import TrainConfig
    from aquilachat.train.loop import DataPlan, build_dataset
    cfg = TrainConfig.from_dict(ours_config(work, info, args))
    tok = Tokenizer.from_dir(info["model"])
    ds = build_dataset(cfg, tok, mode="sft", max_seq_len=args.max_seq_len, eos_id=tok.eos_token_id)
    plan = DataPlan(ds.lengths, batch_size=args.batch_size, grad_accum=1, world_size=1, seed=cfg.seed)
    order = [int(i) for s in range(cfg.max_steps) for i in plan.global_rows(s)]  # our batches, in order
    examples = []
    for i in order:
        u = ds[i]
        ids = u.ids.astype("int64").tolist()
        examples.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, u.mask.tolist())]})
    pad = tok.pad_token_id or 0

    def collate(batch):
        T = max(len(b["input_ids"]) for b in batch)
        x = torch.full((len(batch), T), pad, dtype=torch.long)
        y = torch.full((len(batch), T), -100, dtype=torch.long)
        att = torch.zeros((len(batch), T), dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            x[r, :n] = torch.tensor(b["input_ids"])
            y[r, :n] = torch.tensor(b["labels"])
            att[r, :n] = 1
        return {"input_ids": x, "labels": y, "attention_mask": att}

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    model = LlamaForCausalLM.from_pretrained(info["model"], torch_dtype=torch.float32)
    targs = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=args.batch_size,
                              gradient_accumulation_steps=1, max_steps=cfg.max_steps, learning_rate=cfg.lr,
                              lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                              adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_epsilon=cfg.eps,
                              max_grad_norm=1.0, use_cpu=True, report_to="none", save_strategy="no",
                              logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                              remove_unused_columns=False, seed=cfg.seed)
    trainer = OrderedTrainer(model=model, args=targs, train_dataset=examples, data_collator=collate,
                             callbacks=[Timer()])
    rss0 = rss_mb()
    trainer.train()
    lengths = [len(e["input_ids"]) for e in examples]
    per_step = [sum(lengths[s * args.batch_size:(s + 1) * args.batch_size]) for s in range(cfg.max_steps)]
    tokens = sum(per_step[args.warmup_steps:])
    seconds = sum(times[args.warmup_steps:])
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0}


# ---------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-20m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps run but not measured")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.side:  # a child: run one side, print its JSON
        import torch
        torch.set_num_threads(args.threads)
        info = json.loads((args.work / "info.json").read_text())
        out = (run_ours if args.side == "ours" else run_hf)(args.work, info, args)
        print("RESULT " + json.dumps(out))
        return 0

    for path, what in ((args.data, "--data"), (args.tokenizer, "--tokenizer")):
        if not path.exists():
            print(f"bench/train.py: {what} {path} not found", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        info = prepare(work, args)
        (work / "info.json").write_text(json.dumps(info))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        results = {}
        for side in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--side", side, "--work", str(work),
                   "--preset", args.preset, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup-steps", str(args.warmup_steps), "--max-seq-len", str(args.max_seq_len),
                   "--threads", str(args.threads), "--data", str(args.data), "--tokenizer", str(args.tokenizer)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            results[side] = json.loads(line[0][len("RESULT "):])
    ours, hf = results["ours"], results["hf"]
    print(f"SFT benchmark: preset {args.preset} ({info['params'] / 1e6:.1f}M parameters), batch {args.batch_size}, "
          f"max_seq_len {args.max_seq_len}, {args.steps} measured steps after {args.warmup_steps}, "
          f"{args.threads} thread(s), data {args.data.name}")
    print(f"{'':24}{'tokens/s':>12}{'peak RSS MiB':>15}{'peak - start MiB':>19}")
    for name, r in (("aquilachat train", ours), ("transformers Trainer", hf)):
        print(f"{name:24}{r['tokens_per_s']:12.1f}{r['peak_rss_mb']:15.0f}{r['peak_rss_mb'] - r['rss_before_mb']:19.0f}")
    print(f"speed ratio (ours / transformers): {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x; "
          f"peak RSS ratio: {ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
