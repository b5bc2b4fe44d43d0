"""Peak memory (RSS) of tokenizer training on ~10 MB of Chinese without whitespace.

Builds the corpus from ``../shared/data/corpus/zh`` (People's Daily 1998-01 minus its last 2,000
lines, Romance of the Three Kingdoms, the chinese-poetry JSON texts), removes every whitespace
character (line ends included: the file is one 10 MB line, which the trainer reads in 64 Ki-character
pieces), repeats it if it is shorter than the target, and trains one tokenizer per setting of
``max_cjk_run`` in a fresh child process. The child's peak RSS comes from ``os.wait4`` (the kernel's
``ru_maxrss``, as ``/usr/bin/time -v`` reports it). A child that runs past ``--timeout`` seconds is
killed and reported with the peak it had reached. Each trained tokenizer is also scored on the held-out
People's Daily lines (characters per token; higher is better compression).

    python bench/tokenizer_memory.py                    # K = 4, 8, 16, 32 and no split
    python bench/tokenizer_memory.py --runs 16 none --mb 10 --vocab-size 32000

Nothing is written into the repository; the corpus and tokenizers go to a temporary directory.
The default runs take about 5 minutes of CPU (10 minutes of wall time on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELD_OUT_LINES = 2000


def shared_data_dir() -> Path:
    for candidate in (os.environ.get("AQUILACHAT_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    sys.exit("shared data not found: set AQUILACHAT_SHARED_DATA")


def _json_strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for x in obj:
            yield from _json_strings(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _json_strings(x)


def build_corpus(data: Path, out_dir: Path, target_bytes: int, strip_punct: bool = False) -> tuple[Path, Path, dict]:
    zh = data / "corpus" / "zh"
    pd_lines = (zh / "peoples_daily" / "199801.txt").read_text(encoding="utf-8").splitlines()
    parts = ["".join(pd_lines[:-HELD_OUT_LINES]), (zh / "三国演义.txt").read_text(encoding="utf-8")]
    for path in sorted((zh / "chinese-poetry").rglob("*.json")):
        parts.append("".join(s for s in _json_strings(json.loads(path.read_text(encoding="utf-8")))
                             if re.search(r"[\u4e00-\u9fff]", s)))
    text = re.sub(r"[\W_]+" if strip_punct else r"\s+", "", "".join(parts))
    unique_bytes = len(text.encode("utf-8"))
    reps = -(-target_bytes // unique_bytes)
    data_bytes = (text * reps).encode("utf-8")[:target_bytes].decode("utf-8", errors="ignore")
    corpus = out_dir / "zh_nospace.txt"
    corpus.write_text(data_bytes, encoding="utf-8")
    held = out_dir / "zh_heldout.txt"
    held.write_text("\n".join(pd_lines[-HELD_OUT_LINES:]) + "\n", encoding="utf-8")
    han = sum(1 for c in data_bytes if "\u4e00" <= c <= "\u9fff")
    info = {"bytes": corpus.stat().st_size, "chars": len(data_bytes), "han_share": han / len(data_bytes),
            "unique_bytes": unique_bytes, "repeats": reps}
    return corpus, held, info


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from aquilachat.tokenizer_train import train_tokenizer
    if args.child == "import":  # baseline: the interpreter, torch (imported by aquilachat.tokenizer), tokenizers
        print(json.dumps({}))
        return
    k = None if args.child == "none" else int(args.child)
    t0 = time.perf_counter()
    tok = train_tokenizer([Path(args.corpus)], vocab_size=args.vocab_size, out=Path(args.out), max_cjk_run=k)
    train_s = time.perf_counter() - t0
    held = Path(args.held).read_text(encoding="utf-8")
    n_tokens = len(tok.encode(held))
    print(json.dumps({"train_s": train_s, "ids": tok.vocab_size, "heldout_chars_per_token": len(held) / n_tokens}))


def measure(setting: str, corpus: Path, held: Path, out: Path, vocab_size: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", setting, "--corpus", str(corpus), "--held", str(held),
           "--out", str(out / f"tok_{setting}"), "--vocab-size", str(vocab_size)]
    t0 = time.perf_counter()
    # stderr into the same pipe, read to the end before wait4: no pipe can fill up and block the child
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = threading.Event()

    def kill():
        killed.set()
        proc.send_signal(signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = status
    result = {"setting": setting, "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t0,
              "cpu_s": usage.ru_utime + usage.ru_stime}
    if killed.is_set():
        result["killed_after_s"] = timeout
    elif status != 0:
        result["error"] = output.strip().splitlines()[-1:] or [f"status {status}"]
    else:
        result.update(json.loads(output.strip().splitlines()[-1]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["import", "4", "8", "16", "32", "none"],
                    help="max_cjk_run settings to measure ('none' = no CJK split, 'import' = imports only)")
    ap.add_argument("--mb", type=float, default=10.0, help="corpus size in MB (10^6 bytes)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--strip-punct", action="store_true",
                    help="also remove punctuation and symbols (only letters and digits remain): the worst case")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is killed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--held", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="aquilachat-tokmem-") as tmp:
        tmp = Path(tmp)
        corpus, held, info = build_corpus(shared_data_dir(), tmp, int(args.mb * 1e6), args.strip_punct)
        print(f"corpus: {info['bytes']:,} bytes, {info['chars']:,} characters ({info['han_share']:.1%} Han), "
              f"no whitespace{', no punctuation' if args.strip_punct else ''}; {info['unique_bytes']:,} unique bytes, repeated x{info['repeats']}; "
              f"vocab_size {args.vocab_size}; {os.cpu_count()} CPUs", flush=True)
        print("| max_cjk_run | peak RSS (MiB) | wall (s) | CPU (s) | ids | held-out zh chars/token |")
        print("|---|---:|---:|---:|---:|---:|", flush=True)
        for setting in args.runs:
            r = measure(setting, corpus, held, tmp, args.vocab_size, args.timeout)
            tail = (f"— | killed after {r['killed_after_s']:.0f} s" if "killed_after_s" in r
                    else f"— | error: {r['error']}" if "error" in r
                    else "— | —" if setting == "import"
                    else f"{r['ids']} | {r['heldout_chars_per_token']:.3f}")
            print(f"| {setting} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {tail} |", flush=True)


if __name__ == "__main__":
    main()
