"""DTG-SSOD's math (Li et al., NeurIPS 2022; seed 002) as pure tensor functions.

* ``inverse_nms_clustering``: which teacher NMS cluster each candidate belongs to (INC, Sec. 3.2).
* ``rank_matching_loss``: KL between the teacher's and the student's softmax over each
  cluster's target-class logits (Eq. 4-5), vectorised with segment (scatter) reductions.
* ``softmax_focal_loss``: the classification loss DTG adopts from Unbiased Teacher.
* ``match_anchors``: the RPN-stage teacher -> student anchor correspondence.

No public DTG code exists; every choice the paper leaves open is stated where it is made.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou

__all__ = [
    "INCResult", "inverse_nms_clustering", "segment_log_softmax", "rank_matching_loss",
    "softmax_focal_loss", "match_anchors",
]


class INCResult(NamedTuple):
    cluster: torch.Tensor  # (N,) int64: index (into the inputs) of the kept box of the candidate's cluster, -1 = background
    labels: torch.Tensor   # (N,) int64: the cluster's class, -1 = background
    targets: torch.Tensor  # (N, 4): the cluster's kept box (regression target); zeros for background
    keep: torch.Tensor     # (K,) int64: indices of the kept boxes (what the teacher's NMS outputs), by score


def _group_ids(labels: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    labels = labels.long()
    if group is None:
        return labels
    span = int(labels.max()) + 1 if labels.numel() else 1
    return group.long() * span + labels


def inverse_nms_clustering(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    score_thr: float,
    iou_thr: float,
    group: torch.Tensor | None = None,
) -> INCResult:
    """Reverse the teacher's greedy class-aware NMS into clusters (Inverse NMS Clustering).

    Candidates are the boxes with ``score >= score_thr`` (the paper: lower-scoring ones are
    "clear background"). NMS runs per (``group``, label) — ``group`` is e.g. the image index,
    or image and FPN level at the RPN stage — with torchvision's ``batched_nms`` (IoU >
    ``iou_thr`` suppresses). Greedy NMS visits candidates by descending score and a kept box
    suppresses every later same-group box overlapping it, so a suppressed box belongs to the
    *highest-scoring kept box of its group that outscores it and overlaps it by IoU >
    ``iou_thr``*: that is computed here at once from the (candidates x kept) IoU matrix, and
    tests check it against a step-by-step greedy NMS. A kept box is its own cluster. Score
    ties are broken by input order.
    """
    n = boxes.shape[0]
    if not (scores.shape == (n,) and labels.shape == (n,)) or boxes.shape != (n, 4):
        raise ValueError(
            f"inverse_nms_clustering: boxes (N,4), scores (N,), labels (N,) expected, got "
            f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    device = boxes.device
    cluster = torch.full((n,), -1, dtype=torch.long, device=device)
    cand = torch.nonzero(scores >= score_thr).flatten()
    if cand.numel() == 0:
        return INCResult(cluster, cluster.clone(), boxes.new_zeros(n, 4), cand)
    gid = _group_ids(labels, group)
    b, s, g = boxes[cand].float(), scores[cand].float(), gid[cand]
    kept_local = batched_nms(b, s, g, iou_thr)  # sorted by descending score
    # rank in the greedy visiting order (descending score, ties by input order)
    order = torch.argsort(s, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    iou = box_iou(b, b[kept_local])  # (C, K)
    ok = (g[:, None] == g[kept_local][None, :]) & (iou > iou_thr) & (rank[kept_local][None, :] < rank[:, None])
    is_kept = torch.zeros(cand.numel(), dtype=torch.bool, device=device)
    is_kept[kept_local] = True
    big = torch.iinfo(torch.long).max
    first = torch.where(ok, rank[kept_local][None, :].expand_as(ok), torch.full_like(ok, big, dtype=torch.long)).argmin(1)
    assigned = torch.where(is_kept, torch.arange(cand.numel(), device=device), kept_local[first])
    has = is_kept | ok.any(1)  # always True by construction of greedy NMS; kept for safety
    cluster[cand[has]] = cand[assigned[has]]
    fg = cluster >= 0
    out_labels = torch.where(fg, labels.long()[cluster.clamp(min=0)], torch.full_like(cluster, -1))
    targets = torch.where(fg[:, None], boxes[cluster.clamp(min=0)], boxes.new_zeros(n, 4))
    return INCResult(cluster, out_labels, targets, cand[kept_local])


def segment_log_softmax(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """log-softmax of ``x`` (M,) within each segment ``seg`` (M,) in [0, num_segments): scatter logsumexp."""
    mx = torch.full((num_segments,), -math.inf, dtype=x.dtype, device=x.device)
    mx = mx.scatter_reduce(0, seg, x.detach(), reduce="amax", include_self=True)
    z = x - mx[seg]
    se = torch.zeros(num_segments, dtype=x.dtype, device=x.device).index_add(0, seg, z.exp())
    return z - se.log()[seg]


def rank_matching_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, cluster: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Rank Matching (Eq. 4-5), averaged over clusters: mean_j KL(D_t || D_s) over cluster j's members.

    ``student_logits`` / ``teacher_logits`` (M,) are each member's logit of its cluster's class
    (the target category), ``cluster`` (M,) any integer cluster id (>= 0; pass members only).
    D = softmax(logit / T) within each cluster. A one-member cluster contributes KL = 0 and
    still counts in the average ("L_RM is averaged over all NMS clusters"). The teacher side is
    detached. Zero (with a graph) when there are no clusters.
    """
    if not (student_logits.shape == teacher_logits.shape == cluster.shape) or cluster.dim() != 1:
        raise ValueError(
            f"rank_matching_loss: equal 1-D shapes expected, got {tuple(student_logits.shape)}, "
            f"{tuple(teacher_logits.shape)}, {tuple(cluster.shape)}"
        )
    if cluster.numel() == 0:
        return student_logits.sum() * 0.0
    ids, seg = torch.unique(cluster, return_inverse=True)
    k = ids.numel()
    log_ds = segment_log_softmax(student_logits.float() / temperature, seg, k)
    log_dt = segment_log_softmax(teacher_logits.detach().float() / temperature, seg, k)
    kl_rows = log_dt.exp() * (log_dt - log_ds)
    kl = torch.zeros(k, dtype=kl_rows.dtype, device=kl_rows.device).index_add(0, seg, kl_rows)
    return kl.mean()


