"""One engine of ``bench/decode.py --preset aquila-7b``, measured in a process of its own.

    python bench/decode_engines.py SPEC.json    # SPEC written by bench/decode.py

At start this file imports only the standard library, so the same file runs under the
llama-cpp-python virtual environment (no torch there); each engine imports what it needs.
The spec (JSON) names the engine (``ours``, ``transformers`` or ``llama.cpp``), the precision,
the model (checkpoint directory or ``.gguf`` file), the prompt token ids and the decode length;
the process prints one line ``RESULT {json}`` on stdout (tokens/s, seconds, bytes) and exits.

    python bench/decode_engines.py quantize SRC.gguf DST.gguf q4_0   # under llama-cpp-python

makes a quantized GGUF from an f16 one with llama.cpp's ``llama_model_quantize`` (its default
recipe for that type, as the ``llama-quantize`` tool applies it).

Every engine is driven through the same three calls (:class:`Runner`), greedy (argmax), EOS
never consulted, with the same token ids:

* ``prefill(rows, max_tokens)``: a fresh batch of ``len(rows)`` sequences, their prompts processed
  in one pass and one token chosen for each;
* ``step()``: one more token for every sequence (one decode step over the KV cache).

Protocol (:func:`measure`): a warm-up (4 rows of 8 tokens, two decode steps; a 64-token prompt),
then decode tokens/s at batch 1 and batch 4 = rows x ``new_tokens`` / time of ``new_tokens``
decode steps after the prefill, and prompt processing tokens/s = prompt tokens / time of the
prefill of the ``pp`` prompt (its one chosen token included). The caller takes the process's
peak RSS from ``wait4`` (for llama.cpp it counts the memory-mapped GGUF pages it touched).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

#: Prompt tokens of the prompt-processing warm-up (warms the many-row product kernels).
WARMUP_PROMPT_TOKENS = 64
#: Prompt tokens per row of the decode warm-up.
WARMUP_ROW_TOKENS = 8


class Runner:
    """An engine under test. ``weight_bytes``: bytes of weights one decode step reads (every weight
    tensor once; of the token-embedding table only the rows looked up, counted as one row)."""

    weight_bytes: int
    notes: list[str]

    def prefill(self, rows: list[list[int]], max_tokens: int) -> None:
        """Start ``len(rows)`` new sequences (the previous ones are done); process their prompts and
        choose their first tokens. ``max_tokens``: tokens each will get (engines that stop by
        themselves need it; the caller then runs exactly ``max_tokens - 1`` steps)."""
        raise NotImplementedError

    def step(self) -> None:
        """One decode step: one more token for every running sequence."""
        raise NotImplementedError


def measure(runner: Runner, prompts: dict, new_tokens: int) -> dict:
    """Decode tokens/s at batch 1 and 4 and prompt tokens/s (module docstring).

    ``prompts``: ``{"b4": [4 rows of token ids], "pp": [ids]}``; batch 1 decodes the first row.
    """
    rows = prompts["b4"]
    runner.prefill([r[:WARMUP_ROW_TOKENS] for r in rows], 3)
    runner.step()
    runner.step()
    runner.prefill([prompts["pp"][:WARMUP_PROMPT_TOKENS]], 1)
    out = {}
    for key, batch in (("decode_b1", rows[:1]), ("decode_b4", rows)):
        runner.prefill(batch, new_tokens + 1)
        t = time.perf_counter()
        for _ in range(new_tokens):
            runner.step()
        out[key] = len(batch) * new_tokens / (time.perf_counter() - t)
    t = time.perf_counter()
    runner.prefill([prompts["pp"]], 1)
    out["prompt"] = len(prompts["pp"]) / (time.perf_counter() - t)
    return out


# ------------------------------------------------------------------------------ torch engines
def torch_weight_bytes(model, embedding) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters and buffers, with the
    ``embedding`` table counted as one row (a decode step looks up one row per token)."""
    import itertools
    storages = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    emb = embedding.weight
    return sum(storages.values()) - emb.untyped_storage().nbytes() + emb.shape[1] * emb.element_size()


class OursRunner(Runner):
    """aquilachat's :class:`~aquilachat.LLM` (memory plan, loader, engine), driven through its
    :class:`~aquilachat.engine.Engine` on token ids; prefix caching off (the prompts repeat)."""

    def __init__(self, spec: dict) -> None:
        import inspect

        import torch

        from aquilachat import LLM, SamplingParams
        torch.set_num_threads(spec["threads"])
        kwargs = dict(dtype="bfloat16", device="cpu", max_num_seqs=4, max_model_len=spec["max_model_len"],
                      enable_prefix_caching=False)
        self.notes = []
        if spec["precision"] != "bf16":
            if "quantization" not in inspect.signature(LLM).parameters:
                raise Skip("LLM has no quantization parameter on this branch")
            kwargs["quantization"] = spec["precision"].split("-")[0]  # "int4-g128": a checkpoint quantized so
        self.llm = LLM(spec["model"], **kwargs)
        self.engine = self.llm.engine
        self.params = SamplingParams(temperature=0, ignore_eos=True)
        model = self.llm.model
        backend = getattr(self.engine, "backend", None)
        if backend is not None:
            self.notes.append(f"{type(backend).__name__}" + (" with its compiled kernels"
                                                             if getattr(backend, "uses_kernels", False) else ""))
        self.weight_bytes = torch_weight_bytes(model, model.model.embed_tokens)

    def prefill(self, rows: list[list[int]], max_tokens: int) -> None:
        if self.engine.has_unfinished():
            raise RuntimeError("the previous batch is not finished")
        for row in rows:
            self.engine.add(row, self.params.replace(max_tokens=max_tokens))
        if len(self.engine.step()) != len(rows):
            raise RuntimeError("the engine did not prefill every row in one step")

    def step(self) -> None:
        self.engine.step()


