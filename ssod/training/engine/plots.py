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


def plot_pr_curves(pr_curve: dict, names: list[str], out_png: str | Path, title: str = "") -> Path:
    """Precision-recall at IoU 0.5 per class (``coco_evaluate``'s ``pr_curve``) and their mean,
    whose area is mAP50: where each class loses, at which recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recall = np.asarray(pr_curve["recall"])
    curves = [(n, np.asarray(p)) for n, p in zip(names, pr_curve["precision"]) if p is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, p in curves:
        ax.plot(recall, p, lw=1, alpha=0.6, label=f"{name} {p.mean():.3f}" if len(curves) <= 12 else None)
    if curves:
        mean = np.mean([p for _, p in curves], 0)
        ax.plot(recall, mean, lw=3, color="tab:blue", label=f"all classes {mean.mean():.3f} mAP50")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title or "precision-recall, IoU 0.5", fontsize=9)
    return save_figure(fig, out_png)


def save_eval_plots(result: dict, confusion_png: str | Path, pr_png: str | Path, what: str) -> list[Path]:
    """The pictures of one evaluation (``evaluate_detector``'s result): confusion matrix and PR curves."""
    out = []
    if result.get("confusion"):
        c = result["confusion"]
        out.append(plot_confusion_matrix(c["matrix"], c["names"], confusion_png,
                                         f"{what}, conf 0.25, IoU 0.45 (columns sum to 1)"))
    if result.get("pr_curve"):
        out.append(plot_pr_curves(result["pr_curve"], [r["name"] for r in result["per_class"]], pr_png,
                                  f"{what}, precision-recall at IoU 0.5"))
    return out


def save_figure(fig, out_png: str | Path, dpi: int = 90) -> Path:
    """Lay out, write atomically (a reader never sees half a PNG) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)
