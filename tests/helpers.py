"""Builders for test fixtures: tiny random models and small tokenizers saved in real layouts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from aquilachat.checkpoint import save_hf
from aquilachat.config import ModelConfig
from aquilachat.model import AquilaForCausalLM
from aquilachat.tokenizer import AQUILA_SPECIAL_TOKENS, Tokenizer

def load_script(path: Path, name: str) -> ModuleType:
    """Import a script that is not in a package (a recipe step) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TEXT_FOR_MERGES = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "人工智能是计算机科学的一个分支。你好，世界！用golang实现冒泡排序算法。",
    "def bubble_sort(a):\n    for i in range(len(a)):\n        pass\n",
    "Human: Assistant: ### </s> hello world 你好 我们 的",
]


def make_byte_tokenizer(out: Path, vocab_size: int = 400) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` entries (plus the 8 Aquila specials after it)
    on a few fixed sentences, and save it in Hugging Face layout."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT_FOR_MERGES * 5, trainer)
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in AQUILA_SPECIAL_TOKENS])
    wrapped = Tokenizer(tok, special_tokens_map={"bos_token": "[CLS]", "eos_token": "</s>",
                                                 "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    out = Path(out)
    wrapped.save(out)
    return Tokenizer.from_dir(out)


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                torch_dtype="float32", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    base.update(overrides)
    return ModelConfig(**base)


def make_tiny_model(out: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides) -> AquilaForCausalLM:
    """A random tiny model whose vocabulary matches the tokenizer in ``tokenizer_dir``, saved with
    ``save_hf`` together with that tokenizer."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    cfg = tiny_config(tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **overrides)
    model = AquilaForCausalLM(cfg)
    model.init_weights(seed)
    with torch.no_grad():  # larger-than-default weights so greedy outputs vary with the input
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    save_hf(model, out, tokenizer=tok)
    return model.eval()


def bad_sampling_values(name: str) -> list:
    """Values that ``SamplingParams.<name>`` must refuse, from its declared range: just outside
    each bound, plus a value of the wrong type (a JSON string for a number or a bool)."""
    from aquilachat.sampling_params import MAX_LOGIT_BIAS, MAX_STOP, MAX_STOP_CHARS, PARAMS
    spec = PARAMS[name]
    if name == "logit_bias":
        return [{"5": 100.5}, {"5": -101}, {"x": 1}, {"-1": 1}, {"5": "1"},
                {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}, [5]]
    if name == "structured_outputs":
        return [{"json": {}}, "json"]
    if name == "stop":
        return ["", [""], ["a"] * (MAX_STOP + 1), "x" * (MAX_STOP_CHARS + 1), 5]
    if name == "stop_token_ids":
        return [[-1], ["1"], 5]
    if spec.kind is bool:
        return ["yes"]
    r, step = spec.range, 1 if spec.range.integer else 0.5
    values = ["1"] + ([1.5] if r.integer else [])
    if r.ge is not None:
        values.append(r.ge - step)
    if r.gt is not None:
        values.append(r.gt)
    if r.le is not None:
        values.append(r.le + step)
    return values
