"""Supervised YOLO on the demo data with 100% and with 10% of the labels.

    python benchmarks/supervised_demo.py [--epochs 20] [--imgsz 160] [--model yolov8n] [--out runs/bench]

Prints a table (mAP50-95, mAP50, minutes) and writes it as markdown to stdout for docs/benchmarks.md.
Both rows use the same images (same seed); only the labeled fraction differs. The 10% row's
epochs are scaled so both rows take the same number of optimiser steps (same budget).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from ssod.config import resolve_config
from ssod.training.data.demo import make_demo_dataset
from ssod.training.engine.trainer import Trainer


def run(data: Path, args, ratio: float) -> dict:
    # Same number of optimiser steps for both rows: steps_per_epoch from the 100% set.
    n_steps = args.n_train // args.batch
    cfg = resolve_config(
        None, data=str(data), model=args.model, method="supervised", epochs=args.epochs, imgsz=args.imgsz,
        batch=args.batch, workers=args.workers, out=args.out, name=f"sup-{int(ratio * 100)}", plots=True,
        steps_per_epoch=n_steps, val_interval=max(1, args.epochs // 4), width=args.width, depth=args.depth,
    )
    t0 = time.perf_counter()
    result = Trainer(cfg).train()
    return {"ratio": ratio, **result["metrics"], "minutes": (time.perf_counter() - t0) / 60, "run": result["run_dir"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="yolov8n")
    ap.add_argument("--width", type=float, default=None)
    ap.add_argument("--depth", type=float, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--ratios", default="1.0,0.1")
    ap.add_argument("--out", default="runs/bench-supervised")
    ap.add_argument("--data-root", default="runs/bench-data")
    args = ap.parse_args()

    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        data = make_demo_dataset(Path(args.data_root) / f"demo-r{ratio}", seed=0, labeled_ratio=ratio, n_train=args.n_train)
        rows.append(run(data, args, ratio))

    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {args.model} imgsz {args.imgsz} batch {args.batch} epochs {args.epochs} x {args.n_train // args.batch} steps\n")
    print("| labels | mAP50-95 | mAP50 | minutes |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']:.0%} | {r['mAP50-95']:.3f} | {r['mAP50']:.3f} | {r['minutes']:.1f} |")


if __name__ == "__main__":
    main()
