"""The aquila-tiny recipe's decision stage (recipes/aquila-tiny/decision.py).

Its hinge terms rest on one claim: a request's teacher-forced margins along the drawing answer's
opening are all positive exactly when greedy decoding writes that opening. The oracle is the
engine's own greedy tokens (``LLM.chat`` at temperature 0). Its requests must also stay clear of
the held-out evaluation (``instructions.py``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from aquilachat.checkpoint import BUNDLED_MODELS, load_model, load_tokenizer
from aquilachat.llm import LLM
from aquilachat.sampling_params import SamplingParams
from tests.helpers import load_script, make_tiny_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "aquila-tiny" / "decision.py"
REQUESTS = ["画一只猫", "Draw a cat.", "What is the capital of France?", "介绍一下北京。", "Could you write a poem?",
            "请把下面的句子翻译成英文：今天天气很好。"]


@pytest.fixture(scope="module")
def decision():
    return load_script(SCRIPT, "aquila_tiny_decision")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random tiny model with the bundled model's tokenizer (the template's real special tokens)."""
    out = tmp_path_factory.mktemp("decision_tiny")
    make_tiny_model(out, BUNDLED_MODELS["aquila-tiny"], seed=3)
    return out


def test_margins_are_positive_exactly_where_greedy_decoding_follows(decision, tiny):
    llm = LLM(str(tiny), device="cpu")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    greedy = [list(o.token_ids) for o in llm.chat([[{"role": "user", "content": r}] for r in REQUESTS], params)]
    assert all(len(g) == 8 for g in greedy)
    model, tok = load_model(tiny, dtype="float32", device="cpu").eval(), load_tokenizer(tiny)
    opening = greedy[0]  # the first request's own greedy answer plays the drawing opening
    with torch.no_grad():
        batch = decision.margins(model, tok, REQUESTS, opening, pad_id=0)
        alone = torch.cat([decision.margins(model, tok, [r], opening, pad_id=0) for r in REQUESTS])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=0)  # padding does not leak into the rows
    assert batch.shape == (len(REQUESTS), len(opening))
    diverged = 0
    for row, tokens in zip(batch, greedy):
        split = next((j for j, (a, b) in enumerate(zip(tokens, opening)) if a != b), None)
        if split is None:
            assert (row > 0).all()
        else:  # greedy follows the opening up to ``split``, then prefers another token
            diverged += 1
            assert (row[:split] > 0).all() and row[split] < 0
    assert diverged >= 3  # the random model answers the requests differently
    # one continuation per request (the marker hinge): the margins of each row's last positions
    leads = [g[:3] for g in greedy]  # rows of different lengths before the same last three ids
    with torch.no_grad():
        tails = decision.margins(model, tok, REQUESTS, [lead + opening[-3:] for lead in leads], pad_id=0, last=3)
        for i, (r, lead) in enumerate(zip(REQUESTS, leads)):
            whole = decision.margins(model, tok, [r], lead + opening[-3:], pad_id=0)
            torch.testing.assert_close(tails[i], whole[0, -3:], atol=1e-4, rtol=0)
        full = decision.margins(model, tok, REQUESTS, [list(opening)] * len(REQUESTS), pad_id=0, last=3)
    torch.testing.assert_close(full, batch[:, -3:], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="last"):
        decision.margins(model, tok, REQUESTS[:2], [opening, opening[:-1]], pad_id=0)


def test_requests_stay_clear_of_the_evaluation(decision):
    ins = decision.ins
    rng = random.Random(0)
    drawing = [decision.positive(rng, p_augment=0.5, more=True) for _ in range(2000)]
    assert not ins.heldout_overlap(drawing)
    # the added phrasings hold no frame of a held-out one (written here from DRAW_*_HELDOUT)
    frames = ("illustrate", "show me", "i'd like", "could you paint", "drawing of", "麻烦", "能不能", "插图", "来一张")
    assert not [t for t in decision.MORE_DRAW_EN + decision.MORE_DRAW_ZH if any(f in t.lower() for f in frames)]
    assert not [t for t in decision.MORE_DRAW_ZH if t.startswith("生成{s}")]
    assert any(d.startswith("Give me a picture of") for d in drawing)  # --more-phrasings is used

    class Args:
        pairs, polite, seed = 300, 50, 0

    ordinary = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "ok"}]}
                for q in ("Describe an elephant.", "Tell me a joke.", "介绍一下北京。")]
    pool = decision.negative_pool(Args, ordinary)
    assert "Describe an elephant." not in pool  # a held-out subject's word: refused
    assert "Tell me a joke." in pool and "介绍一下北京。" in pool
    assert not ins.heldout_overlap(pool)


