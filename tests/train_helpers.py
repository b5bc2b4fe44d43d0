"""Builders for the training tests: synthetic conversations, a tiny model, a YAML config, runs."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def synthetic_rows(n: int, *, seed: int = 0, system: str | None = "Be brief.") -> list[dict]:
    """FlagAI-style conversation rows of unequal length (one or two exchanges)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        turns = [{"from": "human", "value": f"What is {a} plus {b}?"},
                 {"from": "gpt", "value": f"{a} plus {b} is {a + b}."}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "And times?"},
                      {"from": "gpt", "value": f"{a} times {b} is {a * b}."}]
        rows.append({"id": f"s{i}", "conversations": turns, "instruction": system or ""})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_setup(tmp: Path, tokenizer_dir: Path, *, n_rows: int = 24) -> Path:
    """A directory with ``model/`` (tiny random model + tokenizer) and ``data.jsonl``."""
    from tests.helpers import make_tiny_model
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "model" / "config.json").exists():
        make_tiny_model(tmp / "model", tokenizer_dir)
    write_jsonl(tmp / "data.jsonl", synthetic_rows(n_rows))
    return tmp


def write_config(path: Path, **fields) -> Path:
    """A training YAML with defaults for the tiny setup (paths relative to the YAML)."""
    base = dict(model="model", data="data.jsonl", max_seq_len=128, batch_size=4, lr=3e-3, warm_up=0.0,
                max_steps=2, save_interval=1000, output_dir="runs", experiment_name="exp", seed=7)
    base.update(fields)
    path.write_text(yaml.safe_dump(base, sort_keys=False), encoding="utf-8")
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this worktree first on the path, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def python() -> str:
    return sys.executable


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(model_dir) / "model.safetensors"))
