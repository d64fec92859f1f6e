"""Pseudo Label Assigner (PLA) for anchor-free YOLO heads (Detect: DFL box branch + class branch).

Efficient Teacher's PLA (seed 004) splits teacher boxes by score: *reliable* (score >= tau2[c])
boxes are treated like labels; *uncertain* ones (tau1[c] <= score < tau2[c]) only supervise the
classification of the positions assigned to them, with the teacher's score as a soft target;
every other position is background. The public code does this for YOLOv5 anchor heads through
the objectness branch; ultralytics' anchor-free Detect head has no objectness, so here the
class branch carries both roles: its target per position is

    reliable gt     -> the task-aligned target of supervised training (one-hot x normalised
                       alignment metric, ultralytics' TaskAlignedAssigner)
    uncertain gt    -> teacher score in the gt's class (soft target)
    no gt           -> 0 (background)

Box (CIoU) and DFL losses apply to positions whose gt is reliable, or uncertain with a confident
teacher localization. The public code's gate is teacher objectness >= 0.99; the anchor-free
analogue is the sharpness of the teacher's DFL edge distributions: ``localization_quality`` is
the mean over the 4 edges of the largest probability mass on two adjacent bins. A perfectly
trained DFL puts all mass on the two bins around the true distance (quality 1); a vague edge
spreads it (uniform over 16 bins: 0.125). ``uncertain_box_loc`` below 1 plays the 0.99 gate's
role. Measured (benchmarks/loc_quality_gate.py, demo data, teacher after burn-in): trained DFL
edges are sharp almost everywhere, so 0.85 passes 91% of uncertain boxes, and sharpness barely
predicts whether an uncertain box is right (precision 0.32 at any gate). The default is therefore
1.0, the paper's plain PLA (no box loss on uncertain boxes), +1.0 / +1.2 mAP50-95 over 0.85 on
two demo data draws.

All boxes of a batch are assigned in ONE call of the assigner (targets padded per image as in
ultralytics' ``preprocess``); no Python loop over boxes or images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ssod.training.methods.efficient_teacher.dense_guidance import DenseAssignment
from ssod.training.methods.efficient_teacher.localization_distillation import edge_support, edge_targets, ld_loss
from ssod.training.methods.two_stage.dtg_ops import rank_matching_loss
from ssod.training.models.yolo import clipped_xyxy, nms_per_image
from ssod.training.pseudo import PseudoLabels, eval_mode, on_enlarged
from ssod.training.ultralytics_env import import_ultralytics

if TYPE_CHECKING:
    from ssod.training.models.base import Detector

__all__ = [
    "pad_per_image", "image_slots", "inside_any", "max_stride", "localization_quality", "teacher_raw", "class_maps",
    "dense_teacher_detections",
    "multiscale_teacher_detections", "side_of", "PseudoLabelAssigner", "labeled_targets",
]


def pad_per_image(
    batch_idx: torch.Tensor, values: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) rows of images ``batch_idx`` -> ((B, M, K) zero-padded, (B, M) valid mask), M >= 1.

    M is at least 1 so that an image set without boxes still runs the one assigner code path
    (all targets masked -> every position is background).
    """
    n, k = values.shape
    device = values.device
    bi = batch_idx.long()
    pos = image_slots(bi, batch_size)
    m = max(int(pos.max()) + 1 if n else 0, 1)
    out = torch.zeros(batch_size, m, k, dtype=values.dtype, device=device)
    mask = torch.zeros(batch_size, m, dtype=torch.bool, device=device)
    out[bi, pos] = values
    mask[bi, pos] = True
    return out, mask


