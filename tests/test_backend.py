"""The CPU decode backend against the plain model (the oracle), and its kernels against torch.

Every comparison is teacher forced: both sides are fed the same fixed tokens, whatever their
logits say (two low-precision paths part ways at the first near-tie when compared through their
own greedy choices, and which tie depends on the CPU's kernels).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aquilachat.backends import BackendUnsupported, CpuDecodeBackend, cpu_kernels
from aquilachat.backends.cpu import _called_as_is
from aquilachat.model import KVCache
from tests.test_model import CASES, pair

PROMPTS = [[5, 17, 33, 2, 250, 9, 1], [44, 3], [7, 7, 7, 8, 9]]

# bf16: both sides round every product and activation to bf16 (8 significant bits, 2^-8
# relative) but in different places (the kernel rounds once after an fp32 sum, oneDNN / MKL per
# block): over 3 layers and 7 steps the measured gap is under 1% of the largest logit; 3% bound.
BF16_BOUND = 0.03


def _logits(runner, model, prompts, steps, *, slots=None, num_slots=None, cache_dtype=None):
    """Prefill a ragged, right-padded batch into a fresh cache, then ``steps`` single-token steps
    of the same fixed random tokens (teacher forcing); logits ``[steps + 1, B, V]``.
    ``runner``: the model or a backend (``forward_hidden`` + ``compute_logits``)."""
    B = len(prompts)
    cache = KVCache.allocate(model.config, num_slots=num_slots or B, max_seq_len=64, dtype=cache_dtype or model.dtype)
    T = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    feed = torch.randint(0, model.config.vocab_size, (B, steps), generator=torch.Generator().manual_seed(7))
    out = []
    with torch.inference_mode():
        hidden = runner.forward_hidden(ids, torch.arange(T).expand(B, T), cache, slots=slots,
                                       logits_index=torch.tensor([len(p) - 1 for p in prompts]))
        out.append(runner.compute_logits(hidden)[:, 0])
        pos = torch.tensor([[len(p)] for p in prompts])
        for step in range(steps):
            hidden = runner.forward_hidden(feed[:, step:step + 1], pos, cache, slots=slots, kv_len=int(pos.max()) + 1)
            out.append(runner.compute_logits(hidden)[:, 0])
            pos = pos + 1
    return torch.stack(out)


def _assert_close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= BF16_BOUND * want.abs().max()


@pytest.fixture
def layer_runs(monkeypatch):
    """Counts the decoder layers the backend computed itself (not through their modules)."""
    runs = []
    real = CpuDecodeBackend._layer
    monkeypatch.setattr(CpuDecodeBackend, "_layer", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    return runs


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_equals_plain_model(case, dtype, kernels, layer_runs):
    """Ragged prefill then decode steps at different positions: the backend's logits equal the
    plain model's (fp32 1e-5; bf16 within BF16_BOUND of the largest logit), GQA, MQA and MHA."""
    if kernels and cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    model = pair(dtype=dtype, **CASES[case])[0]
    backend = CpuDecodeBackend(model, kernels=kernels)
    assert backend.uses_kernels == kernels
    got = _logits(backend, model, PROMPTS, 6)
    assert len(layer_runs) == 7 * 3  # every layer of the prefill and of each step ran in the backend
    _assert_close(got, _logits(model, model, PROMPTS, 6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("slots", [None, torch.tensor([3, 0, 2])], ids=["slice", "tensor"])
def test_backend_equals_plain_model_in_other_slots_and_single_rows(dtype, slots):
    """Rows in scattered cache slots; one row alone (the decode step without a mask)."""
    model = pair(dtype=dtype, **CASES["gqa-untied"])[0]
    backend = CpuDecodeBackend(model)
    _assert_close(_logits(backend, model, PROMPTS, 5, slots=slots, num_slots=4),
                  _logits(model, model, PROMPTS, 5, slots=slots, num_slots=4), dtype)
    _assert_close(_logits(backend, model, PROMPTS[:1], 5), _logits(model, model, PROMPTS[:1], 5), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_backend_runs_other_dtypes_as_the_plain_model(dtype, layer_runs):
    """A model in a dtype the kernels do not take (``--dtype float16`` loads one on the CPU): its
    layers and its final norm run through the modules, so the logits of a ragged prefill and
    decode steps equal the plain model's (no error from the extension at the first decode step)."""
    model = pair(dtype=dtype, **CASES["gqa-untied"])[0]
    backend = CpuDecodeBackend(model)
    got = _logits(backend, model, PROMPTS, 4)
    assert not layer_runs  # every layer ran as its module
    torch.testing.assert_close(got, _logits(model, model, PROMPTS, 4), atol=0, rtol=0)


def test_backend_batch_wider_than_the_kernel_and_prefill_without_cache():
    """More rows than the kernel takes (torch's products), and a forward without a cache (the
    plain model's), still equal the plain model."""
    model = pair(**CASES["mha-untied"])[0]
    backend = CpuDecodeBackend(model)
    prompts = [[i + 1, 2 * i + 3, 5] for i in range(cpu_kernels.MAX_ROWS + 3)]
    _assert_close(_logits(backend, model, prompts, 3), _logits(model, model, prompts, 3), torch.float32)
    ids = torch.tensor(PROMPTS[:1])
    with torch.inference_mode():
        torch.testing.assert_close(backend.forward_hidden(ids), model.forward_hidden(ids))


def test_backend_errors_are_the_models():
    model = pair(**CASES["gqa-untied"])[0]
    backend = CpuDecodeBackend(model)
    cache = KVCache.allocate(model.config, num_slots=1, max_seq_len=4)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="outside the KV cache"):
            backend.forward_hidden(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], cache)
        with pytest.raises(ValueError, match="2 key and 3 value layers; the model has 3"):
            backend.forward_hidden(torch.tensor([[5]]), torch.tensor([[0]]), KVCache(cache.k[:2], cache.v))


def test_backend_refuses_a_model_off_the_cpu():
    model = pair(**CASES["gqa-untied"])[0].to("meta")
    with pytest.raises(BackendUnsupported, match="on the CPU; this one is on meta"):
        CpuDecodeBackend(model)


def test_backend_refuses_a_peft_wrapper_and_the_engine_runs_it_plainly():
    """A PeftModel (unmerged LoRA around the model) is refused with a clear error; an engine
    given one runs the wrapper's own forward passes, no backend."""
    peft = pytest.importorskip("peft")
    from aquilachat.engine import Engine
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(pair(**CASES["gqa-untied"])[0], cfg).eval()
    with pytest.raises(BackendUnsupported, match="got PeftModel.*merge_and_unload"):
        CpuDecodeBackend(wrapped)
    engine = Engine(wrapped, max_num_seqs=1, max_model_len=32)
    assert engine.backend is None and engine.runner is wrapped


def _params(model):
    return {name: p for name, p in model.named_parameters()}


def _own_dense_storage(p: torch.Tensor) -> bool:
    return p.is_contiguous() and p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size()


def _train_step(model, ids):
    """One AdamW (fused) step on a next-token loss; gradients and updated parameters by name."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("release", [True, False], ids=["released", "still-served"])
def test_served_model_trains_exactly_as_a_never_served_one(release):
    """An engine serves a model (prefill + decode through the backend); afterwards, released or
    not, the model has the same parameter objects with their own dense storage and trains
    bit-for-bit as the same model never served: equal gradients and equal updated weights."""
    from aquilachat.engine import Engine
    from aquilachat.sampling import SamplingParams
    served, never = pair(**CASES["gqa-untied"])[0], pair(**CASES["gqa-untied"])[0]
    before = _params(served)
    engine = Engine(served, max_num_seqs=2, max_model_len=64, enable_prefix_caching=False)
    assert isinstance(engine.backend, CpuDecodeBackend)
    for prompt in PROMPTS[:2]:
        engine.add(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    if release:
        backend = engine.backend
        engine.release_backend()
        assert engine.backend is None
        with pytest.raises(RuntimeError, match="released"):
            backend.forward_hidden(torch.tensor([[1]]))
    after = _params(served)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(_own_dense_storage(p) for p in after.values())
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    got, want = _train_step(served, ids), _train_step(never, ids)
    for name in want[0]:
        assert torch.equal(got[0][name], want[0][name]), name
        assert torch.equal(got[1][name], want[1][name]), name


def test_engine_runs_the_backend_and_its_release(layer_runs, monkeypatch):
    from aquilachat.engine import Engine
    from aquilachat.sampling import SamplingParams
    model = pair(**CASES["gqa-untied"])[0]
    engine = Engine(model, max_num_seqs=2, max_model_len=64, enable_prefix_caching=False)
    whole = []  # greedy decode steps run whole in one call (where the kernels are)
    real = CpuDecodeBackend.decode_greedy
    monkeypatch.setattr(CpuDecodeBackend, "decode_greedy",
                        lambda self, *a, **k: (lambda out: out and whole.append(len(out[0])) or out)(real(self, *a, **k)))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add(PROMPTS[0], params)
    while engine.has_unfinished():
        engine.step()
    # prefill + 2 decode steps, 3 layers each, the decode steps whole when the kernels are built
    assert (len(layer_runs), whole) == ((3, [1, 1]) if engine.backend.uses_kernels else (3 * 3, []))
    engine.backend.fuse_steps = False  # op by op: every layer through the backend's loop
    engine.add(PROMPTS[0], params)
    while engine.has_unfinished():
        engine.step()
    runs = len(layer_runs)
    assert runs - (3 if whole else 3 * 3) == 3 * 3
    engine.release_backend()
    engine.add(PROMPTS[0], params)
    while engine.has_unfinished():
        engine.step()
    assert len(layer_runs) == runs and len(whole) <= 2


def test_engine_greedy_picks_through_the_backend(monkeypatch):
    """Greedy steps take the backend's max_rows (one per step, on the plain greedy path and on
    the sampler's full path with a penalty) and choose the same tokens as the sampler's own
    torch path on the same logits (max_rows disabled)."""
    from aquilachat.engine import Engine
    from aquilachat.sampling import SamplingParams
    model = pair(**CASES["gqa-untied"])[0]
    engine = Engine(model, max_num_seqs=2, max_model_len=64, enable_prefix_caching=False)
    if engine.backend is None or engine.backend._kernels is None:
        pytest.skip("no CPU kernels here")
    engine.backend.fuse_steps = False  # single steps op by op (plain greedy ones otherwise run whole)
    real, calls = engine.backend.max_rows, []
    monkeypatch.setattr(engine.backend, "max_rows", lambda x: calls.append(x.shape) or real(x))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run():
        outs = {}
        for p in PROMPTS[:2]:
            engine.add(p, params)
        while engine.has_unfinished():
            for out in engine.step():
                outs.setdefault(out.seq.seq_id, out.seq.output_ids)
        return list(outs.values())

    got = run()
    assert len(calls) == 8 and all(c[1] == model.config.vocab_size for c in calls)
    params = params.replace(repetition_penalty=1.3)  # the sampler's full path: sanitized logits
    got_penalized = run()
    assert len(calls) == 16 and got_penalized != got
    monkeypatch.setattr(engine.backend, "max_rows", lambda x: None)
    assert run() == got_penalized
    params = params.replace(repetition_penalty=1.0)
    assert run() == got
    engine.backend.fuse_steps = True  # whole steps: the kernels' own greedy pick, the same tokens
    monkeypatch.setattr(engine.backend, "max_rows", lambda x: calls.append(x.shape) or real(x))
    calls.clear()
    assert run() == got and len(calls) == 1  # only the prefill step (both prompts) took max_rows


class _PackedLinear(nn.Module):
    """A linear-like leaf module without a ``weight`` attribute (as a quantized linear): the
    backend must call it, never read its weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", linear.weight.detach().t().contiguous())
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x @ self.packed).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_like_modules_are_called_through_the_module(dtype, layer_runs):
    """Quantized linears (aquilachat.quantization) have no float weight to read: the backend calls
    such modules and still computes the rest of the layer itself."""
    model = pair(dtype=dtype, **CASES["gqa-untied"])[0]
    for layer in model.model.layers:
        layer.mlp.down_proj = _PackedLinear(layer.mlp.down_proj)
        layer.self_attn.k_proj = _PackedLinear(layer.self_attn.k_proj)
    model.lm_head = _PackedLinear(model.lm_head)
    got = _logits(CpuDecodeBackend(model), model, PROMPTS, 3)
    assert len(layer_runs) == 4 * 3
    calls = model.model.layers[0].mlp.down_proj.calls
    assert calls == 4 and model.lm_head.calls == 4
    _assert_close(got, _logits(model, model, PROMPTS, 3), dtype)