def test_end_hinge_positions_are_the_end_of_turn(decision):
    """``--end-hinge`` scores the last ``k`` ids of the drawing answer: they must be the template's end
    of turn ``###`` after the prompt line, which the next-token loss supervises too."""
    from aquilachat.chat_format import render_for_training

    tok = load_tokenizer(BUNDLED_MODELS["aquila-tiny"])
    rng = random.Random(1)
    for _ in range(20):
        request, answer = decision.positive_example(rng)
        cont, k = decision.answer_ids(tok, request, answer)
        assert k > 0 and tok.decode(cont[-k:]) == "###"
        assert tok.decode(cont[:-k]).strip() == answer  # the ids before the end are the whole answer
        msgs = [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
        ids, labels = render_for_training(tok, msgs, decision.TEMPLATE)
        assert ids[-len(cont):] == cont and all(lab != -100 for lab in labels[-k:])
    # positive() is positive_example()'s request from the same draws (earlier runs draw as before)
    assert decision.positive(random.Random(5), 0.5, True) == decision.positive_example(random.Random(5), 0.5, True)[0]


def test_text_rows_come_from_the_text(decision):
    tok = load_tokenizer(BUNDLED_MODELS["aquila-tiny"])
    texts = ["春眠不觉晓，处处闻啼鸟。" * 400, "It was the best of times, it was the worst of times. " * 200]
    rng = random.Random(0)
    for _ in range(10):
        row = decision.text_row(rng, tok, texts, 64)
        assert len(row) == 65
        assert tok.decode(row[1:-1]) in texts[0] or tok.decode(row[1:-1]) in texts[1]


def test_margins_of_conversations_follow_greedy_decoding(decision, tiny):
    """``--context``: a request given as a whole conversation (a system message, or an earlier
    exchange) is scored as ``LLM.chat`` answers that conversation."""
    llm = LLM(str(tiny), device="cpu")
    ordinary = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                for q, a in (("你好", "你好！有什么可以帮你的吗？"), ("What is 2 + 2?", "4."))]
    rng = random.Random(4)
    convs = [decision.with_context(rng, r, ordinary) for r in REQUESTS]
    assert {len(c) for c in convs} == {2, 3}  # both kinds are drawn
    assert all(c[-1] == {"role": "user", "content": r} for c, r in zip(convs, REQUESTS))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    greedy = [list(o.token_ids) for o in llm.chat(convs, params)]
    model, tok = load_model(tiny, dtype="float32", device="cpu").eval(), load_tokenizer(tiny)
    opening = greedy[0]
    with torch.no_grad():
        rows = decision.margins(model, tok, convs, opening, pad_id=0)
        plain = decision.margins(model, tok, REQUESTS, opening, pad_id=0)
        as_messages = decision.margins(model, tok, [[{"role": "user", "content": r}] for r in REQUESTS], opening,
                                       pad_id=0)
    torch.testing.assert_close(as_messages, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(rows, plain, atol=1e-3)  # the context changes the scores
    for row, tokens in zip(rows, greedy):
        split = next((j for j, (a, b) in enumerate(zip(tokens, opening)) if a != b), None)
        if split is None:
            assert (row > 0).all()
        else:
            assert (row[:split] > 0).all() and row[split] < 0


def test_art_questions_and_scenes_stay_clear_of_pool_4(decision, shared_data, tmp_path):
    """``--art`` and ``--scenes`` draw only training parts: no held-out subject word, and nothing of
    pools.py's pool 4 (its art questions are checked part by part in pools.py; here whole texts)."""
    import json
    import os
    import subprocess
    import sys

    ins = decision.ins
    rng = random.Random(0)
    art = {decision.art_question(rng) for _ in range(3000)}
    drawing = {decision.positive(rng, 0.5, True, scenes=0.5) for _ in range(3000)}
    assert not ins.heldout_overlap(sorted(art | drawing))
    assert any("在" in d and any(a in d for a in decision.SCENE_ACT_ZH) for d in drawing)  # scenes are used
    assert any(q in art for q in decision.ART_IDIOMS) and len(art) > 200
    out = tmp_path / "pool4.json"
    subprocess.run([sys.executable, str(SCRIPT.parent / "pools.py"), "--pool", "4", str(out)], check=True,
                   env={**os.environ, "AQUILACHAT_SHARED_DATA": str(shared_data)}, capture_output=True)
    pool = json.loads(out.read_text(encoding="utf-8"))
    assert len(pool["drawing"]) == 50 and len(pool["ordinary"]) == 50
    assert not set(pool["ordinary"]) & art and not set(pool["drawing"]) & drawing
    scenes = [d for d in pool["drawing"] if any(w in d for w in ("太极", "跳绳", "毛衣", "浣熊", "邮递员", "tai chi",
                                                                   "jumping rope", "knitting", "raccoon", "mail carrier"))]
    assert 15 <= len(scenes) <= 35  # about half the pool's drawing requests are scenes
    # positive() is still positive_example()'s request from the same draws with scenes on
    assert decision.positive(random.Random(6), 0.5, True, 0.5) == decision.positive_example(random.Random(6), 0.5, True,
                                                                                            0.5)[0]
