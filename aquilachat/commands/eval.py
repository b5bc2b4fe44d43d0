"""``aquilachat eval ppl|code|writing``: perplexity, code execution (HumanEval-X, HumanEval, MBPP),
writing graded by a judge. Each writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (plus
per-sample JSON Lines) into ``--output`` (default ``eval-results/<UTC time>``)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ..errors import ValidationError
from ._common import add_sampling_args, sampling_params


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_backend(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of --model or --url)")
    g.add_argument("--model", help="local checkpoint directory, bundled name or repo id (runs aquilachat.LLM here)")
    g.add_argument("--template", help="chat template for a local model (default: the model's)")
    g.add_argument("--url", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:7000/v1")
    g.add_argument("--model-name", help="the 'model' field sent to --url")
    g.add_argument("--api-key", default=None, help="API key for --url (default: $AQUILACHAT_EVAL_API_KEY)")
    g.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight (default 4)")


def _add_sampling(p: argparse.ArgumentParser, *, temperature: float | None, max_tokens: int) -> None:
    """The sampling options of ``chat`` / ``generate`` with the evaluations' defaults (greedy or
    per category, no nucleus cut)."""
    actions = add_sampling_args(p, temperature=temperature, top_p=1.0, max_tokens=max_tokens)
    if temperature is None:
        actions["temperature"].help = actions["temperature"].help.replace("Default: none.", "Default: per category.")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", type=Path, default=None, help="report directory (default eval-results/<time>)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="shared data folder for named datasets (default $AQUILACHAT_SHARED_DATA or ../shared/data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, code execution, writing with a judge",
                       description="Evaluate a model. Every report (JSON + Markdown + PNG chart) records the "
                                   "model, template, sampling parameters, dataset hashes, package versions and date.")
    evsub = p.add_subparsers(dest="eval_command", metavar="{ppl,code,writing}")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    # ppl
    pp = evsub.add_parser("ppl", help="token-level perplexity and bits per byte",
                          description="Perplexity exp(mean NLL) over scored tokens and bits per byte "
                                      "(NLL / ln 2 / UTF-8 bytes, comparable across tokenizers). Long documents "
                                      "are scored with a sliding window of --context tokens and --stride.")
    pp.add_argument("--model", required=True, help="checkpoint directory, bundled name or repo id")
    pp.add_argument("--data", required=True, nargs="+", type=Path,
                    help=".txt (one document), .jsonl/.jsonl.gz (a 'text' field per line) or .json files")
    pp.add_argument("--field", default="text", help="JSON field with the text (default 'text')")
    pp.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's context)")
    pp.add_argument("--stride", type=int, default=None, help="window stride in tokens (default context/2)")
    pp.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token to each document")
    pp.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    pp.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens per file")
    pp.add_argument("--dtype", default="auto")
    pp.add_argument("--device", default="auto")
    pp.add_argument("--quantization", default=None, choices=["int8", "int4"],
                    help="weight-only quantization at load time (see docs/generation.md)")
    _add_common(pp)
    pp.set_defaults(func=run_ppl)

    # code
    pc = evsub.add_parser("code", help="functional correctness of generated code (pass@k)",
                          description="Generate completions (or use the canonical solutions with --self-test), run each "
                                      "language's tests in a sandbox (no network, time/memory/process limits, throw-away "
                                      "directory) and report pass@k (Chen et al. 2021). A language whose toolchain is "
                                      "missing is reported as skipped.")
    pc.add_argument("--dataset", default="humaneval-x",
                    help="humaneval-x, humaneval, mbpp, a directory of humaneval_<lang>.jsonl[.gz] or a file (default humaneval-x)")
    pc.add_argument("--languages", type=_str_list, default=None,
                    help="comma-separated: python,cpp,java,js,go,rust (default: python,cpp,java,js,go; python for humaneval/mbpp)")
    pc.add_argument("--n", type=int, default=1, help="completions per problem (default 1)")
    pc.add_argument("--k", type=_int_list, default=None, help="comma-separated k of pass@k (default 1; only k <= n)")
    pc.add_argument("--self-test", action="store_true", help="run the canonical solutions (must give pass@1 = 1.0)")
    pc.add_argument("--limit", type=int, default=None, help="only the first N problems of each language")
    pc.add_argument("--tasks", type=_str_list, default=None,
                    help="only these problems: ids (CPP/22) or numbers (22 = that problem in every language)")
    pc.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="samples run at once (default 2)")
    pc.add_argument("--timeout", type=float, default=10.0, help="seconds per test run (default 10)")
    pc.add_argument("--compile-timeout", type=float, default=90.0, help="seconds per compile step (default 90)")
    pc.add_argument("--memory-mb", type=int, default=None, help="data-segment limit of test runs in MiB (default per language)")
    pc.add_argument("--no-truncate", action="store_true", help="do not cut completions at the end of the function")
    pc.add_argument("--allow-network", action="store_true",
                    help="run even where the sandbox cannot cut the network (unsafe for untrusted code)")
    _add_backend(pc)
    _add_sampling(pc, temperature=0.0, max_tokens=512)
    _add_common(pc)
    pc.set_defaults(func=run_code)

    # writing
    pw = evsub.add_parser("writing", help="MT-Bench-style writing grades (1-10) by a judge model",
                          description="Answer MT-Bench / Vicuna / BELLE questions with the model, then have any "
                                      "OpenAI-compatible judge grade each answer (FastChat single-answer templates). "
                                      "Judge prompts and raw judge outputs are kept.")
    pw.add_argument("--questions", required=True,
                    help="question file, or mt_bench, vicuna_bench, belle (from the data folder)")
    pw.add_argument("--judge-url", required=True, help="base URL of the judge's OpenAI-compatible server")
    pw.add_argument("--judge-model", required=True, help="the judge's model name")
    pw.add_argument("--judge-api-key", default=None, help="judge API key (default: $AQUILACHAT_JUDGE_API_KEY)")
    pw.add_argument("--judge-prompts", type=Path, default=None, help="FastChat judge_prompts.jsonl (default: found in the data folder)")
    pw.add_argument("--judge-style", choices=["mt-bench", "belle"], default="mt-bench",
                    help="mt-bench: FastChat single-answer templates, 1-10 (default); belle: BELLE's Chinese prompts, 0-1")
    pw.add_argument("--belle-prompts", type=Path, default=None, help="BELLE eval_prompt.json for --judge-style belle")
    pw.add_argument("--references", type=Path, default=None, help="reference answers (FastChat reference_answer/*.jsonl)")
    pw.add_argument("--limit", type=int, default=None, help="only the first N questions")
    _add_backend(pw)
    _add_sampling(pw, temperature=None, max_tokens=1024)
    _add_common(pw)
    pw.set_defaults(func=run_writing)


# ------------------------------------------------------------------------------------ helpers
def _out_dir(args) -> Path:
    from ..evaluation.code import default_output_dir
    return args.output or default_output_dir()


def _generator(args):
    from ..evaluation.backends import make_generator
    if args.model and args.url:
        raise ValidationError("give either --model (local) or --url (server), not both")
    key = args.api_key or os.environ.get("AQUILACHAT_EVAL_API_KEY")
    return make_generator(model=args.model, url=args.url, model_name=args.model_name, api_key=key,
                          template=args.template, concurrency=args.concurrency)


def _print_written(paths) -> None:
    for p in paths:
        print(f"wrote {p}")


# ------------------------------------------------------------------------------------ ppl
def run_ppl(args: argparse.Namespace) -> int:
    from ..evaluation.ppl import evaluate_files
    from ..evaluation.report import bar_chart, markdown_metadata, run_metadata, write_report
    for f in args.data:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: data file not found")
    results, info = evaluate_files(args.model, args.data, context=args.context, stride=args.stride,
                                   add_bos=not args.no_bos, batch_size=args.batch_size, max_tokens=args.max_tokens,
                                   dtype=args.dtype, device=args.device, field=args.field, progress=not args.no_progress,
                                   quantization=args.quantization)
    meta = run_metadata(model=info, template=None, sampling=None, datasets=args.data,
                        extra={"context": next(iter(results.values())).context,
                               "stride": next(iter(results.values())).stride})
    data = {"kind": "ppl", "files": {k: v.to_dict() for k, v in results.items()}, "metadata": meta}
    lines = ["# Perplexity", "",
             "Token-level perplexity = exp(mean NLL per scored token); bits per byte = total NLL / ln 2 / UTF-8 bytes "
             "(comparable across tokenizers).", "",
             "| file | perplexity | bits/byte | tokens | bytes | documents | windows |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.perplexity:.4f} | {r.bits_per_byte:.4f} | {r.tokens} | {r.bytes} | {r.documents} | {r.windows} |")
    first = next(iter(results.values()))
    lines += ["", f"Context {first.context} tokens, stride {first.stride}, BOS prepended: {first.add_bos}.", "",
              markdown_metadata(meta)]
    out = _out_dir(args)
    paths = write_report(out, "ppl", data, "\n".join(lines))
    png = bar_chart(out / "ppl.png", [Path(k).name for k in results], [r.bits_per_byte for r in results.values()],
                    title="Bits per byte (lower is better)", ylabel="bits / byte")
    for name, r in results.items():
        print(f"{name}: perplexity {r.perplexity:.4f}, bits/byte {r.bits_per_byte:.4f} ({r.tokens} tokens, {r.bytes} bytes)")
    _print_written([*paths.values(), png])
    return 0


# ------------------------------------------------------------------------------------ code
def run_code(args: argparse.Namespace) -> int:
    from ..evaluation.code import (CodeEvalConfig, DEFAULT_LANGUAGES, chart_values, code_report_markdown,
                                   run_code_eval, write_samples)
    from ..evaluation.report import bar_chart, markdown_metadata, run_metadata, write_report
    langs = args.languages or (["python"] if args.dataset in ("humaneval", "mbpp") else list(DEFAULT_LANGUAGES))
    params = sampling_params(args)
    cfg = CodeEvalConfig(dataset=args.dataset, languages=langs, n=args.n, ks=args.k or [1], self_test=args.self_test,
                         limit=args.limit, tasks=args.tasks, workers=args.workers, timeout_s=args.timeout,
                         compile_timeout_s=args.compile_timeout, memory_mb=args.memory_mb, params=params,
                         data_dir=args.data_dir, allow_network=args.allow_network, truncate=not args.no_truncate)
    generator = None
    if not args.self_test:
        generator = _generator(args)
    elif args.model or args.url:
        print("note: --self-test runs the canonical solutions; the model is not used", file=sys.stderr)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    report, results = run_code_eval(cfg, generator, progress=not args.no_progress, log=log)
    files = [e["file"] for e in report["languages"].values()]
    meta = run_metadata(model=None if args.self_test else generator.description,
                        template=None if args.self_test else args.template,
                        sampling=None if args.self_test else {**asdict(params), "n": cfg.n,
                                                              "stop": "per language (see aquilachat.evaluation.languages)"
                                                              + (f", plus {params.stop}" if params.stop else "")},
                        datasets=files)
    report["metadata"] = meta
    out = _out_dir(args)
    paths = write_report(out, "code_eval", report, code_report_markdown(report, markdown_metadata(meta)))
    samples = write_samples(out / "code_eval_samples.jsonl", results)
    labels, values, notes = chart_values(report)
    png = bar_chart(out / "code_eval.png", labels, values, notes=notes, ymax=1.12,
                    title=f"{report['dataset']} pass@{report['k'][0]}" + (" (self-test)" if args.self_test else ""),
                    ylabel=f"pass@{report['k'][0]}")
    for lang, e in report["languages"].items():
        if e["status"] == "skipped":
            print(f"{lang}: skipped ({e['reason']})")
        else:
            ks = ", ".join(f"{k} {e[k]:.4f}" for k in e if k.startswith("pass@"))
            print(f"{lang}: {ks} ({e['counts']['passed']}/{e['samples']} samples passed, {e['seconds']} s)")
    _print_written([*paths.values(), samples, png])
    if args.self_test:
        bad = [lang for lang, e in report["languages"].items() if e["status"] == "evaluated" and not e["self_test_ok"]]
        for lang, e in report["languages"].items():
            for task, why in e.get("known_broken_canonical", {}).items():
                print(f"{lang}: {task} fails as documented upstream bug: {why}")
        if bad:
            print(f"self-test FAILED for: {', '.join(bad)} (see {paths['markdown']})", file=sys.stderr)
            return 1
    return 0


# ------------------------------------------------------------------------------------ writing
def run_writing(args: argparse.Namespace) -> int:
    from ..evaluation.backends import OpenAIHTTPGenerator
    from ..evaluation.report import bar_chart, markdown_metadata, run_metadata, write_report
    from ..evaluation.writing import WritingEvalConfig, resolve_questions, run_writing_eval, writing_report_markdown
    import json
    qpath = resolve_questions(args.questions, args.data_dir)
    params = sampling_params(args, temperature=args.temperature or 0.0)
    cfg = WritingEvalConfig(questions=qpath, judge_prompts=args.judge_prompts, references=args.references,
                            belle_prompts=args.belle_prompts, judge_style=args.judge_style,
                            temperature=args.temperature, params=params, limit=args.limit, data_dir=args.data_dir)
    generator = _generator(args)
    judge_key = args.judge_api_key or os.environ.get("AQUILACHAT_JUDGE_API_KEY")
    judge = OpenAIHTTPGenerator(args.judge_url, args.judge_model, api_key=judge_key, concurrency=args.concurrency)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    report, records = run_writing_eval(cfg, generator, judge, progress=not args.no_progress, log=log)
    files = [qpath] + [p for p in (report["judge_prompts_file"], report["references_file"]) if p]
    sampling = {**asdict(params), "temperature": report["answer_temperature"]}
    meta = run_metadata(model=generator.description, template=args.template, sampling=sampling, datasets=files,
                        extra={"judge": judge.description, "judge_sampling": asdict(cfg.judge_params)})
    report["metadata"] = meta
    out = _out_dir(args)
    paths = write_report(out, "writing_eval", report, writing_report_markdown(report, markdown_metadata(meta)))
    jpath = out / "writing_judgments.jsonl"
    with open(jpath, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cats = report["per_category"]
    png = bar_chart(out / "writing_eval.png", list(cats), [c["mean"] for c in cats.values()],
                    notes=["no grade" if c["mean"] is None else "" for c in cats.values()],
                    ymax=report["scale"][1] * 1.05, title="Writing score by category", ylabel="mean judge score")
    o = report["overall"]
    mean = "n/a" if o["mean"] is None else f"{o['mean']:.3f}"
    print(f"mean score: {mean} ({o['graded']} graded, {o['no_grade']} without a grade)")
    _print_written([*paths.values(), jpath, png])
    return 0
