"""The model against transformers' LlamaForCausalLM (the oracle), and the KV cache against recomputation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aquilachat.config import ModelConfig, swiglu_hidden_size
from aquilachat.errors import ConfigError
from aquilachat.model import AquilaForCausalLM, KVCache

CASES = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "gqa-theta": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-6),
}


def pair(seed=0, dtype=torch.float32, **kw):
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                      max_position_embeddings=128, torch_dtype="float32", **kw)
    ours = AquilaForCausalLM(cfg)
    ours.init_weights(seed)
    ref = LlamaForCausalLM(LlamaConfig(**cfg.to_hf_dict(), attn_implementation="eager")).eval()
    result = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours.to(dtype).eval(), ref.to(dtype)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seq_len", [1, 7, 33])
def test_logits_equal_transformers_fp32(case, seq_len):
    ours, ref = pair(**CASES[case])
    ids = torch.randint(0, 300, (2, seq_len))
    with torch.no_grad():
        got = ours(ids)
        want = ref(ids).logits.float()
    assert got.dtype == torch.float32 and got.shape == (2, seq_len, 300)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_low_precision_close_to_fp32_reference(dtype):
    """bf16/fp16 weights: our logits stay within a documented bound of the fp32 reference.

    Bound: max |diff| <= 0.05 * max |logit| (bf16 has 8 mantissa bits, ~0.4% relative per op).
    """
    ours, ref = pair(**CASES["gqa-untied"])
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        want = ref(ids).logits.float()
        got = ours.to(dtype)(ids)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    # and against transformers run in the same low precision
    with torch.no_grad():
        ref_low = ref.to(dtype)(ids).logits.float()
    assert (got - ref_low).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("case", ["mha-untied", "gqa-untied"])
def test_kv_cache_matches_full_forward(case):
    ours, _ = pair(**CASES[case])
    ids = torch.randint(0, 300, (3, 20))
    cache = KVCache.allocate(ours.config, num_slots=5, max_seq_len=64)
    slots = torch.tensor([4, 0, 2])
    with torch.no_grad():
        full = ours(ids)
        parts = [ours(ids[:, :9], torch.arange(9).expand(3, 9), cache, slots=slots)]
        for t in range(9, 20):
            parts.append(ours(ids[:, t:t + 1], torch.full((3, 1), t), cache, slots=slots))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_ragged_batch_in_cache_equals_single_rows():
    """Rows at different positions share one decode step without affecting each other."""
    ours, _ = pair(**CASES["gqa-untied"])
    a, b = torch.randint(0, 300, (1, 5)), torch.randint(0, 300, (1, 11))
    cache = KVCache.allocate(ours.config, num_slots=2, max_seq_len=32)
    with torch.no_grad():
        ours(a, torch.arange(5)[None], cache, slots=torch.tensor([0]))
        ours(b, torch.arange(11)[None], cache, slots=torch.tensor([1]))
        nxt = torch.randint(0, 300, (2, 1))
        step = ours(nxt, torch.tensor([[5], [11]]), cache, slots=torch.tensor([0, 1]))
        want_a = ours(torch.cat([a, nxt[:1]], 1))[:, -1]
        want_b = ours(torch.cat([b, nxt[1:]], 1))[:, -1]
    torch.testing.assert_close(step[0, 0], want_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], want_b[0], atol=1e-5, rtol=1e-5)


def test_logits_index_selects_positions():
    ours, _ = pair(**CASES["mha-untied"])
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        full = ours(ids)
        picked = ours(ids, logits_index=torch.tensor([3, 8]))
    torch.testing.assert_close(picked[:, 0], full[[0, 1], [3, 8]])


def test_cache_overflow_is_a_clear_error():
    ours, _ = pair(**CASES["mha-untied"])
    cache = KVCache.allocate(ours.config, num_slots=1, max_seq_len=4)
    with pytest.raises(ValueError, match="outside the KV cache"):
        ours(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], cache)


def test_aquila_7b_preset_is_the_published_architecture():
    cfg = ModelConfig.from_preset("aquilachat-7b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (4096, 32, 32)
    assert cfg.intermediate_size == swiglu_hidden_size(4096, 256) == 11008
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rms_norm_eps) == (100008, 2048, 1e-5)
    assert not cfg.tie_word_embeddings
    # 7B parameters, as published
    assert 6.9e9 < cfg.num_parameters() < 7.6e9
    with torch.device("meta"):
        m = AquilaForCausalLM(cfg)
    assert m.num_parameters() == cfg.num_parameters()


def test_flagai_config_fields():
    cfg = ModelConfig.from_flagai_dict({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                                        "norm_eps": 1e-5, "vocab_size": 100008, "max_seq_len": 2048})
    assert cfg.intermediate_size == 11008 and cfg.head_dim == 128 and cfg.num_key_value_heads == 32
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_flagai_dict({"dim": 64, "n_heads": 4})


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"}, source="x/config.json")
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(hidden_size=66, num_attention_heads=4)
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.from_preset("nope")


def test_positions_outside_the_cache_or_kv_len_are_errors_not_writes():
    m, _ = pair(**CASES["gqa-untied"])
    cache = KVCache.allocate(m.config, num_slots=2, max_seq_len=8)
    with torch.inference_mode(), pytest.raises(ValueError, match="2 key and 3 value layers; the model has 3"):
        m(torch.tensor([[5]]), torch.tensor([[0]]), KVCache(cache.k[:2], cache.v))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="not below kv_len"):
            m(torch.tensor([[5]]), torch.tensor([[8]]), cache, slots=torch.tensor([0]), kv_len=8)
        with pytest.raises(ValueError, match=">= 0"):
            m(torch.tensor([[5]]), torch.tensor([[-1]]), cache, slots=torch.tensor([1]))
        with pytest.raises(ValueError, match="slot ids"):
            m(torch.tensor([[5]]), torch.tensor([[0]]), cache, slots=torch.tensor([2]))
        with pytest.raises(ValueError, match="cache slots"):
            m(torch.tensor([[5], [6]]), torch.tensor([[0], [0]]), cache, slots=slice(0, 1))
    assert all(k.abs().sum() == 0 for k in cache.k)


@pytest.mark.parametrize("slots", [slice(None, 2), slice(2, None), slice(-2, None), slice(0, 4, 2)])
def test_any_slice_of_slots_equals_explicit_ids(slots):
    m, _ = pair(**CASES["gqa-untied"])
    cache = KVCache.allocate(m.config, num_slots=4, max_seq_len=8)
    ref_cache = KVCache.allocate(m.config, num_slots=4, max_seq_len=8)
    ids, pos = torch.tensor([[5], [6]]), torch.tensor([[0], [0]])
    with torch.inference_mode():
        got = m(ids, pos, cache, slots=slots)
        want = m(ids, pos, ref_cache, slots=torch.tensor(list(range(4))[slots]))
    torch.testing.assert_close(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v))


def test_cache_built_from_views_works():
    m, _ = pair(**CASES["gqa-untied"])
    big = KVCache.allocate(m.config, num_slots=1, max_seq_len=16)
    cache = KVCache([k[:, :, :8] for k in big.k], [v[:, :, :8] for v in big.v])
    ref = KVCache.allocate(m.config, num_slots=1, max_seq_len=8)
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(m(ids, None, cache), m(ids, None, ref))
        torch.testing.assert_close(m(torch.tensor([[9]]), torch.tensor([[3]]), cache),
                                   m(torch.tensor([[9]]), torch.tensor([[3]]), ref))
