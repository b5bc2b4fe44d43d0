"""Prefix caching (aquilachat.prefix_cache + the engine): the same outputs with and without it.

Oracle: the same checkpoint in an engine with ``enable_prefix_caching=False`` (every prompt
prefilled from position 0). The arithmetic is fp32, so generated tokens must be equal exactly;
log-probabilities are compared with a tolerance of 1e-5 (the reused keys and values were computed
in another batch shape; on the CPUs this was developed on they are bit-identical too).
"""

from __future__ import annotations

import pytest
import torch

from aquilachat.llm import LLM
from aquilachat.prefix_cache import PrefixCache
from aquilachat.sampling_params import SamplingParams
from tests.helpers import make_tiny_model

SYSTEM = "You are a helpful assistant. Answer briefly and politely, in English or in Chinese. "
QUESTIONS = ["What is 2+2?", "hello there", "你好，世界", "The quick brown fox", "def bubble_sort(a):"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("prefix_model")
    make_tiny_model(out, byte_tokenizer_dir, max_position_embeddings=512)
    return out


def _llms(model_dir, max_num_seqs: int):
    return (LLM(model_dir, device="cpu", max_num_seqs=max_num_seqs),
            LLM(model_dir, device="cpu", max_num_seqs=max_num_seqs, enable_prefix_caching=False))


def _assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g.outputs, w.outputs, strict=True):
            assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
            if b.logprobs is not None:
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_greedy_seeded_and_batched_outputs_equal_without_prefix_caching(model_dir):
    cached, plain = _llms(model_dir, max_num_seqs=3)
    assert plain.engine.prefix_cache is None
    prompts = [SYSTEM + q for q in QUESTIONS]
    for params in (SamplingParams(temperature=0, max_tokens=24, logprobs=2),
                   SamplingParams(temperature=1.0, top_p=0.9, seed=7, n=2, max_tokens=24, logprobs=0)):
        for _ in range(2):  # the second round finds every prompt's prefix cached
            _assert_same(cached.generate(prompts, params), plain.generate(prompts, params))
    cache = cached.engine.prefix_cache
    assert cache.hits > 0.5 * cache.queries, (cache.hits, cache.queries)
    # one prefill batch mixing a full hit, a partial hit and a miss (different start positions)
    batch = [prompts[0], SYSTEM + "a new question that nobody asked before", "no shared prefix at all, 完全不同"]
    params = SamplingParams(temperature=0, max_tokens=16)
    hits = cache.hits
    _assert_same(cached.generate(batch, params), plain.generate(batch, params))
    assert cache.hits > hits


def test_chat_turns_reuse_the_previous_turn(model_dir):
    cached, plain = _llms(model_dir, max_num_seqs=2)
    messages = [{"role": "user", "content": "Tell me about the quick brown fox."}]
    params = SamplingParams(temperature=0, max_tokens=20)
    for _ in range(3):
        got, want = cached.chat(messages, params), plain.chat(messages, params)
        _assert_same(got, want)
        messages += [{"role": "assistant", "content": want[0].text}, {"role": "user", "content": "And then?"}]
    # the last turn's prompt starts with the previous turn's prompt, whose full blocks were cached
    previous = cached.encode_chat(messages[:-4])
    assert got[0].outputs[0].num_cached_tokens >= len(previous) // 16 * 16


def test_prefix_of_a_running_sequence_is_copied(model_dir):
    cached, plain = _llms(model_dir, max_num_seqs=2)
    engine = cached.engine
    long_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    first = engine.add(cached.tokenizer.encode(SYSTEM + "first"), long_params)
    engine.step()  # prefilled, running
    second = engine.add(cached.tokenizer.encode(SYSTEM + "second"), SamplingParams(temperature=0, max_tokens=12))
    engine.step()
    assert second.slot != first.slot and second.num_cached_tokens >= 64  # copied from the running slot
    while engine.has_unfinished():
        engine.step()
    want = plain.generate([SYSTEM + "second"], SamplingParams(temperature=0, max_tokens=12))[0]
    assert second.output_ids == want.token_ids


def test_prefix_evicted_while_the_request_waits(model_dir):
    """Slots 0 and 1: X leaves its prefix P in a free slot; D runs in the other; E (queued first)
    takes the slot holding P, evicting it, while F (with prefix P) waits for a slot: F then
    misses and recomputes P, and every output equals the run without prefix caching."""
    cached, plain = _llms(model_dir, max_num_seqs=2)
    engine = cached.engine
    tok = cached.tokenizer
    greedy = SamplingParams(temperature=0, max_tokens=8)
    x = engine.add(tok.encode(SYSTEM + "x"), greedy)
    while engine.has_unfinished():
        engine.step()
    holder = [s for s in range(2) if engine.prefix_cache.cached_blocks(s)]
    assert len(holder) == 1
    d = engine.add(tok.encode("an unrelated long request"), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.step()
    assert d.slot != holder[0]  # the never-used slot is least recently used: P survives
    e = engine.add(tok.encode("another unrelated one"), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    f = engine.add(tok.encode(SYSTEM + "f"), greedy)
    engine.step()
    assert e.slot == holder[0] and f.slot is None  # E evicted P; F waits
    hits = engine.prefix_cache.hits
    while engine.has_unfinished():
        engine.step()
    assert f.num_cached_tokens == 0 and engine.prefix_cache.hits == hits
    for seq, prompt, params in ((x, SYSTEM + "x", greedy), (d, "an unrelated long request", d.params),
                                (e, "another unrelated one", e.params), (f, SYSTEM + "f", greedy)):
        assert seq.output_ids == plain.generate([prompt], params)[0].token_ids


def test_block_books():
    cache = PrefixCache(num_slots=3, block_size=4)
    ids = list(range(10, 30))  # 5 full blocks
    a = cache.allocate(ids, [0, 1, 2])
    assert (a.slot, a.cached_tokens, a.source) == (0, 0, None)
    cache.record(0, ids, len(ids))
    assert cache.cached_blocks(0) == 5
    # the same prompt: 5 blocks cached, but the last token is always recomputed
    b = cache.allocate(ids, [1, 2, 0])
    assert (b.slot, b.cached_tokens, b.source) == (0, 19, None)
    cache.record(0, ids, len(ids))
    # a longer prompt sharing 2 blocks, while slot 0 is busy: copied into the least recently used slot
    c = cache.allocate(ids[:8] + [99] * 8, [1, 2])
    assert (c.slot, c.cached_tokens, c.source) == (1, 8, 0)
    # equal blocks after a different prefix are different blocks (chained hashes)
    assert cache.block_hashes([1, 2, 3, 4, 5, 6, 7, 8])[1] != cache.block_hashes([0, 0, 0, 0, 5, 6, 7, 8])[1]
    # reuse=False (prompt logprobs): LRU slot, nothing reused, nothing counted
    queries = cache.queries
    d = cache.allocate(ids, [2, 0], reuse=False)
    assert (d.slot, d.cached_tokens) == (2, 0) and cache.queries == queries
    cache.drop(0)
    assert cache.cached_blocks(0) == 0 and cache.allocate(ids, [0]).cached_tokens == 8  # slot 1's copy
