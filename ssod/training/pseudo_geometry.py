"""Moving boxes between views of the same image on the GPU.

Teacher pseudo-boxes live in the weak view, the student sees the strong view; both views
carry their original->view matrix (``batch.py``), so a box moves with
``M_to @ inv(M_from)``. Torch twin of ``views.transform_boxes``/``valid_boxes``, vectorised
over all boxes of a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["view_to_view", "map_boxes", "map_edge_support", "clip_and_filter", "erased_area", "rect_overlaps", "spare_objects", "paint_rects", "resample_maps",
           "pull_positions"]


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


def map_edge_support(
    support: torch.Tensor, dist: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor,
    M_from: torch.Tensor, M_to: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move per-edge location distributions (Localization Distillation) from one view to another.

    ``support`` (N, 4, R): the pixel coordinates each edge of box ``n`` may sit at (x for the
    left/right edges 0 and 2, y for top/bottom 1 and 3), ``dist`` (N, 4, R) their probabilities,
    ``boxes`` (N, 4) the boxes in view ``from`` (their centres carry the off-axis terms of a
    rotation or shear). Along each axis a point moves like a box corner; a mirrored axis swaps
    its two edges (the left edge's distribution becomes the right edge's). Exact for the flips,
    scales and shifts ssod's views use; with rotation or shear each edge keeps its own axis (an
    approximation: a rotated edge is no longer one coordinate). Returns (support, dist) mapped.
    """
    if support.numel() == 0:
        return support, dist
    T = view_to_view(M_from, M_to)[batch_idx.long()]  # (N,3,3)
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2).float()[:, None, None]
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2).float()[:, None, None]
    t = T[:, :, :, None, None]  # (N, 3, 3, 1, 1): broadcast over (edge pair, R)
    x = t[:, 0, 0] * support[:, 0::2].float() + t[:, 0, 1] * cy + t[:, 0, 2]  # (N, 2, R): left, right
    y = t[:, 1, 1] * support[:, 1::2].float() + t[:, 1, 0] * cx + t[:, 1, 2]  # (N, 2, R): top, bottom
    dx, dy = dist[:, 0::2], dist[:, 1::2]
    flip_x = (T[:, 0, 0] < 0)[:, None, None]
    flip_y = (T[:, 1, 1] < 0)[:, None, None]
    x, dx = torch.where(flip_x, x.flip(1), x), torch.where(flip_x, dx.flip(1), dx)
    y, dy = torch.where(flip_y, y.flip(1), y), torch.where(flip_y, dy.flip(1), dy)
    out = torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), 1).to(support.dtype)
    return out, torch.stack((dx[:, 0], dy[:, 0], dx[:, 1], dy[:, 1]), 1)


