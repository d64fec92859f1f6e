"""Exported teacher vs PyTorch teacher: COCO mAP on the val set, FP32 / NMS-in-graph / FP16 / INT8.

    python benchmarks/export_parity.py WEIGHTS [--data data.yaml] [--calib DIR] [--calib-size 256]
                                       [--out DIR] [--batch 16] [--skip fp16,int8]

Every row runs through ``ssod_deploy.Detector`` with the same pre-processing (letterbox) and the
same post-processing (conf 0.001, IoU 0.7, 300 detections, as ``ssod eval``); only the network
differs. Two PyTorch references:
    * ``torch (deploy pipeline)``: the checkpoint's teacher through the same Detector (torch backend):
      the deltas against it measure the export alone;
    * ``torch (ssod eval)``: the trainer's evaluation (its own loader and torch NMS), for context.
Also checks that a dynamic-batch ONNX gives the same per-image detections at batch 1..16.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from ssod.export import export_model
from ssod.training.data.formats import load_dataset
from ssod.training.engine.checkpoint import load_checkpoint
from ssod_deploy.detector import Detector
from ssod_deploy.evaluate import coco_evaluate
from ssod_deploy.images import read_image

CONF, IOU, MAX_DET = 0.001, 0.7, 300


def evaluate(model: Path, val_images: list[np.ndarray], gt: dict, batch: int) -> dict[str, Any]:
    det = Detector(model, conf=CONF, iou=IOU, max_det=MAX_DET)
    dets: list[dict[str, Any]] = []
    t = time.perf_counter()
    for start in range(0, len(val_images), batch):
        for i, d in enumerate(det(val_images[start : start + batch]), start):
            wh = d.boxes[:, 2:] - d.boxes[:, :2]
            dets.extend(
                {"image_id": i, "category_id": int(c), "bbox": [float(x), float(y), float(w), float(h)], "score": float(s)}
                for (x, y), (w, h), s, c in zip(d.boxes[:, :2], wh, d.scores, d.labels)
            )
    secs = time.perf_counter() - t
    m = coco_evaluate(gt, dets)["metrics"]
    return {"mAP50-95": m["mAP50-95"], "mAP50": m["mAP50"], "seconds": secs, "backend": det.backend.name}


def dynamic_batch_check(model: Path, images: list[np.ndarray], max_batch: int = 16) -> dict[str, float]:
    """Max |difference| of raw outputs and of final detections between batch b (1..16) and batch 1."""
    det = Detector(model, conf=CONF, iou=IOU, max_det=MAX_DET)
    x, params = det.preprocess(images[:max_batch])
    single = np.concatenate([det.infer(x[i : i + 1])[0] for i in range(len(x))])
    ref = det.postprocess([single], params, [im.shape[:2] for im in images[:max_batch]])
    raw_diff, box_diff, count_mismatch = 0.0, 0.0, 0
    for b in range(1, len(x) + 1):
        out = np.concatenate([det.infer(x[s : s + b])[0] for s in range(0, len(x), b)])
        raw_diff = max(raw_diff, float(np.abs(out - single).max()))
        got = det.postprocess([out], params, [im.shape[:2] for im in images[:max_batch]])
        for r, g in zip(ref, got):
            if len(r) != len(g):
                count_mismatch += 1
            elif len(r):
                box_diff = max(box_diff, float(np.abs(r.boxes - g.boxes).max()))
    return {"raw_max_abs_diff": raw_diff, "box_max_abs_diff_px": box_diff, "images_with_other_count": count_mismatch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--data", default=None, help="dataset YAML (default: the checkpoint's)")
    ap.add_argument("--calib", default=None, help="INT8 calibration images (default: the data's unlabeled folder)")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--calib-method", default="entropy")
    ap.add_argument("--out", default=None, help="folder for the exported models (default: next to the weights)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma list of rows to skip: nms,fp16,int8,eval")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    weights = Path(args.weights)
    ckpt = load_checkpoint(weights)
    data = args.data or ckpt["config"]["data"]
    imgsz = int(ckpt["config"]["imgsz"])
    spec = load_dataset(data)
    out = Path(args.out) if args.out else weights.parent
    out.mkdir(parents=True, exist_ok=True)
    print(f"{weights}: epoch {ckpt.get('epoch')}, imgsz {imgsz}, {len(spec.val)} val images from {data}")
    images = [read_image(s.path) for s in spec.val]
    gt = spec.val_coco

    exports: dict[str, tuple[Path, float]] = {}

    def export(name: str, **kw: Any) -> None:
        t = time.perf_counter()
        path = export_model(weights, out=out / f"parity_{name}.onnx", **kw)
        exports[name] = (path, time.perf_counter() - t)

    export("fp32")
    if "nms" not in skip:
        export("fp32_nms", nms=True, conf=CONF, iou=IOU, max_det=MAX_DET)
    if "fp16" not in skip:
        export("fp16", half=True)
    if "int8" not in skip:
        for target in ("cpu", "tensorrt"):
            export(f"int8_{target}", int8=True, calib=args.calib, calib_size=args.calib_size,
                   calib_method=args.calib_method, int8_target=target)

    rows: list[tuple[str, dict[str, Any]]] = []
    if "eval" not in skip:
        from ssod.training.evaluate_cli import evaluate_checkpoint

        t = time.perf_counter()
        res, _ = evaluate_checkpoint(str(weights), data=data, batch=args.batch, device="cpu",
                                     out=str(out / "parity_ssod_eval.json"), workers=0)
        rows.append(("torch (ssod eval)", {**res["metrics"], "seconds": time.perf_counter() - t, "backend": "torch"}))
    ref = evaluate(weights, images, gt, args.batch)
    rows.append(("torch (deploy pipeline)", ref))
    for name, (path, _) in exports.items():
        rows.append((f"onnx {name}", evaluate(path, images, gt, args.batch)))

    base = ref["mAP50-95"]
    print("\n| model | backend | mAP50-95 | mAP50 | ΔAP50-95 vs torch (pts) | eval s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['backend']} | {r['mAP50-95']:.4f} | {r['mAP50']:.4f} | "
              f"{100 * (r['mAP50-95'] - base):+.3f} | {r['seconds']:.1f} |")
    check = dynamic_batch_check(exports["fp32"][0], images)
    print(f"\ndynamic batch 1..16 vs batch 1 (fp32 ONNX, first 16 val images): {check}")
    print("export seconds: " + ", ".join(f"{k} {v[1]:.1f}" for k, v in exports.items()))


if __name__ == "__main__":
    main()
