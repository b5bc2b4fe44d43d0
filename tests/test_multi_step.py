"""Whole greedy decode steps in one call of the CPU kernels (``CpuDecodeBackend.decode_greedy``):
one step a call by default, up to k with multi-step decoding (``Engine(num_scheduler_steps=k)``,
vLLM's name).

The oracle is the engine's own single steps run op by op (``backend.fuse_steps = False``: the
model's embedding, the layers one call each, the final norm, the vocabulary product and the
sampler), which test_backend and test_engine check against the plain model and transformers;
``_oracle`` switches an engine or ``LLM`` to it. Both paths run the same kernels at
the same instruction level on the same values, so they must agree bit for bit: the same tokens,
the same finish, and the same keys and values in every cache position (the cache is compared
whole, so a step that fed a different token or computed a layer differently shows there, not
only through the greedy picks).
"""

from __future__ import annotations

import pytest
import torch

from aquilachat.backends import CpuDecodeBackend, cpu_kernels
from aquilachat.engine import Engine
from aquilachat.errors import ValidationError
from aquilachat.llm import LLM
from aquilachat.model import AquilaForCausalLM
from aquilachat.sampling import SamplingParams
from tests.helpers import make_tiny_model, tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
PROMPTS = [[5, 17, 33, 2, 250, 9, 1], [44, 3], [7, 7, 7, 8, 9]]


def _kernels_or_skip():
    if cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")


def _model(dtype=torch.float32, seed=0, **overrides):
    cfg = tiny_config(300, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, **overrides)
    model = AquilaForCausalLM(cfg)
    model.init_weights(seed)
    return model.to(dtype).eval()


@pytest.fixture
def bursts(monkeypatch):
    """Counts the multi-step calls that decoded at least one token, and the tokens."""
    calls = []
    real = CpuDecodeBackend.decode_greedy

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        if out:
            calls.append(len(out[0]))
        return out
    monkeypatch.setattr(CpuDecodeBackend, "decode_greedy", spy)
    return calls


def _oracle(engine_or_llm):
    """Switch an engine (or an ``LLM``'s) to single steps op by op (the oracle); returns it."""
    engine = getattr(engine_or_llm, "engine", engine_or_llm)
    if engine.backend is not None:
        engine.backend.fuse_steps = False
    return engine_or_llm


def _run(model, k, params, prompts=PROMPTS, *, eos=(), allowed=None, max_num_seqs=4, fused=None):
    """Every prompt through an engine with ``num_scheduler_steps=k`` (all admitted in the first
    step), whole steps in one call unless ``fused`` is False (default: fused for k > 1, the oracle
    for k = 1); (sequences, each sequence's cache entries ``[(k, v) per layer]``, decode steps)."""
    eng = Engine(model, max_num_seqs=max_num_seqs, max_model_len=64, eos_token_ids=list(eos), allowed=allowed,
                 num_scheduler_steps=k)
    if not (k > 1 if fused is None else fused):
        _oracle(eng)
    seqs = [eng.add(p, params[i] if isinstance(params, list) else params) for i, p in enumerate(prompts)]
    eng.step()
    slots = [s.slot for s in seqs]
    while eng.has_unfinished():
        eng.step()
    # the positions a sequence fed (all but its last token); a burst may write past a row that
    # ended mid-burst, as a step past it would, into positions no one sees before they are refilled
    entries = [[(k[slot, :, :s.num_tokens - 1], v[slot, :, :s.num_tokens - 1]) for k, v in zip(eng.cache.k, eng.cache.v)]
               for s, slot in zip(seqs, slots)]
    return seqs, entries, eng.stats.steps


