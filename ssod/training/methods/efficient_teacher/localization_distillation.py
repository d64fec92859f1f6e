"""Localization Distillation (LD; Zheng et al., CVPR 2022, seed 003) for a student and a teacher that
see different views.

A DFL head predicts, for each of a box's 4 edges, a distribution over R distances (in units of
the position's stride) from its anchor point. LD trains the student's edge distributions to match
the teacher's (KL divergence at temperature T, times T^2), so the student learns where the teacher
is unsure of an edge, not only where its box is. In LD's own setting both models see the same
image and the teacher's distribution at a position is the target at that position. In SSOD the
teacher sees the weak view (here 1.2x larger) and the student the strong view (another scale, a
flip, a shift), so positions, strides and scales differ; copying bins would be wrong. What ssod
transfers instead is the distribution over the edge's *location*:

1. ``edge_support``: each bin j of a kept teacher box's edge is a pixel coordinate in the teacher's
   view (anchor -/+ j * stride), with the teacher's probability (T = 1: the physical belief);
2. ``pseudo_geometry.map_edge_support`` moves those points into the strong view like box corners
   (a flip swaps left and right);
3. ``edge_targets``: for a student position assigned to the box, each mapped point becomes a
   distance in that position's bins, each teacher bin an interval one teacher bin wide there
   (they tile the line without gaps at any scale between the views), and the intervals are put
   on the student's R bins by linear interpolation, DFL's own target rule: the expected distance
   is exactly the teacher's (up to the end bins, which take the mass beyond them, as ultralytics
   clamps its DFL targets) and a sharp teacher gives a sharp target;
4. ``ld_loss``: LD's KL at temperature T (both sides softened; the target by p^(1/T), which is
   softmax(logits / T) when nothing was re-binned), averaged over bins and edges times T^2 as in
   the paper's code (mmdetection ``KnowledgeDistillationKLDivLoss``), weighted per position like
   the DFL term.

Choices the paper leaves open here: the region is the positions that get the box loss (LD's "main
distillation region": the assigner's positives), LD is added to the CIoU and DFL terms rather
than replacing them (the paper's GFL recipe keeps both, weight 0.25 each, T = 10), and uncertain
boxes get LD only where they get box loss (``uncertain_box_loc``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["edge_support", "edge_targets", "ld_loss"]

# edge order of ultralytics' DFL: left, top, right, bottom; d = sign * (anchor - x) / stride
_SIGN = (1.0, 1.0, -1.0, -1.0)


def edge_support(anchors_px: torch.Tensor, strides: torch.Tensor, r: int) -> torch.Tensor:
    """(N, 4, R) pixel coordinates of the R distances each edge of an anchor (N, 2 px) at stride
    (N,) can predict: left/top anchor - j * stride, right/bottom anchor + j * stride."""
    j = torch.arange(r, device=anchors_px.device, dtype=torch.float32)
    a = anchors_px.float().repeat(1, 2)[:, :, None]  # (N, 4, 1): x, y, x, y
    sign = a.new_tensor(_SIGN)[None, :, None]
    return a - sign * j * strides.float().reshape(-1, 1, 1)


def edge_targets(
    support: torch.Tensor, dist: torch.Tensor, anchors_px: torch.Tensor, strides: torch.Tensor,
    canvas_wh: tuple[float, float], r: int,
) -> torch.Tensor:
    """(n, 4, r) target distributions over a student position's bins.

    ``support``/``dist`` (n, 4, R): a teacher edge distribution already in the student's view
    (pixels; unclipped, so their spacing is one teacher bin), ``anchors_px`` (n, 2) and
    ``strides`` (n,) the student positions. Each teacher bin is spread evenly over its width (the
    bins tile the line: no gaps whatever the scale between the views), points are clipped to the
    canvas (a box cut by the border ends there, as its clipped pseudo box does), and the result is
    put on the student's bins by linear interpolation, the rule of DFL's own targets: so the
    expected distance is exactly the teacher's (mass beyond the end bins goes to them, as
    ultralytics clamps its targets). A teacher sure of one bin gives 3/4 of it to the nearest
    student bin at the same scale. One (n, 4, R, r) evaluation, no loops.
    """
    s = strides.double().reshape(-1, 1, 1)
    width = ((support[..., 1:2] - support[..., 0:1]).abs().double() / s).clamp(min=1e-3)  # (n, 4, 1) in bins
    w, h = float(canvas_wh[0]), float(canvas_wh[1])
    lim = torch.tensor([w, h, w, h], dtype=torch.float64, device=support.device)[None, :, None]
    pts = torch.minimum(support.double().clamp(min=0), lim)
    a = anchors_px.double().repeat(1, 2)[:, :, None]
    d = torch.tensor(_SIGN, dtype=torch.float64, device=support.device)[None, :, None] * (a - pts) / s  # (n, 4, R)
    lo, hi = d - width / 2, d + width / 2
    top = float(r - 1)
    below = (hi.clamp(max=0) - lo.clamp(max=0)) / width  # share of each bin's interval under distance 0
    above = (hi.clamp(min=top) - lo.clamp(min=top)) / width
    bins = torch.arange(r, dtype=torch.float64, device=d.device)
    lo_c, hi_c = lo.clamp(0, top)[..., None] - bins, hi.clamp(0, top)[..., None] - bins  # (n, 4, R, r)
    inner = (_tent_integral(hi_c) - _tent_integral(lo_c)) / width[..., None]
    q = (dist.double()[..., None] * inner).sum(-2)
    q[..., 0] += (dist.double() * below).sum(-1)
    q[..., -1] += (dist.double() * above).sum(-1)
    return q.float()


def _tent_integral(u: torch.Tensor) -> torch.Tensor:
    """The integral of the unit tent max(0, 1 - |x|) from -inf to ``u``: linear interpolation's
    share of a point mass going to a bin, accumulated over an interval."""
    u = u.clamp(-1, 1)
    return torch.where(u < 0, (u + 1) ** 2 / 2, 1 - (1 - u) ** 2 / 2)


def ld_loss(pred_logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over positions of ``weight`` (n,) x LD's KL(target_T || student_T) x T^2, averaged over
    bins and the 4 edges (the paper's code); ``pred_logits``/``target`` (n, 4, r)."""
    t = float(temperature)
    q = target.float().clamp(min=0) ** (1.0 / t)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-12)
    log_p = F.log_softmax(pred_logits.float() / t, -1)
    kl = (torch.xlogy(q, q) - q * log_p).mean(-1)  # (n, 4); 0 log 0 = 0
    return (kl.mean(-1) * weight.float()).sum() * (t * t)
