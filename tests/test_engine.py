"""The engine and LLM against oracles: recomputation without cache, single vs batched, transformers generate."""

from __future__ import annotations

import math

import pytest
import torch

from aquilachat.engine import Engine
from aquilachat.errors import ValidationError
from aquilachat.llm import LLM
from aquilachat.sampling import SamplingParams
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("tiny")
    make_tiny_model(out, byte_tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), device="cpu", max_num_seqs=4)


def greedy_no_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_greedy_with_cache_equals_recomputation(llm):
    prompt = llm.tokenizer.encode("The quick brown fox")
    out = llm.generate(None, GREEDY, prompt_token_ids=[prompt])[0]
    assert out.token_ids == greedy_no_cache(llm.model, prompt, 24)
    assert out.finish_reason == "length"


def test_batch_of_four_equals_singles(llm):
    prompts = ["hi", "人工智能是计算机科学的一个分支", "def bubble_sort(a):\n    for", "The quick brown fox jumps over"]
    singles = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]
    batched = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert batched == singles
    # more prompts than slots: queued ones join as slots free up
    many = [o.token_ids for o in llm.generate(prompts * 2, GREEDY)]
    assert many == singles * 2


def test_sequences_join_and_leave_mid_batch(llm):
    """A sequence added while others are decoding gets the same tokens as alone."""
    eng = llm.engine
    tok = llm.tokenizer
    a_ids, b_ids = tok.encode("hello world"), tok.encode("你好，世界")
    alone_b = llm.generate(None, GREEDY, prompt_token_ids=[b_ids])[0].token_ids
    alone_a = llm.generate(None, GREEDY.replace(max_tokens=5), prompt_token_ids=[a_ids])[0].token_ids
    a = eng.add(a_ids, GREEDY.replace(max_tokens=5))
    for _ in range(3):
        eng.step()
    b = eng.add(b_ids, GREEDY)
    while eng.has_unfinished():
        eng.step()
    assert a.output_ids == alone_a and b.output_ids == alone_b
    assert a.finish_reason == "length" and sorted(eng.free_slots) == list(range(eng.max_num_seqs))


def test_seed_reproducible_alone_and_in_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate("hello", p)[0].token_ids
    batch = llm.generate(["xyz", "hello", "你好"], [p][0])
    assert batch[1].token_ids == alone
    n2 = llm.generate("hello", p.replace(n=2))[0]
    assert n2.outputs[0].token_ids == alone and n2.outputs[1].token_ids != alone


def test_context_window_is_checked_before_work(llm):
    long_prompt = [5] * 250
    with pytest.raises(ValidationError, match="context window of 256"):
        llm.generate(None, SamplingParams(max_tokens=10), prompt_token_ids=[long_prompt])
    assert not llm.engine.has_unfinished()
    capped = llm._run([(None, long_prompt)], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                      cap_to_context=True)[0]
    assert len(capped.token_ids) == 6 and capped.finish_reason == "length"
    with pytest.raises(ValidationError, match="empty"):
        llm.generate(None, GREEDY, prompt_token_ids=[[]])
    with pytest.raises(ValidationError, match="outside the model vocabulary"):
        llm.generate(None, GREEDY, prompt_token_ids=[[10**6]])


def test_each_prompt_is_validated_once(llm, monkeypatch):
    real, calls = llm.engine.check_request, []
    monkeypatch.setattr(llm.engine, "check_request", lambda ids, *a, **k: calls.append(ids) or real(ids, *a, **k))
    llm.generate(["ab", "cd"], GREEDY.replace(max_tokens=2, n=2))
    assert calls == [llm.tokenizer.encode("ab"), llm.tokenizer.encode("cd")]  # not once more per answer
    calls.clear()
    assert list(llm.stream_chat([{"role": "user", "content": "hi"}], GREEDY.replace(max_tokens=2)))
    assert len(calls) == 1


def test_a_stream_left_early_leaves_the_engine_empty(llm):
    stream = llm.stream_chat([{"role": "user", "content": "hi"}], GREEDY.replace(max_tokens=20))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished() and len(llm.engine.free_slots) == llm.engine.max_num_seqs
    want = llm.generate("x", GREEDY.replace(max_tokens=3))[0]
    assert len(want.token_ids) == 3


def test_stop_strings_split_across_tokens_never_leak(llm):
    tok = llm.tokenizer
    prompt = "The quick brown fox"
    free = llm.generate(prompt, GREEDY.replace(max_tokens=40))[0]
    text = free.text
    assert len(text) > 8
    # choose a stop string that spans a token boundary in the free-running text
    cut, pieces, pos = None, [tok.decode([t]) for t in free.token_ids], 0
    for p in pieces[:-1]:
        pos += len(p)
        if 3 <= pos < len(text) - 2 and "\ufffd" not in text[pos - 2:pos + 2]:
            cut = pos
            break
    assert cut is not None
    stop = text[cut - 2:cut + 2]
    first = text.find(stop)
    deltas = []
    out = llm._run([(prompt, tok.encode(prompt))], GREEDY.replace(max_tokens=40, stop=[stop]),
                   on_delta=lambda p, i, d: deltas.append(d))[0]
    assert out.text == text[:first] and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert "".join(deltas) == out.text and stop not in "".join(deltas)


