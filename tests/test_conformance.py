"""Slow: third-party clients against a live ``aquilachat serve`` (a subprocess on 127.0.0.1).

* lm-evaluation-harness (``lm_eval --model local-completions``) scores a small multiple-choice
  task that the test writes (a YAML task over a local JSONL; nothing is downloaded) through
  ``/v1/completions`` (``echo``, ``logprobs``), tokenizing with the model's exported tokenizer.
  Oracle: the same log-likelihoods computed offline with ``aquilachat eval ppl``'s machinery
  (:func:`aquilachat.evaluation.ppl.score_ids`), within 1e-4.
* schemathesis generates requests from ``/openapi.json`` for every route (bounded examples) and
  checks that none gets a 5xx.

Both tools are heavy and optional: ``lm_eval`` and ``schemathesis`` are found on PATH, or named by
``AQUILACHAT_LM_EVAL`` / ``AQUILACHAT_SCHEMATHESIS`` (e.g. in a venv made with
``--system-site-packages``); the tests skip without them. Run with ``pytest -m slow tests/test_conformance.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.server_utils import free_port

pytestmark = pytest.mark.slow

#: The bundled model: its directory holds the exported tokenizer (tokenizer.json) lm-eval loads.
MODEL_DIR = REPO / "aquilachat" / "assets" / "aquila-tiny"
#: Largest difference allowed between lm-eval's log-likelihoods (through the server) and ours.
LOGLIK_ATOL = 1e-4
#: A small bilingual multiple-choice task (question, choices, index of the answer).
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("Which animal says meow?", ["a cat", "a dog", "a cow"], 0),
    ("2 + 2 =", ["3", "4", "5"], 1),
    ("中国的首都是", ["北京", "上海", "广州"], 0),
    ("The opposite of hot is", ["cold", "warm", "loud", "green"], 0),
    ("一年有几个月？", ["十二个月", "十个月", "七个月"], 0),
]


def _tool(name: str, env: str) -> str:
    path = os.environ.get(env) or shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (pip install it, or set {env})")
    return path


@contextmanager
def live_server(*args: str):
    """``python -m aquilachat serve`` of this checkout on a free loopback port; yields its URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "aquilachat", "serve", "--model", str(MODEL_DIR), "--host",
                             "127.0.0.1", "--port", str(port), "--served-model-name", "aquila-tiny",
                             "--log-level", "warning", *args], env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("aquilachat serve did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_lm_eval_harness_loglikelihoods_equal_ours(tmp_path):
    lm_eval = _tool("lm_eval", "AQUILACHAT_LM_EVAL")
    import torch
    from transformers import AutoTokenizer

    from aquilachat.checkpoint import load_model
    from aquilachat.evaluation.ppl import score_ids

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
                            for q, c, a in QUESTIONS), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "aquila_mc_local.yaml").write_text(
        "task: aquila_mc_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "TOKENIZERS_PARALLELISM": "false"}
    with live_server("--max-num-seqs", "4") as url:
        model_args = (f"model=aquila-tiny,base_url={url}/v1/completions,tokenizer={MODEL_DIR},"
                      "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=2,max_retries=1")
        # (the form without the "run" subcommand works with lm-eval 0.4.x before and after it came)
        run = subprocess.run([lm_eval, "--model", "local-completions", "--model_args", model_args,
                              "--tasks", "aquila_mc_local", "--include_path", str(tmp_path / "tasks"),
                              "--output_path", str(out), "--log_samples", "--batch_size", "1"],
                             env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (samples_file,) = out.rglob("samples_aquila_mc_local*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()]
    assert len(samples) == len(QUESTIONS)

    # ours, offline: lm-eval's tokenization (TemplateLM._encode_pair, no BOS), our model, ppl's scorer
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = load_model(MODEL_DIR, dtype="float32", device="cpu")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    def nll(ids: list[int]) -> float:
        return score_ids(model, ids, context=max(len(ids), 2), stride=max(len(ids) - 1, 1))[0]

    diffs = []
    with torch.inference_mode():
        for sample in samples:
            for k in range(len(sample["doc"]["choices"])):
                args = sample["arguments"][f"gen_args_{k}"]  # the (context, continuation) lm-eval scored
                context, continuation = args["arg_0"], args["arg_1"]
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                whole, ctx = encode(context + continuation), encode(context)
                ours = -(nll(whole) - nll(ctx))
                theirs = float(sample["resps"][k][0][0])
                diffs.append(abs(float(theirs) - ours))
    print(f"\nlm-eval vs offline log-likelihoods: {len(diffs)} choices, max |diff| {max(diffs):.2e}, "
          f"mean {sum(diffs) / len(diffs):.2e}")
    assert max(diffs) <= LOGLIK_ATOL, diffs


@pytest.mark.timeout(3600)
def test_schemathesis_finds_no_server_error(tmp_path):
    """Every operation of /openapi.json, schemathesis's coverage and fuzzing phases (about 1,100
    requests with the default 20 examples); a 64-token context keeps each generation short (a
    request may still hold 64 prompts x 16 answers on a shared CPU: hence the long request timeout)."""
    st = _tool("schemathesis", "AQUILACHAT_SCHEMATHESIS")
    with live_server("--max-num-seqs", "4", "--max-model-len", "64") as url:
        run = subprocess.run([st, "run", url + "/openapi.json", "--checks", "not_a_server_error",
                              "--max-examples", os.environ.get("AQUILACHAT_SCHEMATHESIS_EXAMPLES", "20"),
                              "--request-timeout", "600", "--workers", "1", "--seed", "1",
                              "--suppress-health-check", "all"],
                             capture_output=True, text=True, timeout=3300, cwd=tmp_path)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
