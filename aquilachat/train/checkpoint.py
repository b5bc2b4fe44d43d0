"""Atomic training checkpoints: Hugging Face weights + training state, and finding the one to resume.

Layout of a run directory (``output_dir/experiment_name``)::

    checkpoints/step_00000100/     a complete checkpoint
        config.json  model.safetensors  generation_config.json  tokenizer files
                                   -> servable as is (aquilachat serve / chat, transformers)
        training_state.pt          step, data position, schedule, config
        optimizer.pt               the optimizer state (full, also under FSDP: gathered on rank 0)
        rng_rank<R>.pt             each rank's RNG states
        adapter.safetensors        LoRA only: the adapter weights (the model files hold the merge)
    checkpoints/latest             name of the newest complete checkpoint
    final/                         the exported model after the last step
    metrics.jsonl  loss.png  data_report.json  config.yaml

Atomicity: a checkpoint is written into ``checkpoints/.tmp-step_N``, its files are fsynced, then
the directory is renamed to ``step_N`` (``rename`` is atomic on POSIX file systems) and only then
is ``latest`` replaced (write a temporary file, ``os.replace``). A crash at any point leaves
``latest`` naming a complete checkpoint; leftover ``.tmp-*`` directories are ignored and removed
by the next save. With several nodes, ``output_dir`` must be on a file system all nodes share.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_hf
from ..config import ModelConfig
from ..errors import CheckpointError

__all__ = ["save_checkpoint", "find_latest", "load_training_state", "export_final",
           "load_optimizer_state", "CHECKPOINT_DIR", "TRAINING_STATE", "OPTIMIZER_STATE", "list_checkpoints"]

CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE = "training_state.pt"
OPTIMIZER_STATE = "optimizer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    _fsync_dir(path)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first: ``[(step, dir), ...]``."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / TRAINING_STATE).exists():
            out.append((int(m.group(1)), d))
    return sorted(out)


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one ``checkpoints/latest`` names, or (when that file is
    missing or stale) the highest complete ``step_N``; ``None`` when there is none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    latest = root / "latest"
    if latest.exists():
        name = latest.read_text(encoding="utf-8").strip()
        d = root / name
        if _STEP_DIR.match(name) and (d / TRAINING_STATE).exists():
            return d
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _barrier(dist_info) -> None:
    if dist_info is not None and dist_info.distributed:
        import torch.distributed as dist
        dist.barrier()


def save_checkpoint(run_dir: Path, step: int, *, dist_info, config: ModelConfig, tokenizer,
                    model_state: dict[str, torch.Tensor] | None, training_state: dict[str, Any] | None,
                    rank_state: dict[str, Any], optimizer_state: dict[str, Any] | None = None,
                    adapter_state: dict[str, torch.Tensor] | None = None,
                    keep: int | None = None, template: str | None = None) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it).

    Args:
        model_state: full (merged) weights, on rank 0 (``None`` elsewhere).
        training_state: step, data position, schedule, ... (rank 0).
        rank_state: this rank's RNG states (written as ``rng_rank<R>.pt``).
        optimizer_state: the full optimizer state dict (rank 0), ``optimizer.pt``.
        adapter_state: LoRA weights (rank 0), ``adapter.safetensors``.
        keep: delete all but the newest ``keep`` checkpoints afterwards.
        template: the chat template the model is trained in (written as its Jinja ``chat_template``).

    Returns:
        The checkpoint directory.
    """
    rank = dist_info.rank if dist_info is not None else 0
    root = Path(run_dir) / CHECKPOINT_DIR
    name = f"step_{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(dist_info)
    torch.save(rank_state, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        write_hf(model_state, config, tmp, tokenizer=tokenizer, template=template)
        if adapter_state is not None:
            from safetensors.torch import save_file
            save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state.items()},
                      str(tmp / "adapter.safetensors"))
        torch.save(optimizer_state, tmp / OPTIMIZER_STATE)
        torch.save(training_state, tmp / TRAINING_STATE)
    _barrier(dist_info)
    if rank == 0:
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run): replace it
            old = root / f".tmp-old-{name}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
        pointer = root / "latest.tmp"
        pointer.write_text(name + "\n", encoding="utf-8")
        _fsync_file(pointer)
        os.replace(pointer, root / "latest")
        _fsync_dir(root)
        if keep is not None:
            for _, d in list_checkpoints(run_dir)[:-keep]:
                if d != final:
                    shutil.rmtree(d, ignore_errors=True)
    _barrier(dist_info)
    return final


def _load(path: Path, required: bool = True):
    if not path.exists():
        if required:
            raise CheckpointError(f"{path}: missing from the checkpoint")
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from None


def load_training_state(ckpt: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(training_state, rng_state)`` of checkpoint ``ckpt`` for ``rank`` (the RNG state is empty
    when the checkpoint was written by fewer processes).

    Raises:
        CheckpointError: a file is missing or unreadable, naming it.
    """
    return _load(ckpt / TRAINING_STATE), _load(ckpt / f"rng_rank{rank}.pt", required=False) or {}


def load_optimizer_state(ckpt: Path) -> dict[str, Any]:
    """The optimizer state dict of checkpoint ``ckpt``.

    Raises:
        CheckpointError: missing or unreadable, naming the file.
    """
    return _load(ckpt / OPTIMIZER_STATE)


def export_final(run_dir: Path, state_dict: dict[str, torch.Tensor], config: ModelConfig, tokenizer, *,
                 dtype: str = "float32", name: str = "final", template: str | None = None) -> Path:
    """Write the finished model to ``run_dir/final`` atomically (rank 0 only); returns the path."""
    run_dir = Path(run_dir)
    final, tmp = run_dir / name, run_dir / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf(state_dict, config, tmp, tokenizer=tokenizer, dtype=dtype, template=template)
    _fsync_tree(tmp)
    if final.exists():
        old = run_dir / f".old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(run_dir)
    return final
