"""Numpy box geometry for the runtime: letterbox and its inverse, IoU, NMS, dense decoding.

Everything is vectorised over boxes; the only Python loop is greedy NMS's loop over *kept*
boxes (each iteration is one vector IoU), which is the standard formulation.
Boxes are ``xyxy`` pixels unless a name says ``xywh`` (centre x, centre y, width, height).
"""

from __future__ import annotations

import cv2
import numpy as np

PAD_VALUE = 114


def _float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


def xywh2xyxy(x: np.ndarray) -> np.ndarray:
    """(..., 4) centre-xywh -> xyxy (new array)."""
    x = _float(x)
    y = np.empty_like(x)
    half = x[..., 2:4] / 2
    y[..., 0:2] = x[..., 0:2] - half
    y[..., 2:4] = x[..., 0:2] + half
    return y


def xyxy2xywh(x: np.ndarray) -> np.ndarray:
    """(..., 4) xyxy -> centre-xywh (new array)."""
    x = _float(x)
    y = np.empty_like(x)
    y[..., 0:2] = (x[..., 0:2] + x[..., 2:4]) / 2
    y[..., 2:4] = x[..., 2:4] - x[..., 0:2]
    return y


def box_area(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) xyxy -> (...,) area; inverted boxes count as 0."""
    b = _float(boxes)
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M)."""
    a = _float(a).reshape(-1, 4)
    b = _float(b).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / (union + eps)


# ---------------------------------------------------------------------------------- letterbox