class TransformersRunner(Runner):
    """transformers' ``LlamaForCausalLM`` (bfloat16; transformers >= 5.24, whose forward takes
    ``cache=``) with its ``DynamicCache``: the prefill keeps
    only the last position's logits (``logits_to_keep=1``, as ``generate`` does), then one
    forward per token; greedy = argmax of the last logits."""

    def __init__(self, spec: dict) -> None:
        import torch
        from transformers import LlamaForCausalLM
        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16).eval()
        self.weight_bytes = torch_weight_bytes(self.model, self.model.model.embed_tokens)
        self.notes = []

    def _forward(self, ids, **kw) -> None:
        with self.torch.inference_mode():
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, **kw)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]

    def prefill(self, rows: list[list[int]], max_tokens: int) -> None:
        from transformers import DynamicCache
        self.cache = DynamicCache(config=self.model.config)
        self._forward(self.torch.tensor(rows), logits_to_keep=1)

    def step(self) -> None:
        self._forward(self.next)


# ------------------------------------------------------------------------------ llama.cpp
class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python's C API (``llama_batch`` with one sequence id per row,
    so batch 4 is four sequences decoded together in one ``llama_decode``); greedy = argmax of
    each row's logits. The KV cache is cleared before each prefill."""

    def __init__(self, spec: dict) -> None:
        import llama_cpp as lc
        import numpy as np
        self.lc, self.np = lc, np
        lc.llama_backend_init()
        self._log = lc.llama_log_callback(lambda level, text, user_data: None)  # kept: C holds it
        lc.llama_log_set(self._log, None)  # llama.cpp's load and context logs: not wanted here
        mparams = lc.llama_model_default_params()
        if not spec.get("extra_bufts", True):  # bench/decode.py's retry after a crash in the repacking
            mparams.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(spec["model"].encode(), mparams)
        if not self.model:
            raise RuntimeError(f"{spec['model']}: llama.cpp could not load it")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = 4 * spec["max_model_len"]
        cparams.n_seq_max = 4
        cparams.n_batch = cparams.n_ubatch = max(len(spec["prompts"]["pp"]), 512)
        cparams.n_threads = cparams.n_threads_batch = spec["threads"]
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(cparams.n_batch, 0, 4)
        self.weight_bytes = gguf_weight_bytes(spec["model"])
        self.notes = [f"llama-cpp-python {lc.__version__}"]

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """``tokens``: (token, position, sequence, wants logits); greedy next token per sequence."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        outs = [i for i, t in enumerate(tokens) if t[3]]
        for seq, i in enumerate(outs):
            logits = self.np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
            self.next[seq] = int(logits.argmax())

    def prefill(self, rows: list[list[int]], max_tokens: int) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        self.next = [0] * len(rows)
        self.pos = [len(r) for r in rows]
        self._decode([(tok, p, s, p == len(row) - 1) for s, row in enumerate(rows) for p, tok in enumerate(row)])

    def step(self) -> None:
        self._decode([(tok, self.pos[s], s, True) for s, tok in enumerate(self.next)])
        self.pos = [p + 1 for p in self.pos]


def gguf_weight_bytes(path: str) -> int:
    """Bytes of a GGUF file's tensors, with ``token_embd`` counted as one row of its type (the
    ``gguf`` package's reader: header only, the data stays mapped)."""
    from gguf import GGUFReader
    total = 0
    for t in GGUFReader(path).tensors:
        if t.name == "token_embd.weight":
            rows = int(t.shape[-1]) if len(t.shape) > 1 else 1  # GGUF shapes are innermost-first
            total += int(t.n_bytes) // rows
        else:
            total += int(t.n_bytes)
    return total


class Skip(Exception):
    """The engine cannot run this precision on this branch (the message says why)."""


RUNNERS = {"ours": OursRunner, "transformers": TransformersRunner, "llama.cpp": LlamaCppRunner}


def quantize_gguf(src: str, dst: str, qtype: str) -> None:
    """``dst`` = ``src`` (an f16 GGUF) quantized to ``qtype`` by ``llama_model_quantize`` with its
    default parameters (llama.cpp's recipe for the type). Written beside ``dst`` and renamed.

    Raises RuntimeError when llama.cpp reports a failure."""
    import llama_cpp as lc
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = os.cpu_count()
    tmp = dst + ".part"
    rc = lc.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")
    os.replace(tmp, dst)


def main() -> None:
    if sys.argv[1] == "quantize":
        quantize_gguf(*sys.argv[2:5])
        return
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    t = time.perf_counter()
    try:
        runner = RUNNERS[spec["engine"]](spec)
    except Skip as e:
        print("RESULT " + json.dumps({"skipped": str(e)}), flush=True)
        return
    result = {"load_s": time.perf_counter() - t, "weight_bytes": runner.weight_bytes, "notes": runner.notes}
    result.update(measure(runner, spec["prompts"], spec["new_tokens"]))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
