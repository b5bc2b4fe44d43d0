"""Reproduce the tokenizer comparison published with Aquila on ``../shared/data``.

Samples (defined here, documented in docs/tokenizers.md):

- English: the 300 C4 documents of ``corpus/en/c4_demo.jsonl`` (field ``text``) and the 30
  Wikipedia articles of ``corpus/en/wiki_demo.txt`` (one per line): 330 samples.
- Chinese: the first 10,000 non-empty lines of ``corpus/zh/peoples_daily/199801.txt`` (People's
  Daily, January 1998; one paragraph per line).
- Code: the HumanEval-X solutions, ``prompt + canonical_solution`` of the 164 problems in each of
  Python, C++, Java, JavaScript and Go (``code_eval/humaneval-x``): 820 samples.

Tokenizers: GPT-2, LLaMA, Aquila and cl100k from ``tokenizers/``. The same table comes from
``aquilachat tokenizer stats`` (the command is printed first). Runs in about 15 s on 2 cores.

    python bench/tokenizer_table.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aquilachat.tokenizer_stats import (PUBLISHED_AQUILA_TABLE, compute_stats, format_markdown,  # noqa: E402
                                        load_token_counter, read_samples, stats_to_json)

CODE_LANGS = ("python", "cpp", "java", "js", "go")


def shared_data_dir() -> Path:
    for candidate in (os.environ.get("AQUILACHAT_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    sys.exit("shared data not found: set AQUILACHAT_SHARED_DATA")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the statistics as JSON")
    args = ap.parse_args()
    d = shared_data_dir()
    en = [d / "corpus/en/c4_demo.jsonl", d / "corpus/en/wiki_demo.txt"]
    zh = [d / "corpus/zh/peoples_daily/199801.txt"]
    code = [d / f"code_eval/humaneval-x/humaneval_{lang}.jsonl.gz" for lang in CODE_LANGS]
    toks = {"gpt2": d / "tokenizers/gpt2", "llama": d / "tokenizers/llama/tokenizer.model",
            "aquila": d / "tokenizers/aquila", "cl100k": d / "tokenizers/cl100k/cl100k_base.tiktoken"}
    print("Command line:\n\n    aquilachat tokenizer stats "
          + " ".join(f"--tokenizer {n}={p}" for n, p in toks.items())
          + " --en " + " ".join(map(str, en)) + " --zh " + " ".join(map(str, zh))
          + " --code " + " ".join(map(str, code)) + " --code-field prompt+canonical_solution --baseline gpt2\n")
    samples = {"en": read_samples(en, limit=10000), "zh": read_samples(zh, limit=10000),
               "code": read_samples(code, field="prompt+canonical_solution", limit=10000)}
    rows = compute_stats([load_token_counter(p, name=n) for n, p in toks.items()], samples)
    print(format_markdown(rows, baseline="gpt2"))
    by_name = {r.name: r for r in rows}
    print("| ratio to GPT-2 | en published | en measured | zh published | zh measured | code published | code measured |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("llama", "aquila"):
        cells = []
        for lang in ("en", "zh", "code"):
            pub = PUBLISHED_AQUILA_TABLE[name][lang] / PUBLISHED_AQUILA_TABLE["gpt2"][lang]
            ours = by_name[name].languages[lang].tokens / by_name["gpt2"].languages[lang].tokens
            cells += [f"{pub:.3f}", f"{ours:.3f}"]
        print(f"| {name} / gpt2 | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(stats_to_json(rows), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
