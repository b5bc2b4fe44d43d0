"""Sampling: validation, NaN/inf safety (property tests), penalties and filters against hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquilachat.errors import ValidationError
from aquilachat.sampling import (CONSTRAINT_ERROR, NO_CANDIDATE_ERROR, SamplingParams, apply_penalties, sample,
                                 sanitize_logits)
from aquilachat.sampling_params import MAX_STOP, PARAMS
from tests.helpers import bad_sampling_values

V = 37
SPECIAL = [math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-38, 0.0, 1e4, -1e4]


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.1, "temperature"), ("temperature", math.nan, "temperature"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("max_tokens", 0, "max_tokens"),
    ("n", 0, "n must"), ("top_k", -2, "top_k"), ("repetition_penalty", 0.0, "repetition_penalty"),
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -3, "frequency_penalty"),
    ("logprobs", 21, "logprobs"), ("stop", [""], "stop"), ("stop_token_ids", [-1], "stop_token_ids"),
    ("max_tokens", 1.5, "max_tokens"), ("temperature", "hot", "temperature"), ("n", True, "n must"),
])
def test_validation_errors(field, value, match):
    with pytest.raises(ValidationError, match=match) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field


@pytest.mark.parametrize("name", list(PARAMS))
def test_every_field_refuses_what_its_range_refuses_and_names_itself(name):
    for value in bad_sampling_values(name):
        with pytest.raises(ValidationError) as info:
            SamplingParams(**{name: value})
        assert info.value.field == name and name in str(info.value), (value, info.value)


def test_the_ranges_chosen_where_openai_and_vllm_differ():
    """sampling_params' docstring: vLLM's unbounded temperature and repetition penalty; seeds in
    [0, 2**63 - 1]; at most 16 stop strings."""
    p = SamplingParams(temperature=5.0, repetition_penalty=20.0, seed=2**63 - 1, stop=[str(i) for i in range(MAX_STOP)])
    assert len(p.stop) == 16
    for bad in ({"seed": -1}, {"seed": 2**63}, {"stop": [str(i) for i in range(MAX_STOP + 1)]}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)


def test_sampling_params_import_without_torch():
    """The evaluations and the command line build SamplingParams without loading torch."""
    import subprocess
    import sys
    code = "import sys, aquilachat; aquilachat.SamplingParams(temperature=0); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


logit_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from(SPECIAL))
params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 1e-6, 0.5, 1.0, 100.0]),
    top_p=st.sampled_from([1e-9, 0.1, 0.9, 1.0]),
    top_k=st.sampled_from([0, 1, 5, V, V + 100]),
    repetition_penalty=st.sampled_from([1.0, 0.5, 1.3, 1e3]),
    presence_penalty=st.sampled_from([0.0, -2.0, 2.0]),
    frequency_penalty=st.sampled_from([0.0, -2.0, 2.0]),
    seed=st.integers(0, 2**31),
    min_p=st.sampled_from([0.0, 0.05, 1.0]),
    min_tokens=st.sampled_from([0, 3]),
    logit_bias=st.sampled_from([None, {0: 100.0, 3: -100.0}, {V - 1: 5.5}]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(logit_values, min_size=V, max_size=V), min_size=1, max_size=4),
       params=st.lists(params_strategy, min_size=4, max_size=4),
       allowed_cut=st.integers(1, V),
       history=st.lists(st.integers(0, V - 1), max_size=6),
       masks=st.one_of(st.none(), st.lists(st.lists(st.booleans(), min_size=V, max_size=V), min_size=4, max_size=4)),
       end_ids=st.lists(st.integers(0, V - 1), max_size=5))
def test_never_raises_and_only_decodable_ids(rows, params, allowed_cut, history, masks, end_ids):
    """Any logits (NaN, infinities), any parameters, token masks (a grammar's), min_tokens end ids
    and logit biases: never an exception, never an id outside ``allowed`` or a row's mask, never a
    banned end id before min_tokens; an error only for a row left with no candidate."""
    logits = torch.tensor(rows, dtype=torch.float32)
    B = logits.shape[0]
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[:allowed_cut] = True
    token_masks = torch.tensor(masks[:B]) if masks is not None else None
    ends = [torch.tensor(end_ids, dtype=torch.long)] * B
    gens = [torch.Generator().manual_seed(p.seed) for p in params[:B]]
    res = sample(logits, params[:B], gens, allowed=allowed, prompt_ids=[history] * B, output_ids=[history] * B,
                 token_masks=token_masks, end_ids=ends)
    for b in range(B):
        tok = int(res.token_ids[b])
        constrained = bool(token_masks is not None or params[b].logit_bias or len(history) < params[b].min_tokens)
        penalized = params[b].repetition_penalty != 1 or params[b].presence_penalty or params[b].frequency_penalty
        if b in res.errors:
            assert tok == -1
            row = logits[b, :allowed_cut]
            has_candidate = bool(((row > -math.inf) & ~row.isnan()).any())  # before the constraints
            if res.errors[b] == CONSTRAINT_ERROR:
                assert has_candidate and constrained
            else:  # no decodable id with a finite logit (or penalties overflowed every one)
                assert res.errors[b] == NO_CANDIDATE_ERROR and (not has_candidate or penalized)
        else:
            assert 0 <= tok < allowed_cut
            assert not math.isnan(logits[b, tok].item())
            if token_masks is not None:
                assert bool(token_masks[b, tok])
            if len(history) < params[b].min_tokens:
                assert tok not in end_ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(logit_values, min_size=V, max_size=V), min_size=1, max_size=4))
def test_plain_greedy_shortcut_equals_full_path(rows):
    """All-greedy batches without penalties take a one-pass shortcut; with the same logits (NaN,
    infinities, ties) it must pick what the full path picks (forced here by an all-True mask)."""
    logits = torch.tensor(rows, dtype=torch.float32)
    B = logits.shape[0]
    params = [SamplingParams(temperature=0)] * B
    fast = sample(logits, params, [None] * B)
    full = sample(logits, params, [None] * B, allowed=torch.ones(V, dtype=torch.bool))
    assert fast.token_ids.tolist() == full.token_ids.tolist()
    assert fast.errors == full.errors


def test_nan_is_impossible_and_posinf_is_certain():
    logits = torch.tensor([[math.nan, 1.0, math.nan, 0.5], [0.0, math.inf, 5.0, math.inf],
                           [math.nan] * 4, [-math.inf] * 4])
    p = [SamplingParams(temperature=1.0, seed=i) for i in range(4)]
    picks = {0: set(), 1: set()}
    for s in range(50):
        res = sample(logits, p, [torch.Generator().manual_seed(s) for _ in range(4)])
        picks[0].add(int(res.token_ids[0]))
        picks[1].add(int(res.token_ids[1]))
        assert set(res.errors) == {2, 3} and "NaN" in res.errors[2]
    assert picks[0] <= {1, 3} and picks[1] == {1, 3}


def test_posinf_outside_allowed_is_ignored():
    logits = torch.tensor([[1.0, 2.0, math.inf]])
    allowed = torch.tensor([True, True, False])
    res = sample(logits, [SamplingParams(temperature=0)], [None], allowed=allowed)
    assert int(res.token_ids[0]) == 1


def test_repetition_penalty_ctrl_handles_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_penalties(logits, seen=seen, counts=torch.zeros(1, 4), repetition=torch.tensor([2.0]),
                          presence=torch.zeros(1), frequency=torch.zeros(1))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # positive divided, negative multiplied


def test_presence_and_frequency_as_openai_defines():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_penalties(logits, seen=None, counts=counts, repetition=torch.ones(1),
                          presence=torch.tensor([0.5]), frequency=torch.tensor([0.25]))
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_penalties_through_sample_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    base = sample(logits, [SamplingParams(temperature=0)], [None], output_ids=[[0]])
    pen = sample(logits, [SamplingParams(temperature=0, frequency_penalty=0.5)], [None], output_ids=[[0]])
    rep = sample(logits, [SamplingParams(temperature=0, repetition_penalty=1.2)], [None], prompt_ids=[[0]])
    assert int(base.token_ids[0]) == 0 and int(pen.token_ids[0]) == 1 and int(rep.token_ids[0]) == 1


def test_top_k_and_top_p_supports():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen_k, seen_p = set(), set()
    for s in range(300):
        g = torch.Generator().manual_seed(s)
        seen_k.add(int(sample(logits, [SamplingParams(top_k=2, seed=s)], [g]).token_ids[0]))
        g = torch.Generator().manual_seed(s)
        seen_p.add(int(sample(logits, [SamplingParams(top_p=0.75, seed=s)], [g]).token_ids[0]))
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}  # 0.5 < 0.75 so id 1 is needed; 0.8 >= 0.75 so id 2 is not
    g = torch.Generator().manual_seed(0)
    assert int(sample(logits, [SamplingParams(top_p=1e-9)], [g]).token_ids[0]) == 0


def test_temperature_distribution_matches_softmax():
    """Empirical frequencies at temperature 2 match softmax(logits / 2) (chi-square-ish bound)."""
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    want = torch.softmax(logits / 2, -1)[0]
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(3)
    for _ in range(n):
        counts[int(sample(logits, [SamplingParams(temperature=2.0)], [g]).token_ids[0])] += 1
    assert torch.allclose(counts / n, want, atol=0.03)


def test_tiny_temperature_is_finite_and_near_greedy():
    logits = torch.tensor([[1e4, 1e4 - 1, -3e38]])
    res = sample(logits, [SamplingParams(temperature=1e-6)], [torch.Generator().manual_seed(0)])
    assert not res.errors and int(res.token_ids[0]) == 0


def test_same_seed_same_draws_alone_or_batched():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [int(sample(logits[1:2], [p], [torch.Generator().manual_seed(7)]).token_ids[0])]
    batch_gens = [torch.Generator().manual_seed(s) for s in (1, 7, 3)]
    batched = sample(logits, [SamplingParams(seed=1), p, SamplingParams(seed=3)], batch_gens)
    assert int(batched.token_ids[1]) == alone[0]


def test_logit_bias_as_openai_defines():
    """Added to the logit before sampling: a bias moves the greedy choice, -100 bans, +100 all but
    forces; the reported logprobs stay the model's (before the bias, vLLM's raw logprobs)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    greedy = SamplingParams(temperature=0, logprobs=1)
    assert int(sample(logits, [greedy.replace(logit_bias={1: 1.5})], [None]).token_ids[0]) == 1
    assert int(sample(logits, [greedy.replace(logit_bias={0: -100})], [None]).token_ids[0]) == 1
    res = sample(logits, [greedy.replace(logit_bias={3: 100})], [None])
    assert int(res.token_ids[0]) == 3
    assert float(res.logprobs[0]) == pytest.approx(float(torch.log_softmax(logits, -1)[0, 3]))
    draws = {int(sample(logits, [SamplingParams(seed=s, logit_bias={"2": 100})], [torch.Generator().manual_seed(s)])
                 .token_ids[0]) for s in range(50)}
    assert draws == {2}


