"""The bundled aquila-tiny model: it ships, loads by default, matches transformers, and answers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from aquilachat.checkpoint import BUNDLED_MODELS
from aquilachat.llm import LLM
from aquilachat.sampling import SamplingParams

ASSET = BUNDLED_MODELS["aquila-tiny"]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def test_ships_small_and_complete():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "special_tokens_map.json"):
        assert (ASSET / name).exists(), name
    assert (ASSET / "model.safetensors").stat().st_size <= 60 * 2**20


def test_default_llm_is_the_bundled_model(llm):
    assert llm.model_name == "aquila-tiny"
    assert llm.tokenizer.vocab_size == llm.config.vocab_size
    assert llm.template.name == "aquila-chat"


def test_logits_equal_transformers(llm):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(ASSET).eval()
    ids = torch.tensor([llm.encode_chat([{"role": "user", "content": "你好"}])])
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), ref(ids).logits.float(), atol=1e-4, rtol=1e-4)


PROMPTS = ["你好", "介绍一下北京。", "写一首关于春天的诗。", "什么是人工智能？", "如何保持健康？",
           "Write a short poem about rivers.", "What is the capital of France?", "Give me three tips for studying.",
           "Who are you?", "Explain what a computer is."]


def test_most_sampled_answers_end_by_themselves(llm):
    """The fine-tuning supervised the end-of-turn marker: most sampled answers end with it
    (finish_reason "stop"), not at the length limit, and the marker never shows in the text."""
    outs = [llm.chat([{"role": "user", "content": p}],
                     SamplingParams(temperature=0.7, top_p=0.9, max_tokens=128, seed=i))[0]
            for i, p in enumerate(PROMPTS)]
    assert all(o.finish_reason in ("stop", "length") and o.text.strip() for o in outs)
    assert sum(o.finish_reason == "stop" for o in outs) >= 6
    assert not any("###" in o.text for o in outs)


def test_cli_chat_without_model_flag():
    # seeded: the tiny model ends its turn at once (an empty answer) in about 1 of 30 samples
    proc = subprocess.run([sys.executable, "-m", "aquilachat", "chat", "你好", "--max-tokens", "64", "--seed", "0"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_routes_drawing_requests_and_not_questions():
    """Issue 18: the bundled model answers a drawing request with a ``#text2image#`` block and an
    ordinary question without one. Greedy decoding is redone here from the plain model's float32
    logits (no engine, no cache) with each step's margin (best minus second-best log-probability),
    so that the check does not depend on CPU kernels: the answer must parse as a block and every
    token of it must win by at least 0.2 nats (measured 0.39-9.9). For questions, the drawing
    opening must lose by more than 1 nat (teacher-forced, recipes/aquila-tiny/decision.py's margins;
    measured below -3)."""
    from aquilachat.chat_format import render
    from aquilachat.checkpoint import load_model, load_tokenizer
    from aquilachat.instructions import parse_instruction
    from tests.helpers import load_script

    root = ASSET.parents[2] / "recipes" / "aquila-tiny"
    decision = load_script(root / "decision.py", "aquila_tiny_decision_bundled")
    model, tok = load_model(ASSET, dtype="float32", device="cpu").eval(), load_tokenizer(ASSET)
    for request in ("画一只猫", "Draw a cat."):
        ids = render(tok, [{"role": "user", "content": request}], decision.TEMPLATE)
        answer, margins = [], []
        with torch.no_grad():
            while len(answer) < 80 and not tok.decode(answer).endswith("###"):
                top = model(torch.tensor([ids + answer]))[0, -1].float().log_softmax(-1).topk(2)
                answer.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
        text = tok.decode(answer)
        assert text.endswith("###"), text
        block = parse_instruction(text[: -len("###")])
        assert block is not None and block.kind == "text2image" and len(block.steps) == 1, text
        assert min(margins) > 0.2, (request, text, margins)
    questions = ["What is the capital of France?", "介绍一下北京。", "写一首关于春天的诗。", "为什么天空是蓝色的？"]
    with torch.no_grad():
        m = decision.margins(model, tok, questions, decision.opening_ids(tok), pad_id=0)
    assert (m.amin(-1) < -1).all(), m.amin(-1)
