"""Reports: one JSON file (everything, machine-readable), one Markdown file (for people) and one PNG
bar chart, written side by side as ``<dir>/<name>.json``, ``.md`` and ``.png``.

Every report records what is needed to reproduce it: the model and backend, chat template,
sampling parameters, dataset files with their SHA-256, package versions, Python and platform, the
command line and the date (UTC, ISO 8601).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

from .datasets import file_sha256

__all__ = ["run_metadata", "write_report", "bar_chart", "PACKAGES"]

#: Packages whose installed versions every report records.
PACKAGES = ("aquilachat", "torch", "transformers", "tokenizers", "numpy", "httpx", "openai", "fastapi",
            "uvicorn", "matplotlib")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` when not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    from .. import __version__
    out["aquilachat"] = __version__  # the imported package (a checkout may differ from the installed one)
    return out


def _command_line() -> str:
    """This process's command line, with ``python -m aquilachat`` shown as ``aquilachat``."""
    if not sys.argv:
        return ""
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "cli.py") and "aquilachat" in sys.argv[0]:
        prog = "aquilachat"
    return " ".join([prog, *sys.argv[1:]])


def run_metadata(*, model: dict[str, Any] | None, template: str | None, sampling: dict[str, Any] | None,
                 datasets: Sequence[str | os.PathLike], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reproducibility block of a report.

    ``datasets`` are file paths; each is recorded with its SHA-256 and size in bytes.
    """
    files = []
    for p in dict.fromkeys(str(d) for d in datasets):
        path = Path(p)
        files.append({"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size})
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "model": model,
        "template": template,
        "sampling": sampling,
        "datasets": files,
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **(extra or {}),
    }


def bar_chart(path: str | os.PathLike, labels: Sequence[str], values: Sequence[float | None], *,
              title: str, ylabel: str, ymax: float | None = None, notes: Sequence[str] | None = None) -> Path:
    """A PNG bar chart; a ``None`` value is drawn as an empty slot labelled with its note
    (e.g. ``"skipped"``). Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.6), dpi=100)
    heights = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(range(len(labels)), heights, color=["#4477aa" if v is not None else "#dddddd" for v in values])
    for i, (bar, v) in enumerate(zip(bars, values)):
        note = notes[i] if notes and i < len(notes) and notes[i] else None
        text = note if v is None else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)))
    long_labels = max((len(x) for x in labels), default=0) > 8
    ax.set_xticklabels(labels, rotation=30 if long_labels else 0, ha="right" if long_labels else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    top = ymax if ymax is not None else max([*heights, 1e-9]) * 1.15
    ax.set_ylim(0, top)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out_dir: str | os.PathLike, name: str, data: dict[str, Any], markdown: str) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` and ``.md``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    mpath.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return {"json": jpath, "markdown": mpath}


def markdown_metadata(meta: dict[str, Any]) -> str:
    """The reproducibility block as a Markdown list."""
    lines = ["## Reproducibility", ""]
    lines.append(f"- date: {meta.get('date')}")
    lines.append(f"- command: `{meta.get('command')}`")
    lines.append(f"- model: `{json.dumps(meta.get('model'), ensure_ascii=False)}`")
    lines.append(f"- template: `{meta.get('template')}`")
    lines.append(f"- sampling: `{json.dumps(meta.get('sampling'), ensure_ascii=False)}`")
    for d in meta.get("datasets", []):
        lines.append(f"- dataset: `{d['path']}` sha256 `{d['sha256']}` ({d['bytes']} bytes)")
    pk = ", ".join(f"{k} {v}" for k, v in meta.get("packages", {}).items() if v)
    lines.append(f"- packages: {pk}")
    lines.append(f"- python {meta.get('python')} on {meta.get('platform')}")
    for key, value in meta.items():
        if key not in {"date", "command", "model", "template", "sampling", "datasets", "packages", "python", "platform"}:
            lines.append(f"- {key}: `{json.dumps(value, ensure_ascii=False, default=str)}`")
    return "\n".join(lines)
