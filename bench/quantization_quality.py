"""Benchmark (not a test): the quality of weight-only int8 / int4 against bf16 on the same weights.

    python bench/quantization_quality.py tiny [--data-dir DIR]
    flock /work/cache/bigmem.lock python bench/quantization_quality.py 7b [--model /work/cache/aquila-7b]

``tiny`` -- the bundled aquila-tiny, every precision with bfloat16 activations:

* held-out perplexity (``aquilachat.evaluation.ppl.perplexity``, windows of 512 tokens, stride
  256, as docs/aquila-tiny.md) on the recipe's held-out slice ``heldout_{zh,en,code}.txt``, written
  by ``python recipes/aquila-tiny/prepare_data.py --out DIR`` (default DIR
  ``runs/aquila-tiny/data``);
* greedy agreement with bf16 over 64 new tokens for 20 chat prompts (the aquila-chat template,
  end of text ignored so every answer has 64 tokens): the mean share of tokens generated before the
  first difference, and how many of the 20 answers are identical.

``7b`` -- a 7B-shape checkpoint (``bench/random_checkpoint.py``'s random fp16 weights at
/work/cache/aquila-7b), needs ~16 GB: run it under ``flock /work/cache/bigmem.lock``. Each
precision loads in its own process (bf16 converted from fp16; int8 and int4 quantized at load time,
tensor by tensor), reports its load time and peak resident memory, and computes the logits of the
same 2 x 32 random tokens (teacher forcing); the parent compares them with bf16's: relative error
``||q - ref|| / ||ref||`` over all positions, and top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aquilachat.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: (label, quantization, int4 group size): bf16 first (the reference)
VARIANTS = [("bf16", None, None), ("int8", "int8", None), ("int4 g32", "int4", 32), ("int4 g64", "int4", 64)]
PROMPTS = [
    "What is the capital of France?", "Write a short poem about the sea.", "How do I sort a list in Python?",
    "Explain photosynthesis in simple words.", "Give me three tips for a job interview.",
    "What is the difference between a virus and a bacterium?", "Translate 'good morning' into Chinese.",
    "Tell me a story about a brave cat.", "Why is the sky blue?", "How many legs does a spider have?",
    "你好，请介绍一下你自己。", "中国的首都是哪里？", "写一首关于春天的诗。", "如何学习编程？", "请解释一下什么是人工智能。",
    "推荐三本好书。", "怎样保持健康的生活方式？", "三国演义的作者是谁？", "用Python写一个冒泡排序。", "今天天气怎么样？",
]


def tiny(args: argparse.Namespace) -> None:
    from aquilachat import LLM, SamplingParams
    from aquilachat.evaluation.ppl import perplexity, read_documents
    files = [args.data_dir / f"heldout_{lang}.txt" for lang in ("zh", "en", "code")]
    if not all(f.exists() for f in files):
        sys.exit(f"held-out files missing in {args.data_dir}: run "
                 f"python recipes/aquila-tiny/prepare_data.py --out {args.data_dir}")
    from aquilachat.checkpoint import quantize_checkpoint
    from aquilachat.quantization import QuantizedLinear
    tmp = tempfile.TemporaryDirectory()
    tokenizer = Checkpoint.open("aquila-tiny").load_tokenizer()
    rows, answers, bits = {}, {}, {}
    for label, method, group in VARIANTS:
        t = time.perf_counter()
        source, quantization = "aquila-tiny", method
        if group not in (None, 32):  # another group size than load time's: through a quantized checkpoint
            source, quantization = Path(tmp.name) / label.replace(" ", "-"), None
            quantize_checkpoint("aquila-tiny", source, method=method, group_size=group)
        llm = LLM(str(source), device="cpu", dtype="bfloat16", quantization=quantization, max_num_seqs=20)
        model = llm.model
        linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        bits[label] = (8 * sum(b.numel() * b.element_size() for m in linears for b in m.buffers())
                       / sum(m.in_features * m.out_features for m in linears)) if linears else 16.0
        ppl = {}
        with torch.no_grad():
            for f in files:
                r = perplexity(model, tokenizer, read_documents(f), context=512, stride=256, batch_size=4)
                ppl[f.stem.removeprefix("heldout_")] = (r.perplexity, r.tokens)
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        outs = llm.generate(None, params, prompt_token_ids=[llm.encode_chat([{"role": "user", "content": p}])
                                                            for p in PROMPTS])
        answers[label] = [o.outputs[0].token_ids for o in outs]
        rows[label] = ppl
        print(f"{label}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    ref_ppl, ref_answers = rows["bf16"], answers["bf16"]
    print(f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| precision | bits/weight (linears) | " + " | ".join(f"ppl {k} ({n:,} tok)" for k, (_, n) in ref_ppl.items())
          + " | ppl change (token-weighted) | greedy agreement (64 tokens) | identical answers |")
    print("|---|---|" + "---|" * len(ref_ppl) + "---|---|---|")
    total = sum(n for _, n in ref_ppl.values())
    for label, method, group in VARIANTS:
        ppl = rows[label]
        # token-weighted mean NLL ratio -> perplexity change over the whole held-out slice
        nll = sum(math.log(p) * n for p, n in ppl.values()) / total
        ref_nll = sum(math.log(p) * n for p, n in ref_ppl.values()) / total
        change = (math.exp(nll - ref_nll) - 1) * 100
        prefix = []
        for a, b in zip(answers[label], ref_answers):
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            prefix.append(k / 64)
        same = sum(a == b for a, b in zip(answers[label], ref_answers))
        print(f"| {label} | {bits[label]:.2f} | " + " | ".join(f"{p:.2f}" for p, _ in ppl.values())
              + f" | {change:+.2f} % | {100 * sum(prefix) / len(prefix):.1f} % | {same}/20 |")


def worker_7b(args: argparse.Namespace) -> None:
    """One precision: load, logits of the fixed tokens into ``args.out``, facts on stdout."""
    t = time.perf_counter()
    ckpt = Checkpoint.open(args.model)
    model = ckpt.load_model(device="cpu", dtype="bfloat16", quantization=args.quantization)
    load_s = time.perf_counter() - t
    ids = torch.randint(0, ckpt.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    torch.save(logits, args.out)
    tensors = {x.data_ptr(): x for x in list(model.parameters()) + list(model.buffers())}
    print(json.dumps({"load_s": load_s, "forward_s": time.perf_counter() - t,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "weight_bytes": sum(x.numel() * x.element_size() for x in tensors.values()),
                      "plan_weight_bytes": ckpt.plan_memory(device="cpu", quantization=args.quantization,
                                                            engine=False, available=10**13).weight_bytes}))


def seven_b(args: argparse.Namespace) -> None:
    print(f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}; model {args.model}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in (None, "int8", "int4"):
            out = Path(tmp) / f"{method}.pt"
            cmd = [sys.executable, __file__, "7b-worker", "--model", str(args.model), "--out", str(out)]
            if method:
                cmd += ["--quantization", method]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{method or 'bf16'} failed:\n{proc.stderr[-3000:]}")
            facts = json.loads(proc.stdout.strip().splitlines()[-1])
            results[method or "bf16"] = (facts, torch.load(out))
            print(f"{method or 'bf16'}: {facts}", file=sys.stderr, flush=True)
    ref = results["bf16"][1]
    print("| precision | weights in memory (plan) | peak RSS of the load | load s | rel. logit error | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for label, (facts, logits) in results.items():
        rel = float((logits - ref).norm() / ref.norm())
        agree = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"| {label} | {facts['weight_bytes'] / 1e9:.2f} GB ({facts['plan_weight_bytes'] / 1e9:.2f}) | "
              f"{facts['peak_rss'] / 1e9:.2f} GB | {facts['load_s']:.0f} | {rel:.4f} | {100 * agree:.1f} % |")
    print(f"loadavg after {Path('/proc/loadavg').read_text().split()[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tiny")
    t.add_argument("--data-dir", type=Path, default=ROOT / "runs" / "aquila-tiny" / "data")
    s = sub.add_parser("7b")
    s.add_argument("--model", type=Path, default=Path("/work/cache/aquila-7b"))
    w = sub.add_parser("7b-worker")
    w.add_argument("--model", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--quantization", default=None)
    args = ap.parse_args()
    {"tiny": tiny, "7b": seven_b, "7b-worker": worker_7b}[args.what](args)


if __name__ == "__main__":
    main()
