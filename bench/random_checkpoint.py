"""Random checkpoints of a named shape, written once to a cache folder outside the repository
(benchmarks only, never the test suite).

    python bench/random_checkpoint.py [--preset aquila-7b] [--cache DIR]

The checkpoint has the exact layout a user downloads for AquilaChat-7B: Hugging Face
``config.json``, float16 weights in sharded safetensors files with a
``model.safetensors.index.json`` (shards of at most ``--shard-size`` bytes, 5 for 7B, as
transformers' ``save_pretrained`` writes them), and the real Aquila tokenizer files from
``../shared/data/tokenizers/aquila``. Weights are Normal(0, 0.02) (norms ones), seeded, written
one shard at a time, so building needs about one shard of memory. A finished folder holds a
``.complete`` marker and is reused as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aquilachat.config import ModelConfig  # noqa: E402
from aquilachat.model import AquilaForCausalLM  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("AQUILACHAT_BENCH_CACHE", "/work/cache"))
TOKENIZER_DIR = REPO.parent / "shared" / "data" / "tokenizers" / "aquila"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
#: transformers' default ``max_shard_size`` for ``save_pretrained`` ("5GB"); 7B fp16 gives 3-4 shards
#: at that size, the published AquilaChat-7B repo has 5 of about 3 GB: use 3 GB.
SHARD_BYTES = 3 * 10**9


def shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of a model of ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = AquilaForCausalLM(config)
    sd = model.state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in sd.items()}


def build(preset: str, out: Path, *, dtype: torch.dtype = torch.float16, seed: int = 0,
          shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a random checkpoint of ``preset`` to ``out`` unless it is already complete there.

    Returns ``out``. Raises ``FileNotFoundError`` when the Aquila tokenizer files are missing.
    """
    from safetensors.torch import save_file
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_preset(preset)
    config.torch_dtype = str(dtype).removeprefix("torch.")
    for name in TOKENIZER_FILES:
        src = TOKENIZER_DIR / name
        if not src.exists():
            raise FileNotFoundError(f"{src}: the Aquila tokenizer files are needed (../shared/data)")
        shutil.copy2(src, out / name)
    config.save(out / "config.json")
    # group keys into shards in state-dict order
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for key, shape in shapes(config).items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key, shape in group:
            if key.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                t = torch.empty(shape, dtype=torch.float32).normal_(0.0, config.initializer_range, generator=gen).to(dtype)
            tensors[key] = t
            weight_map[key] = name
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        print(f"wrote {name} ({sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9:.2f} GB)", flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (out / ".complete").write_text("ok\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="aquila-7b")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    print(build(args.preset, args.cache / args.preset))


if __name__ == "__main__":
    main()
