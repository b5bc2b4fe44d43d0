"""bench/decode.py's ``--preset aquila-7b`` harness on a tiny checkpoint (no figures checked: the
protocol, the bytes a decode step reads, and the table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import decode  # noqa: E402
import decode_engines  # noqa: E402

from tests.helpers import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, byte_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("tiny_bench")
    make_tiny_model(out, byte_tokenizer_dir)
    return out


def expected_weight_bytes(model_dir: Path, precision: str) -> int:
    """Bytes one decode step reads, counted from the plain model's shapes: each linear weight in
    bfloat16 or at its quantized size (the quantizer's plan and byte formula), norms in bfloat16,
    one row of the embedding table."""
    from torch import nn

    from aquilachat.checkpoint import load_model
    from aquilachat.quantization import QuantizationConfig, quantize_plan, weight_bytes
    model = load_model(model_dir, dtype="float32")
    cfg = model.config
    plan = {} if precision == "bf16" else quantize_plan(cfg, QuantizationConfig.for_model(cfg, precision))
    total = 2 * cfg.hidden_size  # one embedding row
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            method, group = plan.get(name, (None, None))
            total += (weight_bytes(module.out_features, module.in_features, method, group_size=group) if method
                      else 2 * module.weight.numel())
        elif name.endswith("norm"):
            total += 2 * module.weight.numel()
    return total


@pytest.mark.parametrize("engine,precision", [("ours", "bf16"), ("ours", "int8"), ("ours", "int4"),
                                              ("transformers", "bf16")])
def test_runner_measures_and_counts_weight_bytes(tiny_dir, engine, precision):
    """The torch engines go through the whole protocol (ours ends every batch exactly at its
    ``max_tokens``: the next prefill refuses a busy engine), and the bytes a decode step reads are
    every weight once at its precision but one row of the embedding table."""
    prompts = {"b4": [[5 + i + j for j in range(16)] for i in range(4)], "pp": list(range(3, 3 + 80))}
    spec = dict(engine=engine, precision=precision, model=str(tiny_dir), prompts=prompts, new_tokens=3,
                threads=1, max_model_len=128)
    runner = decode_engines.RUNNERS[engine](spec)
    result = decode_engines.measure(runner, prompts, 3)
    assert set(result) == {"decode_b1", "decode_b4", "prompt"} and all(v > 0 for v in result.values())
    expected = expected_weight_bytes(tiny_dir, precision)
    assert expected <= runner.weight_bytes <= expected + 4096  # + rotary buffers and alignment, if any


def test_preset_table():
    ok = dict(weight_bytes=10e9, bandwidth=30e9, decode_b1=1.5, decode_b4=5.0, prompt=20.0, peak_rss=11e9,
              load_s=42.0, loadavg=1.3)
    theirs = dict(ok, decode_b1=3.0, decode_b4=4.0, prompt=40.0)
    table = decode.format_preset_table([("ours", "bf16", ok), ("ours", "int8", {"skipped": "no quantization"}),
                                        ("llama.cpp", "f16", theirs)]).splitlines()
    columns = table[0].count("|")
    assert [line.count("|") for line in table[:5]] == [columns] * 5  # every row as wide as the header
    assert table[2] == "| ours | bf16 | 10.00 | 30.0 | 3.00 | 1.50 (50%) | 5.00 | 20.0 | 11.0 | 42 | 1.3 |"
    assert table[3].startswith("| ours | int8 | skipped: no quantization |")
    assert table[-1] == "ours bf16 / llama.cpp f16: decode b1 0.50x, b4 1.25x, prompt 0.50x"


def test_preset_prompts_are_fixed_and_in_vocabulary():
    a, b = decode.preset_prompts(512), decode.preset_prompts(512)
    assert a == b and len(a["pp"]) == 512 and [len(r) for r in a["b4"]] == [16] * 4
    assert all(0 <= t < decode.PROMPT_VOCAB for r in a["b4"] + [a["pp"]] for t in r)
    assert len({tuple(r) for r in a["b4"]}) == 4


def test_preset_rounds_take_medians_and_keep_the_range():
    """Several rounds of one engine -> the median of each figure over the rounds that ran, and the
    batch-1 range shown in the table; an engine skipped in every round stays skipped."""
    base = dict(weight_bytes=10e9, bandwidth=30e9, decode_b4=5.0, prompt=20.0, peak_rss=11e9, load_s=42.0,
                loadavg=1.3)
    runs = [dict(base, decode_b1=b1, bandwidth=bw) for b1, bw in ((1.0, 20e9), (3.0, 40e9), (2.0, 30e9))]
    merged = decode.median_result(runs + [{"skipped": "failed"}])
    assert merged["decode_b1"] == 2.0 and merged["bandwidth"] == 30e9 and merged["runs"] == 3
    assert merged["b1_range"] == (1.0, 3.0)
    row = decode.format_preset_table([("ours", "bf16", merged)]).splitlines()[2]
    assert row == "| ours | bf16 | 10.00 | 30.0 | 3.00 | 2.00 (67%) [1.00-3.00] | 5.00 | 20.0 | 11.0 | 42 | 1.3 |"
    assert decode.median_result([{"skipped": "no llama_cpp"}]) == {"skipped": "no llama_cpp"}
