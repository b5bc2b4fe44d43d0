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


@pytest.fixture(params=[1, 2], ids=["1-thread-openblas", "2-threads-split-k"])
def split_everything(request, monkeypatch):
    """Every linear takes the few-row products whatever its size: with 1 torch thread numpy's
    OpenBLAS (calls counted in the returned list), with 2 the split-K batched product."""
    import aquilachat.cpu_blas as cpu_blas
    import aquilachat.model as model_module
    monkeypatch.setattr(model_module, "SPLIT_LINEAR_MIN_ELEMENTS", 0)
    calls = []
    real = cpu_blas.matmul
    monkeypatch.setattr(cpu_blas, "matmul", lambda x, wt: calls.append(1) or real(x, wt))
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield calls
    torch.set_num_threads(old)


def _decode_logits(model, prompts, steps):
    """Prefill a ragged batch into a cache, then ``steps`` single-token steps; all logits.

    The steps are teacher forced: every row is fed the same fixed random tokens whatever its
    logits say. Two low-precision paths compared through their own greedy choices part ways at
    the first near-tie (bf16 kernels round differently on CPUs with and without AVX512_BF16), so
    every comparison feeds both sides the same tokens.
    """
    cache = KVCache.allocate(model.config, num_slots=len(prompts), max_seq_len=64, dtype=model.dtype)
    T = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    feed = torch.randint(0, model.config.vocab_size, (len(prompts), steps), generator=torch.Generator().manual_seed(7))
    out = []
    with torch.inference_mode():
        logits = model(ids, torch.arange(T).expand(len(prompts), T), cache,
                       logits_index=torch.tensor([len(p) - 1 for p in prompts]))[:, 0]
        pos = torch.tensor([[len(p)] for p in prompts])
        for step in range(steps):
            out.append(logits)
            logits = model(feed[:, step:step + 1], pos, cache, kv_len=int(pos.max()) + 1)[:, 0]
            pos = pos + 1
    return torch.stack(out)


@pytest.fixture
def plan_runs(monkeypatch):
    """Counts the prepared model's decode-plan runs (one per cached forward that took it)."""
    import aquilachat.model as model_module
    runs = []
    real = model_module._DecodePlan.run
    monkeypatch.setattr(model_module._DecodePlan, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    return runs


@pytest.mark.parametrize("case", ["gqa-untied", "mqa-tied"])
def test_cpu_decode_layout_equals_plain_model_and_transformers(case, split_everything, plan_runs):
    """prepare_for_cpu_decode (column-major, fused q/k/v and gate/up, split products) changes no
    value: same state dict, same logits as the plain model and as transformers."""
    plain, ref = pair(**CASES[case])
    fast, _ = pair(**CASES[case])
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    fast.prepare_for_cpu_decode()
    fused = fast.model.layers[0].self_attn.fused_qkv
    fast.prepare_for_cpu_decode()  # idempotent
    assert fast.model.layers[0].self_attn.fused_qkv is fused and fused.split
    after = fast.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    prompts = [[5, 17, 33, 2, 250, 9, 1], [44, 3], [7, 7, 7, 8, 9]]
    want = _decode_logits(plain, prompts, 6)
    torch.testing.assert_close(_decode_logits(fast, prompts, 6), want, atol=1e-5, rtol=1e-5)
    assert len(plan_runs) == 7  # the prefill and every step took the decode plan
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)
    from aquilachat import cpu_blas
    used_openblas = bool(split_everything)
    assert used_openblas == (torch.get_num_threads() == 1 and cpu_blas.enabled())


