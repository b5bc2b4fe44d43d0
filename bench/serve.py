"""Benchmark the server: one-at-a-time (``--max-num-seqs 1``, the original server's behaviour)
against continuous batching, with N concurrent streaming clients.

For each server mode, the script starts ``python -m aquilachat serve`` as a subprocess on
127.0.0.1 with a random ~20M-parameter model (preset ``bench-20m``: the Aquila vocabulary, so the
real Aquila tokenizer from ``../shared/data/tokenizers/aquila`` when present; otherwise a small
byte-level tokenizer and a correspondingly smaller model). Then, for each N, N clients each send
``--requests-per-client`` streamed ``/v1/completions`` requests back to back, every request
generating exactly ``--max-tokens`` tokens (``ignore_eos``; greedy by default). The servers of all
modes run side by side and take turns (``--repeats`` rounds), so a change in the machine's load
hits every mode alike. Reported per row, pooled over the rounds:
aggregate generated tokens per second (all tokens / wall time), and the 50th and 99th percentile
of the time to first token (request sent -> first streamed text), in seconds.

    python bench/serve.py                       # N = 1, 4, 16; max-num-seqs 1 vs 16
    python bench/serve.py --clients 1 8 --max-tokens 64

``--workload multi-turn`` instead compares prefix caching on and off (two servers, the second with
``--no-prefix-caching``, both ``--max-num-seqs 16``): 16 clients each hold a 4-turn chat through
streamed ``/v1/chat/completions``; every conversation starts with the chat template's system
prompt (shared by all) and each turn resends the whole history plus a new ~40-token question, as
chat clients do. Reported per mode: TTFT p50 / p99 over all turns, over the first turns and over
the later turns, generated tokens per second, and the share of prompt tokens served from the
prefix cache (``usage.prompt_tokens_details.cached_tokens``).

    python bench/serve.py --workload multi-turn [--clients 16] [--turns 4] [--max-tokens 32]

``--replicas 1,2`` instead compares ``aquilachat serve --replicas R`` (R engine replicas on Ray
Serve, one torch thread each, ``--max-num-seqs 16`` each; ``0`` is the single-process server
without Ray, for the overhead) on the batching workload above. Each server starts its own local
Ray, so these servers run one after another, not side by side. Run it with a Python that has Ray
Serve (``pip install 'aquilachat[ray]'``). On a machine with fewer cores than replicas x threads
plus the HTTP process it measures correctness and overhead, not scaling.

    python bench/serve.py --replicas 0,1,2 --clients 1 16

This is a benchmark, not a test: numbers depend on the machine and on whatever else runs on it
(the load average is printed with the table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Seconds to wait for a server to load its model.
STARTUP_TIMEOUT_S = 300
#: Seconds one request may take before the benchmark gives up.
REQUEST_TIMEOUT_S = 600


def build_model(out: Path, preset: str) -> str:
    """Save a random model of ``preset`` with a tokenizer under ``out``; return a description."""
    from aquilachat.checkpoint import save_hf
    from aquilachat.config import ModelConfig
    from aquilachat.model import AquilaForCausalLM
    from aquilachat.tokenizer import Tokenizer

    cfg = ModelConfig.from_preset(preset)
    shared = REPO.parent / "shared" / "data" / "tokenizers" / "aquila"
    if (shared / "vocab.json").exists():
        tok = Tokenizer.from_dir(shared)
        source = f"Aquila tokenizer ({shared})"
    else:
        from tests.helpers import make_byte_tokenizer
        tok = make_byte_tokenizer(out / "_tokenizer")
        source = "byte-level test tokenizer (Aquila tokenizer not found)"
    if tok.vocab_size != cfg.vocab_size:
        import dataclasses
        cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    model = AquilaForCausalLM(cfg)
    model.init_weights(0)
    save_hf(model, out, tokenizer=tok)
    return f"{preset}: {model.num_parameters() / 1e6:.1f}M parameters, {source}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``aquilachat serve`` in a subprocess."""

    def __init__(self, model_dir: Path, max_num_seqs: int, threads: int, max_model_len: int,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "aquilachat", "serve", "--model", str(model_dir), "--device", "cpu",
               "--port", str(self.port), "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
               "--served-model-name", "bench", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO)

    def wait_ready(self) -> None:
        import httpx
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def stream_events(client, url: str, body: dict):
    """POST a streamed request; yield its server-sent events (dicts) until ``[DONE]``."""
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            yield event