def softmax_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.5) -> torch.Tensor:
    """Per-row softmax focal loss ``-(1 - p_t)^gamma * log p_t`` (R,).

    DTG uses Focal loss for R-CNN classification, adopted from Unbiased Teacher, whose
    (softmax, multi-class) form and gamma = 1.5 are used here. gamma = 0 is cross-entropy.
    """
    logp = F.log_softmax(logits.float(), -1).gather(1, target.long()[:, None]).squeeze(1)
    return -((1.0 - logp.exp()).clamp(min=0.0) ** gamma) * logp


def match_anchors(
    teacher_anchors: torch.Tensor, student_anchors: torch.Tensor, student_level: torch.Tensor
) -> torch.Tensor:
    """For each teacher anchor (already mapped into the student's view), its student anchor (N,).

    DTG: "assign the teacher's anchors to the corresponding FPN level based on the anchor box
    scale, then choose the student anchor with the largest IoU on that level". The paper's
    level formula (m = log2(area / S), S = 32) encodes torchvision/MMDet's one-size-per-level
    FPN anchors (32, 64, ... px); ssod reads the scale of each level from the student's own
    anchors instead (median sqrt(area) per level) and picks the level(s) whose scale is
    nearest in log2 to the mapped teacher anchor's sqrt(area). On an FPN with one size per
    level this is the paper's rule; where several levels carry the same sizes (torchvision's
    MobileNetV3-FPN repeats all five sizes on every level) all of them are searched. Then the
    student anchor with the largest IoU among the allowed levels is chosen.
    """
    if teacher_anchors.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=student_anchors.device)
    lv = student_level.long()
    n_lv = int(lv.max()) + 1
    s_scale = ((student_anchors[:, 2] - student_anchors[:, 0]) * (student_anchors[:, 3] - student_anchors[:, 1])).clamp(min=1e-6).sqrt().log2()
    # median per level (vectorised: sort by (level, scale), take the middle element of each level)
    key = lv.double() * 1e6 + s_scale.double()
    srt = torch.argsort(key)
    counts = torch.bincount(lv, minlength=n_lv)
    starts = torch.cumsum(counts, 0) - counts
    level_scale = s_scale[srt[(starts + (counts - 1).clamp(min=0) // 2).clamp(max=lv.numel() - 1)]]
    level_scale = torch.where(counts > 0, level_scale, torch.full_like(level_scale, math.inf))
    t = teacher_anchors.float()
    t_scale = ((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])).clamp(min=1e-6).sqrt().log2()
    dist = (t_scale[:, None] - level_scale[None, :]).abs()  # (N, L)
    allowed = dist <= dist.min(1, keepdim=True).values + 1e-6  # (N, L)
    iou = box_iou(t, student_anchors.float())  # (N, A)
    iou = torch.where(allowed[:, lv], iou, torch.full_like(iou, -1.0))
    return iou.argmax(1)
