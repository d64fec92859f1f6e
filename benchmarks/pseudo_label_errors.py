"""What a teacher's pseudo labels get wrong, against unlabeled images' hidden labels (issue 3).

    python benchmarks/pseudo_label_errors.py --weights runs/.../weights/last.pt --data demo/data.yaml [--imgsz 160]

The teacher (a checkpoint's EMA) runs on the letterboxed unlabeled images, as the weak view does
without its flip, with the detection floor and NMS of ``efficient_teacher``. Its boxes are ranked
per class and cut where the Epoch Adaptor would cut them: the labeled count of class c scaled by
N_u / N_l (the tau1 count) and alpha of it (the tau2 count). For both sets: precision and recall
at IoU 0.5, the kept boxes split by error kind (right class; an object's box with the wrong class;
the right class but IoU < 0.5 or a duplicate; background), and recall by object size. A second
pass averages the teacher's dense outputs with those of the mirrored image (flip test-time
augmentation, what a second teacher forward per step would buy). ``--scales 1.6`` adds the teacher
on enlarged views (alone, and fused with the 1x pass as efficient_teacher's ``teacher_scales``
does). ``--precisions fp32 bf16`` runs each teacher in both precisions (the trainer's
``teacher_precision``). Needs ``hidden_labels:`` in the data.yaml (the demo data has them).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from ssod.training.data.formats import load_dataset
from ssod.training.data.loader import LabeledDataset, collate_labeled
from ssod.training.engine.checkpoint import load_detector
from ssod.training.methods.efficient_teacher.assigner import multiscale_teacher_detections, teacher_raw
from ssod.training.models.yolo import dense_nms
from ssod.training.pseudo import match_hidden

SIZES = (0, 16, 24, 32, 10**9)  # object size bins: sqrt(area) in view pixels


def load_views(spec, imgsz: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The first ``n`` unlabeled images letterboxed to ``imgsz`` (the validation view) and their hidden boxes there."""
    views = LabeledDataset(spec.unlabeled_hidden[:n], imgsz, train=False)
    batch = collate_labeled([views[i] for i in range(len(views))])
    return batch["img"], {"boxes": batch["boxes"], "cls": batch["cls"], "img": batch["batch_idx"]}


def mirror_index(raw: list[torch.Tensor]) -> torch.Tensor:
    """Anchor permutation that mirrors every level's grid left-right (anchors in ``decode`` order)."""
    idx, offset = [], 0
    for r in raw:
        h, w = r.shape[-2:]
        idx.append(torch.arange(h * w).view(h, w).flip(1).flatten() + offset)
        offset += h * w
    return torch.cat(idx)


KEYS = ("boxes", "scores", "labels", "batch_idx")


@torch.no_grad()
def in_batches(x: torch.Tensor, detect_batch, batch: int = 32) -> dict[str, torch.Tensor]:
    """``detect_batch(xb)`` -> flat detections with per-batch ``batch_idx``, run over ``x`` in
    batches and joined with view-global ``batch_idx``."""
    out = []
    for s in range(0, len(x), batch):
        d = detect_batch(x[s : s + batch])
        out.append({**d, "batch_idx": d["batch_idx"] + s})
    return {k: torch.cat([o[k] for o in out]) for k in KEYS}


