"""Diagnostic: do the BatchNorm statistics an SSOD teacher inherits cost it mAP?

    python benchmarks/bn_recalibration.py runs/.../weights/last.pt [--which teacher] [--images 200]

The student's BN layers see strongly augmented unlabeled images every step and the EMA teacher
copies their running statistics. This evaluates a checkpoint as saved, then again after
recomputing every BN layer's statistics (cumulative average) on the labeled train images seen
plainly letterboxed. Run it on a supervised and an SSOD checkpoint: only a drop or gain that
differs between the two points at the SSOD views (docs/benchmarks.md, Run 6).
"""

from __future__ import annotations

import argparse
import copy

import torch

from ssod.training.data.formats import load_dataset
from ssod.training.data.loader import build_val_loader
from ssod.training.engine.checkpoint import load_detector
from ssod.training.engine.evaluation import evaluate_detector


def recalibrated(model: torch.nn.Module, loader) -> torch.nn.Module:
    """A copy of ``model`` whose BN running statistics are the plain average over ``loader``."""
    m = copy.deepcopy(model)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    m.train()
    with torch.no_grad():
        for batch in loader:
            m.forward_raw(batch["img"])
    return m.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("--which", default="teacher")
    ap.add_argument("--images", type=int, default=200, help="labeled train images for the statistics")
    args = ap.parse_args()
    model, ckpt = load_detector(args.weights, args.which)
    cfg = ckpt["config"]
    spec = load_dataset(cfg["data"])
    val = build_val_loader(spec.val, cfg["imgsz"], 16, 0)

    def score(m: torch.nn.Module) -> str:
        r = evaluate_detector(m, val, spec, "cpu", conf=cfg["val_conf"], iou=cfg["val_iou"], max_det=cfg["max_det"])
        return f"{r['metrics']['mAP50-95']:.4f} | {r['metrics']['mAP50']:.4f}"

    train = build_val_loader(spec.train[: args.images], cfg["imgsz"], 16, 0)
    print("| BN statistics | mAP50-95 | mAP50 |\n|---|---|---|")
    print(f"| as saved ({args.which}) | {score(model)} |")
    print(f"| recomputed on {min(args.images, len(spec.train))} labeled train images | {score(recalibrated(model, train))} |")


if __name__ == "__main__":
    main()