def letterbox_shape(h: int, w: int, imgsz: int, stride: int | None = None) -> tuple[int, int]:
    """Canvas (H, W) for an h x w image: the imgsz square, or with ``stride`` the smallest
    stride-multiple rectangle holding the image resized to longest side imgsz (ultralytics'
    ``auto`` letterbox: a 640x480 photo at 320 becomes 320x256, 20% fewer pixels than 320x320)."""
    if stride is None:
        return imgsz, imgsz
    if h <= 0 or w <= 0 or imgsz <= 0 or stride <= 0:
        raise ValueError(f"letterbox_shape: invalid sizes h={h} w={w} imgsz={imgsz} stride={stride}")
    new_w, new_h = _resized_wh(h, w, min(imgsz / h, imgsz / w), imgsz)
    return -(-new_h // stride) * stride, -(-new_w // stride) * stride


def letterbox_params(
    h: int, w: int, imgsz: int, canvas_hw: tuple[int, int] | None = None
) -> tuple[float, float, float]:
    """(scale, pad_x, pad_y) fitting an h x w image into a canvas (default the imgsz square),
    aspect kept, longest side resized to imgsz.

    Upscaling is allowed. The pads are the *integer* left/top offsets where ``letterbox``
    places the resized image: ``(canvas - round(w * scale)) / 2`` when that is whole, rounded
    down when it is a half (ultralytics' ``round(d - 0.1)``), so the inverse is exact.
    """
    if h <= 0 or w <= 0 or imgsz <= 0:
        raise ValueError(f"letterbox_params: invalid sizes h={h} w={w} imgsz={imgsz}")
    ch, cw = canvas_hw or (imgsz, imgsz)
    scale = min(imgsz / h, imgsz / w)
    new_w, new_h = _resized_wh(h, w, scale, imgsz)
    pad_x = float(round((cw - new_w) / 2 - 0.1))
    pad_y = float(round((ch - new_h) / 2 - 0.1))
    return float(scale), pad_x, pad_y


def _resized_wh(h: int, w: int, scale: float, imgsz: int) -> tuple[int, int]:
    new_w = min(imgsz, max(1, int(round(w * scale))))
    new_h = min(imgsz, max(1, int(round(h * scale))))
    return new_w, new_h


def letterbox(
    img: np.ndarray, imgsz: int, pad_value: int = PAD_VALUE, stride: int | None = None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resize ``img`` (H, W, 3) uint8 to longest side imgsz and pad it into the imgsz square, or
    with ``stride`` into its smallest stride-multiple rectangle; returns (canvas, params).

    An image that already has the canvas's size comes back as is (no copy): treat the canvas
    as read-only."""
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"letterbox expects (H, W, 3) images, got shape {img.shape}")
    h, w = img.shape[:2]
    canvas_hw = letterbox_shape(h, w, imgsz, stride)
    params = letterbox_params(h, w, imgsz, canvas_hw)
    scale, pad_x, pad_y = params
    new_w, new_h = _resized_wh(h, w, scale, imgsz)
    if (new_w, new_h) == (w, h) and canvas_hw == (h, w):
        return img, params
    if (new_w, new_h) != (w, h):
        interp = cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR
        img = cv2.resize(np.ascontiguousarray(img), (new_w, new_h), interpolation=interp)
    canvas = np.full((*canvas_hw, 3), pad_value, dtype=np.uint8)
    top, left = int(pad_y), int(pad_x)
    canvas[top : top + new_h, left : left + new_w] = img
    return canvas, params


def unletterbox_boxes(
    boxes: np.ndarray, params: tuple[float, float, float], orig_hw: tuple[int, int]
) -> np.ndarray:
    """xyxy boxes in letterboxed pixels -> original-image pixels, clipped to the image."""
    scale, pad_x, pad_y = params
    b = _float(boxes).reshape(-1, 4).copy()
    b -= np.array([pad_x, pad_y, pad_x, pad_y], dtype=b.dtype)
    b /= scale
    h, w = orig_hw
    np.clip(b[:, 0::2], 0, w, out=b[:, 0::2])
    np.clip(b[:, 1::2], 0, h, out=b[:, 1::2])
    return b


# ---------------------------------------------------------------------------------------- NMS


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_thres: float, max_keep: int | None = None
) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, by descending score (like torchvision.ops.nms).

    A box is suppressed when its IoU with a kept higher-scoring box is > ``iou_thres``.
    ``max_keep`` stops once that many are kept (same result as slicing, far fewer iterations).
    """
    boxes = _float(boxes).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"nms: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = box_area(boxes)
    keep: list[int] = []
    limit = boxes.shape[0] if max_keep is None else max_keep
    while order.size and len(keep) < limit:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        if not rest.size:
            break
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_thres]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_thres: float,
    max_keep: int | None = None,
) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other.

    Each class is shifted to its own region of the plane (offset larger than the coordinate
    span), so one plain NMS does all classes at once.
    """
    boxes = _float(boxes).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    classes = np.asarray(classes).reshape(-1)
    span = float(boxes.max() - boxes.min()) + 1.0
    offsets = (classes.astype(np.float64) * span)[:, None]
    return nms(boxes.astype(np.float64) + offsets, scores, iou_thres, max_keep)


# ----------------------------------------------------------------------------- dense decoding

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (K,4) f32, scores (K,), labels (K,) i64


def postprocess_dense(
    pred: np.ndarray,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    max_nms: int = 30000,
    multi_label: bool = False,
    agnostic: bool = False,
) -> list[Detections]:
    """Anchor-free dense output (B, 4 + nc, A) (xywh + class scores) -> per-image detections.

    The numpy twin of ultralytics' ``non_max_suppression``: keep scores > ``conf``, one label
    per box (argmax) or every class above ``conf`` with ``multi_label``, at most ``max_nms``
    candidates by score, class-aware NMS (unless ``agnostic``), at most ``max_det`` results.
    """
    pred = np.asarray(pred)
    if pred.dtype != np.float64:
        pred = pred.astype(np.float32, copy=False)  # fp16 outputs: keep NMS offsets exact
    if pred.ndim != 3 or pred.shape[1] < 5:
        raise ValueError(f"postprocess_dense expects (B, 4 + nc, A), got shape {pred.shape}")
    out: list[Detections] = []
    for x in pred.transpose(0, 2, 1):  # (A, 4 + nc) per image
        cls_scores = x[:, 4:]
        cand = cls_scores.max(axis=1) > conf
        x = x[cand]
        cls_scores = cls_scores[cand]
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = np.nonzero(cls_scores > conf)
            boxes, scores, labels = boxes[i], cls_scores[i, j], j
        else:
            labels = cls_scores.argmax(axis=1)
            scores = np.take_along_axis(cls_scores, labels[:, None], axis=1)[:, 0]
        if scores.shape[0] > max_nms:
            top = np.argsort(-scores, kind="stable")[:max_nms]
            boxes, scores, labels = boxes[top], scores[top], labels[top]
        if agnostic:
            keep = nms(boxes, scores, iou, max_keep=max_det)
        else:
            keep = batched_nms(boxes, scores, labels, iou, max_keep=max_det)
        out.append(
            (
                boxes[keep].astype(np.float32),
                scores[keep].astype(np.float32),
                labels[keep].astype(np.int64),
            )
        )
    return out
