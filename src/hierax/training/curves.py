"""Loss and accuracy curves of a training run, from its metric history, as one PNG.

A bare `matplotlib.figure.Figure` draws without pyplot, so nothing here chooses a backend for the process."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from hierax.atomic import atomic_write


def _series(history: list[dict], split: str, key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in history if r.get("split") == split and key in r]
    return [float(r["epoch"]) for r in rows], [float(r[key]) for r in rows]


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Plot train/val loss and accuracy against epochs into `path` (written to a temporary file, then renamed)."""
    path = Path(path)
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split, key, label in (("train", "loss", "train loss"), ("val", "val_loss", "val loss")):
        x, y = _series(history, split, key)
        if x:
            ax_loss.plot(x, y, marker="." if split == "val" or len(x) < 3 else None, label=label)
    for split, key, label in (
        ("train", "train_top1", "train top-1"),
        ("val", "top1", "val top-1"),
        ("val", "top5", "val top-5"),
    ):
        x, y = _series(history, split, key)
        if x:
            ax_acc.plot(x, y, marker="." if split == "val" or len(x) < 3 else None, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return path