def _assert_same_run(a, b):
    (sa, ea, _), (sb, eb, _) = a, b
    assert [s.output_ids for s in sb] == [s.output_ids for s in sa]
    assert [(s.finish_reason, s.stop_reason) for s in sb] == [(s.finish_reason, s.stop_reason) for s in sa]
    for layers_a, layers_b in zip(ea, eb):
        for (ka, va), (kb, vb) in zip(layers_a, layers_b):
            assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multi_step_equals_single_steps_at_every_level(dtype, bursts, monkeypatch):
    """Three rows of different prompt lengths and max_tokens; every instruction level this CPU
    runs (the level is forced lower as the kernel tests force it)."""
    _kernels_or_skip()
    model = _model(dtype)
    params = [GREEDY.replace(max_tokens=n) for n in (30, 17, 24)]
    for lvl in range(cpu_kernels.load().cpu_level() + 1):
        monkeypatch.setitem(cpu_kernels._state, "level", lvl)
        single = _run(model, 1, params)
        bursts.clear()
        multi = _run(model, 8, params)
        _assert_same_run(single, multi)
        assert bursts and max(bursts) == 8 and sum(bursts) + 1 + 2 >= 17  # most tokens came in bursts
        assert multi[2] == single[2]  # stats.steps counts decode steps either way
        bursts.clear()
        one_call = _run(model, 1, params, fused=True)  # the default engine: a whole step per call
        _assert_same_run(single, one_call)
        assert bursts == [1] * (30 - 1)  # every decode step but the prefill's pick


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multi_step_stops_each_row_at_its_first_end(dtype, bursts):
    """EOS and stop ids that the greedy answers produce mid-burst: each row is cut at its first
    end exactly where single steps end it; the other rows go on."""
    _kernels_or_skip()
    model = _model(dtype)
    free = _run(model, 1, GREEDY)[0]
    # an id each answer produces somewhere after its first token
    eos = free[0].output_ids[5]
    stop = free[1].output_ids[9]
    params = [GREEDY.replace(ignore_eos=False), GREEDY.replace(ignore_eos=False, stop_token_ids=[stop]),
              GREEDY]  # the third ignores EOS
    single = _run(model, 1, params, eos=[eos])
    assert single[0][0].finish_reason == "stop" and single[0][0].stop_reason == eos
    assert single[0][0].output_ids.index(eos) == len(single[0][0].output_ids) - 1 <= 5
    assert len(single[0][2].output_ids) == 30  # ignore_eos
    bursts.clear()
    multi = _run(model, 8, params, eos=[eos])
    _assert_same_run(single, multi)
    assert bursts


def test_multi_step_respects_the_allowed_ids(bursts):
    """With ids the tokenizer cannot decode masked out (``allowed``), the picks are the first
    largest logit among the allowed ids, as the sampler picks them."""
    _kernels_or_skip()
    model = _model()
    free = _run(model, 1, GREEDY)[0]
    allowed = torch.ones(model.config.vocab_size, dtype=torch.bool)
    banned = sorted({t for s in free for t in s.output_ids[:6]})
    allowed[banned] = False
    single = _run(model, 1, GREEDY, allowed=allowed)
    assert not set(banned) & {t for s in single[0] for t in s.output_ids}
    assert [s.output_ids for s in single[0]] != [s.output_ids for s in free]
    bursts.clear()
    multi = _run(model, 8, GREEDY, allowed=allowed)
    _assert_same_run(single, multi)
    assert bursts


@pytest.mark.parametrize("params", [
    GREEDY.replace(temperature=0.8, seed=3), GREEDY.replace(logprobs=2), GREEDY.replace(repetition_penalty=1.3),
    GREEDY.replace(logit_bias={7: 5.0}), GREEDY.replace(min_tokens=40, max_tokens=45)],
    ids=["sampled", "logprobs", "penalty", "logit-bias", "min-tokens"])
def test_rows_that_are_not_plain_greedy_take_single_steps(params, bursts):
    """A batch with a row that samples, wants log-probabilities, penalties, a bias or has not
    reached min_tokens runs single steps (the sampler computes those), with the same results."""
    _kernels_or_skip()
    model = _model()
    mixed = [GREEDY, params]
    single = _run(model, 1, mixed, PROMPTS[:2])
    bursts.clear()
    multi = _run(model, 8, mixed, PROMPTS[:2])
    assert [s.output_ids for s in multi[0]] == [s.output_ids for s in single[0]]
    if params.min_tokens:  # bursts start once every row has reached min_tokens
        assert bursts
    else:
        assert not bursts


def test_non_finite_logits_go_to_the_sampler():
    """A model whose logits turn NaN: the burst stops before that step and the single step's
    sampler finishes the row with an error, as without multi-step decoding."""
    _kernels_or_skip()
    model = _model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    single = _run(model, 1, GREEDY, PROMPTS[:1])
    multi = _run(model, 8, GREEDY, PROMPTS[:1])
    assert single[0][0].finish_reason == "error"
    assert (multi[0][0].finish_reason, multi[0][0].error, multi[0][0].output_ids) == (
        single[0][0].finish_reason, single[0][0].error, single[0][0].output_ids)


