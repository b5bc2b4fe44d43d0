"""Benchmark (not a test): greedy decode tokens/s, ours vs transformers ``generate``, and the
memory-bandwidth bound at batch 1.

    python bench/decode.py [--configs bench-20m,bench-100m] [--new-tokens 128] [--threads N]

For each config a random model with that shape is built once; ours runs it through the engine
(prefill + single-token decode over the preallocated KV cache), transformers runs the same
weights through ``LlamaForCausalLM.generate(do_sample=False)`` with its default dynamic cache.
Both generate exactly ``--new-tokens`` tokens per sequence (EOS ignored) from a 16-token prompt;
the two sides run alternately ``--repeats`` times and the medians are reported (this machine's
speed drifts by +-20% over minutes).

Bandwidth bound (batch 1): every decoded token must read every weight except the embedding table
(one row of it), so tokens/s <= copy_bandwidth / weight_bytes, where copy_bandwidth is measured
here as (bytes read + bytes written) / time of a large ``torch`` tensor copy, once per round
(median reported with the bound).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aquilachat.config import ModelConfig
from aquilachat.engine import Engine
from aquilachat.model import AquilaForCausalLM
from aquilachat.sampling import SamplingParams


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def weight_bytes_per_token(model: AquilaForCausalLM) -> int:
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    emb = model.model.embed_tokens.weight
    if not model.config.tie_word_embeddings:
        total -= emb.numel() * emb.element_size()  # only one row of the table is read
    return total


def bench_ours(model, prompts, new_tokens) -> float:
    eng = Engine(model, max_num_seqs=len(prompts), max_model_len=prompts.shape[1] + new_tokens + 1)
    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for row in prompts.tolist():  # warm-up
        eng.add(row, p.replace(max_tokens=4))
    while eng.has_unfinished():
        eng.step()
    t = time.perf_counter()
    for row in prompts.tolist():
        eng.add(row, p)
    while eng.has_unfinished():
        eng.step()
    return prompts.shape[0] * new_tokens / (time.perf_counter() - t)


def bench_hf(ref, prompts, new_tokens) -> float:
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref.generate(prompts, max_new_tokens=4, min_new_tokens=4, **kw)
        t = time.perf_counter()
        ref.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    return prompts.shape[0] * new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="bench-20m,bench-100m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per row; medians reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM
    print(f"torch threads: {torch.get_num_threads()}")
    rows = []
    for name in args.configs.split(","):
        cfg = ModelConfig.from_preset(name)
        model = AquilaForCausalLM(cfg)
        model.init_weights(0)
        model.eval()
        ref = LlamaForCausalLM(LlamaConfig(**cfg.to_hf_dict())).eval()
        ref.load_state_dict(model.state_dict())
        wb = weight_bytes_per_token(model)
        for b in map(int, args.batches.split(",")):
            prompts = torch.randint(0, cfg.vocab_size, (b, 16), generator=torch.Generator().manual_seed(b))
            # alternated, so machine noise hits both sides alike; the copy bandwidth is measured in
            # the same rounds (it drifts with the machine too)
            runs = [(bench_ours(model, prompts, args.new_tokens), bench_hf(ref, prompts, args.new_tokens),
                     copy_bandwidth()) for _ in range(args.repeats)]
            ours, hf = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            bw = statistics.median(r[2] for r in runs)
            bound = bw / wb
            print(f"{name} batch {b}: copy bandwidth {', '.join(f'{r[2] / 1e9:.1f}' for r in runs)} GB/s")
            rows.append((name, cfg.num_parameters() / 1e6, b, ours, hf, ours / hf,
                         f"{bound:.0f} ({ours / bound:.0%})" if b == 1 else "-"))
    print()
    print("| config | params (M) | batch | ours tok/s | transformers tok/s | ratio | bandwidth bound tok/s (ours/bound) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.2f}x | {r[6]} |")


if __name__ == "__main__":
    main()