def image_slots(batch_idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) each row's slot in its image's padded block (``pad_per_image``): rows of an image in input order."""
    bi = batch_idx.long()
    order = torch.argsort(bi, stable=True)
    counts = torch.bincount(bi, minlength=batch_size)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(bi)
    pos[order] = torch.arange(len(bi), device=bi.device) - start[bi[order]]
    return pos


def localization_quality(dist_logits: torch.Tensor) -> torch.Tensor:
    """Sharpness of DFL edge distributions: logits (..., 4, R) -> (...) in (0, 1].

    Mean over the 4 edges of the largest probability on two adjacent bins (a DFL target is a
    two-bin split, so a confident edge scores ~1 wherever its distance falls between bins).
    Heads without a distribution (R == 1) have no such signal: quality 0.
    """
    r = dist_logits.shape[-1]
    if r < 2:
        return dist_logits.new_zeros(dist_logits.shape[:-2])
    p = dist_logits.float().softmax(-1)
    return (p[..., :-1] + p[..., 1:]).amax(-1).mean(-1)


def teacher_raw(teacher: "Detector", img: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's raw per-level head maps on ``img`` (eval mode, no grad)."""
    with eval_mode(teacher):
        return teacher.forward_raw(img)


def max_stride(model: "Detector") -> int:
    """A dense model's largest stride: what its input sides must be a multiple of."""
    return int(torch.as_tensor(model.stride).max())


def class_maps(raw: list[torch.Tensor], reg_max: int) -> list[torch.Tensor]:
    """Per-level class probabilities (B, nc, H, W) from raw Detect maps (box channels first)."""
    return [x[:, 4 * int(reg_max) :].sigmoid() for x in raw]


@torch.no_grad()
def dense_teacher_detections(
    teacher: "Detector", img: torch.Tensor, conf: float, iou: float, max_det: int, max_nms: int = 30000,
    raw: list[torch.Tensor] | None = None, agnostic: bool = False,
) -> PseudoLabels:
    """Teacher detections on ``img`` with each box's DFL ``loc_quality`` (flat ``PseudoLabels``).

    Same decoding and class-aware NMS as ``YoloDetector.predict`` (best class per position, one
    ``batched_nms`` for the whole batch, ``max_det`` per image), but keeps track of which
    position each box came from so its edge distributions can be scored. One teacher forward,
    or none when the caller passes the teacher's ``raw`` maps of ``img`` (``teacher_raw``).
    """
    if raw is None:
        raw = teacher_raw(teacher, img)
    decoded = teacher.decode(raw)  # (B, 4 + nc, A): xywh pixels + class probabilities
    r = int(teacher.reg_max)
    b, c, a = decoded.shape
    nc = c - 4
    p = decoded.transpose(1, 2).float()
    scores, labels = p[..., 4:].max(-1)  # (B, A)
    top, idx = scores.topk(min(max_nms, a), dim=1)
    bi, ki = (top >= conf).nonzero(as_tuple=True)
    ai = idx[bi, ki]
    boxes = clipped_xyxy(p[bi, ai, :4], tuple(img.shape[-2:]))
    s, lab = scores[bi, ai], labels[bi, ai]
    keep = nms_per_image(boxes, s, lab, bi, iou, max_det, b, nc, agnostic)
    dist = torch.cat([x[:, : 4 * r].flatten(2) for x in raw], 2)  # (B, 4R, A)
    kept_dist = dist[bi[keep], :, ai[keep]].reshape(-1, 4, r)
    import_ultralytics()
    from ultralytics.utils.tal import make_anchors

    anchors, strides = make_anchors(raw, teacher.stride, 0.5)  # (A, 2) grid units, (A, 1)
    ak = ai[keep]
    return {
        "boxes": boxes[keep],
        "scores": s[keep],
        "labels": lab[keep].long(),
        "batch_idx": bi[keep].long(),
        "loc_quality": localization_quality(kept_dist),
        "class_scores": p[bi[keep], ai[keep], 4:],  # (N, nc): every class's score at the box's position
        # each edge's distribution over where it lies (Localization Distillation's targets)
        "edge_support": edge_support(anchors[ak] * strides[ak], strides[ak, 0], r),
        "edge_dist": kept_dist.float().softmax(-1),
    }


