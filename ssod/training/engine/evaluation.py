"""Evaluate a torch detector on a val loader with the runtime's COCO evaluator."""

from __future__ import annotations

from typing import Any

import torch

from ssod.training.pseudo_geometry import map_boxes
from ssod_deploy.evaluate import coco_evaluate, confusion_matrix


@torch.no_grad()
def predict_original_coords(model, loader, device, conf: float, iou: float, max_det: int):
    """Yield (dataset index, boxes xyxy in original pixels, scores, labels) per val image."""
    was_training = model.training
    model.eval()
    index = 0
    try:
        for batch in loader:
            img = batch["img"].to(device)
            dets = model.predict(img, conf=conf, iou=iou, max_det=max_det)
            boxes = torch.cat([d["boxes"] for d in dets]).float().cpu()
            bidx = torch.cat([torch.full((len(d["boxes"]),), i, dtype=torch.long) for i, d in enumerate(dets)])
            M = batch["M"].float()
            eye = torch.eye(3).expand_as(M)
            orig = map_boxes(boxes, bidx, M, eye)  # view -> original pixels
            hw = batch["orig_size"].float()[bidx]
            orig[:, 0::2] = orig[:, 0::2].clamp(min=0).minimum(hw[:, 1:2])
            orig[:, 1::2] = orig[:, 1::2].clamp(min=0).minimum(hw[:, 0:1])
            scores = torch.cat([d["scores"] for d in dets]).float().cpu()
            labels = torch.cat([d["labels"] for d in dets]).long().cpu()
            for i in range(len(dets)):
                m = bidx == i
                yield index + i, orig[m].numpy(), scores[m].numpy(), labels[m].numpy()
            index += len(dets)
    finally:
        model.train(was_training)


def evaluate_detector(model, loader, spec, device, conf: float = 0.001, iou: float = 0.7, max_det: int = 300) -> dict[str, Any]:
    """COCO mAP (+ per-class AP, + the confusion matrix at ultralytics' conf 0.25 / IoU 0.45) of
    ``model`` on ``spec.val``; image ids are val indices."""
    dets: list[dict[str, Any]] = []
    for image_id, boxes, scores, labels in predict_original_coords(model, loader, device, conf, iou, max_det):
        wh = boxes[:, 2:] - boxes[:, :2]
        dets.extend(
            {"image_id": int(image_id), "category_id": int(c), "bbox": [float(x), float(y), float(w), float(h)], "score": float(s)}
            for (x, y), (w, h), s, c in zip(boxes[:, :2], wh, scores, labels)
        )
    return score_detections(spec, dets)


def score_detections(spec, dets: list[dict[str, Any]]) -> dict[str, Any]:
    """COCO metrics, per-class AP and PR curves of COCO-format ``dets`` on ``spec.val``, plus the
    confusion matrix (rows predicted, columns true, the last of each background)."""
    result = coco_evaluate(spec.val_coco, dets)
    matrix = confusion_matrix(spec.val_coco, dets, category_ids=range(len(spec.names)))
    result["confusion"] = {"names": list(spec.names), "matrix": matrix.tolist()}
    return result
