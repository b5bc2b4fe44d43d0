"""The memory plan (aquilachat.memory) against what is really allocated, with the available memory
and the CPU's bfloat16 capability injected (nothing here depends on the machine), and loading
without a second copy of the weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aquilachat import LLM, SamplingParams, cli
from aquilachat import memory
from aquilachat.checkpoint import Checkpoint, _FilePages, load_model
from aquilachat.config import ModelConfig
from aquilachat.engine import Engine
from aquilachat.memory import MemoryPlanError, kv_bytes_per_token, parse_kv_cache_memory, plan_memory, weight_bytes
from aquilachat.model import param_bytes
from tests.helpers import make_tiny_model

GB = 10**9


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("mem") / "m"
    make_tiny_model(out, byte_tokenizer_dir, max_position_embeddings=1024)
    return out


def _with_dtype(src, dst, dtype: torch.dtype):
    """A copy of the checkpoint ``src`` stored in ``dtype`` (config.json says so too)."""
    import shutil
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture
def available(monkeypatch):
    """Set the memory the plan sees: ``available(bytes)``."""
    def set_(n: int) -> None:
        monkeypatch.setattr(memory, "available_memory", lambda device="cpu": (int(n), "injected"))
    return set_


@pytest.fixture
def native_bf16(monkeypatch):
    def set_(flag: bool) -> None:
        monkeypatch.setattr(memory, "cpu_has_native_bf16", lambda: flag)
    return set_


# ---------------------------------------------------------------------------- the counts
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True])
def test_plan_bytes_equal_the_allocated_tensors(model_dir, tmp_path, dtype, tied):
    """Weights and KV cache as planned are the bytes the loaded model and engine hold (within 2 %)."""
    src = model_dir
    if tied:
        src = tmp_path / "tied"
        cfg = json.loads((model_dir / "config.json").read_text())
        sd = load_file(model_dir / "model.safetensors")
        sd.pop("lm_head.weight")
        import shutil
        shutil.copytree(model_dir, src)
        save_file(sd, str(src / "model.safetensors"))
        cfg["tie_word_embeddings"] = True
        (src / "config.json").write_text(json.dumps(cfg))
    llm = LLM(src, dtype=dtype, device="cpu", max_num_seqs=3, max_model_len=96)
    plan = llm.memory_plan
    assert plan.weight_bytes == pytest.approx(param_bytes(llm.model), rel=0.02)
    assert plan.kv_cache_bytes == pytest.approx(llm.engine.cache.nbytes(), rel=0.02)
    assert (plan.num_slots, plan.max_model_len) == (3, 96) == (llm.engine.max_num_seqs, llm.engine.max_model_len)
    assert plan.max_num_batched_tokens == llm.engine.max_num_batched_tokens
    assert llm.engine.cache.k[0].dtype == getattr(torch, dtype)


def test_weight_and_kv_formulas_on_the_7b_shape():
    """AquilaChat-7B: 7.3e9 parameters, 14.6 GB as float16/bfloat16, 29.2 GB as float32;
    one token of KV cache is 32 layers x 2 x 4096 values = 512 KiB in bfloat16."""
    cfg = ModelConfig.from_preset("aquila-7b")
    assert weight_bytes(cfg, torch.float32) == 4 * cfg.num_parameters()
    assert weight_bytes(cfg, torch.bfloat16) == 2 * cfg.num_parameters()
    assert round(weight_bytes(cfg, torch.bfloat16) / GB, 1) == 14.6
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 512 * 1024


# ---------------------------------------------------------------------------- too large
def test_too_large_is_one_line_with_numbers_and_options(model_dir, available, monkeypatch):
    cfg = Checkpoint.open(model_dir).config
    need32 = plan_memory(cfg, dtype="float32", available=10 * GB, max_num_seqs=1, max_model_len=128).total_bytes
    need16 = plan_memory(cfg, dtype="bfloat16", available=10 * GB, max_num_seqs=1, max_model_len=128).total_bytes
    available((need32 + need16) // 2)  # room for bfloat16, not for float32
    called = []
    monkeypatch.setattr(Checkpoint, "load_model", lambda *a, **k: called.append(1))
    with pytest.raises(MemoryPlanError) as info:
        LLM(model_dir, dtype="float32", device="cpu", max_model_len=128)
    msg = str(info.value)
    assert "\n" not in msg
    assert "as float32" in msg and "as bfloat16" in msg and "available" in msg
    assert "--dtype bfloat16" in msg
    assert called == []  # nothing was loaded: the plan came first


def test_cli_and_server_refuse_with_the_same_line(model_dir, available, capsys, monkeypatch):
    """``generate`` prints the plan's error as one line with exit status 1; ``serve`` refuses to
    start (uvicorn never runs) with the same line."""
    available(memory.CPU_OVERHEAD_BYTES // 2)
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("aquilachat generate: error: not enough memory for") and "\n" not in err
    import uvicorn
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("the server started"))
    assert cli.main(["serve", "--model", str(model_dir), "--device", "cpu"]) == 1
    serve_err = capsys.readouterr().err.strip().splitlines()[-1]
    assert serve_err.replace("aquilachat serve:", "aquilachat generate:") == err


def test_explicit_context_that_cannot_fit_names_the_options(model_dir, available):
    cfg = Checkpoint.open(model_dir).config
    fits = plan_memory(cfg, dtype="float32", available=10 * GB, max_num_seqs=1, max_model_len=512)
    available(fits.total_bytes + fits.kv_cache_bytes)  # the cache may take 90 % of what is left
    with pytest.raises(MemoryPlanError, match="Options that fit: --max-model-len 512"):
        LLM(model_dir, dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=1)
    plan = LLM(model_dir, dtype="float32", device="cpu", max_model_len=512, max_num_seqs=1).memory_plan
    assert (plan.num_slots, plan.max_model_len) == (1, 512)


# ---------------------------------------------------------------------------- dtype auto
@pytest.mark.parametrize("stored,native,fits32,want", [
    (torch.float16, True, True, torch.bfloat16),
    (torch.float16, False, True, torch.float32),
    (torch.float16, False, False, torch.bfloat16),
    (torch.bfloat16, False, True, torch.bfloat16),
    (torch.bfloat16, True, True, torch.bfloat16),
    (torch.float32, True, True, torch.float32),
])
def test_dtype_auto_on_the_cpu(model_dir, tmp_path, available, native_bf16, stored, native, fits32, want):
    ckpt_dir = _with_dtype(model_dir, tmp_path / "c", stored)
    cfg = Checkpoint.open(ckpt_dir).config
    need32 = plan_memory(cfg, dtype="float32", available=10 * GB, max_num_seqs=1).total_bytes
    need16 = plan_memory(cfg, dtype="bfloat16", available=10 * GB, max_num_seqs=1).total_bytes
    available(need32 + 10**6 if fits32 else (need16 + need32) // 2)
    assert need16 < need32
    native_bf16(native)
    llm = LLM(ckpt_dir, device="cpu", max_num_seqs=1)
    assert llm.model.dtype == want == llm.memory_plan.torch_dtype
    assert llm.memory_plan.dtype_reason
    if native or fits32:  # the loader alone plans the weights only, and decides the same way
        assert load_model(ckpt_dir, device="cpu").dtype == want


def test_float32_checkpoint_that_does_not_fit_is_an_error(model_dir, available, native_bf16):
    cfg = Checkpoint.open(model_dir).config
    native_bf16(True)
    available(weight_bytes(cfg, torch.float32) // 2)
    with pytest.raises(MemoryPlanError, match="as float32"):
        LLM(model_dir, device="cpu")


# ---------------------------------------------------------------------------- the KV budget
@pytest.mark.parametrize("text,want", [("4GB", (4 * 10**9, None)), ("4GiB", (4 * 2**30, None)),
                                       ("512MiB", (512 * 2**20, None)), ("1.5gb", (1.5e9, None)),
                                       ("0.25", (None, 0.25)), (0.5, (None, 0.5)), (3_000_000, (3_000_000, None)),
                                       ("2e9", (2 * 10**9, None))])
def test_kv_cache_memory_parses_sizes_and_fractions(text, want):
    assert parse_kv_cache_memory(text) == want


@pytest.mark.parametrize("bad", ["", "four", "-1GB", "0", "1PB", "nan"])
def test_kv_cache_memory_rejects_nonsense(bad):
    from aquilachat.errors import ConfigError
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        parse_kv_cache_memory(bad)


def test_kv_cache_memory_gives_the_computed_slots_and_tokens(model_dir, available):
    cfg = Checkpoint.open(model_dir).config
    per_token = kv_bytes_per_token(cfg, torch.float32)
    available(10 * GB)
    # a size: 3.5 slots of the whole 1024-token context -> 3 slots
    llm = LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory=int(3.5 * 1024 * per_token))
    assert (llm.engine.max_num_seqs, llm.engine.max_model_len) == (3, 1024)
    assert llm.engine.cache.nbytes() == 3 * 1024 * per_token
    # max_num_seqs caps the slots a large budget would give
    plan = plan_memory(cfg, dtype="float32", kv_cache_memory="1GB", max_num_seqs=5)
    assert plan.num_slots == 5
    # a fraction of what is left after weights, workspace and overhead
    fixed = memory.CPU_OVERHEAD_BYTES + weight_bytes(cfg, torch.float32)
    work = memory.workspace_bytes(cfg, torch.float32, num_slots=5, max_model_len=1024, max_num_batched_tokens=2048)
    available(fixed + work + 10 * 1024 * per_token)
    assert plan_memory(cfg, dtype="float32", kv_cache_memory=0.5).num_slots == 5
    # less than one slot of the whole context: the window is shortened (not set by the user) ...
    plan = plan_memory(cfg, dtype="float32", kv_cache_memory=600 * per_token, max_num_seqs=4)
    assert (plan.num_slots, plan.max_model_len) == (1, 512)
    # ... or refused when the user asked for it
    with pytest.raises(MemoryPlanError, match="--kv-cache-memory|--max-model-len"):
        plan_memory(cfg, dtype="float32", kv_cache_memory=600 * per_token, max_model_len=1024)


def test_default_budget_lowers_max_num_seqs_to_what_fits(model_dir, available):
    cfg = Checkpoint.open(model_dir).config
    per_token = kv_bytes_per_token(cfg, torch.float32)
    fixed = memory.CPU_OVERHEAD_BYTES + weight_bytes(cfg, torch.float32) + memory.workspace_bytes(
        cfg, torch.float32, num_slots=5, max_model_len=1024, max_num_batched_tokens=2048)
    available(fixed + 6 * 1024 * per_token)  # 90 % of it: 5.4 slots
    plan = plan_memory(cfg, dtype="float32")
    assert plan.num_slots == 5 and plan.max_model_len == 1024
    assert plan.total_bytes <= plan.available_bytes


def test_cli_flags_reach_the_plan(model_dir, capsys):
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hi", "--device", "cpu", "--max-tokens", "2",
                     "--max-num-seqs", "2", "--max-model-len", "64", "--kv-cache-memory", "1GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"]


# ---------------------------------------------------------------------------- the engine's prefill budget
def test_prefill_token_budget_splits_admission_and_keeps_greedy_output(model_dir):
    """With max_num_batched_tokens the prompts are prefilled over several steps; fp32 greedy
    answers equal those of one big prefill."""
    model = load_model(model_dir, dtype="float32", device="cpu")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21], [22, 23]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for budget in (None, 8):
        eng = Engine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=budget)
        seqs = [eng.add(p, params) for p in prompts]
        eng.step()
        # one big prefill admits all four; a budget of 8 padded tokens admits the 6-token prompt
        # alone (two rows would be padded to 2 x 6 = 12)
        assert len(eng.running) == (4 if budget is None else 1)
        while eng.has_unfinished():
            eng.step()
        outs[budget] = [s.output_ids for s in seqs]
    assert outs[8] == outs[None]


# ---------------------------------------------------------------------------- no second copy
def test_same_dtype_weights_stay_in_the_file_mapping(model_dir):
    """Stored dtype == run dtype: every weight lies in the private mapping of the safetensors file
    (no copy); loading as another dtype gives the converted values, in fresh memory."""
    m = load_model(model_dir, dtype="float32", device="cpu")
    pages = _FilePages(model_dir / "model.safetensors")
    assert pages.ranges
    for name, p in m.named_parameters():
        start = p.data_ptr()
        assert any(lo <= start < hi for lo, hi in pages.ranges), name
    ref = load_file(model_dir / "model.safetensors")
    m16 = load_model(model_dir, dtype="bfloat16", device="cpu")
    for name, p in m16.state_dict().items():
        assert torch.equal(p, ref[name].to(torch.bfloat16)), name
        assert not any(lo <= p.data_ptr() < hi for lo, hi in pages.ranges), name
    # the converted model's source pages were released, not its neighbours': the fp32 model still
    # reads its own (file-backed) values
    for name, p in m.state_dict().items():
        assert torch.equal(p, ref[name]), name


def test_sharded_float16_checkpoint_converts_tensor_by_tensor(model_dir, tmp_path):
    """Two shards with an index, float16 on disk, loaded as bfloat16 and float32: equal to the
    stored values converted one by one."""
    out = tmp_path / "sharded"
    out.mkdir()
    import shutil
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    sd = {k: v.to(torch.float16) for k, v in load_file(model_dir / "model.safetensors").items()}
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        m = load_model(out, dtype=dtype, device="cpu")
        for k, v in m.state_dict().items():
            assert v.dtype == dtype and torch.equal(v, sd[k].to(dtype)), k


# ---------------------------------------------------------------------------- training
def test_sft_of_a_7b_shape_stops_before_building_with_the_ways_to_fit(tmp_path, byte_tokenizer_dir, available,
                                                                      capsys, monkeypatch):
    """``aquilachat sft`` of an AquilaChat-7B-shape model (from scratch, so no 14.6 GB file is
    needed) on a 21 GB machine: one error line with the numbers and the options (LoRA, gradient
    checkpointing, FSDP2 ranks), before any weight is allocated."""
    from aquilachat.model import AquilaForCausalLM
    from tests.train_helpers import synthetic_rows, write_config, write_jsonl
    write_jsonl(tmp_path / "data.jsonl", synthetic_rows(8))
    cfg = write_config(tmp_path / "sft.yaml", model=None, architecture="aquila-7b", tokenizer=str(byte_tokenizer_dir),
                       max_seq_len=512, batch_size=2)
    available(21 * GB)
    monkeypatch.setattr(AquilaForCausalLM, "__init__", lambda *a, **k: pytest.fail("the model was built"))
    assert cli.main(["sft", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("aquilachat sft: error: not enough memory to train")
    # (the vocabulary is the test tokenizer's: 6.6B parameters, 25.9 GB of fp32 weights)
    assert "weights 25.9 GB" in err and "AdamW state 51.8 GB" in err and "21.0 GB available" in err
    assert "strategy: fsdp over" in err


def test_training_plan_options_each_fit():
    """Every option the error names fits when planned with it (LoRA, gradient checkpointing,
    a smaller batch, FSDP2 over more ranks)."""
    cfg = ModelConfig.from_preset("aquila-7b")
    avail = 60 * GB
    with pytest.raises(MemoryPlanError) as info:
        memory.plan_training(cfg, batch_size=4, seq_len=2048, available=avail)
    msg = str(info.value)
    assert "lora: true" in msg and "strategy: fsdp over" in msg
    lora = memory.plan_training(cfg, batch_size=4, seq_len=2048, lora_r=8, gradient_checkpointing=True,
                                lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], available=avail)
    assert lora.total_bytes <= avail and lora.optimizer_bytes < 10**8
    ranks = int(msg.split("strategy: fsdp over ")[1].split()[0])
    sharded = memory.plan_training(cfg, batch_size=4, seq_len=2048, strategy="fsdp", world_size=ranks,
                                   gradient_checkpointing="gradient_checkpointing" in msg.split("strategy: fsdp")[1],
                                   available=avail)
    assert sharded.total_bytes <= avail
    full = memory.plan_training(cfg, batch_size=1, seq_len=2048, available=10**15)
    assert full.weight_bytes == full.gradient_bytes == 4 * cfg.num_parameters()
    assert full.optimizer_bytes == 8 * cfg.num_parameters()


def test_serve_resolves_a_hub_repo_id_once(model_dir, monkeypatch):
    """``serve`` with a Hub repo id: one snapshot download for the plan, the weights and the
    tokenizer (the name is resolved once, into a Checkpoint)."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub
    import uvicorn

    from aquilachat.server import app as app_module
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or str(model_dir))
    loaded = []
    real_create_app = app_module.create_app

    def create_app(loader, settings, **kw):
        loaded.append(loader())  # what the server's loader thread does
        return real_create_app(loader, settings, **kw)

    monkeypatch.setattr(app_module, "create_app", create_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    assert cli.main(["serve", "--model", "someone/some-model", "--device", "cpu", "--max-num-seqs", "2"]) == 0
    assert calls == ["someone/some-model"]
    llm = loaded[0]
    assert llm.memory_plan.num_slots == 2 and llm.engine.max_num_seqs == 2