@torch.no_grad()
def scaled_teacher_detections(
    teacher: "Detector", img: torch.Tensor, conf: float, iou: float, max_det: int, scale: float,
    raw: list[torch.Tensor] | None = None, agnostic: bool = False,
) -> PseudoLabels:
    """Teacher detections on ``img`` enlarged ``scale`` times (bilinear, to a stride multiple),
    boxes mapped back into ``img`` pixels. ``scale`` 1 is the plain pass (and may reuse ``raw``)."""
    if scale == 1.0:
        return dense_teacher_detections(teacher, img, conf, iou, max_det, raw=raw, agnostic=agnostic)
    return on_enlarged(lambda x: dense_teacher_detections(teacher, x, conf, iou, max_det, agnostic=agnostic),
                       img, scale, max_stride(teacher))


@torch.no_grad()
def multiscale_teacher_detections(
    teacher: "Detector", img: torch.Tensor, conf: float, iou: float, max_det: int, scales: list[float],
    raw: list[torch.Tensor] | None = None, agnostic: bool = False,
) -> PseudoLabels:
    """Teacher detections fused over enlarged copies of ``img`` (scale-aware test-time augmentation).

    Why: a detector misses objects only a couple of cells of its finest stride wide; enlarged, the
    same objects are found (SED, Guo et al. CVPR 2022, gives the teacher the larger scale for the
    same reason), while large objects degrade once they outgrow the sizes the model was trained on.
    So with several scales (1.0 among them) each pass keeps the sizes it sees well - the 1x pass
    boxes at least 2 finest-stride cells wide (sqrt of the area, 16 px at stride 8), each enlarged
    pass boxes under 4 cells in ``img`` pixels - and one class-aware NMS merges them (``max_det``
    per image). The size rule is the model's, not the data's: it is in units of its finest stride.
    One scale is one pass at that scale, every box kept: [1.0] is the paper's teacher, [1.4] the
    cheap variant (one pass at 1.96x the pixels instead of 1 + 2.56x for [1.0, 1.6]).
    """
    wanted = sorted({float(x) for x in scales})
    if len(wanted) == 1:
        return scaled_teacher_detections(teacher, img, conf, iou, max_det, wanted[0], raw=raw, agnostic=agnostic)
    if wanted[0] != 1.0:
        raise ValueError(f"teacher_scales: several scales must include 1.0 (the pass for large objects), got {scales}")
    cell = float(torch.as_tensor(teacher.stride).min())
    base = dense_teacher_detections(teacher, img, conf, iou, max_det, raw=raw, agnostic=agnostic)
    parts = [{k: v[side_of(base["boxes"]) >= 2 * cell] for k, v in base.items()}]
    for f in wanted[1:]:
        d = scaled_teacher_detections(teacher, img, conf, iou, max_det, f, agnostic=agnostic)
        parts.append({k: v[side_of(d["boxes"]) < 4 * cell] for k, v in d.items()})
    fused = {k: torch.cat([p[k] for p in parts]) for k in base}
    keep = nms_per_image(fused["boxes"], fused["scores"], fused["labels"], fused["batch_idx"], iou, max_det,
                         int(img.shape[0]), len(teacher.names), agnostic)
    return {k: v[keep] for k, v in fused.items()}


def side_of(boxes: torch.Tensor) -> torch.Tensor:
    """sqrt(area) of xyxy boxes: one size for any aspect ratio."""
    return (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1).sqrt()


