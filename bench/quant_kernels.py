"""Benchmark (not a test): the few-row products on the CPU, ours
(``aquilachat/backends/cpu_kernels.cpp``) against torch's, as GB/s of weight bytes read, next to a
plain read of the same bytes: the weight-only quantized formats (the measurements behind
``Int8Linear`` / ``Int4Linear``'s choice of kernel) and the float weights of the CPU decode
backend (docs/generation.md, "CPU decode backend").

    python bench/quant_kernels.py [--formats int8,int4] [--rows 1,4] [--threads 2]
        [--shapes 4096x4096,11008x4096,4096x11008,100008x4096] [--rounds 15]
    python bench/quant_kernels.py --formats fp32,bf16 --shapes 100008x448,100008x96 --rows 1

Per weight ``[out, in]`` (written ``out x in``) with random codes and scales, for ``x [M, in]``
bfloat16:

* ``read``: ``torch.sum`` of the codes viewed as float32 (one vectorized pass over the same bytes
  on torch's threads: what reading the weight costs here, nothing multiplied);
* int8 ``torch``: ``torch.ops.aten._weight_int8pack_mm(x, q, scales)``; ``plain``:
  ``ext.linear_int8`` on the same plain codes (fp32 multiply-adds); ``ours``: what ``Int8Linear``
  uses here (with AVX512_BF16: ``ext.linear_int8_blocked`` on its blocked layout, else ``plain``);
* int4 (group 32) ``torch``: ``_weight_int4pack_mm_for_cpu`` on its packed layout; ``ours``:
  ``ext.linear_int4`` on ours (``Int4Linear`` layout ``"aquilachat"``: the same bytes);
* fp32 / bf16 (``x`` in the same dtype) ``torch``: ``F.linear``; ``ours``: ``ext.linear``.

Interleaved: each round times every option once (a block of calls of at least ~50 ms), and the
figure is the median over rounds, so a burst of load on this shared machine hits all options alike.
GB/s = bytes read by a call (codes + scales (+ zeros)) / seconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from aquilachat.backends import cpu_kernels
from aquilachat.quantization import Int4Linear, Int8Linear


def block_time(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def int8_options(out_f: int, in_f: int, x: torch.Tensor, ext, level: int) -> tuple[int, dict]:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=g)
    s = (torch.rand(out_f, generator=g) * 1e-3).to(x.dtype)
    nbytes = q.numel() + s.numel() * s.element_size()
    opts = {"read": lambda: q.view(torch.float32).sum(),
            "torch": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s)}
    if ext is not None:
        opts["plain"] = lambda: ext.linear_int8(x, q, s, level)
        if level >= 3 and x.dtype == torch.bfloat16 and in_f % 32 == 0:
            blocked = Int8Linear.from_tensors({"weight": q, "scales": s}, in_features=in_f, out_features=out_f,
                                              dtype=x.dtype, layout="aquilachat")
            opts["ours"] = lambda: ext.linear_int8_blocked(x, blocked.weight, blocked.scales, level)
        else:
            opts["ours"] = opts["plain"]
    return nbytes, opts


def int4_options(out_f: int, in_f: int, x: torch.Tensor, ext, level: int) -> tuple[int, dict]:
    g = torch.Generator().manual_seed(0)
    groups = in_f // 32
    tensors = {"weight": torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, generator=g),
               "scales": torch.rand(out_f, groups, generator=g) * 1e-2,
               "zeros": torch.randn(out_f, groups, generator=g) * 1e-3}
    m = Int4Linear.from_tensors(tensors, in_features=in_f, out_features=out_f, dtype=x.dtype, layout="torch")
    w, sz = m.weight, m.scales_and_zeros
    nbytes = w.numel() + sz.numel() * sz.element_size()
    opts = {"read": lambda: w.view(torch.float32).sum(),
            "torch": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 32, sz)}
    if ext is not None:
        ours = Int4Linear.from_tensors(tensors, in_features=in_f, out_features=out_f, dtype=x.dtype,
                                       layout="aquilachat")
        opts["ours"] = lambda: ext.linear_int4(x, ours.weight, ours.scales_and_zeros, level)
    return nbytes, opts


def float_options(out_f: int, in_f: int, x: torch.Tensor, ext, level: int) -> tuple[int, dict]:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)).to(x.dtype)
    opts = {"read": lambda: w.view(torch.float32).sum(), "torch": lambda: torch.nn.functional.linear(x, w)}
    if ext is not None:
        opts["ours"] = lambda: ext.linear(x, w, level)
    return w.numel() * w.element_size(), opts


OPTIONS = {"int8": int8_options, "int4": int4_options, "fp32": float_options, "bf16": float_options}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,100008x4096")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext = cpu_kernels.load()
    level = cpu_kernels.level() if ext is not None else 0
    print(f"torch {torch.__version__}, {args.threads} threads, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"our level {level} ({cpu_kernels.load_error() or 'built'}); "
          f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    table = []
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            out_f, in_f = map(int, shape.split("x"))
            if fmt == "int4" and out_f % 16:
                continue  # int4 needs rows in 16s (lm_head stays int8)
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, in_f).to(torch.float32 if fmt == "fp32" else torch.bfloat16)
                nbytes, opts = OPTIONS[fmt](out_f, in_f, x, ext, level)
                with torch.inference_mode():
                    calls = {}
                    for name, fn in opts.items():  # warm up, and size each block to ~50 ms
                        fn()
                        calls[name] = max(1, int(0.05 / max(block_time(fn, 2), 1e-6)))
                    times = {name: [] for name in opts}
                    for _ in range(args.rounds):
                        for name, fn in opts.items():
                            times[name].append(block_time(fn, calls[name]))
                gbs = {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}
                table.append((fmt, shape, m, nbytes, gbs))
                print(f"{fmt} {shape} M={m}: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in gbs.items()), flush=True)
                del opts
    print(f"\nloadavg after: {Path('/proc/loadavg').read_text().split()[:3]}\n")
    print("| format | weight (out x in) | M | MB read | read GB/s | torch GB/s | plain GB/s | ours GB/s | ours / torch "
          "| ours / read |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt, shape, m, nbytes, g in table:
        ours = g.get("ours", float("nan"))  # nan: no kernel of ours for this format
        plain = f"{g['plain']:.1f}" if "plain" in g else "-"
        print(f"| {fmt} | {shape} | {m} | {nbytes / 1e6:.0f} | {g['read']:.1f} | {g['torch']:.1f} | {plain} | {ours:.1f} | "
              f"{ours / g['torch']:.2f}x | {ours / g['read']:.0%} |")


if __name__ == "__main__":
    main()
