"""Training: supervised fine-tuning and pretraining of Aquila models (``aquilachat sft`` / ``pretrain``).

Modules:

* :mod:`.config` — the YAML (FlagAI field names plus ours), validated with pydantic.
* :mod:`.data` — dataset formats, readers, rendering with
  :func:`aquilachat.chat_format.render_for_training`, packing, the dataset report.
* :mod:`.loop` — the training loop in four stages (set up the run, build the model, fit, export):
  AdamW, warm-up + cosine, token-normalised loss, exact resume.
* :mod:`.strategy` — single process, DDP or FSDP2: one strategy object, chosen once.
* :mod:`.lora` — LoRA through peft, and the one merge of an adapter into the weights.
* :mod:`.metrics` — ``metrics.jsonl`` and ``loss.png``.
* :mod:`.distributed` — process-group setup, hostfile parsing and per-node torchrun commands.
* :mod:`.checkpoint` — atomic checkpoints (Hugging Face weights + training state) and resume.

Heavy imports (torch, peft) happen inside the modules, so ``import aquilachat.train`` is cheap.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    if name == "train":
        from .loop import train
        return train
    raise AttributeError(f"module 'aquilachat.train' has no attribute {name!r}")