def test_decode_greedy_stops_before_a_pick_that_is_not_plain():
    """The kernel call on its own: with every id disallowed no pick is plain, so it decodes 0
    tokens (and the caller runs a single step); positions past the cache are refused clearly."""
    _kernels_or_skip()
    model = _model()
    eng = Engine(model, max_num_seqs=1, max_model_len=32)
    eng.add([5, 6, 7], GREEDY.replace(max_tokens=20))
    eng.step()
    backend, seq = eng.backend, eng.running[0]
    args = ([seq.output_ids[-1]], [seq.num_tokens - 1], eng.cache, [seq.slot])
    none = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    with torch.inference_mode():
        assert backend.decode_greedy(*args, 4, allowed=none) == [[]]
        assert len(backend.decode_greedy(*args, 4)[0]) == 4
        with pytest.raises(RuntimeError, match="outside the cache"):
            backend.decode_greedy(*args, 40)
    assert backend.decode_greedy(*args, 4) is None  # autograd on: the plain model's business


def test_backend_returns_none_for_what_it_does_not_fuse():
    """Hooks, float16 weights and training mode: decode_greedy declines (None) and the engine's
    single steps run, with the same tokens as an engine without multi-step decoding."""
    _kernels_or_skip()
    for change in ("hook", "fp16", "train"):
        model = _model()
        if change == "hook":
            model.model.layers[2].mlp.register_forward_hook(lambda m, i, o: o)
        elif change == "fp16":
            model.half()
        eng = Engine(model, max_num_seqs=1, max_model_len=32, num_scheduler_steps=8)
        eng.add([5, 6, 7], GREEDY.replace(max_tokens=10))
        eng.step()
        if change == "train":
            model.train()
        seq = eng.running[0]
        with torch.inference_mode():
            got = eng.backend.decode_greedy([seq.output_ids[-1]], [seq.num_tokens - 1], eng.cache, [seq.slot], 4)
        assert got is None, change


