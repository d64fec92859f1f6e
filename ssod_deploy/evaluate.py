"""COCO box mAP via pycocotools, quietly, tolerant of hand-written ground truth.

pycocotools is the reference everybody compares against, so the numbers come from it; this
module only normalises the inputs (missing ``iscrowd``/``area``/annotation ids, empty
detection lists) and turns ``COCOeval`` state into plain dicts and a readable table.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ssod_deploy.boxes import box_iou

METRIC_KEYS = ("mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")


def coco_evaluate(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Box mAP of ``detections`` against the COCO-format ``gt`` dict.

    ``detections``: dicts with ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``.
    Returns ``{"metrics": {...}, "per_class": [...]}``; metrics are 0-1 floats, NaN where
    pycocotools reports -1 (no ground truth in that size range / class).
    Per-class AP is read from ``COCOeval.eval["precision"]`` at area=all, maxDets=100, and so is
    ``pr_curve``: each class's precision at pycocotools' 101 recall points at IoU 0.5 (None for a
    class without ground truth), for the PR-curve picture.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_ds = _normalise_gt(gt)
    dt_ds = _detections_dataset(gt_ds, detections)

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_ds
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = dt_ds
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    metrics = {k: _nan_if_neg(v) for k, v in zip(METRIC_KEYS, ev.stats[:6])}
    per_class = _per_class(ev, gt_ds)
    return {"metrics": metrics, "per_class": per_class, "pr_curve": _pr_curve(ev)}


def _pr_curve(ev: Any) -> dict[str, Any]:
    """Precision at the 101 recall points, IoU 0.5, area all, maxDets 100, per class (pycocotools'
    interpolated curve: the one its AP50 averages)."""
    precision = ev.eval["precision"]
    a_all = ev.params.areaRngLbl.index("all")
    m_100 = ev.params.maxDets.index(100) if 100 in ev.params.maxDets else -1
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    curves = precision[t50, :, :, a_all, m_100].T  # (K, R)
    return {
        "recall": [round(float(r), 2) for r in ev.params.recThrs],
        "category_ids": [c for c in ev.params.catIds],
        "precision": [None if (c < 0).all() else np.clip(c, 0, None).round(4).tolist() for c in curves],
    }


def _nan_if_neg(v: float) -> float:
    v = float(v)
    return float("nan") if v < 0 else v


def _normalise_gt(gt: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``gt`` with what pycocotools assumes filled in.

    Annotation ids are renumbered 1..N: pycocotools treats a matched gt id of 0 as "no match".
    """
    for key in ("images", "categories"):
        if key not in gt:
            raise ValueError(f"ground truth has no '{key}' list (COCO format needs it)")
    ds: dict[str, Any] = {k: copy.deepcopy(v) for k, v in gt.items() if k != "annotations"}
    ds.setdefault("info", {})
    ds.setdefault("licenses", [])
    anns = []
    for n, a in enumerate(gt.get("annotations", []) or [], start=1):
        if "bbox" not in a:
            raise ValueError(f"ground-truth annotation {a.get('id', n)} has no 'bbox'")
        x, y, w, h = (float(v) for v in a["bbox"])
        b = dict(a)
        b["bbox"] = [x, y, w, h]
        b["id"] = n
        b.setdefault("iscrowd", 0)
        if b.get("area") is None:
            b["area"] = w * h
        anns.append(b)
    ds["annotations"] = anns
    return ds