async def one_request(client, url: str, prompt: str, max_tokens: int, temperature: float) -> tuple[float, int]:
    """Send one streamed completion; return (time to first token in s, generated tokens)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    ttft, tokens = None, 0
    async for event in stream_events(client, url + "/v1/completions", body):
        if event["choices"] and ttft is None:
            ttft = time.perf_counter() - sent
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    return ttft if ttft is not None else time.perf_counter() - sent, tokens


async def concurrently(clients: int, session) -> tuple[list, float]:
    """Run ``session(http_client, i)`` for ``i < clients`` at once over one httpx client; return
    every session's results, concatenated, and the wall time in seconds."""
    import httpx
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as c:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(session(c, i) for i in range(clients)))
        wall = time.perf_counter() - start
    return [r for rs in per_client for r in rs], wall


async def run_clients(url: str, clients: int, requests_per_client: int, max_tokens: int,
                      temperature: float) -> dict:
    words = ["river", "mountain", "算法", "golang", "sorting", "天空", "quick", "fox", "bubble", "世界"]

    async def client_loop(c, i: int) -> list[tuple[float, int]]:
        results = []
        for j in range(requests_per_client):
            prompt = f"Client {i} request {j}: " + " ".join(words[(i + k) % len(words)] for k in range(8 + i % 5))
            results.append(await one_request(c, url, prompt, max_tokens, temperature))
        return results

    results, wall = await concurrently(clients, client_loop)
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99), "ttfts": ttfts}


#: Words the multi-turn questions are made of (English and Chinese, as AquilaChat's users write).
QUESTION_WORDS = ["explain", "the", "river", "mountain", "算法", "golang", "sorting", "天空", "quick", "fox",
                  "bubble", "世界", "why", "how", "冒泡排序", "memory", "cache", "example", "please", "history"]


def question(client: int, turn: int, words: int = 24) -> str:
    """Client ``client``'s question of turn ``turn`` (distinct per client and turn, ~40 tokens)."""
    return f"Client {client}, question {turn + 1}: " + " ".join(
        QUESTION_WORDS[(client * 7 + turn * 3 + k * k) % len(QUESTION_WORDS)] for k in range(words)) + "?"


