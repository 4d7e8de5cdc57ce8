"""Training metrics: one JSON object per logged step in ``metrics.jsonl``, and a loss-curve PNG."""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch


class MetricsLog:
    """Append-only JSONL metrics file; a resumed run first drops records past its checkpoint's step."""

    def __init__(self, path, *, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20   # bytes on macOS, KiB on Linux


def plot_loss(metrics_path, png_path, *, title: str = "rtkern train") -> Path | None:
    """Draw loss (and learning rate) against step; returns the PNG path, or None without records."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not recs:
        return None
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in recs], color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in recs], color="tab:orange", lw=1, alpha=0.7, label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title(title)
    fig.legend(loc="upper right")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
