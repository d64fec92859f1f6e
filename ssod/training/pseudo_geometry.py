"""Moving boxes between views of the same image on the GPU.

Teacher pseudo-boxes live in the weak view, the student sees the strong view; both views
carry their original->view matrix (``batch.py``), so a box moves with
``M_to @ inv(M_from)``. Torch twin of ``views.transform_boxes``/``valid_boxes``, vectorised
over all boxes of a batch.
"""

from __future__ import annotations

import torch

__all__ = ["view_to_view", "map_boxes", "clip_and_filter"]


def view_to_view(M_from: torch.Tensor, M_to: torch.Tensor) -> torch.Tensor:
    """(B,3,3) matrices taking pixels of view ``from`` to pixels of view ``to``."""
    # float32 is enough (errors ~1e-4 px) and works on every device (MPS has no float64).
    return M_to.float() @ torch.linalg.inv(M_from.float())


def map_boxes(
    boxes: torch.Tensor, batch_idx: torch.Tensor, M_from: torch.Tensor, M_to: torch.Tensor
) -> torch.Tensor:
    """Map xyxy ``boxes`` (N,4) of image ``batch_idx`` (N,) from one view to another.

    Transforms the 4 corners of each box and takes their min/max (exact for flips, scales and
    shifts; the enclosing box for rotations/shears).
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    T = view_to_view(M_from, M_to)[batch_idx.long()]  # (N,3,3)
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    xs = torch.stack([x1, x2, x2, x1], dim=1)  # (N,4)
    ys = torch.stack([y1, y1, y2, y2], dim=1)
    tx = T[:, 0, 0:1] * xs + T[:, 0, 1:2] * ys + T[:, 0, 2:3]
    ty = T[:, 1, 0:1] * xs + T[:, 1, 1:2] * ys + T[:, 1, 2:3]
    out = torch.stack([tx.amin(1), ty.amin(1), tx.amax(1), ty.amax(1)], dim=1)
    return out.to(boxes.dtype)


def clip_and_filter(
    boxes: torch.Tensor, imgsz: int, min_size: float = 2.0, min_visible: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip mapped boxes to the ``imgsz`` canvas; keep those still ``min_size`` px wide/high
    with at least ``min_visible`` of their (unclipped) mapped area inside.

    Returns ``(clipped_boxes (N,4), keep (N,) bool)``; the caller indexes boxes, scores and
    labels with the same mask.
    """
    clipped = boxes.clamp(0.0, float(imgsz))
    cw = clipped[:, 2] - clipped[:, 0]
    ch = clipped[:, 3] - clipped[:, 1]
    area_m = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (cw >= min_size) & (ch >= min_size) & (area_m > 0) & (cw * ch >= min_visible * area_m)
    return clipped, keep