def test_cpu_decode_layout_follows_weight_changes_and_trains(split_everything):
    """Loading weights into a prepared model reaches the fused storage; a replaced weight makes
    the layer fall back to its own modules; with autograd on, gradients equal the plain model's."""
    plain, _ = pair(**CASES["gqa-untied"])
    other, _ = pair(seed=1, **CASES["gqa-untied"])
    fast, _ = pair(**CASES["gqa-untied"])
    fast.prepare_for_cpu_decode()
    fast.load_state_dict(other.state_dict())
    prompts = [[5, 17, 33, 2], [44, 3, 9]]
    torch.testing.assert_close(_decode_logits(fast, prompts, 3), _decode_logits(other, prompts, 3),
                               atol=1e-5, rtol=1e-5)
    new_q = torch.randn_like(plain.model.layers[1].self_attn.q_proj.weight) * 0.02
    for m in (plain, fast):
        m.model.layers[1].self_attn.q_proj.weight = torch.nn.Parameter(new_q.clone())
    plain.load_state_dict({k: v for k, v in other.state_dict().items() if "layers.1.self_attn.q_proj" not in k},
                          strict=False)
    torch.testing.assert_close(_decode_logits(fast, prompts, 3), _decode_logits(plain, prompts, 3),
                               atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    for m in (plain, fast):
        m.train()
        m.zero_grad()
        m(ids).logsumexp(-1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_numpy_openblas_is_limited_to_one_thread():
    """cpu_blas uses numpy's OpenBLAS only after limiting it to one thread (two spinning pools on
    few cores slowed decode steps 3x); torch's own threads are untouched."""
    from aquilachat import cpu_blas
    threads = torch.get_num_threads()
    if not cpu_blas.enable():
        pytest.skip("numpy here is not built on OpenBLAS (torch does every product)")
    from threadpoolctl import threadpool_info
    pools = [p for p in threadpool_info() if p.get("prefix") == "libscipy_openblas"]
    assert pools and all(p["num_threads"] == 1 for p in pools)
    assert torch.get_num_threads() == threads
    x, wt = torch.randn(3, 40), torch.randn(40, 70)
    torch.testing.assert_close(cpu_blas.matmul(x, wt), x @ wt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opt", ["adamw-fused", "sgd-fused"])
def test_fused_optimizer_after_prepare_and_train_touches_only_its_parameter(opt):
    """After prepare_for_cpu_decode, q/k/v share one tensor; model.train() gives each its own
    dense storage again, so a fused optimizer step on q leaves k untouched."""
    m, _ = pair(**CASES["gqa-untied"])
    m.prepare_for_cpu_decode()
    m.train()
    attn = m.model.layers[0].self_attn
    k_before, q_before = attn.k_proj.weight.detach().clone(), attn.q_proj.weight.detach().clone()
    make = {"adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.0, fused=True),
            "sgd-fused": lambda p: torch.optim.SGD(p, lr=1.0, fused=True)}[opt]
    o = make([attn.q_proj.weight])
    attn.q_proj.weight.grad = torch.ones_like(attn.q_proj.weight)
    o.step()
    assert torch.equal(attn.k_proj.weight.detach(), k_before)
    assert (attn.q_proj.weight.detach() - q_before).abs().min() > 0


def test_positions_outside_the_cache_or_kv_len_are_errors_not_writes():
    m, _ = pair(**CASES["gqa-untied"])
    cache = KVCache.allocate(m.config, num_slots=2, max_seq_len=8)
    for prepare in (False, True):  # with the decode plan too
        if prepare:
            m.prepare_for_cpu_decode()
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


def _teacher_forced(m, ids, slots, num_slots, dtype=torch.float32):
    cache = KVCache.allocate(m.config, num_slots=num_slots, max_seq_len=32, dtype=dtype)
    out = []
    with torch.inference_mode():
        out.append(m(ids[:, :3], torch.arange(3).expand(ids.shape[0], 3), cache, slots=slots)[:, -1])
        for t in range(3, ids.shape[1]):
            out.append(m(ids[:, t:t + 1], torch.full((ids.shape[0], 1), t), cache, slots=slots, kv_len=t + 1)[:, 0])
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [None, torch.tensor([3, 0, 2])], ids=["slice", "tensor"])
def test_prepared_equals_plain_teacher_forced(split_everything, plan_runs, dtype, slots):
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    plain, fast = pair(dtype=dtype, **CASES["gqa-untied"])[0], pair(dtype=dtype, **CASES["gqa-untied"])[0]
    fast.prepare_for_cpu_decode()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(_teacher_forced(fast, ids, slots, 4, dtype), _teacher_forced(plain, ids, slots, 4, dtype),
                               atol=tol, rtol=tol)
    assert len(plan_runs) == 8


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_plan_equals_the_layer_modules(case, dtype, plan_runs):
    """The prepared model's cached forward runs the decode plan (one function over all layers'
    tensors, products as mm/addmm at these sizes); the same model through its modules gives the
    same logits (ragged prefill, then steps at different positions), fp32 and bf16."""
    fast = pair(dtype=dtype, **CASES[case])[0]
    fast.prepare_for_cpu_decode()
    prompts = [[5, 17, 33, 2, 250, 9, 1], [44, 3], [7, 7, 7, 8, 9]]
    got = _decode_logits(fast, prompts, 5)
    assert len(plan_runs) == 6
    plan, fast._decode_plan = fast._decode_plan, None
    want = _decode_logits(fast, prompts, 5)
    assert len(plan_runs) == 6
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _steps(model, ids, cache_dtype, grad=False, autocast=False):
    """Prefill 3 tokens of each row into a cache, then feed the rest one at a time; logits."""
    cache = KVCache.allocate(model.config, num_slots=ids.shape[0], max_seq_len=16, dtype=cache_dtype)
    with torch.inference_mode(not grad), torch.set_grad_enabled(grad), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = [model(ids[:, :3], None, cache)[:, -1]]
        for t in range(3, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], torch.full((ids.shape[0], 1), t), cache)[:, 0])
    return torch.stack(out, 1).detach()


CHANGES = ["forward-hook", "forward-pre-hook", "global-hook", "peft-lora", "weight-storage", "module-replaced",
           "layer-replaced", "accelerate-style-forward", "class-swapped", "fp32-cache", "autocast", "autograd", "train-mode"]


