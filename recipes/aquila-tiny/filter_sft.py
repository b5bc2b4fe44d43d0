"""Step 2b of the aquila-tiny recipe: keep the SFT conversations that fit the context.

Reads ``sft_raw.jsonl`` (FlagAI format), renders each conversation with the trained tokenizer in
the aquila-chat template (the same ``render_for_training`` the trainer uses) and writes
``sft.jsonl`` with every conversation that fits ``--max-tokens``; a multi-turn conversation that
does not fit is cut after its last complete exchange that does (never mid-answer, so every kept
answer ends with its supervised end-of-turn marker). Prints how many were kept, cut and dropped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aquilachat.chat_format import render_for_training
from aquilachat.tokenizer import Tokenizer


def main() -> None:
    here = Path(__file__).resolve()
    run = here.parents[2] / "runs" / "aquila-tiny"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=run / "tokenizer")
    ap.add_argument("--input", type=Path, default=run / "data" / "sft_raw.jsonl")
    ap.add_argument("--output", type=Path, default=run / "data" / "sft.jsonl")
    ap.add_argument("--max-tokens", type=int, default=512)
    args = ap.parse_args()
    tok = Tokenizer.from_dir(args.tokenizer)
    kept = cut = dropped = 0
    with open(args.input, encoding="utf-8") as f, open(args.output, "w", encoding="utf-8") as out:
        for line in f:
            conv = json.loads(line)
            turns = conv["conversations"]
            for end in range(len(turns), 0, -2):
                ids, _ = render_for_training(tok, turns[:end], "aquila-chat")
                if len(ids) <= args.max_tokens:
                    break
            else:
                dropped += 1
                continue
            if end < len(turns):
                cut += 1
            kept += 1
            out.write(json.dumps({**conv, "conversations": turns[:end]}, ensure_ascii=False) + "\n")
    print(f"sft: kept {kept} conversations ({cut} cut to their first exchanges that fit), "
          f"dropped {dropped} longer than {args.max_tokens} tokens")


if __name__ == "__main__":
    main()
