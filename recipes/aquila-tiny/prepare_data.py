"""Step 1 of the aquila-tiny recipe: gather the training text from ../shared/data.

Writes into OUT (default ``runs/aquila-tiny/data``):

* ``pretrain_{zh,en,code}.txt`` — pretraining text, one document per blank-line-separated block;
* ``heldout_{zh,en,code}.txt`` — the held-out slice (the last 2% of each source's documents),
  never trained on, used for perplexity;
* ``sft_raw.jsonl`` — every SFT conversation, converted to FlagAI's format
  ``{"id", "conversations": [{"from": "human"|"gpt", "value"}], "instruction": ""}``;
* ``sources.json`` — file, license and size of everything used.

Sources (licenses in ../shared/data/SOURCES.md): English — tinyshakespeare, Pride and Prejudice,
Alice (public domain), Wikipedia demo (CC BY-SA), C4 demo (ODC-By); Chinese — People's Daily
1998-01 (modern news), 三国演义 (public domain), chinese-poetry (MIT); code — the Python standard
library of the interpreter running this script (PSF-2.0). ``code_eval`` and ``eval_writing``
are never read.

    python recipes/aquila-tiny/prepare_data.py [--shared ../shared/data] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

from aquilachat.io import iter_records, iter_texts

HELDOUT = 0.02
CODE_CHARS = 1_000_000


def poetry_docs(path: Path) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data if isinstance(data, list) else data.get("content", [data]) if isinstance(data, dict) else [data]
    if isinstance(data, dict) and not isinstance(data.get("content"), list):
        items = [data]
    docs = []
    for item in items:
        lines: list[str] = []

        def walk(x):
            if isinstance(x, str):
                lines.append(x)
            elif isinstance(x, list):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for key in ("title", "rhythmic", "chapter", "section", "author", "paragraphs", "content", "comment"):
                    if key in x:
                        walk(x[key])
        walk(item)
        text = "\n".join(l.strip() for l in lines if l.strip())
        if text:
            docs.append(text)
    return docs


def split_blocks(text: str, max_chars: int = 2000) -> list[str]:
    """Paragraph-ish documents of at most ``max_chars`` characters."""
    docs, cur = [], []
    size = 0
    for line in text.replace("\r\n", "\n").split("\n"):
        line = line.rstrip()
        if not line:
            if size > 200:
                docs.append("\n".join(cur))
                cur, size = [], 0
            continue
        cur.append(line)
        size += len(line)
        if size >= max_chars:
            docs.append("\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n".join(cur))
    return [d for d in docs if d.strip()]


def gather(shared: Path) -> dict[str, list[tuple[str, list[str]]]]:
    corpus = shared / "corpus"
    en = [(str(p), split_blocks(p.read_text(encoding="utf-8"))) for p in
          [corpus / "en/tinyshakespeare/input.txt", corpus / "en/pride_and_prejudice.txt", corpus / "en/alice.txt"]]
    en.append((str(corpus / "en/wiki_demo.txt"),
               [b for line in (corpus / "en/wiki_demo.txt").read_text(encoding="utf-8").splitlines()
                for b in split_blocks(line.replace(". ", ".\n"))]))
    en.append((str(corpus / "en/c4_demo.jsonl"),
               [text for _, text in iter_texts(corpus / "en/c4_demo.jsonl")]))
    zh = [(str(corpus / "zh/peoples_daily/199801.txt"),
           [l.strip() for l in (corpus / "zh/peoples_daily/199801.txt").read_text(encoding="utf-8").splitlines() if l.strip()]),
          (str(corpus / "zh/三国演义.txt"), split_blocks((corpus / "zh/三国演义.txt").read_text(encoding="utf-8"), 800))]
    for p in sorted((corpus / "zh/chinese-poetry").rglob("*.json")):
        zh.append((str(p), poetry_docs(p)))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code_docs, total = [], 0
    for p in sorted(stdlib.glob("*.py")):  # about 1M characters of Python, in name order
        text = p.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > CODE_CHARS:
            continue
        code_docs.append(text)
        total += len(text)
    code = [(str(stdlib) + "/*.py", code_docs)]
    return {"en": en, "zh": zh, "code": code}


def identity(text: str) -> str:
    return text.replace("{{name}}", "Aquila-tiny").replace("{{author}}", "the aquilachat project")


def sft_conversations(shared: Path) -> list[dict]:
    sft = shared / "sft"
    convs: list[dict] = []

    def add(cid, turns):
        if turns and all(isinstance(v, str) and v.strip() for _, v in turns) and turns[-1][0] == "gpt":
            convs.append({"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns], "instruction": ""})

    def records(name):  # JSON Lines or a JSON array, as aquilachat reads every data file
        return [row for _, row in iter_records(sft / name)]

    for name in ("alpaca_data_train.jsonl", "convo_samples.jsonl", "sft_samples.jsonl"):
        for i, row in enumerate(records(f"aquila_chat/{name}")):
            add(f"aquila_chat/{name}:{i}", [(t["from"], t["value"]) for t in row["conversations"]])
    for i, row in enumerate(records("fastchat/dummy_conversation.json")):
        add(f"fastchat:{i}", [(t["from"], identity(t["value"])) for t in row["conversations"]])
    for i, row in enumerate(records("medicalgpt/sharegpt_zh_1K_format.jsonl")):
        add(f"sharegpt_zh:{i}", [(t["from"], t["value"]) for t in row["conversations"]])
    for name in ("llama_factory/alpaca_zh_demo.json", "llama_factory/alpaca_en_demo.json", "llama_factory/identity.json",
                 "medicalgpt/Belle_open_source_1k.json"):
        for i, r in enumerate(records(name)):
            q = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
            add(f"{name}:{i}", [("human", identity(q)), ("gpt", identity(r["output"]))])
    for r in records("belle_zh_seed_tasks.json"):
        for j, inst in enumerate(r["instances"]):
            q = r["instruction"] + ("\n" + inst["input"] if inst.get("input") else "")
            add(f"belle_seed:{r['id']}:{j}", [("human", q), ("gpt", inst["output"])])
    return convs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve()
    ap.add_argument("--shared", type=Path, default=here.parents[3] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=here.parents[2] / "runs" / "aquila-tiny" / "data")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sources = []
    for lang, items in gather(args.shared).items():
        train, held = [], []
        for name, docs in items:
            k = max(1, int(len(docs) * HELDOUT)) if len(docs) >= 10 else 0
            train += docs[: len(docs) - k]
            held += docs[len(docs) - k:]
            sources.append({"lang": lang, "file": name, "documents": len(docs), "heldout": k,
                            "chars": sum(map(len, docs))})
        (args.out / f"pretrain_{lang}.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
        (args.out / f"heldout_{lang}.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
        print(f"{lang}: {len(train)} training documents ({sum(map(len, train)):,} chars), {len(held)} held out")
    convs = sft_conversations(args.shared)
    with open(args.out / "sft_raw.jsonl", "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    print(f"sft: {len(convs)} conversations")
    (args.out / "sources.json").write_text(json.dumps(sources, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