CHANGES = ["forward-hook", "forward-pre-hook", "global-hook", "peft-lora", "peft-merged", "weight-storage", "load-assign",
           "module-replaced", "layer-replaced", "accelerate-style-forward", "class-swapped", "fp32-cache", "autocast",
           "autograd", "train-mode", "to-bf16"]


def _apply_change(change, m, handles):
    """Make ``change`` to ``m`` (after a backend was created for it); returns the cache dtype."""
    layer = m.model.layers[1]
    if change == "forward-hook":
        handles.append(layer.mlp.register_forward_hook(lambda mod, args, y: y * 0.5))
    elif change == "forward-pre-hook":
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 2,)))
    elif change == "global-hook":
        handles.append(torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, y: y * 0.5 if isinstance(mod, nn.Linear) and y.shape[-1] == 176 else None))
    elif change == "peft-lora":
        import peft
        torch.manual_seed(0)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0,
                              init_lora_weights=False)
        peft.get_peft_model(m, cfg)  # injects unmerged LoRA layers into m's modules
    elif change == "peft-merged":
        import peft
        torch.manual_seed(0)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0,
                              init_lora_weights=False)
        peft.get_peft_model(m, cfg).merge_and_unload()  # plain nn.Linear modules again, merged weights
    elif change == "weight-storage":
        with torch.no_grad():
            layer.self_attn.k_proj.weight.data = layer.self_attn.k_proj.weight.data * 1.5
    elif change == "load-assign":
        other = pair(seed=1, dtype=m.dtype, **CASES["gqa-untied"])[0]
        m.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    elif change == "module-replaced":
        new = nn.Linear(176, 64, bias=False, dtype=m.dtype)
        with torch.no_grad():
            new.weight.copy_(torch.randn(64, 176, generator=torch.Generator().manual_seed(4)) * 0.02)
        layer.mlp.down_proj = new
    elif change == "layer-replaced":
        m.model.layers[2] = pair(seed=5, dtype=m.dtype, **CASES["gqa-untied"])[0].model.layers[2]
    elif change == "accelerate-style-forward":  # an instance attribute, as accelerate's add_hook_to_module
        o_proj = layer.self_attn.o_proj
        o_proj.forward = lambda x, _forward=o_proj.forward: _forward(x) * 0.5
    elif change == "class-swapped":
        class HalfMLP(type(layer.mlp)):
            def forward(self, x):
                return super().forward(x) * 0.5
        layer.mlp.__class__ = HalfMLP
    elif change == "train-mode":
        m.train()
    elif change == "to-bf16":
        m.to(torch.bfloat16)
    return torch.float32 if change == "fp32-cache" else m.dtype