@pytest.mark.parametrize("change", CHANGES)
def test_decode_plan_steps_aside_when_the_model_changes(change, plan_runs):
    """After prepare_for_cpu_decode, anything the decode plan would not see (hooks, wrapped or
    replaced modules, an instance-level forward (accelerate's hooks), a swapped class, weights given new storage, a replaced layer, a cache of another dtype,
    autograd, training mode) makes the model run its modules: the logits equal an unprepared
    model's with the same change, and the plan does not run."""
    if change == "peft-lora":
        peft = pytest.importorskip("peft")
    dtype = torch.bfloat16 if change == "fp32-cache" else torch.float32
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    handles = []
    out = []
    for prepare in (False, True):
        m = pair(dtype=dtype, **CASES["gqa-untied"])[0]
        if prepare:
            m.prepare_for_cpu_decode()
        layer = m.model.layers[1]
        cache_dtype = dtype
        if change == "forward-hook":
            handles.append(layer.mlp.register_forward_hook(lambda mod, args, y: y * 0.5))
        elif change == "forward-pre-hook":
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 2,)))
        elif change == "global-hook":
            handles.append(torch.nn.modules.module.register_module_forward_hook(
                lambda mod, args, y: y * 0.5 if isinstance(mod, torch.nn.Linear) and y.shape[-1] == 176 else None))
        elif change == "peft-lora":
            torch.manual_seed(0)
            cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0,
                                  init_lora_weights=False)
            m = peft.get_peft_model(m, cfg).eval()
        elif change == "weight-storage":
            with torch.no_grad():
                layer.self_attn.k_proj.weight.data = layer.self_attn.k_proj.weight.data * 1.5
        elif change == "module-replaced":
            new = torch.nn.Linear(176, 64, bias=False)
            with torch.no_grad():
                new.weight.copy_(torch.randn(64, 176, generator=torch.Generator().manual_seed(4)) * 0.02)
            layer.mlp.down_proj = new
        elif change == "layer-replaced":
            m.model.layers[2] = pair(seed=5, dtype=dtype, **CASES["gqa-untied"])[0].model.layers[2]
        elif change == "accelerate-style-forward":  # an instance attribute, as accelerate's add_hook_to_module
            o_proj = layer.self_attn.o_proj
            o_proj.forward = lambda x, _forward=o_proj.forward: _forward(x) * 0.5
        elif change == "class-swapped":
            class HalfMLP(type(layer.mlp)):
                def forward(self, x):
                    return super().forward(x) * 0.5
            layer.mlp.__class__ = HalfMLP
        elif change == "fp32-cache":
            cache_dtype = torch.float32
        elif change == "train-mode":
            m.train()
        try:
            out.append(_steps(m, ids, cache_dtype, grad=change == "autograd", autocast=change == "autocast"))
        finally:
            for h in handles:
                h.remove()
            handles.clear()
    tol = 1e-5 if dtype == torch.float32 and change != "autocast" else 2e-2
    torch.testing.assert_close(out[1], out[0], atol=tol, rtol=tol)
    assert plan_runs == []


def test_a_stale_decode_plan_is_dropped():
    """train(), .to() and a load_state_dict that assigns new tensors drop the decode plan and the
    fused weights (they would keep the old weights alive); an in-place load keeps them (their
    views see the new values)."""
    m, _ = pair(**CASES["gqa-untied"])
    other, _ = pair(seed=1, **CASES["gqa-untied"])
    for change, kept in [("load", True), ("load-assign", False), ("train", False), ("to-bf16", False)]:
        m.eval().float().prepare_for_cpu_decode()
        assert m._decode_plan is not None
        if change == "load":
            m.load_state_dict(other.state_dict())
        elif change == "load-assign":
            m.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
        elif change == "train":
            m.train()
        else:
            m.to(torch.bfloat16)
        assert (m._decode_plan is not None) == kept, change
        # fused q/k/v and gate/up no module views any more are dropped too (their memory)
        assert all((layer.self_attn.fused_qkv is not None and layer.mlp.fused_gate_up is not None) == kept
                   for layer in m.model.layers), change


def test_prepared_model_pickles_and_its_copy_runs_its_own_weights():
    import copy
    import io
    m, _ = pair(**CASES["gqa-untied"])
    m.prepare_for_cpu_decode()
    buf = io.BytesIO()
    torch.save(m, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    want = _steps(m, ids, torch.float32)
    for other in (loaded, copy.deepcopy(m)):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.1)  # the original changes; the copy must not read its tensors
        torch.testing.assert_close(_steps(other, ids, torch.float32), want, atol=1e-5, rtol=1e-5)


def test_peft_lora_merged_after_prepare_equals_unprepared(split_everything):
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    out = []
    for prepare in (False, True):
        m, _ = pair(**CASES["gqa-untied"])
        if prepare:
            m.prepare_for_cpu_decode()
        torch.manual_seed(0)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                              lora_dropout=0.0, init_lora_weights=False)
        merged = peft.get_peft_model(m, cfg).eval().merge_and_unload()
        if prepare:
            merged.prepare_for_cpu_decode()
        out.append(_teacher_forced(merged, ids, None, 2))
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)
