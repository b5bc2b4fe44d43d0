"""A run's ``metrics.jsonl`` (one JSON object per logged step, written by rank 0) and its plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import iter_records

__all__ = ["MetricsLog", "read_metrics", "plot_loss"]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, without a last line cut short by a crash."""
    return [row for _, row in iter_records(path, bad_rows="yield")
            if isinstance(row, dict) and not isinstance(row, DataError)]


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` writer: every row is flushed at once, so a killed run keeps all
    of its finished steps.

    Args:
        keep_until: a resumed run keeps the rows of steps ``<= keep_until`` (the checkpoint's
            step) and drops the later ones, which the resumed run logs again; ``None`` starts
            an empty file.
    """

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        rows = []
        if keep_until is not None and path.exists():
            rows = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """Draw ``loss`` (and the learning rate) against ``step`` from ``metrics.jsonl`` into a PNG.
    Returns ``None`` when matplotlib (the ``train`` extra) is missing or nothing was logged."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="learning rate")
    ax2.set_ylabel("learning rate")
    ax.set_title(metrics_path.parent.name)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