def detect(model, x: torch.Tensor, flip_tta: bool, conf: float, iou: float) -> dict[str, torch.Tensor]:
    """Teacher boxes on every view (flat, with ``batch_idx``); ``flip_tta`` averages the mirrored pass in."""

    def one(xb: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = teacher_raw(model, xb)
        dec = model.decode(raw)
        if flip_tta:
            mir = model.decode(teacher_raw(model, xb.flip(-1)))[:, :, mirror_index(raw)]
            mir[:, 0] = xb.shape[-1] - mir[:, 0]  # x centre back into the unflipped view
            dec = (dec + mir) / 2
        dets = dense_nms(dec, conf, iou, 100, tuple(xb.shape[-2:]))
        return {k: torch.cat([d[k] for d in dets]) for k in ("boxes", "scores", "labels")} | {
            "batch_idx": torch.cat([torch.full_like(d["labels"], j) for j, d in enumerate(dets)])}

    return in_batches(x, one)


def detect_multiscale(model, x: torch.Tensor, scales: list[float], conf: float, iou: float) -> dict[str, torch.Tensor]:
    """What efficient_teacher's ``teacher_scales`` gives the training loop, on every view."""
    return in_batches(x, lambda xb: multiscale_teacher_detections(model, xb, conf, iou, 100, scales))


def rescaled(dets: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Boxes of an enlarged view back in the imgsz view (letterbox and resize scale together)."""
    return {**dets, "boxes": dets["boxes"] * factor}


def top_per_class(dets: dict[str, torch.Tensor], counts: np.ndarray) -> dict[str, torch.Tensor]:
    """The ``counts[c]`` highest-scoring boxes of each class c (the adaptor's count rule)."""
    keep = torch.zeros(len(dets["scores"]), dtype=torch.bool)
    for c, k in enumerate(counts):
        idx = (dets["labels"] == c).nonzero().flatten()
        keep[idx[dets["scores"][idx].argsort(descending=True)[: int(round(k))]]] = True
    return {k: v[keep] for k, v in dets.items()}


def error_kinds(dets: dict[str, torch.Tensor], gt: dict[str, torch.Tensor]) -> dict[str, int]:
    """Kept boxes by kind: tp, wrong class (IoU >= 0.5 with another class's object), poor box or duplicate, background."""
    tp = match_hidden(dets, gt["boxes"], gt["cls"], gt["img"], 0.5)
    iou = box_iou(dets["boxes"], gt["boxes"]) if len(tp) and len(gt["cls"]) else torch.zeros(len(tp), 0)
    same_img = dets["batch_idx"][:, None] == gt["img"][None]
    same_cls = dets["labels"][:, None] == gt["cls"][None]
    wrong_cls = ((iou >= 0.5) & same_img & ~same_cls).any(1) & ~tp
    poor = ((iou >= 0.1) & same_img & same_cls).any(1) & ~tp & ~wrong_cls
    n = len(tp)
    return {"tp": int(tp.sum()), "wrong class": int(wrong_cls.sum()), "poor box / duplicate": int(poor.sum()),
            "background": n - int(tp.sum() + wrong_cls.sum() + poor.sum())}


def recall_by_size(dets: dict[str, torch.Tensor], gt: dict[str, torch.Tensor]) -> list[float]:
    """Share of hidden objects with a same-class box at IoU >= 0.5 (not one-to-one), per size bin."""
    iou = box_iou(gt["boxes"], dets["boxes"])
    hit = ((iou >= 0.5) & (gt["img"][:, None] == dets["batch_idx"][None]) & (gt["cls"][:, None] == dets["labels"][None])).any(1)
    side = ((gt["boxes"][:, 2:] - gt["boxes"][:, :2]).clamp(min=0).prod(1)).sqrt()
    return [float(hit[(side >= lo) & (side < hi)].float().mean()) for lo, hi in zip(SIZES[:-1], SIZES[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True, help="checkpoint whose EMA teacher is analysed")
    ap.add_argument("--data", required=True, help="data.yaml with unlabeled images and hidden_labels")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--n", type=int, default=600, help="unlabeled images analysed (the first n)")
    ap.add_argument("--alpha", type=float, default=0.6, help="tau2 keeps alpha x the tau1 count (seed 004: 60%%)")
    ap.add_argument("--conf", type=float, default=0.05, help="detection floor (efficient_teacher tau1_bounds[0])")
    ap.add_argument("--iou", type=float, default=0.65, help="teacher NMS IoU (efficient_teacher nms_iou)")
    ap.add_argument("--scales", type=float, nargs="*", default=[],
                    help="also run the teacher on views enlarged by these factors (bilinear from the imgsz view, "
                         "and letterboxed from the file at that size), boxes mapped back")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="run every teacher in each of these precisions (the trainer's teacher_precision)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("SSOD_THREADS", os.cpu_count() or 1)))

    spec = load_dataset(args.data)
    if not spec.unlabeled_hidden:
        raise SystemExit(f"{args.data}: no hidden_labels for the unlabeled images; this diagnostic needs them")
    model, _ = load_detector(args.weights)
    x, gt = load_views(spec, args.imgsz, args.n)
    labeled = np.bincount(np.concatenate([s.cls for s in spec.train]), minlength=spec.nc).astype(float)
    counts = labeled * len(x) / len(spec.train)  # the adaptor's expected count per class

    print(f"{Path(args.weights)}: {len(x)} unlabeled images, {len(gt['cls'])} hidden objects, imgsz {args.imgsz}\n")
    print("| teacher | set | boxes/img | precision | recall | tp | wrong class | poor box / duplicate | background "
          "| recall by size " + " / ".join(f"{lo}-{hi if hi < 10**9 else ''}" for lo, hi in zip(SIZES[:-1], SIZES[1:])) + " px |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = [("single view", lambda: detect(model, x, False, args.conf, args.iou)),
            ("flip-averaged", lambda: detect(model, x, True, args.conf, args.iou))]
    for scale in args.scales:
        size = int(round(args.imgsz * scale / 32)) * 32
        runs.append((f"x{size / args.imgsz:.2f} bilinear", lambda size=size: rescaled(
            detect(model, F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False), False, args.conf, args.iou),
            args.imgsz / size)))
        runs.append((f"x{size / args.imgsz:.2f} from the file", lambda size=size: rescaled(
            detect(model, load_views(spec, size, args.n)[0], False, args.conf, args.iou), args.imgsz / size)))
        runs.append((f"teacher_scales [1, {scale:g}] (fused)", lambda scale=scale: detect_multiscale(
            model, x, [1.0, scale], args.conf, args.iou)))
    runs = [(f"{name}, {p}" if len(args.precisions) > 1 else name, p, run) for p in args.precisions for name, run in runs]
    for name, precision, run in runs:
        model.pseudo_label_dtype = torch.bfloat16 if precision == "bf16" else None
        t0 = time.perf_counter()
        dets = run()
        name += f" ({time.perf_counter() - t0:.1f} s)"
        for label, kept in ((f"tau2 count ({args.alpha:.0%})", top_per_class(dets, counts * args.alpha)),
                            ("tau1 count (100%)", top_per_class(dets, counts)), (f"all >= {args.conf}", dets)):
            kinds = error_kinds(kept, gt)
            n = max(1, len(kept["scores"]))
            sizes = " / ".join(f"{r:.2f}" for r in recall_by_size(kept, gt))
            print(f"| {name} | {label} | {len(kept['scores']) / len(x):.2f} | {kinds['tp'] / n:.3f} "
                  f"| {kinds['tp'] / len(gt['cls']):.3f} | " + " | ".join(str(v) for v in kinds.values()) + f" | {sizes} |")


if __name__ == "__main__":
    main()