def test_num_scheduler_steps_is_checked():
    with pytest.raises(ValidationError, match="num_scheduler_steps"):
        Engine(_model(), num_scheduler_steps=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("tiny-ms")
    make_tiny_model(out, byte_tokenizer_dir)
    return out


def test_llm_stop_strings_and_text_equal_single_steps(tiny_dir):
    """Through ``LLM`` (tokenizer, allowed ids, detokenizing): the same text, token ids and
    finish as single steps, with a stop string completed in the middle of a burst (the answer
    ends at the token that completes it, not at the end of the burst)."""
    _kernels_or_skip()
    one = _oracle(LLM(str(tiny_dir), device="cpu", max_num_seqs=2))
    eight = LLM(str(tiny_dir), device="cpu", max_num_seqs=2, num_scheduler_steps=8)
    params = GREEDY.replace(max_tokens=40)
    free = one.generate(["The quick brown fox", "你好"], params)
    for out in free:
        text = out.outputs[0].text
        assert len(text) > 12
    for prompt, out in zip(["The quick brown fox", "你好"], free):
        text = out.outputs[0].text
        # a stop string that completes well inside the first or second burst
        start = next(i for i in range(8, len(text) - 3) if "\ufffd" not in text[i:i + 3])
        stop = text[start:start + 3]
        p = params.replace(stop=[stop])
        counted = [llm.engine.stats.generated_tokens for llm in (one, eight)]
        a, b = one.generate(prompt, p)[0].outputs[0], eight.generate(prompt, p)[0].outputs[0]
        assert (b.text, b.token_ids, b.finish_reason, b.stop_reason) == (a.text, a.token_ids, a.finish_reason,
                                                                         a.stop_reason)
        assert a.finish_reason == "stop" and a.text == text[:text.find(stop)]
        # the tokens a burst decoded past the stop string are not counted (the server's
        # aquilachat_generation_tokens_total): both engines counted the answer's tokens
        assert [llm.engine.stats.generated_tokens - n for llm, n in zip((one, eight), counted)] == [len(a.token_ids)] * 2
    a, b = one.generate(["The quick brown fox", "你好"], params), eight.generate(["The quick brown fox", "你好"], params)
    assert [o.outputs[0].token_ids for o in b] == [o.outputs[0].token_ids for o in a]
    assert [o.outputs[0].text for o in b] == [o.outputs[0].text for o in a]


def _nan_after_end_model():
    """A model whose keys and values turn NaN when one token ``E`` is fed (its embedding row is
    NaN), and prompts around it: ``PA`` answers ``E`` after a few tokens (greedy, from the clean
    model), ``PB`` runs on beside it and never produces ``E``; ``C`` shares a 16-token block with
    ``PA`` (it goes to PA's freed slot), ``D`` shares 32 tokens with ``PB`` (a later cache start in
    the same prefill, so C's row attends masked positions of its slot beyond its own)."""
    model = _model(tie_word_embeddings=False)
    g = torch.Generator().manual_seed(1)
    pa, pb = torch.randint(1, 300, (20,), generator=g).tolist(), torch.randint(1, 300, (36,), generator=g).tolist()
    c, d = pa[:16] + [7, 8], pb[:32] + [9, 10, 11, 12]
    eng = Engine(model, max_num_seqs=3, max_model_len=64)
    a, b = eng.add(pa, GREEDY), eng.add(pb, GREEDY.replace(max_tokens=20))
    while eng.has_unfinished():
        eng.step()
    bad = set(b.output_ids) | set(pa) | set(pb) | set(c) | set(d)
    k = next(i for i in range(3, 12) if a.output_ids[i] not in bad and a.output_ids[i] not in a.output_ids[:i])
    end = a.output_ids[k]
    with torch.no_grad():
        model.model.embed_tokens.weight[end] = float("nan")
    return model, end, (pa, pb, c, d)


@pytest.mark.parametrize("how", ["eos", "finish"])
def test_a_row_ended_in_a_burst_leaves_nothing_in_its_slot(how):
    """A burst keeps feeding a row that ended in it (its end token and what follows), which
    single steps never do. Here that writes NaN keys and values past the row's end; they must
    not reach the next request in its slot (masked attention multiplies them by 0, and 0 * NaN
    is NaN): that request gets the same answer as with single steps, not an error. ``eos``: the
    row ends on its EOS inside the burst; ``finish``: it ends from outside after the burst (a
    stop string, a client gone), as the output processor ends it."""
    _kernels_or_skip()
    model, end, (pa, pb, c, d) = _nan_after_end_model()

    def run(k):
        eng = Engine(model, max_num_seqs=3, max_model_len=64, eos_token_ids=[end] if how == "eos" else [],
                     num_scheduler_steps=k)
        a = eng.add(pa, GREEDY.replace(ignore_eos=how != "eos"))
        b = eng.add(pb, GREEDY.replace(max_tokens=20))
        while end not in a.output_ids:
            eng.step()
        cut = a.output_ids.index(end) + 1
        if how == "finish":
            eng.finish(a, "stop", "a stop string")
        eng.step()
        assert a.finished
        later = [eng.add(c, GREEDY.replace(max_tokens=5)), eng.add(d, GREEDY.replace(max_tokens=5))]
        while eng.has_unfinished():
            eng.step()
        return [(a.output_ids[:cut], a.finish_reason)] + [(s.output_ids, s.finish_reason, s.error, s.num_cached_tokens)
                                                          for s in [b] + later]

    single = run(1)
    assert single[2] == (single[2][0], "length", None, 16) and len(single[2][0]) == 5  # C: in PA's slot, no error
    for k in (8, 64):
        assert run(k) == single, k


def test_llm_stop_string_right_before_an_end_id(tiny_dir):
    """A stop string completed by the token just before an end id (EOS or a stop id), both in
    one burst: single steps stop at the stop string and never generate the end id, so neither may
    a burst's answer hold it (token_ids, hence usage, as with single steps)."""
    _kernels_or_skip()
    one = _oracle(LLM(str(tiny_dir), device="cpu", max_num_seqs=2))
    eight = LLM(str(tiny_dir), device="cpu", max_num_seqs=2, num_scheduler_steps=8)
    params = GREEDY.replace(max_tokens=40)
    tok, tried = one.tokenizer, 0
    for prompt in ["The quick brown fox", "你好", "def bubble_sort", "hello world"]:
        ids = one.generate(prompt, params)[0].outputs[0].token_ids
        for k in range(2, len(ids) - 1):
            before, upto, end = tok.decode(ids[:k]), tok.decode(ids[:k + 1]), ids[k + 1]
            stop = upto[-1:]  # completed by token k exactly, and the end id right after it
            if (end in ids[:k + 1] or len(upto) <= len(before) or "\ufffd" in upto or not stop.strip()
                    or stop in before):
                continue
            p = params.replace(stop=[stop], stop_token_ids=[end])
            a, b = one.generate(prompt, p)[0].outputs[0], eight.generate(prompt, p)[0].outputs[0]
            assert a.finish_reason == "stop" and a.stop_reason == stop and a.token_ids == ids[:k + 1]
            assert (b.text, b.token_ids, b.finish_reason, b.stop_reason) == (a.text, a.token_ids, a.finish_reason,
                                                                             a.stop_reason)
            tried += 1
            break
    assert tried


def test_llm_request_mixes_equal_single_steps(tiny_dir):
    """Through ``LLM``, requests as a newcomer writes them: several prompts of different lengths
    queued for 2 slots, ``n=2``, English and Chinese stop strings (one that a multi-token
    character completes), stop ids, ``max_tokens`` 1 and 2, ``min_tokens``, EOS not ignored, and
    a batch that mixes in prompt log-probabilities: every answer's text, token ids, finish and stop
    reason equal single steps' for 2, 3 and 64 steps. (``num_cached_tokens`` is left out: which
    prefix a queued answer finds cached depends on when slots free up, which bursts change.)"""
    _kernels_or_skip()
    llms = {k: LLM(str(tiny_dir), device="cpu", max_num_seqs=2, num_scheduler_steps=k) for k in (1, 2, 3, 64)}
    llms["oracle"] = _oracle(LLM(str(tiny_dir), device="cpu", max_num_seqs=2))
    prompts = ["The quick brown fox", "你好", "def bubble_sort(a):", "a", "人工智能是计算机科学的一个分支。"]
    base = GREEDY.replace(max_tokens=24, ignore_eos=False)
    free = llms["oracle"].generate(prompts, base)
    texts = [o.outputs[0].text for o in free]
    # stop strings the answers complete mid-way (in characters free of broken UTF-8), and a stop id
    stops = [t[i:i + 2] for t in texts for i in (6, 11) if len(t) > i + 2 and "\ufffd" not in t[i:i + 2]][:4]
    assert stops
    stop_id = free[0].outputs[0].token_ids[7]
    cases = [base.replace(max_tokens=1), base.replace(max_tokens=2), base.replace(n=2, stop=stops),
             base.replace(stop=["的", "，", "。"] + stops[:1]), base.replace(stop_token_ids=[stop_id]),
             base.replace(min_tokens=6, stop=stops), base.replace(prompt_logprobs=1, stop=stops[:2])]
    for params in cases:
        want = [[(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.prompt_logprobs) for c in r.outputs]
                for r in llms["oracle"].generate(prompts, params)]
        for k in (1, 2, 3, 64):
            got = [[(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.prompt_logprobs) for c in r.outputs]
                   for r in llms[k].generate(prompts, params)]
            assert got == want, (k, params)


@pytest.mark.parametrize("k", [1, 8])
def test_finish_during_the_step_that_ends_the_sequence_leaves_nothing_behind(k):
    """``finish()`` from another thread (a client gone) while the step that ends the sequence
    runs: the sequence ends by itself (``length``) and the request is dropped, not kept forever
    in the engine's pending finishes (a burst makes that window k steps wide)."""
    _kernels_or_skip()
    eng = Engine(_model(), max_num_seqs=2, max_model_len=64, num_scheduler_steps=k)
    if k == 1:
        _oracle(eng)  # single steps op by op: finish() lands while _forward_hidden runs
    seqs = [eng.add([5, 6, 7], GREEDY.replace(max_tokens=9)) for _ in range(6)]
    forward, burst = eng._forward_hidden, eng.backend.decode_greedy

    def finish_last(decode, *args, **kwargs):  # the step that gives the last token
        for seq in list(eng.running):
            if decode and len(seq.output_ids) == seq.max_tokens - 1:
                eng.finish(seq, "abort")
        return forward(decode, *args, **kwargs)

    def finish_all(*args, **kwargs):  # a burst that runs to every row's max_tokens
        for seq in list(eng.running):
            eng.finish(seq, "abort")
        return burst(*args, **kwargs)
    eng._forward_hidden = finish_last
    if k > 1:
        eng.backend.decode_greedy = finish_all
    while eng.has_unfinished():
        eng.step()
    assert [s.finish_reason for s in seqs] == ["length"] * 6
    eng._forward_hidden, eng.backend.decode_greedy = forward, burst
    later = eng.add([5, 6, 7], GREEDY.replace(max_tokens=3))  # the next request's steps drop them
    while eng.has_unfinished():
        eng.step()
    assert later.finish_reason == "length" and not eng._pending_finish
