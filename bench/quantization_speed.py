"""Benchmark (not a test): the weight-only linear modules (aquilachat.quantization) at AquilaChat-7B
shapes, in GB/s of weight bytes read, against the machine's copy bandwidth.

    python bench/quantization_speed.py [--rows 1,4] [--repeats 30] [--fp32] [--threads N]

For each ``[out, in]`` shape of the 7B model (q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008, lm_head 100008x4096) and each format -- bf16 ``F.linear`` (the reference), int8
(per channel), int4 with group 32 and 128 (not for lm_head: 100008 rows are not a multiple of 16,
which torch's int4 packing needs; aquilachat keeps lm_head in int8) -- one module with random codes is built (no float copy),
and ``module(x)`` for ``x [M, in]`` bf16 is timed: the median of ``--repeats`` calls after two
warm-up calls. The rate is the module's weight bytes (codes + scales + zeros: exactly what a decode
step reads) over that time; at M=1 a product reading at the copy bandwidth would score 1.0x.
``copy_bandwidth`` (bench/decode.py) counts read + write bytes of a large copy.
``--fp32`` adds float32 activations (torch's reference loops for these kernels) at one shape.
Say how loaded the machine was (``/proc/loadavg`` is printed) when quoting the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth  # noqa: E402

from aquilachat.quantization import Int4Linear, Int8Linear  # noqa: E402

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008), "lm_head": (100008, 4096)}


def random_module(method: str, out_f: int, in_f: int, dtype: torch.dtype, group_size: int = 32):
    """A quantized module with random codes and scales (``from_tensors``: no float weight)."""
    g = torch.Generator().manual_seed(0)
    if method == "int8":
        return Int8Linear.from_tensors({"weight": torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=g),
                                        "scales": torch.rand(out_f, generator=g) * 1e-3},
                                       in_features=in_f, out_features=out_f, dtype=dtype)
    groups = in_f // group_size
    return Int4Linear.from_tensors({"weight": torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, generator=g),
                                    "scales": torch.rand(out_f, groups, generator=g) * 1e-2,
                                    "zeros": torch.randn(out_f, groups, generator=g) * 1e-3},
                                   in_features=in_f, out_features=out_f, dtype=dtype)


class _Dense(torch.nn.Module):
    def __init__(self, out_f: int, in_f: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.randn(out_f, in_f, dtype=dtype) * 1e-2

    def forward(self, x):
        return F.linear(x, self.weight)


def module_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters())
               + ([m.weight] if isinstance(m, _Dense) else []))


def time_call(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4", help="M values (tokens per product)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {', '.join(SHAPES)}")
    ap.add_argument("--fp32", action="store_true", help="also time fp32 activations at 4096x4096")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's; on a shared, oversubscribed machine 1 thread avoids "
                         "waiting at every product for a descheduled second thread)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; loadavg {Path('/proc/loadavg').read_text().split()[:3]}")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write)\n")
    print("| shape | format | MB read | " + " | ".join(f"M={m} ms | M={m} GB/s | M={m} vs copy" for m in rows) + " |")
    print("|---|---|---|" + "---|---|---|" * len(rows))
    formats = [("bf16", None), ("int8", None), ("int4 g32", 32), ("int4 g128", 128)]
    for name in args.shapes.split(","):
        out_f, in_f = SHAPES[name]
        for fmt, group in formats:
            if fmt.startswith("int4") and out_f % 16:  # torch's int4 packing needs rows in 16s (lm_head is int8)
                continue
            if fmt == "bf16":
                module = _Dense(out_f, in_f, torch.bfloat16)
            else:
                module = random_module(fmt.split()[0], out_f, in_f, torch.bfloat16, group or 32)
            nbytes = module_bytes(module)
            cells = []
            for m in rows:
                x = torch.randn(m, in_f, dtype=torch.bfloat16)
                with torch.no_grad():
                    dt = time_call(lambda: module(x), args.repeats)
                cells += [f"{dt * 1e3:.2f}", f"{nbytes / dt / 1e9:.1f}", f"{nbytes / dt / bw:.2f}x"]
            print(f"| {name} {out_f}x{in_f} | {fmt} | {nbytes / 1e6:.0f} | " + " | ".join(cells) + " |", flush=True)
            del module
    if args.fp32:
        print("\nfloat32 activations (the kernels' reference loops), 4096x4096, M=1:")
        for fmt, group in formats[1:]:
            module = random_module(fmt.split()[0], 4096, 4096, torch.float32, group or 32)
            x = torch.randn(1, 4096)
            with torch.no_grad():
                dt = time_call(lambda: module(x), max(3, args.repeats // 10))
            print(f"  {fmt}: {dt * 1e3:.1f} ms, {module_bytes(module) / dt / 1e9:.2f} GB/s")
    print(f"\nloadavg after: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
