"""Benchmark (not a test): greedy decode tokens/s, ours vs transformers ``generate``, and the
memory-bandwidth bound at batch 1.

    python bench/decode.py [--configs bench-20m,bench-100m] [--new-tokens 128] [--threads N]
                           [--num-scheduler-steps 1,8]

For each config a random model with that shape is built once; ours runs it through the engine
(prefill + single-token decode over the preallocated KV cache) once per ``--num-scheduler-steps``
value (default ``1,8``: the default engine, and greedy decode steps 8 at a time in one call of
the kernels, vLLM's multi-step decoding; docs/generation.md), transformers runs the same
weights through ``LlamaForCausalLM.generate(do_sample=False)`` with its default dynamic cache.
Both generate exactly ``--new-tokens`` tokens per sequence (EOS ignored) from a 16-token prompt;
the two sides run alternately ``--repeats`` times and the medians are reported (this machine's
speed drifts by +-20% over minutes).

Bandwidth bound (batch 1): every decoded token must read every weight except the embedding table
(one row of it), so tokens/s <= copy_bandwidth / weight_bytes, where copy_bandwidth is measured
here as (bytes read + bytes written) / time of a large ``torch`` tensor copy, once per round
(median reported with the bound).

``--preset aquila-7b``: the AquilaChat-7B shape (random float16 weights and the real Aquila
tokenizer, written once to ``--cache``: ``bench/random_checkpoint.py``), engine against engine:

* ours (``aquilachat.LLM`` and its engine) in bfloat16, int8 and int4 (``quantization=``,
  quantized at load; int4 in groups of 32, the default), and int4 in groups of 128 (what
  aquilachat.quantization advises for 7B-class models: 15 % fewer bytes) from a checkpoint that
  ``aquilachat quantize --method int4 --group-size 128`` writes once to ``--cache``; a precision
  this branch's ``LLM`` cannot load is reported as skipped;
* llama.cpp through llama-cpp-python, at f16, q8_0 and q4_0, on GGUF files that our exporter
  writes (``aquilachat convert --to gguf``: f16, q8_0) and llama.cpp's ``llama_model_quantize``
  makes from the f16 one (q4_0; llama.cpp's default recipe, so ``output.weight`` is not q4_0).
  ``--llama-python`` names an interpreter that has ``llama_cpp`` (its own virtual environment);
* transformers ``LlamaForCausalLM`` in bfloat16 (the checkpoint is in Hugging Face layout).

Missing files are made first (each step timed, its peak RSS reported). Each engine then runs in
a process of its own, one after the other, for ``--repeats`` rounds (default 1; the engines take
turns, so a drift of this shared machine's speed hits them alike; medians are reported, with the
batch-1 range) (``bench/decode_engines.py``: same prompt token ids,
greedy, EOS ignored, warm-up first); reported per engine: decode tokens/s at batch 1 and 4,
prompt processing tokens/s for a ``--prompt-tokens`` prompt, the process's peak RSS, and the
batch-1 bound ``copy_bandwidth / weight_bytes``, where ``weight_bytes`` is what that engine's
weights at that precision occupy (the embedding table counted as one row) and the copy bandwidth
is measured just before the engine runs. Needs about 17 GB of free memory and 40 GB of disk; run
it alone (``flock /work/cache/bigmem.lock python bench/decode.py --preset aquila-7b ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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


def bench_ours(model, prompts, new_tokens, num_scheduler_steps: int = 1) -> float:
    eng = Engine(model, max_num_seqs=len(prompts), max_model_len=prompts.shape[1] + new_tokens + 1,
                 num_scheduler_steps=num_scheduler_steps)
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


# ------------------------------------------------------------------------ --preset aquila-7b
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("AQUILACHAT_BENCH_CACHE", "/work/cache"))
#: (engine, precision) rows of the preset, in the order they run.
PRESET_ENGINES = (("ours", "bf16"), ("ours", "int8"), ("ours", "int4"), ("ours", "int4-g128"),
                  ("llama.cpp", "f16"), ("llama.cpp", "q8_0"), ("llama.cpp", "q4_0"),
                  ("transformers", "bf16"))
#: llama.cpp's type that reads about as many bytes per weight as ours at a precision.
LLAMA_COUNTERPART = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0", "int4-g128": "q4_0"}
#: Our precisions that load a quantized checkpoint made once by ``aquilachat quantize`` (method,
#: group size) instead of quantizing the float checkpoint at load.
QUANTIZED_CHECKPOINTS = {"int4-g128": ("int4", 128)}
#: Rows per batch-4 decode prompt, and tokens per row.
BATCH, ROW_TOKENS = 4, 16
#: Ids the prompts are drawn from: the Aquila tokenizer's byte-level BPE entries (no special tokens).
PROMPT_VOCAB = 100_000


def preset_prompts(prompt_tokens: int, seed: int = 0) -> dict:
    """The token ids every engine gets: ``b4`` (4 rows of 16 ids; batch 1 uses the first) and
    ``pp`` (``prompt_tokens`` ids), drawn uniformly from the BPE ids with a fixed seed."""
    rng = random.Random(seed)
    return {"b4": [[rng.randrange(PROMPT_VOCAB) for _ in range(ROW_TOKENS)] for _ in range(BATCH)],
            "pp": [rng.randrange(PROMPT_VOCAB) for _ in range(prompt_tokens)]}


def run_child(cmd: list[str], timeout: float) -> tuple[int, str, float, int]:
    """Run ``cmd`` (stdout captured, stderr passed through) with ``timeout`` seconds; returns
    (exit code, stdout, seconds, peak RSS in bytes of that process: ``wait4``'s ``ru_maxrss``)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen does not wait again
    return proc.returncode, out, time.perf_counter() - t, usage.ru_maxrss * 1024


def quantized_checkpoint(cache: Path, precision: str) -> Path:
    """Where :data:`QUANTIZED_CHECKPOINTS`' ``precision`` lives under ``cache``."""
    return cache / f"aquila-7b-{precision}"


def prepare_7b(cache: Path, llama_python: str, gguf_types: set[str], *, timeout: float,
               quantized: set[str] = frozenset()) -> tuple[Path, dict[str, Path], list[str]]:
    """Make what is missing: the random checkpoint, the quantized checkpoints of ``quantized``
    (:data:`QUANTIZED_CHECKPOINTS`: ``aquilachat quantize``), and of ``gguf_types`` the f16 and
    q8_0 GGUF files (our exporter) and the q4_0 one (llama.cpp's quantizer, from the f16 file).
    Returns the checkpoint, the GGUF path per llama.cpp type, and one line per step that ran
    (seconds, peak RSS)."""
    ckpt = cache / "aquila-7b"
    ggufs = {t: cache / "gguf7b" / f"aquila-7b-{t}.gguf" for t in ("f16", "q8_0", "q4_0")}
    steps = []
    todo = []
    if not (ckpt / ".complete").exists():
        todo.append(("random checkpoint", [sys.executable, "bench/random_checkpoint.py", "--cache", str(cache)]))
    for precision in sorted(quantized):
        dst = quantized_checkpoint(cache, precision)
        if not (dst / "config.json").exists():
            method, group = QUANTIZED_CHECKPOINTS[precision]
            todo.append((f"{precision} checkpoint (aquilachat quantize)",
                         [sys.executable, "-m", "aquilachat", "quantize", str(ckpt), str(dst), "--method", method,
                          "--group-size", str(group)]))
    for t in ("f16", "q8_0"):
        if not ggufs[t].exists() and (t in gguf_types or (t == "f16" and "q4_0" in gguf_types)):
            todo.append((f"GGUF {t} (aquilachat convert)", [sys.executable, "-m", "aquilachat", "convert", str(ckpt),
                                                             str(ggufs[t]), "--to", "gguf", "--outtype", t]))
    if not ggufs["q4_0"].exists() and "q4_0" in gguf_types:
        todo.append(("GGUF q4_0 (llama_model_quantize)", [llama_python, "bench/decode_engines.py", "quantize",
                                                           str(ggufs["f16"]), str(ggufs["q4_0"]), "q4_0"]))
    for what, cmd in todo:
        print(f"making {what}: {' '.join(cmd)}", flush=True)
        rc, _, secs, rss = run_child(cmd, timeout)
        if rc != 0:
            raise SystemExit(f"{what}: {' '.join(cmd)} exited with {rc}")
        steps.append(f"{what}: {secs:.0f} s, peak RSS {rss / 1e9:.1f} GB")
    return ckpt, ggufs, steps


def run_engine(engine: str, precision: str, model: Path, prompts: dict, *, python: str, new_tokens: int,
               threads: int, timeout: float) -> dict:
    """One engine in its own process (``bench/decode_engines.py``); its result dict, with
    ``peak_rss`` and the copy bandwidth / load average measured just before it, or ``skipped``.

    llama.cpp runs with its defaults first. When that process dies of a signal (llama.cpp 0.3.36's
    AMX weight repacking crashed with SIGSEGV on the first decode of q4_0 / q8_0 on a Sapphire
    Rapids-class CPU here), it runs once more with ``use_extra_bufts = false`` (no repacking), and
    the result's notes say so."""
    max_model_len = -(-max(len(prompts["pp"]) + 1, ROW_TOKENS + new_tokens + 1) // 32) * 32
    spec = dict(engine=engine, precision=precision, model=str(model), prompts=prompts, new_tokens=new_tokens,
                threads=threads, max_model_len=max_model_len)
    retry_note = None
    while True:
        bandwidth, load = copy_bandwidth(), os.getloadavg()[0]
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(spec, f)
            f.flush()
            rc, out, _, rss = run_child([python, "bench/decode_engines.py", f.name], timeout)
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        if engine == "llama.cpp" and rc < 0 and "extra_bufts" not in spec:
            retry_note = f"defaults died of signal {-rc}; run with use_extra_bufts=false (no weight repacking)"
            print(f"llama.cpp {precision}: {retry_note}", flush=True)
            spec["extra_bufts"] = False
            continue
        break
    if rc != 0 or line is None:
        return {"skipped": f"failed (exit code {rc}; see its stderr above)"}
    result = json.loads(line.removeprefix("RESULT "))
    result.update(peak_rss=rss, bandwidth=bandwidth, loadavg=load)
    if retry_note:
        result["notes"] = result.get("notes", []) + [retry_note]
    return result


def median_result(results: list[dict]) -> dict:
    """One engine's runs (:func:`run_engine` dicts) -> one dict: the median of every figure over
    the runs that were not skipped, ``runs`` (how many), and ``b1_range`` (min, max of batch-1
    tokens/s); the first run's ``skipped`` when every run was skipped."""
    done = [r for r in results if "skipped" not in r]
    if not done:
        return results[0]
    out = {k: statistics.median(r[k] for r in done) for k in done[0] if isinstance(done[0][k], (int, float))}
    out["runs"] = len(done)
    out["b1_range"] = (min(r["decode_b1"] for r in done), max(r["decode_b1"] for r in done))
    return out


def format_preset_table(rows: list[tuple[str, str, dict]]) -> str:
    """The preset's markdown table: one row per (engine, precision, result of :func:`run_engine`),
    then the ratios of ours to llama.cpp at the counterpart precision (:data:`LLAMA_COUNTERPART`)."""
    head = ("| engine | precision | weights read/token (GB) | copy bandwidth (GB/s) | bound b1 tok/s | "
            "decode b1 tok/s (% of bound) | decode b4 tok/s | prompt tok/s | peak RSS (GB) | load (s) | load avg |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    by_key = {(e, p): r for e, p, r in rows}
    for engine, precision, r in rows:
        if "skipped" in r:
            lines.append(f"| {engine} | {precision} | skipped: {r['skipped']} |" + " |" * 8)
            continue
        bound = r["bandwidth"] / r["weight_bytes"]
        lines.append(f"| {engine} | {precision} | {r['weight_bytes'] / 1e9:.2f} | {r['bandwidth'] / 1e9:.1f} | "
                     f"{bound:.2f} | {r['decode_b1']:.2f} ({r['decode_b1'] / bound:.0%}){_range(r)} | {r['decode_b4']:.2f} | "
                     f"{r['prompt']:.1f} | {r['peak_rss'] / 1e9:.1f} | {r['load_s']:.0f} | {r['loadavg']:.1f} |")
    ratios = []
    for ours, theirs in LLAMA_COUNTERPART.items():
        a, b = by_key.get(("ours", ours), {}), by_key.get(("llama.cpp", theirs), {})
        if "decode_b1" in a and "decode_b1" in b:
            ratios.append(f"ours {ours} / llama.cpp {theirs}: decode b1 {a['decode_b1'] / b['decode_b1']:.2f}x, "
                          f"b4 {a['decode_b4'] / b['decode_b4']:.2f}x, prompt {a['prompt'] / b['prompt']:.2f}x")
    return "\n".join(lines + ([""] + ratios if ratios else []))


def _range(r: dict) -> str:
    lo_hi = r.get("b1_range")
    return f" [{lo_hi[0]:.2f}-{lo_hi[1]:.2f}]" if lo_hi and r.get("runs", 1) > 1 else ""


def run_preset(args: argparse.Namespace) -> None:
    threads = args.threads or os.cpu_count()
    new_tokens = args.new_tokens or 16
    wanted = [tuple(e.split(":", 1)) for e in args.engines.split(",")] if args.engines else list(PRESET_ENGINES)
    bad = [e for e in wanted if e not in PRESET_ENGINES]
    if bad:
        raise SystemExit(f"--engines: unknown {':'.join(bad[0])}; choose from "
                         + ",".join(f"{e}:{p}" for e, p in PRESET_ENGINES))
    llama_python = args.llama_python or sys.executable
    ckpt, ggufs, steps = prepare_7b(args.cache, llama_python, {p for e, p in wanted if e == "llama.cpp"},
                                    timeout=args.timeout,
                                    quantized={p for e, p in wanted if e == "ours" and p in QUANTIZED_CHECKPOINTS})
    prompts = preset_prompts(args.prompt_tokens)
    repeats = args.repeats or 1
    runs: dict[tuple[str, str], list[dict]] = {e: [] for e in wanted}
    for round_ in range(repeats):  # round-robin: a drift of the machine's speed hits every engine alike
        for engine, precision in wanted:
            print(f"== {engine} {precision} (round {round_ + 1}/{repeats})", flush=True)
            llama = engine == "llama.cpp"
            model = (ggufs[precision] if llama else quantized_checkpoint(args.cache, precision)
                     if precision in QUANTIZED_CHECKPOINTS else ckpt)
            r = run_engine(engine, precision, model, prompts,
                           python=llama_python if llama else sys.executable, new_tokens=new_tokens,
                           threads=threads, timeout=args.timeout)
            print(json.dumps(r), flush=True)
            runs[(engine, precision)].append(r)
    rows = [(engine, precision, median_result(runs[(engine, precision)])) for engine, precision in wanted]
    print()
    print(f"aquila-7b, {threads} threads, decode {new_tokens} tokens after the prefill (batch 1: 1 x "
          f"{ROW_TOKENS}-token prompt; batch 4: 4 x {ROW_TOKENS}), prompt processing {args.prompt_tokens} tokens; "
          f"{repeats} round(s), engines in turn, medians (batch-1 range in brackets)")
    for step in steps:
        print(f"made {step}")
    print()
    print(format_preset_table(rows))
    for engine, precision in wanted:  # what each engine said about itself (first round that ran)
        notes = next((r["notes"] for r in runs[(engine, precision)] if r.get("notes")), [])
        if notes:
            print(f"{engine} {precision}: {'; '.join(notes)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="bench-20m,bench-100m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128; 16 for --preset")
    ap.add_argument("--repeats", type=int, default=None,
                    help="alternating runs per row, medians reported (default 3; --preset: 1, each engine "
                         "loads anew per round)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default; --preset: all cores)")
    ap.add_argument("--num-scheduler-steps", default="1,8",
                    help="ours at each of these engine num_scheduler_steps (decode steps per engine step when "
                         "every sequence decodes greedily; 1 is the default engine)")
    ap.add_argument("--preset", choices=["aquila-7b"], help="engine against engine at a real size (docstring)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="--preset: where its model files live")
    ap.add_argument("--engines", default=None, help="--preset: a subset, e.g. ours:bf16,llama.cpp:q4_0")
    ap.add_argument("--llama-python", default=None, help="--preset: interpreter with llama_cpp (default: this one)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="--preset: prompt-processing prompt length")
    ap.add_argument("--timeout", type=float, default=900, help="--preset: seconds per engine or preparation step")
    args = ap.parse_args()
    if args.preset:
        run_preset(args)
        return
    args.new_tokens = args.new_tokens or 128
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
            ks = [int(k) for k in args.num_scheduler_steps.split(",")]
            runs = [([bench_ours(model, prompts, args.new_tokens, k) for k in ks],
                     bench_hf(ref, prompts, args.new_tokens), copy_bandwidth()) for _ in range(args.repeats or 3)]
            hf = statistics.median(r[1] for r in runs)
            bw = statistics.median(r[2] for r in runs)
            bound = bw / wb
            print(f"{name} batch {b}: copy bandwidth {', '.join(f'{r[2] / 1e9:.1f}' for r in runs)} GB/s")
            for i, k in enumerate(ks):
                ours = statistics.median(r[0][i] for r in runs)
                rows.append((name, cfg.num_parameters() / 1e6, b, k, ours, hf, ours / hf,
                             f"{bound:.0f} ({ours / bound:.0%})" if b == 1 else "-"))
    print()
    print("| config | params (M) | batch | ours: num_scheduler_steps | ours tok/s | transformers tok/s | ratio "
          "| bandwidth bound tok/s (ours/bound) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.2f}x | {r[7]} |")


if __name__ == "__main__":
    main()