async def one_chat(client, url: str, messages: list[dict], max_tokens: int, temperature: float) -> dict:
    """One streamed chat turn: its TTFT (s), answer text, generated and prompt tokens, cached tokens."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    ttft, parts, usage = None, [], None
    async for event in stream_events(client, url + "/v1/chat/completions", body):
        for choice in event["choices"]:
            if choice["delta"].get("content"):
                ttft = ttft if ttft is not None else time.perf_counter() - sent
                parts.append(choice["delta"]["content"])
        usage = event.get("usage") or usage
    return {"ttft": ttft if ttft is not None else time.perf_counter() - sent, "text": "".join(parts),
            "tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


async def run_multi_turn(url: str, clients: int, turns: int, max_tokens: int, temperature: float) -> dict:
    """``clients`` concurrent conversations of ``turns`` turns each (module docstring)."""
    async def conversation(c, i: int) -> list[tuple[int, dict]]:
        messages: list[dict] = []
        results = []
        for turn in range(turns):
            messages.append({"role": "user", "content": question(i, turn)})
            result = await one_chat(c, url, messages, max_tokens, temperature)
            messages.append({"role": "assistant", "content": result["text"]})
            results.append((turn, result))
        return results

    results, wall = await concurrently(clients, conversation)
    return {"wall_s": wall, "results": results}


def multi_turn(args, model_dir: Path) -> int:
    """Prefix caching on vs off on the multi-turn chat workload (module docstring)."""
    modes = {"on": (), "off": ("--no-prefix-caching",)}
    load_before = os.getloadavg()
    servers = {name: Server(model_dir, 16, args.threads, args.max_model_len, extra)
               for name, extra in modes.items()}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    try:
        for server in servers.values():
            server.wait_ready()
            asyncio.run(run_clients(server.url, 1, 1, 4, args.temperature))  # warm-up (a completion: no chat prefix)
        for rep in range(args.repeats):
            for name, server in servers.items():
                stats = asyncio.run(run_multi_turn(server.url, args.clients[0], args.turns, args.max_tokens,
                                                   args.temperature))
                runs[name].append(stats)
                ttfts = sorted(r["ttft"] for _, r in stats["results"])
                print(f"prefix caching {name:>3}, run {rep + 1}: TTFT p50 {percentile(ttfts, 50):.3f} s, "
                      f"p99 {percentile(ttfts, 99):.3f} s, {sum(r['tokens'] for _, r in stats['results']) / stats['wall_s']:.1f} tok/s",
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()
    load_after = os.getloadavg()
    print()
    print(f"{args.clients[0]} clients x {args.turns} turns, {args.max_tokens} tokens per answer (ignore_eos, temperature "
          f"{args.temperature}), {args.repeats} run(s) per mode, interleaved; {args.threads} torch thread(s); load "
          f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print()
    print("| prefix caching | turns | TTFT p50 s | TTFT p99 s | TTFT p50 turn 1 | TTFT p50 turns 2+ | tokens/s | "
          "prompt tokens | cached |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, stats_list in runs.items():
        results = [tr for s in stats_list for tr in s["results"]]
        ttfts = sorted(r["ttft"] for _, r in results)
        first = sorted(r["ttft"] for t, r in results if t == 0)
        later = sorted(r["ttft"] for t, r in results if t > 0)
        tokens = sum(r["tokens"] for _, r in results)
        wall = sum(s["wall_s"] for s in stats_list)
        prompt = sum(r["prompt_tokens"] for _, r in results)
        cached = sum(r["cached"] for _, r in results)
        print(f"| {name} | {len(results)} | {percentile(ttfts, 50):.3f} | {percentile(ttfts, 99):.3f} | "
              f"{percentile(first, 50):.3f} | {percentile(later, 50):.3f} | {tokens / wall:.1f} | {prompt} | "
              f"{cached / prompt:.0%} |")
    return 0


def replicas_bench(args, model_dir: Path) -> int:
    """``--replicas``: one server per replica count, one after another (module docstring)."""
    load_before = os.getloadavg()
    rows = []
    for count in args.replicas:
        extra = ("--replicas", str(count), "--threads-per-replica", str(args.threads)) if count else ()
        server = Server(model_dir, 16, args.threads, args.max_model_len, extra)
        try:
            started = time.perf_counter()
            server.wait_ready()
            ready = time.perf_counter() - started
            asyncio.run(run_clients(server.url, 1, 1, 4, args.temperature))  # warm-up
            for n in args.clients:
                runs = [asyncio.run(run_clients(server.url, n, args.requests_per_client, args.max_tokens,
                                                args.temperature)) for _ in range(args.repeats)]
                ttfts = sorted(t for r in runs for t in r["ttfts"])
                tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall_s"] for r in runs)
                rows.append({"replicas": count, "clients": n, "ready_s": ready, "requests": sum(r["requests"] for r in runs),
                             "tok_s": tokens / wall, "ttft_p50": percentile(ttfts, 50),
                             "ttft_p99": percentile(ttfts, 99)})
                print(f"replicas {count}, {n:>2} clients: {tokens / wall:7.1f} tok/s, TTFT p50 "
                      f"{rows[-1]['ttft_p50']:.3f} s, p99 {rows[-1]['ttft_p99']:.3f} s", flush=True)
        finally:
            server.stop()
    load_after = os.getloadavg()
    print()
    print(f"{args.repeats} runs x {args.requests_per_client} requests per client, {args.max_tokens} tokens each "
          f"(ignore_eos, temperature {args.temperature}), {args.threads} torch thread(s) per replica, max-num-seqs 16 "
          f"per replica; {os.cpu_count()} CPUs; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print()
    print("| replicas | clients | requests | tokens/s | TTFT p50 s | TTFT p99 s | ready after s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = r["replicas"] or "none (one process, no Ray)"
        print(f"| {name} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | "
              f"{r['ttft_p99']:.3f} | {r['ready_s']:.1f} |")
    return 0


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (default 1 4 16)")
    p.add_argument("--modes", type=int, nargs="+", default=[1, 16],
                   help="server --max-num-seqs values to compare (default 1 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--requests-per-client", type=int, default=2, help="back-to-back requests per client (default 2)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of every (mode, N), interleaved across modes and pooled (default 2)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--preset", default="bench-20m", help="model preset (default bench-20m)")
    p.add_argument("--max-model-len", type=int, default=512, help="server context window (default 512)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server (OMP_NUM_THREADS; default 1: on a shared 2-core "
                        "machine more threads spin against other processes)")
    p.add_argument("--model-dir", type=Path, default=None, help="reuse / keep the random model here")
    p.add_argument("--workload", choices=["batching", "multi-turn"], default="batching",
                   help="batching: max-num-seqs modes vs N clients (default); multi-turn: prefix caching on vs off "
                        "on 4-turn chats sharing the system prompt (--clients defaults to 16)")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation (default 4)")
    p.add_argument("--replicas", type=lambda v: [int(x) for x in v.split(",")], default=None, metavar="R,R,...",
                   help="compare aquilachat serve --replicas R for each R (0: one process without Ray) on the "
                        "batching workload, one server after another; needs Ray Serve")
    args = p.parse_args(argv)
    if args.workload == "multi-turn":
        if args.clients == [1, 4, 16]:
            args.clients = [16]
        if args.max_model_len == 512:
            args.max_model_len = 1024  # four turns of history

    with tempfile.TemporaryDirectory(prefix="aquilachat-bench-") as tmp:
        model_dir = args.model_dir or Path(tmp) / "model"
        if not (model_dir / "config.json").exists():
            model_dir.mkdir(parents=True, exist_ok=True)
            print("model:", build_model(model_dir, args.preset), flush=True)
        if args.workload == "multi-turn":
            return multi_turn(args, model_dir)
        if args.replicas is not None:
            return replicas_bench(args, model_dir)
        load_before = os.getloadavg()
        # All servers run at once and the modes take turns for every N and repetition, so that a
        # change in the machine's load (other processes) affects every mode alike.
        servers = {mode: Server(model_dir, mode, args.threads, args.max_model_len) for mode in args.modes}
        results: dict[tuple[int, int], list[dict]] = {}
        try:
            for server in servers.values():
                server.wait_ready()
                asyncio.run(run_clients(server.url, 1, 1, 4, args.temperature))  # warm-up
            for n in args.clients:
                for rep in range(args.repeats):
                    for mode, server in servers.items():
                        stats = asyncio.run(run_clients(server.url, n, args.requests_per_client, args.max_tokens,
                                                        args.temperature))
                        results.setdefault((mode, n), []).append(stats)
                        print(f"max-num-seqs {mode:>2}, {n:>2} clients, run {rep + 1}: {stats['tok_s']:7.1f} tok/s, "
                              f"TTFT p50 {stats['ttft_p50']:.3f} s, p99 {stats['ttft_p99']:.3f} s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
        rows = []
        for (mode, n), runs in results.items():
            ttfts = sorted(t for r in runs for t in r["ttfts"])
            tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall_s"] for r in runs)
            rows.append({"max_num_seqs": mode, "clients": n, "requests": sum(r["requests"] for r in runs),
                         "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                         "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99)})
        rows.sort(key=lambda r: (r["max_num_seqs"], r["clients"]))
        load_after = os.getloadavg()

    print()
    print(f"{args.repeats} runs x {args.requests_per_client} requests per client, {args.max_tokens} tokens each (ignore_eos, "
          f"temperature {args.temperature}), {args.threads} torch thread(s); load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print()
    print("| max-num-seqs | clients | requests | tokens | wall s | tokens/s | TTFT p50 s | TTFT p99 s | vs one-at-a-time |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {r["clients"]: r["tok_s"] for r in rows if r["max_num_seqs"] == 1}
    for r in rows:
        ratio = f"{r['tok_s'] / base[r['clients']]:.1f}x" if r["clients"] in base else "-"
        print(f"| {r['max_num_seqs']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | "
              f"{r['tok_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