def test_transformers_generate_equals_ours_chinese_and_english(tmp_path, aquila_tokenizer_dir):
    """64 greedy tokens on a random model with the real Aquila vocabulary, vs transformers."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "aq"
    make_tiny_model(out, aquila_tokenizer_dir, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=128)
    ours = LLM(str(out), device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    for prompt in ("用golang实现冒泡排序算法", "Write a short poem about rivers."):
        ids = ours.tokenizer.encode(prompt)
        got = ours.generate(prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0].token_ids
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64, min_new_tokens=64,
                                pad_token_id=0)[0, len(ids):].tolist()
        assert got == want


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("nan")
    model = make_tiny_model(out, byte_tokenizer_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.inf  # overflow -> inf - inf = NaN
    from aquilachat.checkpoint import save_hf
    save_hf(model, out, tokenizer_dir=byte_tokenizer_dir)
    return out


def test_non_finite_model_gives_error_finish_not_exception(nan_dir, tiny_dir):
    llm = LLM(str(nan_dir), device="cpu")
    outs = llm.chat([{"role": "user", "content": "你好"}], SamplingParams(max_tokens=8))
    assert outs[0].finish_reason == "error" and "NaN" in outs[0].error
    assert llm.engine.stats.sampling_errors == 1
    # the engine is fine afterwards, and the error only ends the failing row
    assert llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3))[0].finish_reason == "error"
    assert not llm.engine.has_unfinished() and len(llm.engine.free_slots) == llm.engine.max_num_seqs


def test_error_row_does_not_stop_others(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    eng = llm.engine
    eng.release_backend()  # the poisoned model below runs its forward passes itself
    real_model = eng.model

    class Poison(torch.nn.Module):  # row 0's logits become NaN from the 3rd call on
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.config = real_model.config

        def forward_hidden(self, *a, **k):
            return real_model.forward_hidden(*a, **k)

        def compute_logits(self, hidden):
            out = real_model.compute_logits(hidden)
            self.calls += 1
            if self.calls >= 3 and out.shape[0] == 2:
                out[0] = math.nan
            return out

    eng.model = Poison()
    a = eng.add([5, 6, 7], GREEDY.replace(max_tokens=10))
    b = eng.add([8, 9], GREEDY.replace(max_tokens=10))
    while eng.has_unfinished():
        eng.step()
    assert a.finish_reason == "error" and b.finish_reason == "length" and len(b.output_ids) == 10


def test_streamed_chinese_deltas(llm):
    msgs = [{"role": "user", "content": "用golang实现冒泡排序算法"}]
    p = SamplingParams(temperature=0.9, max_tokens=60, seed=3)
    deltas = list(llm.stream_chat(msgs, p))
    whole = llm.chat(msgs, p)[0].text
    assert "".join(deltas) == whole == llm.last_output.text
    for d in deltas:
        assert d.count("\ufffd") <= whole.count("\ufffd")
    assert "###" not in whole


def test_engine_finish_frees_slot_within_a_step(llm):
    eng = llm.engine
    seq = eng.add([5, 6], GREEDY.replace(max_tokens=50))
    eng.step()
    eng.step()
    assert eng.num_running == 1
    eng.finish(seq, "abort")
    eng.step()
    assert eng.num_running == 0 and seq.finish_reason == "abort"


def test_per_prompt_params_equal_each_prompt_alone(llm):
    """``generate(prompts, [params per prompt])`` (vLLM's form): every prompt gets exactly what it
    gets alone with its own params, though all of them share the engine's batches."""
    prompts = ["hi", "人工智能是计算机科学的一个分支", "def bubble_sort(a):\n    for", "The quick brown fox"]
    params = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, max_tokens=12, seed=5, n=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=1.2, top_k=20, max_tokens=9, seed=11, ignore_eos=True, logprobs=2)]
    deltas: dict[tuple[int, int], str] = {}
    together = llm._run([(p, llm.tokenizer.encode(p)) for p in prompts], params,
                        on_delta=lambda p, i, d: deltas.__setitem__((p, i), deltas.get((p, i), "") + d))
    assert [len(o.outputs) for o in together] == [1, 2, 1, 1]
    for prompt, p, out in zip(prompts, params, together):
        alone = llm.generate([prompt], p)[0]
        assert out.prompt == prompt
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in alone.outputs]
        assert [len(c.token_ids) for c in out.outputs] == [p.max_tokens] * p.n
    assert {k: v for k, v in deltas.items()} == {(i, j): c.text for i, o in enumerate(together)
                                                 for j, c in enumerate(o.outputs)}
    chats = llm.chat([[{"role": "user", "content": p}] for p in prompts[:2]], params[:2])
    assert [c.token_ids for c in chats[1].outputs] == [
        c.token_ids for c in llm.chat([{"role": "user", "content": prompts[1]}], params[1])[0].outputs]


@pytest.mark.parametrize("params, message", [
    ([SamplingParams()], "1 SamplingParams for 2 prompts"),
    ([SamplingParams(), {"temperature": 0}], r"params\[1\] must be a SamplingParams, not dict"),
    ({"temperature": 0}, "params must be a SamplingParams or a list of them, not dict"),
])
def test_bad_per_prompt_params_are_refused_before_anything_runs(llm, params, message):
    with pytest.raises(ValidationError, match=message) as info:
        llm.generate(["hi", "there"], params)
    assert info.value.field == "params"
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValidationError, match="max_tokens"):  # a bad one among good ones: none runs
        llm.generate(["hi", "there"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=10**6)])
    assert not llm.engine.has_unfinished()
