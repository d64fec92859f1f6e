"""Does the DFL sharpness gate pick the uncertain pseudo boxes that are right? (issue 3 diagnostic)

    python benchmarks/loc_quality_gate.py WEIGHTS [--data data.yaml] [--n 256] [--imgsz 160]
        [--tau1 0.1] [--tau2 0.6]

Runs a checkpoint's student (the teacher right after burn-in) on the weak views of ``--n``
unlabeled images that carry hidden labels (the demo data does), splits its boxes into reliable
(>= tau2) and uncertain (tau1..tau2) as Efficient Teacher does, and prints, for several values of
``uncertain_box_loc``, the fraction of boxes that pass the gate, their precision (same-class
IoU >= 0.5 with a hidden label) and the mean IoU of the matched ones.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchvision.ops import box_iou

from ssod.training.data.formats import load_dataset
from ssod.training.data.loader import UnlabeledDataset, collate_unlabeled
from ssod.training.data.views import StrongAug, WeakAug
from ssod.training.engine.checkpoint import load_checkpoint
from ssod.training.methods.efficient_teacher.assigner import dense_teacher_detections
from ssod.training.models.base import build_model


def best_iou(det: dict, batch: dict, k: int) -> torch.Tensor:
    """Per teacher box of image k: the best same-class IoU with a hidden label (0 without one)."""
    sel = det["batch_idx"] == k
    g = batch["gt_batch_idx"] == k
    boxes, labels = det["boxes"][sel], det["labels"][sel]
    gt, gc = batch["gt_boxes"][g].float(), batch["gt_cls"][g].long()
    if len(gt) == 0 or len(boxes) == 0:
        return torch.zeros(len(boxes))
    iou = box_iou(boxes, gt)
    return torch.where(labels[:, None] == gc[None], iou, torch.zeros_like(iou)).max(1).values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--data", default=None, help="dataset YAML (default: the checkpoint's)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--imgsz", type=int, default=None)
    ap.add_argument("--tau1", type=float, default=0.1)
    ap.add_argument("--tau2", type=float, default=0.6)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    ck = load_checkpoint(args.weights)
    model = build_model(ck["model_spec"])
    model.load_state_dict(ck["student"])
    model.eval()
    spec = load_dataset(args.data or ck["config"]["data"])
    if not spec.unlabeled_hidden:
        raise SystemExit(f"{args.data or ck['config']['data']}: the unlabeled images have no hidden labels")
    imgsz = args.imgsz or int(ck["config"]["imgsz"])
    ds = UnlabeledDataset(spec.unlabeled[: args.n], imgsz, WeakAug(flip_p=0.5), StrongAug(), seed=0,
                          hidden=spec.unlabeled_hidden)
    scores, quality, ious = [], [], []
    for i in range(0, len(ds), args.batch):
        batch = collate_unlabeled([ds[j] for j in range(i, min(i + args.batch, len(ds)))])
        det = dense_teacher_detections(model, batch["weak"], args.tau1, 0.65, 100)
        scores.append(det["scores"])
        quality.append(det["loc_quality"])
        ious += [best_iou(det, batch, k) for k in range(batch["weak"].shape[0])]
    s, q, iou = (torch.cat(x).numpy() for x in (scores, quality, ious))
    print(f"{len(ds)} images, {len(s)} teacher boxes >= {args.tau1}\n")
    print("| boxes | uncertain_box_loc | pass | precision@0.5 | mean IoU of matched |")
    print("|---|---|---|---|---|")
    for name, m in (("reliable", s >= args.tau2), ("uncertain", (s >= args.tau1) & (s < args.tau2))):
        for gate in (0.0, 0.85, 0.9, 0.95, 0.97):
            mm = m & (q >= gate)
            prec = (iou[mm] >= 0.5).mean() if mm.any() else float("nan")
            hit = mm & (iou >= 0.5)
            miou = iou[hit].mean() if hit.any() else float("nan")
            print(f"| {name} ({m.sum()}) | {gate} | {mm.sum() / max(m.sum(), 1):.0%} | {prec:.3f} | {miou:.3f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    np.set_printoptions(precision=3)
    main()
