"""Benchmark (not a test): the per-token cost of structured output (JSON schema) with each grammar
engine that imports — xgrammar, llguidance, outlines-core — on the CPU with the real Aquila
vocabulary (100,008 ids, ``../shared/data/tokenizers/aquila``), next to unconstrained decoding.

    python bench/grammar.py [--repeats 5] [--threads 1]

For each engine: the one-time setup for the vocabulary, the compile time of a JSON schema (and of
"any JSON" where the engine has it), then the per-token cost of constrained decoding, measured
by teacher forcing a fixed valid JSON instance (tokenized by the Aquila tokenizer) through the
engine's matcher: per token, compute the next-token mask (a ``[ceil(V / 32)]`` int32 bitmask)
and accept the token. Medians over tokens, best median over ``--repeats`` rounds (the engines run
in turn each round, so the machine's load drifts hit all of them alike).

Then the cost that is the same whichever engine computes the mask: turning a bitmask into the
``[B, V]`` bool mask that :func:`aquilachat.sampling.sample` applies, and ``sample`` itself with
and without that mask; and end to end, one decode step (prefill excluded, median of 64) of a
random model with the Aquila vocabulary (preset ``bench-20m``) through the engine, unconstrained
and with a JSON schema (xgrammar through :mod:`aquilachat.structured_output`), alternated.

This is a benchmark, not a test: the numbers depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
INSTANCE = {"name": "王小明 (Wang Xiaoming)", "age": 34, "email": "xiaoming.wang@example.com",
            "tags": ["engineer", "北京", "chess", "long-distance running"],
            "address": {"city": "Beijing 北京市海淀区", "zip": "100080"}, "active": True}


class XGrammar:
    name = "xgrammar"

    def __init__(self, token_bytes: list[bytes], vocab_size: int, eos: int, encode) -> None:
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo(token_bytes, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.words = (vocab_size + 31) // 32

    def compile_schema(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=True)

    def compile_any_json(self):
        return self.compiler.compile_builtin_json_grammar()

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def step(self, matcher, bitmask: torch.Tensor, token: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")


class LLGuidance:
    name = "llguidance"

    def __init__(self, token_bytes: list[bytes], vocab_size: int, eos: int, encode) -> None:
        import llguidance
        import llguidance.torch as lltorch
        self.ll, self.lltorch = llguidance, lltorch

        class Wrapper:  # llguidance tokenizes forced text with the model's own tokenizer
            eos_token_id, bos_token_id, tokens = eos, None, token_bytes
            special_token_ids = [i for i, b in enumerate(token_bytes) if not b]

            def __call__(self, text: str) -> list[int]:
                return encode(text)

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()), n_vocab=vocab_size)

    def compile_schema(self, schema: dict):
        return self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True})

    def compile_any_json(self):
        return self.ll.LLMatcher.grammar_from_json_schema({}, defaults={"whitespace_flexible": True})

    def matcher(self, grammar):
        m = self.ll.LLMatcher(self.tokenizer, grammar)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def step(self, matcher, bitmask: torch.Tensor, token: int) -> None:
        self.lltorch.fill_next_token_bitmask(matcher, bitmask, 0)
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, token_bytes: list[bytes], vocab_size: int, eos: int, encode) -> None:
        import outlines_core
        self.oc = outlines_core
        self.eos = eos
        vocab: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes):
            if b and i != eos:
                vocab.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, vocab)

    def compile_schema(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def compile_any_json(self):
        return None  # a regular expression cannot describe arbitrarily nested JSON

    def matcher(self, index):
        return self.oc.Guide(index)

    def step(self, guide, bitmask: torch.Tensor, token: int) -> None:
        guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())
        if token == self.eos:  # the index has no transition for EOS: a final state ends the text
            if not guide.is_finished():
                raise RuntimeError("outlines-core: EOS before the end of the instance")
        else:
            guide.advance(token)


ENGINES = (XGrammar, LLGuidance, OutlinesCore)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def per_token_us(engine, compiled, tokens: list[int], vocab_size: int) -> tuple[float, float, float]:
    """Microseconds over one teacher-forced instance: the matcher's creation, then the median and
    the mean of (mask + accept) per token."""
    t = time.perf_counter()
    matcher = engine.matcher(compiled)
    start = time.perf_counter() - t
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    times = []
    for tok in tokens:
        t = time.perf_counter()
        engine.step(matcher, bitmask, tok)
        times.append(time.perf_counter() - t)
    return start * 1e6, statistics.median(times) * 1e6, statistics.fmean(times) * 1e6


def mask_costs(vocab_size: int, repeats: int = 200) -> dict[str, float]:
    """Microseconds: bitmask -> bool mask, sample() with and without the mask (one greedy row)."""
    from aquilachat.sampling import SamplingParams, sample
    from aquilachat.structured_output import bitmask_to_bool
    bitmask = torch.randint(-2**31, 2**31 - 1, (1, (vocab_size + 31) // 32), dtype=torch.int32)
    logits = torch.randn(1, vocab_size)
    params = [SamplingParams(temperature=0)]
    gens = [torch.Generator()]

    def median(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    allowed = bitmask_to_bool(bitmask, vocab_size)
    return {"bitmask -> bool mask": median(lambda: bitmask_to_bool(bitmask, vocab_size)),
            "sample(), greedy, no mask": median(lambda: sample(logits, params, gens)),
            "sample(), greedy, with mask": median(lambda: sample(logits, params, gens, token_masks=allowed))}


def decode_step_ms(vocab_size: int, backend, repeats: int, steps: int = 64) -> tuple[float, float]:
    """Median milliseconds of one single-sequence greedy decode step (bench-20m shape, this
    vocabulary), unconstrained and under a JSON schema whose one long string keeps it going for
    ``steps`` tokens; the two alternate ``repeats`` times."""
    import dataclasses

    from aquilachat.config import ModelConfig
    from aquilachat.engine import Engine
    from aquilachat.model import AquilaForCausalLM
    from aquilachat.sampling import SamplingParams
    from aquilachat.sampling_params import StructuredOutputs
    cfg = dataclasses.replace(ModelConfig.from_preset("bench-20m"), vocab_size=vocab_size)
    model = AquilaForCausalLM(cfg)
    model.init_weights(0)
    engine = Engine(model.eval(), max_num_seqs=1, max_model_len=256, enable_prefix_caching=False)
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 400, "maxLength": 500}},
              "required": ["text"]}
    grammar = backend.compile(StructuredOutputs(json=schema))
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for constrained in (False, True):
            engine.add(list(range(5, 21)), params, constraint=grammar.constraint() if constrained else None)
            engine.step()  # prefill
            while engine.has_unfinished():
                t = time.perf_counter()
                engine.step()
                times[constrained].append(time.perf_counter() - t)
    return statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "tokenizers" / "aquila"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from aquilachat.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(args.tokenizer)
    V = tok.vocab_size
    eos = tok.eos_token_id
    special = set(tok.special_tokens.values())
    token_bytes = [b"" if i in special else tok.token_bytes(i) for i in range(V)]
    text = json.dumps(INSTANCE, ensure_ascii=False)
    tokens = tok.encode(text) + [eos]
    print(f"vocabulary: {V} ids ({args.tokenizer}); instance: {len(tokens)} tokens, {len(text)} characters; "
          f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    engines, rows = [], {}
    for cls in ENGINES:
        try:
            engine, setup = timed(lambda: cls(token_bytes, V, eos, tok.encode))
        except ImportError as exc:
            print(f"{cls.name}: not installed ({exc})")
            continue
        compiled, compile_s = timed(lambda: engine.compile_schema(SCHEMA))
        try:
            any_json, any_s = timed(engine.compile_any_json)
        except Exception as exc:  # noqa: BLE001 - reported
            any_json, any_s = None, None
            print(f"{cls.name}: any-JSON grammar failed: {exc}")
        engines.append((engine, compiled))
        rows[engine.name] = {"setup_s": setup, "compile_s": compile_s,
                             "any_json_s": any_s if any_json is not None else None, "per_token_us": []}
    for _ in range(args.repeats):
        for engine, compiled in engines:
            rows[engine.name]["per_token_us"].append(per_token_us(engine, compiled, tokens, V))

    print(f"\n{'engine':<14} {'vocab setup':>12} {'schema compile':>15} {'any-JSON compile':>17} "
          f"{'new matcher':>12} {'mask+accept / token: median':>28} {'mean':>10}")
    for name, r in rows.items():
        any_json = f"{r['any_json_s'] * 1e3:.1f} ms" if r["any_json_s"] is not None else "n/a"
        start, med, mean = (min(x[i] for x in r["per_token_us"]) for i in range(3))
        print(f"{name:<14} {r['setup_s'] * 1e3:>9.0f} ms {r['compile_s'] * 1e3:>12.1f} ms {any_json:>17} "
              f"{start:>9.0f} us {med:>25.1f} us {mean:>7.1f} us")
    print("\nshared by every engine (one row, V = %d):" % V)
    for what, us in mask_costs(V).items():
        print(f"  {what:<30} {us:8.1f} us")
    from aquilachat.structured_output import GrammarBackend
    backend = GrammarBackend(token_bytes, V, [eos])
    plain, constrained = decode_step_ms(V, backend, args.repeats)
    print(f"  decode step, bench-20m with this vocabulary: unconstrained {plain:.2f} ms, "
          f"with a JSON schema (xgrammar) {constrained:.2f} ms (+{(constrained - plain) * 1e3:.0f} us, "
          f"{constrained / plain - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