def test_min_p_keeps_tokens_within_a_factor_of_the_top():
    """Nguyen et al. 2024: keep ids with p >= min_p * p_max, probabilities after temperature."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    for min_p, temperature, want in ((0.5, 1.0, {0, 1}), (0.25, 1.0, {0, 1, 2}), (0.5, 2.0, {0, 1, 2}),
                                     (1.0, 1.0, {0})):
        # at temperature 2 the probabilities are proportional to sqrt(p): 0.15 -> 0.55 of the top's
        draws = {int(sample(logits, [SamplingParams(temperature=temperature, min_p=min_p, seed=s)],
                            [torch.Generator().manual_seed(s)]).token_ids[0]) for s in range(300)}
        assert draws == want, (min_p, temperature, draws)


def test_min_tokens_holds_back_the_end_ids():
    logits = torch.tensor([[0.0, 5.0, 1.0]])  # id 1 (the end id) is by far the most likely
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    ends = [torch.tensor([1])]
    assert int(sample(logits, [params], [None], output_ids=[[2]], end_ids=ends).token_ids[0]) == 2
    assert int(sample(logits, [params], [None], output_ids=[[2, 2]], end_ids=ends).token_ids[0]) == 1
    # without end_ids, the row's stop_token_ids are the end ids
    assert int(sample(logits, [params], [None], output_ids=[[]]).token_ids[0]) == 2


def test_token_masks_and_their_dead_end():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [math.nan, math.nan, math.nan]])
    masks = torch.tensor([[False, True, True], [False, False, False], [True, True, True]])
    res = sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3, token_masks=masks)
    assert int(res.token_ids[0]) == 1
    assert res.errors == {1: CONSTRAINT_ERROR, 2: NO_CANDIDATE_ERROR}
    draws = {int(sample(logits[:1], [SamplingParams(seed=s)], [torch.Generator().manual_seed(s)],
                        token_masks=masks[:1]).token_ids[0]) for s in range(100)}
    assert draws == {1, 2}


def test_logprobs_are_before_temperature():
    """OpenAI / vLLM: the log-probability of the model's distribution, whatever the temperature."""
    logits = torch.tensor([[1.0, 0.5, -1.0]])
    want = torch.log_softmax(logits, -1)[0]
    for temperature in (0.0, 0.3, 3.0):
        res = sample(logits, [SamplingParams(temperature=temperature, seed=1, logprobs=3)],
                     [torch.Generator().manual_seed(1)])
        tok = int(res.token_ids[0])
        assert float(res.logprobs[0]) == pytest.approx(float(want[tok]))
        assert [i for i, _ in res.top_logprobs[0]] == [0, 1, 2]


