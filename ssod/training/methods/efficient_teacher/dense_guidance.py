"""DTG-SSOD's dense teacher guidance (Li et al., NeurIPS 2022; seed 002) for anchor-free YOLO heads.

``assignment: inverse_nms`` replaces the task-aligned assignment of pseudo boxes. The student
position that corresponds to a teacher position (``pseudo_geometry.pull_positions``) is
assigned to the box that position's candidate was suppressed by in the teacher's NMS (Inverse
NMS Clustering, the math shared with the two-stage method in ``two_stage/dtg_ops.py``); positions
whose teacher candidate is clear background, or whose cluster's box left the strong view, are
background. Rank Matching then aligns the student's score ranking within each cluster with the
teacher's.

Choices the paper (written for Faster R-CNN) leaves open, for a dense head:

* candidates are the teacher's positions scoring at least tau1[c] in their best class c: the
  Epoch Adaptor's per-class floor is where efficient_teacher stops counting a box as an object,
  so it plays the paper's tau (0.45 at the R-CNN stage); the clusters' kept boxes are then
  exactly the pseudo boxes the PLA would use (greedy NMS at the same IoU);
* the class target of a member of a *reliable* cluster (kept score >= tau2[c]) is an IoU-aware
  score instead of DTG's hard 1 under Focal loss (ultralytics' BCE head expects scores that rank
  boxes by quality): ``inc_target: aligned`` (default) the task-aligned metric of the teacher's
  box and score there, normalised to 1 at the kept box (what TaskAlignedAssigner does with the
  student's); ``iou`` its plain IoU with the kept box, which weighs every member almost fully
  (measured with Rank Matching at 3: level with ``aligned`` at the first evaluations, Run 30).
  Box and DFL losses go to the kept box at those positions, weighted by that target as
  ultralytics weights them;
* a member of an *uncertain* cluster gets the teacher's own score at that position as its soft
  class target (the PLA's soft target, read per position instead of per box) and no box loss;
* Rank Matching (Eq. 4-5, T = 1 from the paper's Table 3) runs over every cluster's members in
  the student view, on the logits of the cluster's class; a student cell that reads the same
  teacher cell as another (a zoomed-in strong view) is a member twice. Its weight defaults to 0,
  not the paper's 3: at 3 it cost 4.5 mAP50-95 on the demo benchmark (Run 30).

Measured (docs/benchmarks.md Run 30, two demo draws): INC alone -2.1 / -1.3 mAP50-95 against the
task-aligned PLA, so ``assignment: tal`` stays the default; kept as an option for heads and data
where the teacher's clusters are the better guide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ssod.training.methods.two_stage.dtg_ops import inverse_nms_clustering
from ssod.training.models.yolo import clipped_xyxy
from ssod.training.pseudo import PseudoLabels
from ssod.training.pseudo_geometry import pull_positions
from ssod.training.ultralytics_env import import_ultralytics

if TYPE_CHECKING:
    from ssod.training.models.base import Detector

__all__ = ["DenseAssignment", "TeacherClusters", "teacher_clusters", "student_assignment"]


class DenseAssignment(NamedTuple):
    """Per student position (B, A): the target it is assigned to and what the teacher said there."""

    index: torch.Tensor    # long: row of the flat target list (the PLA's ``targets``), -1 = background
    quality: torch.Tensor  # a reliable member's class target: IoU-aware, 1 at the kept box (``inc_target``)
    score: torch.Tensor    # the teacher's score at this position in the cluster's class
    logit: torch.Tensor    # ... as a logit (Rank Matching's teacher side)


class TeacherClusters(NamedTuple):
    """The teacher's NMS clusters on its own grid (B, A_t) and their kept boxes (``heads``)."""

    heads: PseudoLabels    # boxes, scores, labels, batch_idx, head (= row number), in the weak view
    head: torch.Tensor     # (B, A_t) long: the kept box (row of ``heads``) each position belongs to, -1 = none
    quality: torch.Tensor  # (B, A_t) as ``DenseAssignment``'s, on the teacher's grid
    score: torch.Tensor    # (B, A_t)
    logit: torch.Tensor    # (B, A_t)


