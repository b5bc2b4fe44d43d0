"""Benchmark (not a test): few-row products ``x [M, in] @ W.T`` on the CPU, as GB/s of weight read,
against the copy bandwidth. The measurements behind the CPU decode backend's choice of kernel
(docs/generation.md, "CPU decode backend").

    flock /work/cache/bigmem.lock python bench/cpu_kernels.py [--dtypes float32,bfloat16] [--rows 1,4]
        [--threads 1,2] [--shapes 4096x4096,11008x4096,4096x11008,100008x4096] [--compile]

Options measured for each weight ``W [out, in]`` (shape written ``out x in``):

* ``F.linear row-major``: ``torch.nn.functional.linear(x, W)`` with ``W`` contiguous (the layout of a
  checkpoint; bf16 goes to oneDNN, fp32 to MKL);
* ``F.linear col-major``: the same with ``W`` stored column-major (``W.t()`` contiguous), the layout
  the old ``prepare_for_cpu_decode`` used;
* ``backend kernel``: :func:`aquilachat.backends.cpu_kernels.linear` (the backend's own few-row
  product, when its extension builds here);
* with ``--compile``: ``torch.compile`` of ``F.linear`` (inductor; compile time reported).

With ``--step CONFIG`` (e.g. ``bench-20m``) it times whole batch-1 decode steps of a random model
of that preset instead: the plain model, the CPU decode backend with and without its kernels, and
``torch.compile`` of the plain model's ``forward_hidden`` (``dynamic=True``; the first call's time
is reported as the compile time).

Weight GB/s = weight bytes / median time of a call (the weight is far larger than the caches, so
every call reads it from memory). The copy bandwidth is (read + write bytes) / time of a 512 MiB
tensor copy (bench/decode.py), measured before every shape. The largest fp32 weight is 1.6 GB and
two layouts of it exist at once: run under the machine's big-memory lock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import copy_bandwidth  # noqa: E402


def timed(fn) -> float:
    """Median seconds of ``fn()`` (``torch.utils.benchmark``, blocks of calls for at least 0.5 s,
    on torch's current number of threads)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.5).median


def time_steps(preset: str, steps: int, threads_list: list[int]) -> None:
    """Median ms per batch-1 decode step (forward_hidden + compute_logits, cache in place) of a random
    ``preset`` model: plain modules, the backend with / without kernels, torch.compile."""
    from aquilachat.backends import CpuDecodeBackend
    from aquilachat.config import ModelConfig
    from aquilachat.model import AquilaForCausalLM, KVCache
    cfg = ModelConfig.from_preset(preset)
    model = AquilaForCausalLM(cfg)
    model.init_weights(0)
    model.eval()
    bw = copy_bandwidth()
    print(f"{preset}: load {open('/proc/loadavg').read().split()[:3]}, copy bandwidth {bw / 1e9:.1f} GB/s")
    runners = {"plain modules": model, "backend, torch products": CpuDecodeBackend(model, kernels=False),
               "backend, kernels": CpuDecodeBackend(model)}

    class Compiled:  # the plain model's forward_hidden through inductor
        forward_hidden = staticmethod(torch.compile(model.forward_hidden, dynamic=True))
        compute_logits = staticmethod(model.compute_logits)
    runners["torch.compile(forward_hidden)"] = Compiled
    for threads in threads_list:
        torch.set_num_threads(threads)
        for name, runner in runners.items():
            cache = KVCache.allocate(cfg, num_slots=1, max_seq_len=steps + 8)
            times = []
            with torch.inference_mode():
                for pos in range(steps + 4):
                    t = time.perf_counter()
                    runner.compute_logits(runner.forward_hidden(torch.tensor([[pos % 100 + 1]]), torch.tensor([[pos]]),
                                                                cache, kv_len=pos + 1))
                    times.append(time.perf_counter() - t)
            first = f", first call {times[0]:.1f} s" if name.startswith("torch.compile") else ""
            print(f"threads={threads} {name}: {statistics.median(times[4:]) * 1e3:.2f} ms per step{first}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,100008x4096")
    ap.add_argument("--compile", action="store_true", help="also torch.compile(F.linear) (needs a C++ compiler)")
    ap.add_argument("--step", default="", help="time whole decode steps of this preset instead")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    if args.step:
        return time_steps(args.step, args.steps, [int(t) for t in args.threads.split(",")])
    try:
        from aquilachat.backends import cpu_kernels
        kernels = cpu_kernels.load()
    except ImportError:
        kernels = None
    print(f"load: {open('/proc/loadavg').read().split()[:3]}, backend kernel: "
          f"{'built' if kernels else 'not available'}, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes.split(","):
            out_f, in_f = map(int, shape.split("x"))
            w = torch.randn(out_f, in_f, dtype=dtype) * 0.02
            w_col = w.t().contiguous().t()
            nbytes = w.numel() * w.element_size()
            bw = copy_bandwidth()
            options = {"F.linear row-major": lambda x: F.linear(x, w),
                       "F.linear col-major": lambda x: F.linear(x, w_col)}
            if kernels is not None:
                options["backend kernel"] = lambda x: cpu_kernels.linear(x, w)
            if args.compile:
                compiled = torch.compile(F.linear, dynamic=False)
                t = time.perf_counter()
                compiled(torch.randn(1, in_f, dtype=dtype), w)
                print(f"torch.compile(F.linear) {dtype_name} {shape}: compiled in {time.perf_counter() - t:.1f} s")
                options["torch.compile row-major"] = lambda x: compiled(x, w)
            for threads in map(int, args.threads.split(",")):
                torch.set_num_threads(threads)
                for m in map(int, args.rows.split(",")):
                    x = torch.randn(m, in_f, dtype=dtype)
                    with torch.inference_mode():
                        for name, fn in options.items():
                            sec = timed(lambda: fn(x))
                            rows.append((dtype_name, shape, m, threads, name, sec * 1e3, nbytes / sec / 1e9,
                                         bw / 1e9))
                            r = rows[-1]
                            print(f"{r[0]} {r[1]} M={r[2]} threads={r[3]} {r[4]}: {r[5]:.2f} ms, {r[6]:.1f} GB/s "
                                  f"({r[6] / r[7]:.0%} of copy {r[7]:.1f} GB/s)", flush=True)
            del w, w_col
    print()
    print("| dtype | weight (out x in) | rows M | threads | option | ms | weight GB/s | % of copy bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2f} | {r[6]:.1f} | {r[6] / r[7]:.0%} |")


if __name__ == "__main__":
    main()
