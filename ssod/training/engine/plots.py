"""PNG plots of the per-epoch metrics CSV: one panel per column group."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_results(csv_path: str | Path, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return Path(out_png)
    cols = [c for c in rows[0] if c != "epoch" and any(r.get(c) not in ("", None) for r in rows)]
    n = len(cols)
    ncol = min(4, n) or 1
    nrow = (n + ncol - 1) // ncol or 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    for ax, c in zip(axes.flat, cols):
        pts = [(float(r["epoch"]), float(r[c])) for r in rows if r.get(c) not in ("", None)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_title(c, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return save_figure(fig, out_png)


def plot_confusion_matrix(matrix, names: list[str], out_png: str | Path, title: str = "") -> Path:
    """The detection confusion matrix (``ssod_deploy.evaluate.confusion_matrix``), each true-class
    column normalised to 1 as ultralytics draws it, so rare classes read as clearly as common ones;
    cells annotated up to 30 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    frac = m / np.maximum(m.sum(0, keepdims=True), 1)
    labels = [*names, "background"]
    n = len(labels)
    side = min(max(4.0, 0.45 * n + 2), 24.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title or "confusion matrix (columns sum to 1)", fontsize=9)
    if n <= 31:
        for (i, j), v in np.ndenumerate(frac):
            if m[i, j]:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str | Path, dpi: int = 90) -> Path:
    """Lay out, write atomically (a reader never sees half a PNG) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)