def _detections_dataset(gt_ds: dict[str, Any], detections: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A results "dataset" built directly (``COCO.loadRes`` crashes on an empty list)."""
    image_ids = {img["id"] for img in gt_ds["images"]}
    cat_ids = {c["id"] for c in gt_ds["categories"]}
    anns = []
    for n, d in enumerate(detections, start=1):
        if d["image_id"] not in image_ids:
            raise ValueError(f"detection {n} has image_id {d['image_id']!r} not in the ground truth")
        if d["category_id"] not in cat_ids:
            raise ValueError(
                f"detection {n} has category_id {d['category_id']!r} not in the ground truth "
                f"categories {sorted(cat_ids)}"
            )
        x, y, w, h = (float(v) for v in d["bbox"])
        anns.append(
            {
                "id": n,
                "image_id": d["image_id"],
                "category_id": d["category_id"],
                "bbox": [x, y, w, h],
                "area": w * h,
                "score": float(d["score"]),
                "iscrowd": 0,
            }
        )
    return {
        "info": {},
        "images": copy.deepcopy(gt_ds["images"]),
        "categories": copy.deepcopy(gt_ds["categories"]),
        "annotations": anns,
    }


def _per_class(ev: Any, gt_ds: dict[str, Any]) -> list[dict[str, Any]]:
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
    a_all = ev.params.areaRngLbl.index("all")
    m_100 = ev.params.maxDets.index(100) if 100 in ev.params.maxDets else -1
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt_ds["categories"]}
    n_gt: dict[Any, int] = {}
    for a in gt_ds["annotations"]:
        if not a.get("iscrowd", 0):
            n_gt[a["category_id"]] = n_gt.get(a["category_id"], 0) + 1
    rows = []
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, a_all, m_100]
        rows.append(
            {
                "class_id": cat_id,
                "name": names.get(cat_id, str(cat_id)),
                "AP50-95": _mean_valid(p),
                "AP50": _mean_valid(p[t50]),
                "n_gt": n_gt.get(cat_id, 0),
            }
        )
    return rows


def _mean_valid(p: np.ndarray) -> float:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else float("nan")


# ------------------------------------------------------------------------------------ confusion


def confusion_matrix(
    gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], conf: float = 0.25, iou: float = 0.45,
    category_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Detection confusion matrix, ultralytics' definition: ``m[pred, true]`` over the classes plus a
    last "background" index (row: a ground-truth box nothing found; column: a detection on nothing).

    Detections with ``score >= conf`` are matched to ground truth of any class at IoU > ``iou``,
    each box at most once, highest IoU first, so a right box with the wrong class shows up off the
    diagonal: the error mAP hides and the one a teacher's pseudo labels mostly make.
    ``category_ids`` gives the matrix order (default: the categories sorted by id); crowd boxes are
    left out. Vectorised per image.
    """
    ids = list(category_ids) if category_ids is not None else sorted(int(c["id"]) for c in gt.get("categories", []))
    index = {c: i for i, c in enumerate(ids)}
    nc = len(ids)
    m = np.zeros((nc + 1, nc + 1), np.int64)
    per_image: dict[Any, list[list[Any]]] = {img["id"]: [[], [], [], []] for img in gt.get("images", [])}
    for a in gt.get("annotations", []):
        if not a.get("iscrowd", 0) and a["category_id"] in index and a["image_id"] in per_image:
            per_image[a["image_id"]][0].append(a["bbox"])
            per_image[a["image_id"]][1].append(index[a["category_id"]])
    for d in detections:
        if d["score"] >= conf and d["category_id"] in index and d["image_id"] in per_image:
            per_image[d["image_id"]][2].append(d["bbox"])
            per_image[d["image_id"]][3].append(index[d["category_id"]])
    for g_box, g_cls, d_box, d_cls in per_image.values():
        g_cls, d_cls = np.asarray(g_cls, np.int64), np.asarray(d_cls, np.int64)
        gi, di = _match(_xyxy(g_box), _xyxy(d_box), iou)
        np.add.at(m, (d_cls[di], g_cls[gi]), 1)
        np.add.at(m, (nc, np.delete(g_cls, gi)), 1)  # missed
        np.add.at(m, (np.delete(d_cls, di), nc), 1)  # on background
    return m


def _xyxy(xywh: list) -> np.ndarray:
    b = np.asarray(xywh, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def _match(g: np.ndarray, d: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one (gt, detection) pairs with IoU > ``thr``, greedy by IoU (ultralytics' rule)."""
    if not len(g) or not len(d):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ious = box_iou(g, d)
    gi, di = np.nonzero(ious > thr)
    order = np.argsort(-ious[gi, di], kind="stable")
    gi, di = gi[order], di[order]
    keep = np.unique(di, return_index=True)[1]  # each detection once, its best gt
    gi, di = gi[np.sort(keep)], di[np.sort(keep)]
    keep = np.unique(gi, return_index=True)[1]  # each gt once, its best detection
    return gi[np.sort(keep)], di[np.sort(keep)]


def top_confusions(m: Any, names: Sequence[str], k: int = 5) -> list[str]:
    """The ``k`` largest off-diagonal class-to-class counts of a confusion matrix (array or nested
    lists, as stored in the JSON), as 'true -> predicted: n of N true boxes'."""
    m = np.asarray(m)
    nc = len(names)
    off = m[:nc, :nc].copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    totals = m[:, :nc].sum(0)
    lines = []
    for pred, true in zip(*np.unravel_index(flat, off.shape)):
        if off[pred, true] > 0:
            lines.append(f"{names[true]} -> {names[pred]}: {off[pred, true]} of {totals[true]} {names[true]} boxes")
    return lines


# ------------------------------------------------------------------------------------ output


def format_table(result: Mapping[str, Any]) -> str:
    """Overall metrics line block and a per-class table, for terminals and log files."""
    m = result["metrics"]
    lines = ["  ".join(f"{k} {_fmt(m.get(k))}" for k in METRIC_KEYS)]
    rows = result.get("per_class") or []
    if rows:
        name_w = max(5, *(len(str(r["name"])) for r in rows))
        header = f"{'id':>4}  {'class':<{name_w}}  {'n_gt':>6}  {'AP50':>6}  {'AP50-95':>7}"
        lines += [header, "-" * len(header)]
        for r in rows:
            lines.append(
                f"{str(r['class_id']):>4}  {str(r['name']):<{name_w}}  {r['n_gt']:>6}  "
                f"{_fmt(r['AP50']):>6}  {_fmt(r['AP50-95']):>7}"
            )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{float(v):.3f}"


def detections_to_coco(
    image_ids: Sequence[Any],
    boxes_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    labels_list: Sequence[np.ndarray],
    label_to_category: Mapping[int, Any] | Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Per-image xyxy boxes/scores/labels -> COCO result dicts (bbox as [x, y, w, h]).

    ``label_to_category`` maps a model label to a COCO category id (dict or list indexed by
    label); ``None`` keeps the label as the id.
    """
    if not (len(image_ids) == len(boxes_list) == len(scores_list) == len(labels_list)):
        raise ValueError("detections_to_coco: image_ids, boxes, scores and labels differ in length")
    out: list[dict[str, Any]] = []
    for img_id, boxes, scores, labels in zip(image_ids, boxes_list, scores_list, labels_list):
        img_id = img_id.item() if isinstance(img_id, np.generic) else img_id  # JSON-safe
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if b.shape[0] == 0:
            continue
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1).round(3).tolist()
        s = np.asarray(scores, dtype=np.float64).reshape(-1).tolist()
        lab = np.asarray(labels).reshape(-1).astype(np.int64).tolist()
        if label_to_category is None:
            cats = lab
        else:
            try:
                cats = [label_to_category[i] for i in lab]
                cats = [c.item() if isinstance(c, np.generic) else c for c in cats]
            except (KeyError, IndexError) as e:
                raise ValueError(f"label {e} has no category in label_to_category") from e
        out.extend(
            {"image_id": img_id, "category_id": c, "bbox": bb, "score": sc}
            for bb, sc, c in zip(xywh, s, cats)
        )
    return out
