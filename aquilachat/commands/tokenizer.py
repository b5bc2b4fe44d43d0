"""``aquilachat tokenizer train ...`` and ``aquilachat tokenizer stats ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or compare tokenizers",
                       description="Train a byte-level BPE tokenizer in Aquila's layout, or compare "
                                   "tokenizers by tokens per sample on English, Chinese and code.")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on text files",
                        description="Train a GPT-2-style byte-level BPE tokenizer on UTF-8 text files "
                                    "(streamed). Runs of CJK characters are cut into chunks of at most "
                                    "--max-cjk-run characters before the GPT-2 regex, so that no word is "
                                    "longer than that and training stays linear in the corpus on Chinese "
                                    "without spaces or punctuation. Writes tokenizer.json, vocab.json, merges.txt, "
                                    "special_tokens_map.json and tokenizer_config.json: <|endoftext|> is id 0, "
                                    "Aquila's 8 special tokens follow the learned vocabulary.")
    t.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="BPE vocabulary size (vocab.json: <|endoftext|> + 256 bytes + merges); "
                        "the tokenizer has N + 8 ids")
    t.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    t.add_argument("--min-frequency", type=int, default=2, metavar="N", help="least count of a merged pair (default 2)")
    t.add_argument("--max-cjk-run", type=int, default=None, metavar="K",
                   help="longest run of CJK characters kept as one pre-token (default 16)")
    t.add_argument("--skip-bad-files", action="store_true",
                   help="skip empty, binary or non-UTF-8 files (counted) instead of stopping with an error")
    t.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    t.set_defaults(func=run_train)

    s = tsub.add_parser("stats", help="compare tokenizers: tokens per sample, chars and bytes per token",
                        description="Average tokens per sample per language (the measure of the table "
                                    "published with Aquila), characters and bytes per token, vocabulary "
                                    "size. Tokenizers: a directory (tokenizer.json or vocab.json + merges.txt), "
                                    "a tokenizer.json, a SentencePiece .model or a tiktoken rank file. "
                                    "Samples: .jsonl[.gz] (one record per line, FIELD) or text (one per line).")
    s.add_argument("--tokenizer", action="append", required=True, metavar="NAME=PATH",
                   help="a tokenizer to compare (repeat); NAME= is optional")
    for lang, what in (("en", "English"), ("zh", "Chinese"), ("code", "code")):
        s.add_argument(f"--{lang}", nargs="+", type=Path, metavar="FILE", help=f"{what} sample files")
        s.add_argument(f"--{lang}-field", default="text", metavar="FIELD",
                       help="JSONL field(s) with the sample text, joined with + (default: text)")
    s.add_argument("--samples", type=int, default=10000, metavar="N",
                   help="use the first N samples of each language (default 10000, as the published table)")
    s.add_argument("--format", choices=["markdown", "json"], default="markdown", help="output format")
    s.add_argument("--baseline", metavar="NAME", help="add a table of tokens/sample relative to this tokenizer")
    s.add_argument("--output", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    s.set_defaults(func=run_stats)


def run_train(args: argparse.Namespace) -> int:
    from ..tokenizer_train import DEFAULT_MAX_CJK_RUN, train_tokenizer
    skipped: list[tuple[Path, str]] = []

    def on_skip(path: Path, reason: str) -> None:
        skipped.append((path, reason))
        print(f"skipped {reason}", file=sys.stderr)

    tok = train_tokenizer(args.input, vocab_size=args.vocab_size, out=args.out, min_frequency=args.min_frequency,
                          max_cjk_run=args.max_cjk_run if args.max_cjk_run is not None else DEFAULT_MAX_CJK_RUN,
                          skip_bad_files=args.skip_bad_files, on_skip=on_skip, show_progress=args.progress)
    base = tok.vocab_size - len(tok.special_tokens) + 1  # <|endoftext|> is part of the BPE vocabulary
    note = "" if base == args.vocab_size else f" (asked for {args.vocab_size}; the corpus gave no more merges)"
    print(f"trained {base}-entry BPE vocabulary{note} + {tok.vocab_size - base} special tokens "
          f"= {tok.vocab_size} ids; used {len(args.input) - len(skipped)} file(s), skipped {len(skipped)}; "
          f"wrote {args.out}")
    return 0


def _parse_tokenizer_spec(spec: str) -> tuple[str | None, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        return None, spec
    return name or None, path


def run_stats(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..tokenizer_stats import compute_stats, format_markdown, load_token_counter, read_samples, stats_to_json
    samples = {}
    for lang in ("en", "zh", "code"):
        files = getattr(args, lang)
        if files:
            samples[lang] = read_samples(files, field=getattr(args, f"{lang}_field"), limit=args.samples)
    if not samples:
        raise DataError("no samples: give at least one of --en, --zh, --code")
    counters = []
    for spec in args.tokenizer:
        name, path = _parse_tokenizer_spec(spec)
        counters.append(load_token_counter(path, name=name))
    names = [c.name for c in counters]
    if len(set(names)) != len(names):
        raise DataError(f"tokenizer names must differ (got {', '.join(names)}); use NAME=PATH")
    rows = compute_stats(counters, samples)
    if args.format == "json":
        text = json.dumps(stats_to_json(rows), indent=2, ensure_ascii=False) + "\n"
    else:
        text = format_markdown(rows, baseline=args.baseline)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
