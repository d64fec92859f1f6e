"""How many objects the strong view's cutouts hide, and how many cutouts ``spare_objects`` keeps.

    python benchmarks/cutout_coverage.py --data demo/data.yaml --imgsz 160 [--draws 3]

The labeled train images go through the unlabeled branch's weak/strong views (their labels in
place of pseudo boxes, so no teacher is needed) ``--draws`` times. Printed: objects in the strong
view, the share the painted cutouts make ``clip_and_filter`` drop (``strong_cutout: true``), and
the share of drawn cutouts ``spare_objects`` still paints (docs/benchmarks.md Run 25).
"""

from __future__ import annotations

import argparse

import torch

from ssod.training.data.formats import load_dataset
from ssod.training.data.loader import UnlabeledDataset, collate_unlabeled
from ssod.training.data.views import StrongAug, WeakAug
from ssod.training.pseudo_geometry import clip_and_filter, map_boxes, spare_objects


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="data.yaml (its labeled train split is used)")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--draws", type=int, default=3, help="views drawn per image (epochs of the view seed)")
    args = ap.parse_args()
    train = load_dataset(args.data).train
    ds = UnlabeledDataset([s.path for s in train], args.imgsz, WeakAug(), StrongAug(cutouts_deferred=True),
                          seed=0, hidden=train)
    drawn = applied = objects = dropped = 0
    sides = []
    for epoch in range(args.draws):
        ds.epoch = epoch
        b = collate_unlabeled([ds[i] for i in range(len(ds))])
        boxes = map_boxes(b["gt_boxes"], b["gt_batch_idx"], b["M_weak"], b["M_strong"])
        rects = b["cutouts_pending"]
        _, kept = clip_and_filter(boxes, args.imgsz)
        _, kept_painted = clip_and_filter(boxes, args.imgsz, erased=rects[..., :4], batch_idx=b["gt_batch_idx"])
        drawn += int(((rects[..., 2] > rects[..., 0]) & (rects[..., 3] > rects[..., 1])).sum())
        applied += int(spare_objects(rects, boxes, b["gt_batch_idx"], args.imgsz).sum())
        objects += int(kept.sum())
        dropped += int((kept & ~kept_painted).sum())
        k = boxes[kept]
        sides.append(((k[:, 2] - k[:, 0]) * (k[:, 3] - k[:, 1])).clamp(min=0).sqrt())
    side = torch.cat(sides)
    n = len(ds) * args.draws
    print(f"{args.data}: {len(ds)} images x {args.draws} draws at {args.imgsz} px")
    print(f"objects in the strong view: {objects} (median side {side.median():.1f} px, "
          f"{float((side < 32).float().mean()):.0%} under 32 px)")
    print(f"cutouts drawn: {drawn} ({drawn / n:.2f} per image); painted under spare_objects: {applied} "
          f"({applied / max(drawn, 1):.0%})")
    print(f"objects the painted cutouts drop (strong_cutout: true): {dropped} ({dropped / max(objects, 1):.1%})")


if __name__ == "__main__":
    main()
