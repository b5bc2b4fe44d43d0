"""aquilachat: run, serve, fine-tune, train tokenizers for and evaluate AquilaChat-family models.

The public names (``LLM``, ``SamplingParams``, ``RequestOutput``, ``ModelConfig``) are imported
lazily so that ``import aquilachat`` and ``aquilachat --help`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "LLM": "aquilachat.llm",
    "SamplingParams": "aquilachat.sampling_params",
    "RequestOutput": "aquilachat.outputs",
    "CompletionOutput": "aquilachat.outputs",
    "ModelConfig": "aquilachat.config",
    "AquilaForCausalLM": "aquilachat.model",
    "KVCache": "aquilachat.model",
    "Tokenizer": "aquilachat.tokenizer",
    "load_model": "aquilachat.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aquilachat' has no attribute {name!r}")