@torch.no_grad()
def teacher_clusters(
    teacher: "Detector", raw: list[torch.Tensor], img_hw: tuple[int, int], tau1: torch.Tensor, iou: float,
    aligned: tuple[float, float] | None = None,
) -> TeacherClusters:
    """Inverse NMS Clustering of the teacher's dense output ``raw`` (its per-level maps on a view
    of ``img_hw`` pixels), candidates scoring >= ``tau1`` (per class) in their best class.

    ``quality`` is each member's IoU with its kept box, or with ``aligned`` = (alpha, beta) the
    task-aligned form of it: score^alpha * IoU^beta divided by the cluster's largest (the kept
    box: 1), ultralytics' TaskAlignedAssigner target with the teacher's boxes and scores in place
    of the student's, so a cluster weighs about what a task-aligned positive set does.
    """
    decoded = teacher.decode(raw)  # (B, 4 + nc, A): xywh pixels + class probabilities
    b, _, a = decoded.shape
    p = decoded.transpose(1, 2).float()
    scores, labels = p[..., 4:].max(-1)  # (B, A)
    boxes = clipped_xyxy(p[..., :4], img_hw)
    bi, ai = (scores >= tau1.to(scores)[labels]).nonzero(as_tuple=True)
    cb, cs, cl = boxes[bi, ai], scores[bi, ai], labels[bi, ai]
    inc = inverse_nms_clustering(cb, cs, cl, score_thr=0.0, iou_thr=iou, group=bi)
    keep = inc.keep
    head_no = torch.full((len(cs),), -1, dtype=torch.long, device=cs.device)
    head_no[keep] = torch.arange(len(keep), device=cs.device)
    member = inc.cluster >= 0  # every candidate: a kept box is its own cluster
    own_head = head_no[inc.cluster.clamp(min=0)]
    r = 4 * int(teacher.reg_max)
    logits = torch.cat([x[:, r:].flatten(2) for x in raw], 2).transpose(1, 2).float()  # (B, A, nc)

    def dense(values: torch.Tensor, fill: float) -> torch.Tensor:
        out = torch.full((b, a), fill, dtype=values.dtype, device=values.device)
        out[bi[member], ai[member]] = values[member]
        return out

    import_ultralytics()
    from ultralytics.utils.metrics import bbox_iou

    quality = bbox_iou(cb, cb[inc.cluster.clamp(min=0)], xywh=False).squeeze(-1)  # row with row
    if aligned is not None and len(cs):
        metric = cs.pow(aligned[0]) * quality.pow(aligned[1])
        top = torch.zeros_like(metric).scatter_reduce(0, inc.cluster.clamp(min=0), metric, "amax", include_self=False)
        quality = metric / top[inc.cluster.clamp(min=0)].clamp(min=1e-9)
    heads = {
        "boxes": cb[keep], "scores": cs[keep], "labels": cl[keep].long(), "batch_idx": bi[keep].long(),
        "head": torch.arange(len(keep), device=cs.device),
    }
    return TeacherClusters(
        heads=heads,
        head=dense(own_head, -1),
        quality=dense(quality, 0.0),
        score=dense(cs, 0.0),
        logit=dense(logits[bi, ai, cl], 0.0),
    )


def student_assignment(
    clusters: TeacherClusters, kept: torch.Tensor, M_weak: torch.Tensor, M_strong: torch.Tensor,
    teacher_grid: list[tuple[int, int]], teacher_strides: list[float],
    student_grid: list[tuple[int, int]], student_strides: list[float],
) -> DenseAssignment:
    """The clusters read on the student's grid of the strong view.

    ``kept`` (K,): for each kept box (row of ``clusters.heads``) its row in the strong-view target
    list, -1 when it did not survive the move into the strong view (its members are background).
    """
    src = pull_positions(M_weak, M_strong, teacher_grid, teacher_strides, student_grid, student_strides)
    ok = src >= 0
    at = src.clamp(min=0)
    head = torch.where(ok, clusters.head.gather(1, at), torch.full_like(src, -1))
    row = torch.where(head >= 0, kept[head.clamp(min=0)] if kept.numel() else torch.full_like(head, -1),
                      torch.full_like(head, -1))
    fg = row >= 0

    def read(values: torch.Tensor) -> torch.Tensor:
        v = values.gather(1, at)
        return torch.where(fg, v, torch.zeros_like(v))

    return DenseAssignment(row, read(clusters.quality), read(clusters.score), read(clusters.logit))