def _steps(runner, model, ids, cache_dtype, grad=False, autocast=False):
    """Prefill 3 tokens of each row into a cache, then feed the rest one at a time; logits."""
    cache = KVCache.allocate(model.config, num_slots=ids.shape[0], max_seq_len=16, dtype=cache_dtype)
    with torch.inference_mode(not grad), torch.set_grad_enabled(grad), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = [runner.compute_logits(runner.forward_hidden(ids[:, :3], None, cache))[:, -1]]
        for t in range(3, ids.shape[1]):
            hidden = runner.forward_hidden(ids[:, t:t + 1], torch.full((ids.shape[0], 1), t), cache)
            out.append(runner.compute_logits(hidden)[:, 0])
    return torch.stack(out, 1).detach().float()


@pytest.mark.parametrize("change", CHANGES)
def test_backend_steps_aside_for_what_it_does_not_see(change, layer_runs):
    """Hooks, unmerged or merged LoRA, replaced or class-swapped modules, an instance-level forward, new
    weight storage, autograd, autocast, training mode, a dtype change, all made after the
    backend was created: the backend's logits equal the plain model's with the same change, and
    the layers it cannot see run through their modules."""
    if change.startswith("peft"):
        pytest.importorskip("peft")
    dtype = torch.bfloat16 if change == "fp32-cache" else torch.float32
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    out, handles = [], []
    for use_backend in (False, True):
        m = pair(dtype=dtype, **CASES["gqa-untied"])[0]
        runner = CpuDecodeBackend(m) if use_backend else m
        cache_dtype = _apply_change(change, m, handles)
        try:
            out.append(_steps(runner, m, ids, cache_dtype, grad=change == "autograd", autocast=change == "autocast"))
        finally:
            for h in handles:
                h.remove()
            handles.clear()
    low = m.dtype != torch.float32 or change == "autocast"
    _assert_close(out[1], out[0], torch.bfloat16 if low else torch.float32)
    per_forward = {"forward-hook": 2, "forward-pre-hook": 2, "peft-lora": 0, "peft-merged": 3, "module-replaced": 3,
                   "accelerate-style-forward": 2, "class-swapped": 2, "weight-storage": 3, "load-assign": 3,
                   "layer-replaced": 3, "fp32-cache": 3, "to-bf16": 3}.get(change, 0)
    assert len(layer_runs) == 5 * per_forward  # 5 forwards: the layers the backend could still run itself


def test_kernel_switch_off_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("AQUILACHAT_CPU_KERNELS", "0")
    assert cpu_kernels.load() is None and "AQUILACHAT_CPU_KERNELS=0" in cpu_kernels.load_error()
    model = pair(**CASES["gqa-untied"])[0]
    assert not CpuDecodeBackend(model).uses_kernels
    with pytest.raises(BackendUnsupported, match="not available"):
        CpuDecodeBackend(model, kernels=True)
    x, w = torch.randn(2, 64), torch.randn(30, 64)
    assert torch.equal(cpu_kernels.linear(x, w), F.linear(x, w))


def _assert_product_close(got, want, scale, dtype, where):
    """A kernel's product ``got [M, N]`` against the float64 ``want``: fp32 within 1e-5 of ``scale``
    (sum |x||w| per output), bf16 also within one bf16 rounding of the result (2^-8 relative)."""
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want).abs()
    bound = 1e-5 * scale if dtype == torch.float32 else 2.0 ** -8 * want.abs() + 1e-5 * scale
    assert (err <= bound).all(), (*where, float((err - bound).max()))


def _kernel_levels():
    ext = cpu_kernels.load()
    return list(range(ext.cpu_level() + 1)) if ext is not None else []


def _ext_and_levels():
    """The extension and every instruction level this CPU runs (skips the test without it)."""
    levels = _kernel_levels()
    if not levels:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    return cpu_kernels.load(), levels


