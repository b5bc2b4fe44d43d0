"""Step 6 of the aquila-tiny recipe: evaluate the fine-tuned model and ship it in the package.

* held-out perplexity and bits per byte (``aquilachat.evaluation.ppl``) of the pretrained and the
  fine-tuned model on the held-out slices (``heldout_{zh,en,code}.txt``), with the uniform
  baseline (perplexity = vocabulary size) for comparison;
* ten sampled answers (five Chinese, five English prompts; temperature 0.7, top_p 0.9, seeds 0-9,
  at most 128 new tokens) and how each ended (its own end-of-turn vs the length limit);
* copies ``runs/aquila-tiny/sft/final`` into ``aquilachat/assets/aquila-tiny`` and the loss
  curves into ``docs/aquila-tiny/``; writes ``runs/aquila-tiny/report.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "runs" / "aquila-tiny"
ASSET = ROOT / "aquilachat" / "assets" / "aquila-tiny"
DOCS = ROOT / "docs" / "aquila-tiny"
SHIP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "vocab.json",
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json")

PROMPTS = ["你好", "介绍一下北京。", "写一首关于春天的诗。", "什么是人工智能？", "如何保持健康？",
           "Write a short poem about rivers.", "What is the capital of France?", "Give me three tips for studying.",
           "Who are you?", "Explain what a computer is."]


def main() -> None:
    from aquilachat.evaluation.ppl import evaluate_files
    from aquilachat.llm import LLM
    from aquilachat.sampling import SamplingParams

    report: dict = {"heldout": {}, "samples": []}
    files = [RUN / "data" / f"heldout_{lang}.txt" for lang in ("zh", "en", "code")]
    for stage in ("pretrain", "sft"):
        results, info = evaluate_files(str(RUN / stage / "final"), files, stride=256, device="cpu", progress=False)
        report["heldout"][stage] = {Path(f).stem.removeprefix("heldout_"): r.to_dict() for f, r in results.items()}
        report["vocab_size"] = info["vocab_size"]
        report["parameters"] = info["parameters"]
    llm = LLM(str(RUN / "sft" / "final"), device="cpu")
    ends = 0
    for seed, prompt in enumerate(PROMPTS):
        t = time.perf_counter()
        out = llm.chat([{"role": "user", "content": prompt}],
                       SamplingParams(temperature=0.7, top_p=0.9, max_tokens=128, seed=seed))[0]
        ends += out.finish_reason == "stop"
        report["samples"].append({"prompt": prompt, "answer": out.text, "finish_reason": out.finish_reason,
                                  "tokens": len(out.token_ids), "seconds": round(time.perf_counter() - t, 2)})
    report["ended_by_end_of_turn"] = f"{ends}/{len(PROMPTS)}"
    for stage in ("pretrain", "sft"):
        for name in ("metrics.jsonl", "data_report.json"):
            if (RUN / stage / name).exists():
                report.setdefault(stage, {})[name] = str(RUN / stage / name)
    (RUN / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    if ASSET.exists():
        shutil.rmtree(ASSET)
    ASSET.mkdir(parents=True)
    for name in SHIP:
        if (RUN / "sft" / "final" / name).exists():
            shutil.copy2(RUN / "sft" / "final" / name, ASSET / name)
    DOCS.mkdir(parents=True, exist_ok=True)
    for stage in ("pretrain", "sft"):
        if (RUN / stage / "loss.png").exists():
            shutil.copy2(RUN / stage / "loss.png", DOCS / f"{stage}_loss.png")
        shutil.copy2(RUN / stage / "metrics.jsonl", DOCS / f"{stage}_metrics.jsonl")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1, ensure_ascii=False))
    for s in report["samples"]:
        print(f"[{s['finish_reason']}] {s['prompt']} -> {s['answer']!r}")


if __name__ == "__main__":
    main()
