"""The batch contract between data loading, models and methods.

All geometry is in *pixels of the network input* (a square ``imgsz`` canvas) unless a name
says otherwise. Boxes are ``xyxy``. Matrices are 3x3 homogeneous affine transforms that map
pixel coordinates of the *original* image to pixel coordinates of a view::

    [x', y', 1]^T = M @ [x, y, 1]^T

so a box seen in the weak view maps into the strong view with ``M_strong @ inv(M_weak)``.

Labeled batch (dict), produced by ``LabeledDataset`` + ``collate_labeled``:
    img        float32 (B, 3, S, S) in [0, 1], RGB
    boxes      float32 (N, 4) xyxy pixels of ``img``
    cls        int64   (N,)
    batch_idx  int64   (N,)  which image each box belongs to
    M          float32 (B, 3, 3) original -> view
    orig_size  int64   (B, 2) (h, w) of the original image
    paths      list[str]
    skipped    list[tuple[str, str]]  unreadable files replaced by another sample (path, reason)

Unlabeled batch (dict), produced by ``UnlabeledDataset`` + ``collate_unlabeled``:
    weak, strong          float32 (B, 3, Sw, Sw) and (B, 3, S, S): Sw = S, or larger when the
                          method's teacher looks at an enlarged view (``Method.teacher_view_size``):
                          the loader then draws it from the file at that size
    M_weak, M_strong      float32 (B, 3, 3)
    erased                float32 (B, K, 4) the strong view's cutout rectangles, xyxy pixels
                          (zero rows: none); pseudo boxes they hide are dropped
    cutouts_pending       float32 (B, K, 5) only with ``aug.strong_cutout: spare_objects``: the cutouts
                          drawn but not painted (xyxy pixels, gray level 0-255); the first
                          ``pseudo.weak_to_strong`` of the step paints those that hide no pseudo
                          box and moves them to ``erased``
    orig_size, paths, skipped   as above
    gt_boxes, gt_cls, gt_batch_idx   hidden labels mapped into the *weak* view when the dataset
                                     has them (demo data does), else empty tensors

Detections (what ``Detector.predict`` returns, one dict per image):
    boxes (K, 4) xyxy pixels of the input, scores (K,), labels (K,) int64
"""

from __future__ import annotations

from typing import Any

Batch = dict[str, Any]

LABELED_KEYS = ("img", "boxes", "cls", "batch_idx", "M", "orig_size", "paths", "skipped")
UNLABELED_KEYS = (
    "weak", "strong", "M_weak", "M_strong", "erased", "orig_size", "paths", "skipped",
    "gt_boxes", "gt_cls", "gt_batch_idx",
)