def test_kernel_products_run_on_torchs_threads():
    """The extension's parallel regions use torch's intra-op threads (it is built with -fopenmp;
    without it at::parallel_for silently runs every product on one thread), and a product's
    result does not depend on how many threads computed it (each output row is one thread's)."""
    ext = cpu_kernels.load()
    if ext is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 512, generator=gen), torch.randn(4096, 512, generator=gen)
    try:
        torch.set_num_threads(1)
        assert ext.parallel_threads(64) == 1
        one = {dt: cpu_kernels.linear(x.to(dt), w.to(dt)) for dt in (torch.float32, torch.bfloat16)}
        if (os.cpu_count() or 1) >= 2:
            torch.set_num_threads(2)
            assert ext.parallel_threads(64) == 2
            for dt in (torch.float32, torch.bfloat16):
                assert torch.equal(cpu_kernels.linear(x.to(dt), w.to(dt)), one[dt])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_equals_float64_product_at_every_level(dtype):
    """The compiled product at every instruction level this CPU runs (generic C++, AVX2,
    AVX-512, AVX512_BF16) against a float64 product of the same values, over row counts and
    shapes with and without vector-width tails. fp32: within 1e-5 of sum |x||w|; bf16: the
    result rounded once to bf16 (2^-8 relative) plus fp32 summation error."""
    ext, levels = _ext_and_levels()
    gen = torch.Generator().manual_seed(0)
    for M in range(1, cpu_kernels.MAX_ROWS + 1):
        for N, K in [(1, 1), (7, 33), (37, 64), (300, 176), (1029, 96), (96, 1031)]:
            x = torch.randn(M, K, generator=gen).to(dtype)
            w = torch.randn(N, K, generator=gen).to(dtype)
            want = x.double() @ w.double().T
            scale = x.double().abs() @ w.double().abs().T
            for level in levels:
                _assert_product_close(ext.linear(x, w, level), want, scale, dtype, (M, N, K, level))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_gives_each_row_the_same_result_whatever_the_batch(dtype):
    """Batch invariance: a row's product is bit-identical alone and among up to MAX_ROWS rows (in
    any position), at every level, so a sequence's decode steps and logits do not depend on the
    other sequences in the step."""
    ext, levels = _ext_and_levels()
    gen = torch.Generator().manual_seed(1)
    # one input row reads a thread's rows as STREAMS parts side by side, more rows go R rows at a
    # time (cpu_kernels_body.h); 1030 rows leave rows over after the parts at 1-3 threads; 203
    # inputs: a vector-width tail, 2100: a long row, in both dtypes
    for K in (203, 2100):
        x = torch.randn(cpu_kernels.MAX_ROWS, K, generator=gen).to(dtype)
        w = torch.randn(1030, K, generator=gen).to(dtype)
        for level in levels:
            alone = torch.cat([ext.linear(x[i:i + 1], w, level) for i in range(x.shape[0])])
            for rows in (2, 5, cpu_kernels.MAX_ROWS):
                assert torch.equal(ext.linear(x[:rows], w, level), alone[:rows]), (K, level, rows)
                assert torch.equal(ext.linear(x[-rows:], w, level), alone[-rows:]), (K, level, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_one_row_bits_do_not_depend_on_the_thread_count(dtype):
    """At one input row each thread cuts its range of rows into STREAMS parts (cpu_kernels_body.h,
    `streams`), so the parts and the rows left over after them move with the split: one, two and
    three threads give the same bits as the same row among three rows at one thread, at every
    level (4099, 1029 and 1030 rows: uneven shares of more rows than a task's grain; 17 and 203
    inputs: a tail at every vector width). Torch's thread count, not the CPU's cores, sets the
    split, so this runs the split path on a one-core machine too."""
    ext, levels = _ext_and_levels()
    gen = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    try:
        for K, N in ((17, 4099), (203, 1029), (2100, 1030)):
            x = torch.randn(3, K, generator=gen).to(dtype)
            w = torch.randn(N, K, generator=gen).to(dtype)
            for level in levels:
                torch.set_num_threads(1)
                want = ext.linear(x, w, level)[1:2]  # more than one row: R rows at a time, no parts
                for threads in (1, 2, 3):
                    torch.set_num_threads(threads)
                    assert torch.equal(ext.linear(x[1:2].contiguous(), w, level), want), (K, N, level, threads)
    finally:
        torch.set_num_threads(before)


def test_kernel_wrapper_hands_other_inputs_to_torch():
    """Too many rows, mixed dtypes, a non-contiguous weight, autograd: F.linear's result."""
    if cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    w = torch.randn(40, 24)
    for x, weight in [(torch.randn(cpu_kernels.MAX_ROWS + 1, 24), w), (torch.randn(2, 24), w.t().contiguous().t()),
                      (torch.randn(2, 24).bfloat16(), w)]:
        if x.dtype != weight.dtype:
            with pytest.raises(RuntimeError):
                cpu_kernels.linear(x, weight)
            continue
        assert torch.equal(cpu_kernels.linear(x, weight), F.linear(x, weight))
    wg = w.clone().requires_grad_()
    y = cpu_kernels.linear(torch.randn(2, 24), wg)
    assert y.requires_grad and y.grad_fn is not None


def _int8_operands(M, N, K, dtype, gen):
    x = torch.randn(M, K, generator=gen).to(dtype)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    scales = (torch.rand(N, generator=gen) * 1e-2 + 1e-4).to(dtype)
    return x, q, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_kernel_equals_float64_product_at_every_level(dtype):
    """The int8 product ``(x @ q.T) * scales`` at every instruction level this CPU runs (generic
    C++, AVX2, AVX-512; level 3 runs the AVX-512 one) against float64 of the same values, over
    row counts and shapes with and without vector-width tails. Tolerance: fp32 sums of K
    products, each exact in fp32 (a bf16 or fp32 input times a code of 8 bits: for fp32 input
    rounded once), so within 1e-5 of sum |x||q| scale (K <= 1031: K * 2^-24 ~ 6e-5 worst
    case, ~sqrt(K) * 2^-24 typical); bf16 output: plus the final rounding, 2^-8 relative."""
    ext, levels = _ext_and_levels()
    gen = torch.Generator().manual_seed(2)
    for M in (1, 2, 3, 4, 5, 7, 8, 9, 17, cpu_kernels.MAX_ROWS):
        for N, K in [(1, 1), (7, 33), (37, 64), (300, 176), (1029, 96), (96, 1031), (5, 15)]:
            x, q, scales = _int8_operands(M, N, K, dtype, gen)
            want = (x.double() @ q.double().T) * scales.double()
            scale = (x.double().abs() @ q.double().abs().T) * scales.double()
            for level in levels:
                _assert_product_close(ext.linear_int8(x, q, scales, level), want, scale, dtype, (M, N, K, level))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_kernel_gives_each_row_the_same_result_whatever_the_batch(dtype):
    """Batch invariance of the int8 product, as for the float one: a row's bits alone equal its
    bits among up to MAX_ROWS rows, in any position, at every level."""
    ext, levels = _ext_and_levels()
    x, q, scales = _int8_operands(cpu_kernels.MAX_ROWS, 1030, 203, dtype, torch.Generator().manual_seed(3))
    for level in levels:
        alone = torch.cat([ext.linear_int8(x[i:i + 1], q, scales, level) for i in range(x.shape[0])])
        for rows in (2, 3, 5, cpu_kernels.MAX_ROWS):
            assert torch.equal(ext.linear_int8(x[:rows], q, scales, level), alone[:rows]), (level, rows)
            assert torch.equal(ext.linear_int8(x[-rows:], q, scales, level), alone[-rows:]), (level, rows)


def test_int8_kernel_wrapper_hands_other_inputs_to_torch(monkeypatch):
    """More than MAX_ROWS rows: a float product of the weight dequantized by the extension
    (exactly q * scale in fp32); autograd and kernels switched off: torch's _weight_int8pack_mm;
    bad operands: a clear error from the kernel."""
    if cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    gen = torch.Generator().manual_seed(4)
    x, q, scales = _int8_operands(cpu_kernels.MAX_ROWS + 1, 40, 64, torch.float32, gen)
    torch_op = torch.ops.aten._weight_int8pack_mm
    ext = cpu_kernels.load()
    assert torch.equal(ext.dequantize_int8(q, scales, 3, 17), q[3:17].float() * scales[3:17, None])
    bf = scales.to(torch.bfloat16)
    assert torch.equal(ext.dequantize_int8(q, bf, 0, 40), (q.float() * bf.float()[:, None]).to(torch.bfloat16))
    want = (x.double() @ q.double().T) * scales.double()
    _assert_product_close(cpu_kernels.linear_int8(x, q, scales), want,
                          (x.double().abs() @ q.double().abs().T) * scales.double(), torch.float32, ("rows",))
    xg = x[:2].clone().requires_grad_()
    assert torch.equal(cpu_kernels.linear_int8(xg, q, scales), torch_op(xg, q, scales))
    with pytest.raises(RuntimeError, match="columns"):
        ext.linear_int8(x[:, :63].contiguous(), q, scales, 2)
    with pytest.raises(RuntimeError, match="scales"):
        ext.linear_int8(x, q, scales[:-1], 2)
    with pytest.raises(RuntimeError, match="int8"):
        ext.linear_int8(x, q.to(torch.int16), scales, 2)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("AQUILACHAT_CPU_KERNELS", "0")
    assert torch.equal(cpu_kernels.linear_int8(x[:2], q, scales), torch_op(x[:2], q, scales))


def _int4_operands(M, N, K, group_size, dtype, gen):
    """x [M, K], portable int4 checkpoint tensors of a random [N, K] weight, and its float64
    dequantized weight (the reference)."""
    from aquilachat.quantization import dequantize, quantize_weight
    x = torch.randn(M, K, generator=gen).to(dtype)
    tensors = quantize_weight(torch.randn(N, K, generator=gen), "int4", group_size=group_size, dtype=dtype)
    return x, tensors, dequantize(tensors, "int4").double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int4_kernel_equals_float64_product_at_every_level(dtype):
    """Our int4 product in its own layout at every instruction level this CPU runs (generic C++,
    AVX2, AVX-512 fp32 multiply-adds; AVX512_BF16's VDPBF16PS on codes made bfloat16 by 0x4300 | q)
    against float64 of the same inputs and dequantized weight, for group sizes 32, 64 and 128, one
    to five rows and a batch of MAX_ROWS. Tolerance as the float kernels': fp32 sums (the codes and
    bf16 inputs are exact in the sums' products), the bf16 result rounded once. Each row's bits do
    not depend on the rows beside it."""
    levels = _kernel_levels()
    if not levels:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    from aquilachat.quantization import Int4Linear
    ext = cpu_kernels.load()
    gen = torch.Generator().manual_seed(11)
    for N, K, group_size in ((48, 64, 32), (64, 256, 64), (32, 384, 128), (208, 192, 32)):
        x, tensors, w = _int4_operands(cpu_kernels.MAX_ROWS, N, K, group_size, dtype, gen)
        m = Int4Linear.from_tensors(tensors, in_features=K, out_features=N, dtype=dtype, layout="aquilachat")
        assert m.scales_and_zeros.shape == (N // 16, K // group_size, 16, 2)
        for level in levels:
            alone = torch.cat([ext.linear_int4(x[i:i + 1], m.weight, m.scales_and_zeros, level) for i in range(6)])
            for M in (1, 2, 3, 4, 5):
                got = ext.linear_int4(x[:M], m.weight, m.scales_and_zeros, level)
                _assert_product_close(got, x[:M].double() @ w.T, x[:M].double().abs() @ w.abs().T, dtype,
                                      (N, K, group_size, level, M))
                assert torch.equal(got, alone[:M]), (N, K, group_size, level, M)
            batch = ext.linear_int4(x, m.weight, m.scales_and_zeros, level)
            assert torch.equal(batch[:6], alone), (N, K, group_size, level)
            _assert_product_close(batch, x.double() @ w.T, x.double().abs() @ w.abs().T, dtype, (level, "batch"))


def test_int4_layouts_and_dequantized_rows_agree():
    """The kernel's layout against torch's (Int4Linear layout "torch", _weight_int4pack_mm_for_cpu)
    on the same checkpoint tensors: the extension dequantizes rows to exactly the reference
    weight (fp32) or its bf16 rounding. Both layouts' products, up to MAX_ROWS rows (our kernel)
    and beyond (our dequantized blocks through torch's product), equal the float64 product within
    fp32 summation; in bf16 also within the result's rounding and, past MAX_ROWS, the rounding of
    each dequantized weight to bf16 (2^-9 relative each: 2^-8 of sum |x||w| bounds it). Bad
    operands get a clear error."""
    if cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    from aquilachat.quantization import Int4Linear
    ext = cpu_kernels.load()
    gen = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16):
        x, tensors, w = _int4_operands(cpu_kernels.MAX_ROWS + 3, 96, 128, 32, dtype, gen)
        ours = Int4Linear.from_tensors(tensors, in_features=128, out_features=96, dtype=dtype)
        theirs = Int4Linear.from_tensors(tensors, in_features=128, out_features=96, dtype=dtype, layout="torch")
        assert ours.layout == "aquilachat" and ours.weight.shape == theirs.weight.shape
        rows = ext.dequantize_int4(ours.weight, ours.scales_and_zeros, 16, 64)
        assert torch.equal(rows, w[16:64].to(dtype)), dtype
        for M in (1, 4, cpu_kernels.MAX_ROWS + 3):
            want = x[:M].double() @ w.T
            scale = x[:M].double().abs() @ w.abs().T
            if dtype == torch.bfloat16 and M > cpu_kernels.MAX_ROWS:
                scale = scale * (1 + 2.0 ** -8 / 1e-5)
            for layout, got in (("aquilachat", ours(x[:M])), ("torch", theirs(x[:M]))):
                _assert_product_close(got, want, scale, dtype, (dtype, M, layout))
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ext.dequantize_int4(ours.weight, ours.scales_and_zeros, 8, 32)
    with pytest.raises(RuntimeError, match=r"x \[M, 128\]"):
        ext.linear_int4(x[:, :64].contiguous(), ours.weight, ours.scales_and_zeros, 3)
    with pytest.raises(RuntimeError, match="scales_and_zeros"):
        ext.linear_int4(x, ours.weight, ours.scales_and_zeros[:2], 3)
    with pytest.raises(RuntimeError, match="N % 16"):
        ext.linear_int4(x, ours.weight[:40], ours.scales_and_zeros, 3)


def test_int8_blocked_layout_holds_each_code_where_documented():
    """Int8Linear's "aquilachat" layout (pure torch, any CPU), decoded byte by byte from its
    documented description: for row block b, inputs 4c .. 4c + 3 and lane l, the 4 bytes at
    ((b * K/4 + c) * 16 + l) * 4 hold lo nibbles in bytes 0-1 and hi nibbles in bytes 2-3, input
    4c + p in nibble p; lo | hi << 4 = q + 128; rows past N are q = 0."""
    from aquilachat.quantization import _blocked_int8_codes
    gen = torch.Generator().manual_seed(4)
    N, K = 37, 64
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    packed = _blocked_int8_codes(q, 48)
    assert packed.shape == (48, K) and packed.dtype == torch.uint8
    flat = packed.flatten().tolist()
    for n in range(48):
        for k in range(K):
            b, l, c, p = n // 16, n % 16, k // 4, k % 4
            lane = flat[((b * (K // 4) + c) * 16 + l) * 4:][:4]
            lo = (lane[p // 2] >> (4 * (p % 2))) & 15
            hi = (lane[2 + p // 2] >> (4 * (p % 2))) & 15
            assert (lo | hi << 4) - 128 == (int(q[n, k]) if n < N else 0), (n, k)


def test_int8_blocked_kernel_equals_float64_product():
    """The AVX512_BF16 int8 product in the blocked layout (VDPBF16PS on (16 + lo, 256 + 16 hi) per
    code, the offset 400 X removed per group of 32 inputs) against float64 of the same values, for
    row counts 1-5, 9 and MAX_ROWS, row counts N with and without a partial last block of 16, and
    widths 32 to 4096; each row's bits alone equal its bits in any batch; dequantized rows equal
    q * scale rounded to bf16 once. Tolerance: the sums' terms are (400 + q) x, exact products,
    summed in fp32 per group of 32 and then across groups: within 1e-5 of sum (400 + |q|) |x| scale,
    plus the bf16 rounding of the result (2^-8 relative). The dequantization runs on any CPU."""
    ext = cpu_kernels.load()
    if ext is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    from aquilachat.quantization import Int8Linear
    gen = torch.Generator().manual_seed(6)
    for N, K in ((40, 64), (16, 32), (100, 4096), (37, 96), (300, 224)):
        x, q, scales = _int8_operands(cpu_kernels.MAX_ROWS, N, K, torch.bfloat16, gen)
        m = Int8Linear.from_tensors({"weight": q, "scales": scales}, in_features=K, out_features=N,
                                    dtype=torch.bfloat16, layout="aquilachat")
        assert m.weight.shape == (-(-N // 16) * 16, K)
        rows = ext.dequantize_int8_blocked(m.weight, scales, 16, N)
        assert torch.equal(rows, (q[16:].float() * scales[16:].float()[:, None]).bfloat16()), (N, K)
        if ext.cpu_level() < 3:
            continue
        want = (x.double() @ q.double().T) * scales.double()
        terms = (x.double().abs() @ (400 + q.double().abs()).T) * scales.double()
        alone = torch.cat([ext.linear_int8_blocked(x[i:i + 1], m.weight, scales, 3) for i in range(10)])
        for M in (1, 2, 3, 4, 5, 9):
            got = ext.linear_int8_blocked(x[:M], m.weight, scales, 3)
            _assert_product_close(got, want[:M], terms[:M], torch.bfloat16, (N, K, M))
            assert torch.equal(got, alone[:M]), (N, K, M)
        batch = ext.linear_int8_blocked(x, m.weight, scales, 3)
        assert torch.equal(batch[:10], alone), (N, K)
        _assert_product_close(batch, want, terms, torch.bfloat16, (N, K, "batch"))


def test_int8_layouts_agree_and_bad_operands_get_clear_errors():
    """Int8Linear in the blocked layout against the plain one on the same checkpoint tensors, up
    to MAX_ROWS rows (the two kernels) and beyond (the dequantized blocks through torch's
    product): both within their bounds of the float64 product (fp32 sums, the bf16 result and,
    past MAX_ROWS, the weight's bf16 rounding: 2^-8 of sum |x||w|). The default layout is the
    blocked one exactly where its kernel runs. Bad operands get a clear error."""
    ext = cpu_kernels.load()
    if ext is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    from aquilachat.quantization import Int8Linear
    gen = torch.Generator().manual_seed(8)
    x, q, scales = _int8_operands(cpu_kernels.MAX_ROWS + 3, 40, 128, torch.bfloat16, gen)
    tensors = {"weight": q, "scales": scales}
    plain = Int8Linear.from_tensors(tensors, in_features=128, out_features=40, dtype=torch.bfloat16, layout="plain")
    default = Int8Linear.from_tensors(tensors, in_features=128, out_features=40, dtype=torch.bfloat16)
    assert default.layout == ("aquilachat" if cpu_kernels.level() >= 3 else "plain")
    assert Int8Linear(128, 40, dtype=torch.float32, device="meta").layout == "plain"
    assert Int8Linear(120, 40, dtype=torch.bfloat16, device="meta").layout == "plain"  # 120 % 32
    want = (x.double() @ q.double().T) * scales.double()
    total = (x.double().abs() @ q.double().abs().T) * scales.double()
    for M in (1, 4, cpu_kernels.MAX_ROWS + 3):
        slack = 2 ** -8 if M > cpu_kernels.MAX_ROWS else 1e-5 * 8  # (400 + |q|) / |q| ~ 8 for uniform codes
        for module in (plain, default):
            err = (module(x[:M]).double() - want[:M]).abs()
            assert (err <= 2 ** -8 * want[:M].abs() + slack * total[:M]).all(), (module.layout, M)
    with pytest.raises(ValueError, match="bfloat16 and in_features % 32"):
        Int8Linear(120, 40, dtype=torch.bfloat16, device="meta", layout="aquilachat")
    blocked = Int8Linear.from_tensors(tensors, in_features=128, out_features=40, dtype=torch.bfloat16,
                                      layout="aquilachat")
    with pytest.raises(RuntimeError, match="pad 41 scales"):
        ext.linear_int8_blocked(x, blocked.weight[:32], torch.cat([scales, scales[:1]]), 3)
    with pytest.raises(RuntimeError, match="bfloat16 CPU x"):
        ext.linear_int8_blocked(x.float(), blocked.weight, scales, 3)
    with pytest.raises(RuntimeError, match="level 2 here"):
        ext.linear_int8_blocked(x, blocked.weight, scales, 2)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.dequantize_int8_blocked(blocked.weight, scales, 8, 40)


def test_called_as_is_sees_hooks_and_instance_forward():
    lin = nn.Linear(4, 4, bias=False)
    assert _called_as_is(lin, nn.Linear)
    handle = lin.register_forward_hook(lambda *a: None)
    assert not _called_as_is(lin, nn.Linear)
    handle.remove()
    lin.forward = lambda x: x
    assert not _called_as_is(lin, nn.Linear)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "no-kernels"])
def test_int8_bf16_widths_torch_gets_wrong_never_reach_it(monkeypatch, kernels):
    """bfloat16 input whose width is not a multiple of 64 (torch 2.13's _weight_int8pack_mm returns
    NaN or crashes on it): any row count, with or without our kernels, equals the fp32 product of
    the dequantized weight within the bf16 rounding of the result (and, for more than MAX_ROWS
    rows with the kernels, of the weight dequantized to bf16)."""
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_state", {})
        monkeypatch.setenv("AQUILACHAT_CPU_KERNELS", "0")
    elif cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    gen = torch.Generator().manual_seed(5)
    for K in (40, 200):
        for M in (1, 9, cpu_kernels.MAX_ROWS + 6):
            x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
            q = torch.randint(-127, 128, (1100, K), generator=gen, dtype=torch.int8)
            scales = (torch.rand(1100, generator=gen) / 100).to(torch.bfloat16)
            ref = (x.double() @ q.double().T) * scales.double()
            y = cpu_kernels.linear_int8(x, q, scales)
            assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
            total = (x.double().abs() @ q.double().abs().T) * scales.double()
            # past MAX_ROWS the kernels' path multiplies the weight dequantized to bf16 (each
            # weight rounded, 2^-9 relative)
            slack = 2 ** -8 if kernels and M > cpu_kernels.MAX_ROWS else 1e-5
            bound = 2 ** -8 * ref.abs() + slack * total
            assert ((y.double() - ref).abs() <= bound).all(), (K, M)


# fused decode ops: bf16 results may differ from torch's by the rounding of differently ordered
# fp32 sums: one bf16 ulp (2^-7 relative) of the largest output; 2 ulps allowed
BF16_OP_BOUND = 2 ** -6


def _fused_operands(dtype, gen):
    """A GQA decode step of 3 rows at ragged positions in slots (2, 0, 3) of a 4-slot cache."""
    B, H, Hkv, D, S = 3, 6, 2, 16, 40
    q, k, v = (torch.randn(B, h, D, generator=gen).to(dtype) for h in (H, Hkv, Hkv))
    caches = [torch.randn(4, Hkv, S, D, generator=gen).to(dtype) for _ in range(2)]
    return q, k, v, caches, torch.tensor([2, 0, 3]), torch.tensor([5, 0, 31])


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_decode_ops_equal_the_models_functions(dtype, kernels, monkeypatch):
    """cpu_kernels.rms_norm / rotate / decode_attend against model.rms_norm / rotate / attend on
    the same values (the kernels' code is the same at every instruction level; the fallback runs
    when the extension is missing): RMSNorm within fp32 summation order (bf16: 2 ulps), rotary
    bit-identical, attention within 1e-5 (bf16: 2 ulps of the largest output) and the cache
    written at exactly the same places with the same values."""
    from aquilachat.model import LayerInputs, attend, rms_norm, rotate
    if kernels and cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_state", {"ext": None, "error": "test: no extension"})
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 200, generator=gen).to(dtype) * 3, torch.randn(200, generator=gen).to(dtype)
    got, want = cpu_kernels.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    else:
        assert (got.float() - want.float()).abs().max() <= BF16_OP_BOUND * want.float().abs().max()

    q, k, v, (k_cache, v_cache), slot_ids, pos = _fused_operands(dtype, gen)
    B, H, D = q.shape
    Hkv, S = k.shape[1], k_cache.shape[2]
    cos, sin = torch.randn(B, D, generator=gen).to(dtype), torch.randn(B, D, generator=gen).to(dtype)
    for t, heads in ((q, H), (k, Hkv)):
        assert torch.equal(cpu_kernels.rotate(t, cos, sin), rotate(t[:, None], cos[:, None, None], sin[:, None, None])[:, 0])

    kv_len = int(pos.max()) + 1
    flat_index = ((slot_ids[:, None] * Hkv + torch.arange(Hkv)) * S + pos[:, None]).view(-1)  # (B * Hkv)
    mask = (torch.arange(kv_len)[None, None, :] <= pos[:, None, None])[:, None]  # (B, 1, 1, kv_len)
    inputs = LayerInputs(cos, sin, (slot_ids, flat_index, slot_ids, pos[:, None]), mask, kv_len)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = attend(q[:, None], k[:, None], v[:, None], (want_k, want_v), inputs)[:, 0]  # (B, H * D)
    got = cpu_kernels.decode_attend(q, k, v, k_cache, v_cache, slot_ids, pos)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert (got.float() - want.float()).abs().max() <= BF16_OP_BOUND * want.float().abs().max()


def test_decode_attend_refuses_positions_outside_the_cache():
    ext = cpu_kernels.load()
    if ext is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    q, k, v, (k_cache, v_cache), slot_ids, pos = _fused_operands(torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="position 40 outside"):
        ext.decode_attend(q, k, v, k_cache, v_cache, slot_ids, torch.tensor([5, 40, 1]))
    with pytest.raises(RuntimeError, match="slot 4 outside"):
        ext.decode_attend(q, k, v, k_cache, v_cache, torch.tensor([4, 0, 1]), pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_layer_equals_the_op_by_op_path(case, dtype, layer_runs):
    """A decode step's layer in one call (ext.decode_layer, ``fuse_layers``) gives bit for bit the
    logits of the same ops called one by one, over a ragged prefill and 6 teacher-forced steps
    (MHA, GQA, MQA); a layer it cannot take whole (here a non-contiguous weight, which goes to
    torch's product) runs op by op in the same step, the others whole, and the logits equal the
    op-by-op path's again."""
    if cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    model = pair(dtype=dtype, **CASES[case])[0]
    backend = CpuDecodeBackend(model, kernels=True)
    calls = []
    real = backend._kernels

    class Spy:
        def __getattr__(self, name):
            return lambda *a: calls.append(name) or getattr(real, name)(*a)

    backend._kernels = Spy()
    backend.fuse_layers = False
    want = _logits(backend, model, PROMPTS, 6)
    assert "decode_layer" not in calls
    backend.fuse_layers = True
    assert torch.equal(_logits(backend, model, PROMPTS, 6), want)
    assert calls.count("decode_layer") == 6 * 3
    up = model.model.layers[1].mlp.up_proj
    up.weight = nn.Parameter(up.weight.detach().t().contiguous().t(), requires_grad=False)  # same values
    assert not up.weight.is_contiguous()
    backend.fuse_layers = False
    want = _logits(backend, model, PROMPTS, 6)  # that product now goes to torch: other bits
    backend.fuse_layers = True
    calls.clear()
    assert torch.equal(_logits(backend, model, PROMPTS, 6), want)
    assert calls.count("decode_layer") == 6 * 2 and calls.count("decode_attend") == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", [(3, 96, 200, 6, 2, 16, 40), (7, 100, 37, 5, 1, 10, 9)], ids=["gqa", "mqa-odd"])
def test_fused_layer_bits_do_not_depend_on_the_thread_count(dtype, dims):
    """decode_layer splits each op's rows, heads and elements among the threads of one parallel
    region: one, two and three threads (shares that split rows, heads and elements unevenly) give
    the same output and the same cache, bit for bit (a decode step of ragged rows of a GQA layer,
    and of an MQA layer whose hidden size, head size and MLP width are not multiples of 8)."""
    ext = cpu_kernels.load()
    if ext is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    gen = torch.Generator().manual_seed(5)
    B, C, I, H, Hkv, D, S = dims
    shapes = [(C,), (H * D, C), (Hkv * D, C), (Hkv * D, C), (C, H * D), (C,), (I, C), (I, C), (C, I)]
    weights = [(torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(dtype) for s in shapes]
    x = torch.randn(B, C, generator=gen).to(dtype)
    slots = B + 2
    caches = [torch.randn(slots, Hkv, S, D, generator=gen).to(dtype) for _ in range(2)]
    cos, sin = torch.randn(B, D, generator=gen).to(dtype), torch.randn(B, D, generator=gen).to(dtype)
    slot_ids = torch.randperm(slots, generator=gen)[:B]  # scattered slots
    pos = torch.randint(0, S, (B,), generator=gen)  # ragged positions, one at the cache's end
    pos[-1] = S - 1
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            k, v = (c.clone() for c in caches)
            out = ext.decode_layer(x, weights, 1e-5, 1e-5, k, v, cos, sin, slot_ids, pos, H, Hkv, cpu_kernels.level())
            results.append((out, k, v))
    finally:
        torch.set_num_threads(threads)
    (out1, k1, v1) = results[0]
    for out2, k2, v2 in results[1:]:
        assert torch.equal(out1, out2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    assert not torch.equal(k1, caches[0])  # the step wrote its keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_equals_torch(dtype):
    """ext.silu_mul (the MLP's silu(gate) * up on the kernels' decode path) against torch's two
    ops: fp32 within 4 ulps (std::exp against torch's vectorised exp), bf16 within one bf16 ulp of
    the output (a silu rounded to the other side of a bf16 boundary)."""
    ext = cpu_kernels.load()
    if ext is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    gen = torch.Generator().manual_seed(6)
    g = torch.cat([torch.randn(3, 500, generator=gen) * 6, torch.tensor([[0.0, -0.0, 88.0, -88.0, -104.0] * 100])])
    g, u = g.to(dtype), (torch.randn(4, 500, generator=gen) * 2).to(dtype)
    got, want = ext.silu_mul(g, u), F.silu(g) * u
    assert got.dtype == dtype and got.shape == want.shape
    rel = 2 ** -21 if dtype == torch.float32 else 2 ** -7
    assert ((got.double() - want.double()).abs() <= rel * want.double().abs() + 1e-30).all()


def test_max_rows_equals_torch_max():
    """The backend's greedy pick (ext.max_rows) against torch.max(dim=-1) on rows built to trip
    it: ties (the first index wins), NaN anywhere (the first NaN wins), +-inf, all -inf, lengths
    around its 16 lanes and 4096-value chunks; values equal (NaN where torch gives NaN), indices
    identical. Other dtypes, or no kernels, give None (the sampler's own path)."""
    model = pair(**CASES["gqa-untied"])[0]
    backend = CpuDecodeBackend(model, kernels=True)
    if backend._kernels is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    gen = torch.Generator().manual_seed(7)
    nan, inf = float("nan"), float("inf")
    rows = [torch.randn(100008, generator=gen), torch.full((100008,), -inf), torch.zeros(4097),
            torch.randint(0, 2, (100008,), generator=gen).float()]
    rows += [torch.randint(0, 4, (n,), generator=gen).float() for n in range(1, 70)]
    for n, where in ((100008, (500, 70000)), (13, (12,)), (40, (3,)), (40, (39,)), (8200, (4096,)), (16, (0,))):
        r = torch.randn(n, generator=gen)
        r[list(where)] = nan
        rows.append(r)
    r = torch.randn(100008, generator=gen)
    r[[5, 99999]] = inf
    rows.append(r)
    r = torch.full((9,), -inf)
    r[8] = 1
    rows.append(r)
    for r in rows:
        values, indices = backend.max_rows(r[None])
        want_values, want_indices = r[None].max(dim=-1)
        assert torch.equal(indices, want_indices), (r.shape, indices, want_indices)
        assert torch.equal(values, want_values) or (values.isnan().all() and want_values.isnan().all())
    x = torch.randn(5, 3000, generator=gen)
    x[2, 7] = nan
    values, indices = backend.max_rows(x)
    assert torch.equal(indices, x.max(dim=-1).indices) and values.isnan().tolist() == [False, False, True, False, False]
    assert backend.max_rows(x.double()) is None and backend.max_rows(x[0]) is None
    assert CpuDecodeBackend(model, kernels=False).max_rows(x) is None


def test_backend_decode_takes_the_fused_ops(monkeypatch):
    """A kernels decode step runs RMSNorm (the final one too), rotary, attention and silu * up
    through the fused ops (and still
    equals the plain model: test_backend_equals_plain_model); a prefill does not. (Op by op here;
    the layer in one call: test_fused_layer_equals_the_op_by_op_path.)"""
    if cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels not built here: {cpu_kernels.load_error()}")
    model = pair(**CASES["gqa-untied"])[0]
    backend = CpuDecodeBackend(model, kernels=True)
    calls = []

    class Spy:
        def __getattr__(self, name):
            real = getattr(cpu_kernels.load(), name)
            return lambda *a: calls.append(name) or real(*a)

    backend._kernels = Spy()
    backend.fuse_layers = False
    cache = KVCache.allocate(model.config, num_slots=2, max_seq_len=16)
    with torch.inference_mode():
        backend.forward_hidden(torch.tensor([[3, 4, 5], [6, 7, 8]]), None, cache)
        assert "decode_attend" not in calls and "rms_norm" not in calls
        backend.forward_hidden(torch.tensor([[9], [10]]), torch.tensor([[3], [3]]), cache, kv_len=4)
    layers = model.config.num_hidden_layers
    # two norms per layer and the final one
    assert calls.count("decode_attend") == layers and calls.count("rms_norm") == 2 * layers + 1
    assert calls.count("silu_mul") == layers
    assert calls.count("rotate") == 2 * layers