def clip_and_filter(
    boxes: torch.Tensor, imgsz: int, min_size: float = 2.0, min_visible: float = 0.25,
    erased: torch.Tensor | None = None, batch_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip mapped boxes to the ``imgsz`` canvas; keep those still ``min_size`` px wide/high
    with at least ``min_visible`` of their (unclipped) mapped area visible: inside the canvas
    and, when ``erased`` (B, K, 4) rectangles of image ``batch_idx`` are given, not under them.

    Returns ``(clipped_boxes (N,4), keep (N,) bool)``; the caller indexes boxes, scores and
    labels with the same mask.
    """
    clipped = boxes.clamp(0.0, float(imgsz))
    cw = clipped[:, 2] - clipped[:, 0]
    ch = clipped[:, 3] - clipped[:, 1]
    area_m = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = cw * ch
    if erased is not None and batch_idx is not None:
        visible = visible - erased_area(clipped, batch_idx, erased)
    keep = (cw >= min_size) & (ch >= min_size) & (area_m > 0) & (visible >= min_visible * area_m)
    return clipped, keep


def erased_area(boxes: torch.Tensor, batch_idx: torch.Tensor, erased: torch.Tensor) -> torch.Tensor:
    """(N,) area of each xyxy box covered by its image's erased rectangles ``erased`` (B, K, 4).

    The sum of the K intersections: exact when the rectangles do not overlap each other, an
    upper bound when they do (then a box counts as a little more hidden than it is).
    """
    if boxes.numel() == 0:
        return boxes.new_zeros(0)
    return rect_overlaps(boxes, batch_idx, erased).sum(1)


def rect_overlaps(boxes: torch.Tensor, batch_idx: torch.Tensor, rects: torch.Tensor) -> torch.Tensor:
    """(N, K) area of each xyxy box (N, 4) inside each rectangle of its image ``rects`` (B, K, >=4)."""
    r = rects[..., :4].to(boxes)[batch_idx.long()]  # (N, K, 4)
    b = boxes[:, None]
    w = (torch.minimum(b[..., 2], r[..., 2]) - torch.maximum(b[..., 0], r[..., 0])).clamp(min=0)
    h = (torch.minimum(b[..., 3], r[..., 3]) - torch.maximum(b[..., 1], r[..., 1])).clamp(min=0)
    return w * h


def spare_objects(
    rects: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, imgsz: int,
    min_size: float = 2.0, min_visible: float = 0.25,
) -> torch.Tensor:
    """(B, K) bool: which of each image's drawn cutouts ``rects`` (B, K, >=4 xyxy; zero rows: none)
    to apply, so that none alone makes ``clip_and_filter`` drop a pseudo box (``boxes``: mapped
    into the view, unclipped) it would keep without cutouts.

    Why: a cutout that hides an object whole turns that pseudo label into background for the
    student; cutouts over background or over part of an object keep the occlusion the strong
    view is there for. One (N, K) comparison for the whole batch.
    """
    xyxy = rects[..., :4].float()
    drawn = (xyxy[..., 2] > xyxy[..., 0]) & (xyxy[..., 3] > xyxy[..., 1])  # (B, K)
    if boxes.numel() == 0:
        return drawn
    clipped, kept = clip_and_filter(boxes, imgsz, min_size, min_visible)
    visible = ((clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]))[:, None]
    visible = visible - rect_overlaps(clipped, batch_idx, xyxy)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None]
    hides = (kept[:, None] & (visible < min_visible * area)).float()  # (N, K)
    hidden = torch.zeros(drawn.shape, device=hides.device).index_add_(0, batch_idx.long().to(hides.device), hides)
    return drawn & (hidden.to(drawn.device) == 0)


def paint_rects(img: torch.Tensor, rects: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``img`` (B, C, H, W) in [0, 1] with each applied rectangle of ``rects`` (B, K, 5: xyxy
    pixels, gray level 0-255) filled with its gray level, later passes over earlier ones (the
    order ``views.cutout`` paints in). A loop over the K passes only (three by default)."""
    H, W = img.shape[-2:]
    ys = torch.arange(H, device=img.device, dtype=torch.float32)[None, :, None] + 0.5  # pixel centres
    xs = torch.arange(W, device=img.device, dtype=torch.float32)[None, None, :] + 0.5
    r = rects.to(img.device).float()
    apply = apply.to(img.device)
    for k in range(r.shape[1]):
        x1, y1, x2, y2, gray = (v[:, None, None] for v in r[:, k].unbind(-1))
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2) & apply[:, k, None, None]  # (B, H, W)
        img = torch.where(inside[:, None], (gray / 255.0).to(img.dtype)[:, None], img)
    return img


