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


def save_figure(fig, out_png: str | Path, dpi: int = 90) -> Path:
    """Lay out, write atomically (a reader never sees half a PNG) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)