def inside_any(points: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, A) bool: point ``a`` (A, 2 pixels) lies strictly inside a box of image ``b``.

    One padded (B, A, M) comparison; M is the largest box count of an image.
    """
    padded, mask = pad_per_image(batch_idx, boxes.float(), batch_size)  # (B, M, 4), (B, M)
    x, y = points[None, :, None, 0], points[None, :, None, 1]  # (1, A, 1)
    b = padded[:, None]  # (B, 1, M, 4)
    inside = (x > b[..., 0]) & (x < b[..., 2]) & (y > b[..., 1]) & (y < b[..., 3]) & mask[:, None]
    return inside.any(-1)


def labeled_targets(batch: dict[str, Any]) -> PseudoLabels:
    """A labeled batch as PLA targets: every box reliable with score 1 (= ultralytics' supervised loss)."""
    n = len(batch["cls"])
    device = batch["img"].device
    ones = torch.ones(n, dtype=torch.bool, device=device)
    return {
        "boxes": torch.as_tensor(batch["boxes"], dtype=torch.float32, device=device).reshape(-1, 4),
        "labels": torch.as_tensor(batch["cls"], device=device).long().reshape(-1),
        "batch_idx": torch.as_tensor(batch["batch_idx"], device=device).long().reshape(-1),
        "scores": torch.ones(n, device=device),
        "reliable": ones,
        "box_ok": ones,
    }


class PseudoLabelAssigner:
    """Dense losses (cls BCE, CIoU, DFL) of raw YOLO outputs against reliable/uncertain targets.

    ``criterion`` is the model's ultralytics ``v8DetectionLoss`` (``YoloDetector.criterion()``):
    its TaskAlignedAssigner, box decoding, BboxLoss and gains (``hyp.box/cls/dfl``) are reused so
    that an all-reliable target set reproduces the supervised loss exactly. ``weights`` scale
    the three terms on top of those gains (1.0 = exactly the supervised loss).
    """

    def __init__(
        self, criterion: Any, cls_weight: float = 1.0, box_weight: float = 1.0, dfl_weight: float = 1.0,
        ld_weight: float = 0.0, ld_temperature: float = 10.0, rm_temperature: float = 1.0,
    ):
        self.crit = criterion
        self.weights = {"cls": float(cls_weight), "box": float(box_weight), "dfl": float(dfl_weight),
                        "ld": float(ld_weight)}
        self.ld_temperature = float(ld_temperature)
        self.rm_temperature = float(rm_temperature)

    def __call__(
        self, raw: list[torch.Tensor], targets: PseudoLabels, ignore: PseudoLabels | None = None,
        min_norm: torch.Tensor | float | None = None, background: torch.Tensor | None = None,
        assignment: DenseAssignment | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses on ``raw`` (per-level (B, 4R + nc, H, W) maps) for ``targets`` in the same view.

        ``targets``: boxes (N,4) xyxy pixels, labels, scores, batch_idx, reliable (bool), box_ok
        (bool: box/DFL loss wanted), optionally class_scores (N, nc): an uncertain box's soft
        target over every class (``uncertain_targets: vector``) instead of its score in its class.
        ``ignore`` (boxes, batch_idx): regions where positions not
        assigned to a target get no classification loss instead of the background target (the
        ``ignore_low_score`` option: teacher boxes below tau1 are weak evidence of an object, not
        of background). Returns gain- and weight-scaled per-image-normalised ``cls``, ``box``,
        ``dfl`` (multiply by the batch size for ultralytics' scale, as ``Detector.loss`` does),
        the normaliser ``norm`` (ultralytics': the summed target scores, at least 1) and detached
        counts ``pos_reliable``, ``pos_uncertain``, ``pos_box``, ``ignored``. ``min_norm`` raises
        the normaliser to at least that value (see ``unsup_norm`` in efficient_teacher.yaml).
        ``background`` (B, A, nc): the classification target of positions outside every target
        box, instead of 0 (``unsup_background: teacher``: the teacher's own scores there, so an
        object it missed is not taught as background; inside a target box unassigned positions
        stay 0, as on labeled images); it does not count in the normaliser.
        With ``ld_weight`` > 0 and targets carrying ``edge_support``/``edge_dist`` (the teacher's
        edge distributions in this view) an ``ld`` term is added: Localization Distillation on the
        box-loss positions (``localization_distillation.py``), at the DFL gain; else ``ld`` is 0.
        ``assignment`` (DTG's dense guidance, ``dense_guidance.py``): which target each position
        belongs to, from the teacher's NMS clusters, instead of the task-aligned assigner; adds
        ``rm``, Rank Matching over those clusters (unweighted; 0 without ``assignment``).
        """
        crit = self.crit
        reg_max, nc = int(crit.reg_max), int(crit.nc)
        flat = torch.cat([x.flatten(2) for x in raw], 2)  # (B, 4R + nc, A)
        pred_distri = flat[:, : 4 * reg_max].permute(0, 2, 1).contiguous()
        pred_scores = flat[:, 4 * reg_max :].permute(0, 2, 1).contiguous()
        if pred_scores.shape[-1] != nc:
            raise ValueError(f"raw outputs have {pred_scores.shape[-1]} class channels, the criterion expects {nc}")
        dtype, device, bsz = pred_scores.dtype, pred_scores.device, pred_scores.shape[0]
        import_ultralytics()  # already loaded by the model; keeps the one import door
        from ultralytics.utils.tal import make_anchors

        stride = crit.stride.to(device)
        anchor_points, stride_tensor = make_anchors(raw, stride, 0.5)
        anchors_px = anchor_points * stride_tensor
        imgsz = torch.tensor(raw[0].shape[2:], device=device, dtype=dtype) * stride[0]
        pred_bboxes = crit.bbox_decode(anchor_points, pred_distri)  # xyxy grid units (B, A, 4)

        boxes = targets["boxes"].float()
        boxes = torch.minimum(boxes.clamp(min=0), boxes.new_tensor([imgsz[1], imgsz[0], imgsz[1], imgsz[0]]))
        packed = torch.cat(
            (
                targets["labels"].float()[:, None],
                boxes,
                targets["scores"].float()[:, None],
                targets["reliable"].float()[:, None],
                targets["box_ok"].float()[:, None],
            ),
            1,
        )
        vector = targets.get("class_scores")
        if vector is not None:
            packed = torch.cat((packed, vector.float().reshape(len(packed), nc)), 1)
        padded, mask = pad_per_image(targets["batch_idx"], packed, bsz)
        gt_labels, gt_bboxes = padded[..., 0:1], padded[..., 1:5]
        gt_score, gt_rel, gt_box = padded[..., 5], padded[..., 6] > 0.5, padded[..., 7] > 0.5

        if assignment is None:
            target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx = crit.assigner(
                pred_scores.detach().sigmoid(),
                (pred_bboxes.detach() * stride_tensor).type(gt_bboxes.dtype),
                anchors_px,
                gt_labels,
                gt_bboxes,
                mask[..., None].float(),
            )
            target_gt_idx = target_gt_idx.long()
        else:  # the teacher's clusters: reliable members learn their IoU-aware quality (dense_guidance.py)
            fg_mask = assignment.index >= 0
            slots = image_slots(targets["batch_idx"], bsz)
            target_gt_idx = torch.zeros_like(assignment.index)
            if len(slots):
                target_gt_idx = torch.where(fg_mask, slots[assignment.index.clamp(min=0)], target_gt_idx)
            target_bboxes = gt_bboxes.gather(1, target_gt_idx[..., None].expand(-1, -1, 4))
            target_labels = gt_labels[..., 0].gather(1, target_gt_idx).long()
            target_scores = F.one_hot(target_labels.clamp(0, nc - 1), nc).to(dtype) * (
                assignment.quality * fg_mask).to(dtype)[..., None]
        rel = gt_rel.gather(1, target_gt_idx) & fg_mask  # (B, A)
        box_pos = gt_box.gather(1, target_gt_idx) & fg_mask
        if assignment is not None:  # an uncertain member: the teacher's score at that position
            soft = F.one_hot(target_labels.clamp(0, nc - 1), nc).to(dtype) * assignment.score.to(dtype)[..., None]
        elif vector is None:  # the paper: the teacher's score in the box's class, 0 in the others
            one_hot = F.one_hot(target_labels.long().clamp(0, nc - 1), nc).to(dtype)
            soft = one_hot * gt_score.gather(1, target_gt_idx)[..., None]
        else:
            soft = padded[..., 8:].gather(1, target_gt_idx[..., None].expand(-1, -1, nc)).to(dtype)
        cls_t = torch.where(rel[..., None], target_scores.to(dtype), soft) * fg_mask[..., None].to(dtype)
        tss = cls_t.sum().clamp(min=1)
        if min_norm is not None:  # a tensor floor stays on the device: no host sync per step
            tss = torch.maximum(tss, torch.as_tensor(min_norm, dtype=tss.dtype, device=tss.device))
        if background is not None:  # only away from every target box: inside one, unassigned
            # positions stay 0 as task-aligned assignment makes them on labeled images
            near = fg_mask | inside_any(anchors_px, boxes, targets["batch_idx"], bsz)
            cls_t = torch.where(near[..., None], cls_t, background.to(dtype))

        bce = F.binary_cross_entropy_with_logits(pred_scores, cls_t, reduction="none")
        class_weights = getattr(crit, "class_weights", None)
        if class_weights is not None:
            bce = bce * class_weights
        ignored = torch.zeros_like(fg_mask)
        if ignore is not None and ignore["boxes"].numel():
            ignored = inside_any(anchors_px, ignore["boxes"], ignore["batch_idx"], bsz) & ~fg_mask
            bce = bce * (~ignored)[..., None].to(bce.dtype)
        loss_cls = bce.sum() / tss
        loss_box, loss_dfl = crit.bbox_loss(
            pred_distri, pred_bboxes, anchor_points, target_bboxes / stride_tensor,
            cls_t, tss, box_pos, imgsz, stride_tensor,
        )
        hyp = crit.hyp
        loss_rm = pred_scores.new_zeros(())
        if assignment is not None:
            bi, ai = fg_mask.nonzero(as_tuple=True)
            student_logit = pred_scores[bi, ai, target_labels[bi, ai]]
            loss_rm = rank_matching_loss(student_logit, assignment.logit[bi, ai].to(student_logit),
                                         assignment.index[bi, ai], self.rm_temperature)
        loss_ld = self._distill(targets, pred_distri, box_pos, target_gt_idx, cls_t, anchors_px, stride_tensor,
                                raw[0].shape[2:], tss)
        return {
            "cls": loss_cls * float(hyp.cls) * self.weights["cls"],
            "box": loss_box * float(hyp.box) * self.weights["box"],
            "dfl": loss_dfl * float(hyp.dfl) * self.weights["dfl"],
            "ld": loss_ld * float(hyp.dfl) * self.weights["ld"],
            "rm": loss_rm,
            "norm": tss.detach(),
            "pos_reliable": rel.sum().detach(),
            "pos_uncertain": (fg_mask & ~rel).sum().detach(),
            "pos_box": box_pos.sum().detach(),
            "ignored": ignored.sum().detach(),
            # exposed for tests and diagnostics (detached)
            "cls_target": cls_t.detach(),
            "box_mask": box_pos.detach(),
        }

    def _distill(
        self, targets: PseudoLabels, pred_distri: torch.Tensor, box_pos: torch.Tensor, target_gt_idx: torch.Tensor,
        cls_t: torch.Tensor, anchors_px: torch.Tensor, stride_tensor: torch.Tensor, grid_hw: torch.Size,
        tss: torch.Tensor,
    ) -> torch.Tensor:
        """LD's term per target mass (like DFL): 0 unless enabled and the targets carry edge distributions."""
        if self.weights["ld"] <= 0 or "edge_support" not in targets:
            return pred_distri.new_zeros(())
        r = int(self.crit.reg_max)
        n = len(targets["edge_support"])
        edges = torch.cat((targets["edge_support"].reshape(n, 4 * r), targets["edge_dist"].reshape(n, 4 * r)), 1).float()
        padded, _ = pad_per_image(targets["batch_idx"], edges, int(box_pos.shape[0]))  # (B, M, 8R)
        bi, ai = box_pos.nonzero(as_tuple=True)
        rows = padded[bi, target_gt_idx[bi, ai]]  # (n_pos, 8R)
        support, dist = rows[:, : 4 * r].reshape(-1, 4, r), rows[:, 4 * r :].reshape(-1, 4, r)
        s0 = float(self.crit.stride[0])  # the canvas: the finest level's grid times its stride
        target = edge_targets(support, dist, anchors_px[ai], stride_tensor[ai, 0], (grid_hw[1] * s0, grid_hw[0] * s0), r)
        weight = cls_t[bi, ai].sum(-1)
        return ld_loss(pred_distri[bi, ai].reshape(-1, 4, r), target, weight, self.ld_temperature) / tss