def _cell_centres(h: int, w: int, step_y: float, step_x: float, device: torch.device) -> torch.Tensor:
    """(1, H*W, 3) homogeneous pixel centres of an H x W grid of cells step_y x step_x px, row-major
    (ultralytics' anchor points times the stride)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * step_y
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * step_x
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy, torch.ones_like(gx)), -1).reshape(1, h * w, 3)


def resample_maps(maps: list[torch.Tensor], M_from: torch.Tensor, M_to: torch.Tensor, canvas: int) -> torch.Tensor:
    """Dense per-level maps of view ``from`` read at the grid-cell centres of view ``to``.

    ``maps``: per level (B, C, H, W) over a square ``canvas``-pixel view, cell ``(i, j)`` centred
    on pixel ``((j + 0.5) * canvas / W, (i + 0.5) * canvas / H)`` (ultralytics' anchor points).
    Each cell of view ``to`` is mapped into view ``from`` and the level's map is sampled there
    bilinearly; points outside view ``from`` read 0. Returns (B, A, C) with the levels
    flattened in order, the layout of the head's flattened outputs. One ``grid_sample`` per
    level (3 for YOLO), no loop over images or positions.
    """
    T = view_to_view(M_to, M_from)  # (B,3,3): to-view pixels -> from-view pixels
    out = []
    for m in maps:
        b, _, h, w = m.shape
        src = _cell_centres(h, w, canvas / h, canvas / w, m.device) @ T[:, :2].transpose(1, 2)  # (B, HW, 2)
        grid = (src * (2.0 / canvas) - 1.0).reshape(b, h, w, 2)  # align_corners=False convention
        out.append(F.grid_sample(m.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).flatten(2))
    return torch.cat(out, 2).transpose(1, 2).to(maps[0].dtype)


def pull_positions(
    M_from: torch.Tensor, M_to: torch.Tensor, from_grid: list[tuple[int, int]], from_strides: list[float],
    to_grid: list[tuple[int, int]], to_strides: list[float],
) -> torch.Tensor:
    """(B, A_to) index of the view-``from`` grid position each view-``to`` position corresponds to, -1 if none.

    Dense teacher guidance needs a one-to-one reading of the teacher's positions from the
    student's. DTG-SSOD (seed 002) pushes each teacher anchor to the student level whose anchor
    scale matches and the best-overlapping anchor there; anchor-free heads have points, not
    anchors, so here each student position *pulls*: its centre is mapped into view ``from`` and
    it reads the cell containing that point on the teacher level whose stride, seen in view
    ``to``, is nearest its own in log2 (a view shrunk 2x sends stride-8 student cells to
    stride-16 teacher cells). Pulling gives every student position exactly one answer (pushing
    leaves zoomed-in student cells without one). Levels are ``(H, W)`` grids with their strides,
    flattened in order (the heads' layout); centres outside view ``from`` read -1.
    """
    T = view_to_view(M_to, M_from)  # (B,3,3): to-view pixels -> from-view pixels
    b = T.shape[0]
    device = T.device
    scale = T[:, :2, :2].det().abs().sqrt()  # (B,): from-view pixels per to-view pixel
    log_from = torch.tensor(from_strides, dtype=torch.float32, device=device).log2()  # (L_from,)
    sizes = torch.tensor([h * w for h, w in from_grid], device=device)
    offsets = torch.cumsum(sizes, 0) - sizes
    heights = torch.tensor([h for h, _ in from_grid], device=device)
    widths = torch.tensor([w for _, w in from_grid], device=device)
    strides = torch.tensor(from_strides, dtype=torch.float32, device=device)
    out = []
    for (h, w), s in zip(to_grid, to_strides):
        level = ((torch.log2(s * scale))[:, None] - log_from[None]).abs().argmin(1)  # (B,)
        src = _cell_centres(h, w, s, s, device) @ T[:, :2].transpose(1, 2)  # (B, HW, 2) pixels of view ``from``
        st = strides[level][:, None]
        j = torch.floor(src[..., 0] / st).long()
        i = torch.floor(src[..., 1] / st).long()
        hh, ww = heights[level][:, None], widths[level][:, None]
        inside = (j >= 0) & (j < ww) & (i >= 0) & (i < hh)
        idx = offsets[level][:, None] + i * ww + j
        out.append(torch.where(inside, idx, torch.full_like(idx, -1)))
    return torch.cat(out, 1) if out else torch.zeros(b, 0, dtype=torch.long, device=device)