def test_sanitize_rows():
    x = sanitize_logits(torch.tensor([[math.nan, 1.0, math.inf, math.inf]]))
    assert x.tolist() == [[-math.inf, -math.inf, 0.0, 0.0]]


@settings(max_examples=200, deadline=None)
@given(B=st.integers(1, 3), V=st.sampled_from([1024, 1030, 1031, 2560, 4099, 5000]), data=st.data())
def test_blockwise_row_max_equals_torch_max(B, V, data):
    """The blocked maximum used by greedy sampling equals torch.max: values (NaN-propagating) and
    the first index of the maximum, with ties, infinities and NaN in the head or the tail."""
    from aquilachat.sampling import _block_width, _max_rows
    assert (V % _block_width(V) == 0) == (V not in (1031, 4099))  # whole blocks, or blocks and a tail
    x = torch.randn(B, V)
    for _ in range(data.draw(st.integers(0, 4))):
        b, i = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, V - 1))
        x[b, i] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 5.0, 5.0, 1e30]))
    values, index = _max_rows(x)
    want_values, want_index = x.max(dim=-1)
    torch.testing.assert_close(values, want_values, equal_nan=True)
    nan_rows = want_values.isnan()
    assert index[~nan_rows].tolist() == want_index[~nan_rows].tolist()
