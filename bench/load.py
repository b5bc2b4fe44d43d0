"""Benchmark (not a test): loading a real-size checkpoint — time, peak memory against the weight
bytes, and the memory plan — next to plain reading of the same files.

    python bench/load.py [--preset aquila-7b] [--dtype auto,bfloat16,float32] [--cold] [--llm]

The checkpoint is a random one of the preset's exact shape, float16, sharded safetensors with the
real Aquila tokenizer files, written once to ``--cache`` (``bench/random_checkpoint.py``). Each
measurement runs in its own process, one at a time:

* ``cat``: ``cat`` of the weight files to ``/dev/null`` (the floor for reading them);
* ``load``: ``Checkpoint.load_model(dtype=...)`` (``--llm``: the whole ``LLM``, with its memory
  plan, engine and KV cache); a dtype whose plan does not fit is reported with the plan's error.

With ``--cold`` the page cache is dropped before every measurement (``/proc/sys/vm/drop_caches``,
root only); otherwise the files are read once first and every figure is warm. Peak RSS is the
child's ``ru_maxrss`` (file-backed pages of memory-mapped weights count, as they do for the
kernel); the fixed overhead is the RSS after importing torch and aquilachat, before loading.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.random_checkpoint import DEFAULT_CACHE, build  # noqa: E402

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from aquilachat.checkpoint import Checkpoint
from aquilachat.memory import MemoryPlanError
from aquilachat.model import param_bytes
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
path, dtype, whole = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
base = rss_mb()
t = time.perf_counter()
try:
    if whole:
        from aquilachat import LLM
        llm = LLM(path, dtype=dtype, device="cpu")
        model, plan = llm.model, llm.memory_plan
    else:
        ck = Checkpoint.open(path)
        plan = ck.plan_memory(device="cpu", dtype=dtype)
        model = ck.load_model(dtype=plan.torch_dtype, device="cpu", check_memory=False)
except MemoryPlanError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
elapsed = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "base_rss_mb": base, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "end_rss_mb": rss_mb(), "weight_bytes": param_bytes(model), "dtype": str(model.dtype),
                  "plan": plan.summary(), "kv_cache_bytes": plan.kv_cache_bytes}))
"""


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def time_cat(files: list[Path]) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="aquila-7b")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--dtype", default="auto,bfloat16,float32")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (root)")
    ap.add_argument("--llm", action="store_true", help="measure the whole LLM (plan + weights + engine + KV cache)")
    args = ap.parse_args()
    path = build(args.preset, args.cache / args.preset)
    files = sorted(path.glob("*.safetensors"))
    file_bytes = sum(f.stat().st_size for f in files)
    cold = args.cold and drop_caches()
    if args.cold and not cold:
        print("could not drop the page cache (not root?): figures are warm")
    if not cold:
        time_cat(files)  # warm the page cache
    cat_s = time_cat(files)
    print(f"{args.preset}: {len(files)} files, {file_bytes / 1e9:.2f} GB; cat to /dev/null: {cat_s:.1f} s "
          f"({file_bytes / cat_s / 1e9:.2f} GB/s, {'cold' if cold else 'warm'})")
    rows = []
    for dtype in args.dtype.split(","):
        if cold:
            drop_caches()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype, "1" if args.llm else "0"],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{dtype}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if "error" in r:
            print(f"--dtype {dtype}: {r['error']}")
            continue
        w = r["weight_bytes"] / 2**20
        extra = r["kv_cache_bytes"] / 2**20 if args.llm else 0.0
        rows.append((dtype, r))
        print(f"--dtype {dtype} -> {r['dtype']}: load {r['seconds']:.1f} s ({r['seconds'] / cat_s:.2f}x cat); "
              f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB = {(r['peak_rss_mb'] - r['base_rss_mb'] - extra) / w:.3f} x "
              f"weights ({w / 1024:.2f} GiB) + KV {extra / 1024:.2f} GiB + fixed {r['base_rss_mb']:.0f} MiB; "
              f"plan: {r['plan']}")


if __name__ == "__main__":
    main()
