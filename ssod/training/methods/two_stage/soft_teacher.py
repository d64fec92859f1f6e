"""Soft Teacher (Xu et al., ICCV 2021; seed 001) for two-stage (Faster R-CNN) students.

One step after burn-in, for the unlabeled batch (weak view -> teacher, strong view -> student):

1. the EMA teacher detects on the weak view (torchvision post-processing, class-aware NMS);
   boxes with foreground score >= ``cls_threshold`` (0.9) are G_cls; every box with score >
   ``reg_score_threshold`` (0.5) is jittered ``n_jitter`` times, refined by the teacher's
   R-CNN, and those with regression variance (Eq. 8-9) < ``reg_variance_threshold`` (0.02)
   are G_reg (Eq. 10). Both sets move into the strong view through the recorded matrices;
2. student RPN on the strong view learns from G_cls class-agnostically (torchvision's matcher
   and sampler, as the public code's rpn_pseudo_threshold = 0.9);
3. student R-CNN classification: torchvision's proposal sampling against G_cls; each sampled
   proposal is mapped back into the weak view and scored by the *teacher's* R-CNN, whose
   background probability is the reliability r_j of the background rows (BG-T); the loss is
   Eq. 4-5 per image, averaged over images (Eq. 11);
4. student R-CNN regression: a second proposal sampling against G_reg, box loss only.

    L = L_sup + lambda_u * (L_rpn_cls + L_rpn_box + L_rcnn_cls(Eq. 4) + L_rcnn_reg(Eq. 10))

Normalisation choice: the RPN and regression terms keep torchvision's supervised
normalisation (mean over sampled anchors; smooth-L1 sum / sampled rows) so lambda_u = 4 weighs
them relative to the supervised loss as the paper's alpha does; the classification term is
Eq. 4 exactly (its scale is that of a mean cross-entropy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssod.training.data.batch import Batch
from ssod.training.methods.base import register_method
from ssod.training.methods.two_stage.seeded import SeededStepMethod
from ssod.training.methods.two_stage.common import (
    image_index,
    map_rows,
    pseudo_targets,
    split_rows,
)
from ssod.training.methods.two_stage.soft_teacher_ops import (
    bgt_weights,
    jitter_boxes,
    regression_variance,
    reliable_for_regression,
)
from ssod.training.pseudo import (
    PseudoLabels,
    concat_detections,
    eval_mode,
    select,
    weak_to_strong,
)

if TYPE_CHECKING:
    from ssod.training.models.base import Detector

__all__ = ["SoftTeacher", "jitter_variance"]


@torch.no_grad()
def jitter_variance(
    teacher: "Detector", feats: Any, image_sizes: list[tuple[int, int]], pseudo: PseudoLabels,
    n_jitter: int, scale: float, generator: torch.Generator | None, imgsz: int,
) -> Tensor:
    """Eq. 7-9 for every box of ``pseudo`` (teacher's view): (N,) regression variance.

    All jittered boxes of the batch go through the teacher's R-CNN in one ``roi_forward``
    (proposal list per image: torchvision's API); each refined box is the decoded box of the
    pseudo box's own class column.
    """
    n = pseudo["boxes"].shape[0]
    if n == 0:
        return pseudo["boxes"].new_zeros(0)
    jit = jitter_boxes(pseudo["boxes"], n_jitter, scale, generator).clamp(0.0, float(imgsz))  # (J, N, 4)
    flat = jit.permute(1, 0, 2).reshape(-1, 4)  # (N*J, 4), box-major
    row_img = pseudo["batch_idx"].long().repeat_interleave(n_jitter)
    row_cls = pseudo["labels"].long().repeat_interleave(n_jitter)
    row_id = torch.arange(flat.shape[0], device=flat.device)
    b = len(image_sizes)
    props = split_rows(flat, row_img, b)
    order = torch.sort(row_img, stable=True).indices  # row order of the per-image lists
    _, breg = teacher.roi_forward(feats, props, image_sizes)
    dec = teacher.decode_roi(breg, props)  # (N*J, nc+1, 4) in list order
    col = row_cls[order] + 1  # torchvision column of the class (0 = background)
    refined_sorted = dec[torch.arange(dec.shape[0], device=dec.device), col]
    refined = torch.empty_like(refined_sorted)
    refined[row_id[order]] = refined_sorted
    return regression_variance(refined.reshape(n, n_jitter, 4).permute(1, 0, 2), pseudo["boxes"])


@register_method
class SoftTeacher(SeededStepMethod):
    name = "soft_teacher"
    uses_unlabeled = True

    FRACTIONS = ("cls_threshold", "reg_score_threshold")

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        c = self.cfg
        if c["n_jitter"] < 2:
            raise ValueError(f"method 'soft_teacher': n_jitter must be >= 2 (a variance needs 2 samples), got {c['n_jitter']}")

    # --------------------------------------------------------------------------- step
    def unsupervised_losses(self, unlabeled: Batch, student: "Detector", teacher: "Detector") -> dict[str, Tensor]:
        c = self.cfg
        weak_img = unlabeled["weak"]
        device, bu, imgsz = weak_img.device, int(weak_img.shape[0]), int(unlabeled["strong"].shape[-1])

        # 1. teacher: detections, jitter variance (one backbone pass on the weak view, kept for BG-T)
        with eval_mode(teacher):
            images_w = teacher.prepare(weak_img)
            feats_w = teacher.backbone_features(images_w)
            floor = min(c["reg_score_threshold"], c["cls_threshold"])
            dets = teacher.predict(weak_img, conf=floor, iou=c["nms_iou"], max_det=c["max_det"])
            weak = concat_detections(dets, device=device)
            var = jitter_variance(
                teacher, feats_w, images_w.image_sizes, weak, c["n_jitter"], c["jitter_scale"],
                self._generator(device), imgsz,
            )
        weak["is_cls"] = weak["scores"] >= c["cls_threshold"]
        weak["is_reg"] = reliable_for_regression(var, weak["scores"], c["reg_variance_threshold"], c["reg_score_threshold"])
        self.meter.add_images(bu)
        self.meter.add_quality("pl", select(weak, weak["is_cls"]), unlabeled, iou=c["quality_iou"])
        self.meter.add_quality("pl_reg", select(weak, weak["is_reg"]), unlabeled, iou=c["quality_iou"])
        strong = weak_to_strong(weak, unlabeled, c["min_box_size"], c["min_visible"])
        strong_img = unlabeled["strong"]  # read after weak_to_strong: it paints deferred cutouts
        g_cls = pseudo_targets(select(strong, strong["is_cls"]), bu)
        g_reg = pseudo_targets(select(strong, strong["is_reg"]), bu)
        n_cls, n_reg = int(strong["is_cls"].sum()), int(strong["is_reg"].sum())
        self.meter.add_count("pl_cls", n_cls)
        self.meter.add_count("pl_reg", n_reg)
        self.record_targets(strong_img, {**strong, "reliable": strong["is_cls"]})  # class labels solid

        # 2. student RPN on the strong view, class-agnostic pseudo boxes G_cls
        images_s = student.prepare(strong_img)
        feats_s = student.backbone_features(images_s)
        anchors, obj, deltas, level = student.rpn_raw(images_s, feats_s)
        rpn_labels, matched = student.rpn_targets(anchors, g_cls)
        rpn = student.rpn_loss(anchors, obj, deltas, rpn_labels, matched)
        fn = getattr(student, "rpn_decode_proposals", None)
        proposals = fn(images_s, anchors, obj, deltas, level)[0] if fn else student.rpn_proposals(images_s, feats_s)[0]

        # 3. R-CNN classification with BG-T weights (Eq. 4-5)
        props, labels, _, _ = student.roi_targets(proposals, g_cls)
        logits, _ = student.roi_forward(feats_s, props, images_s.image_sizes)
        row_img = image_index([len(p) for p in props], device)
        bg = student.bg_index
        with eval_mode(teacher):
            pw, ok = map_rows(torch.cat(props), row_img, unlabeled["M_strong"], unlabeled["M_weak"], imgsz,
                              min_size=0.0, min_visible=0.0)
            t_logits, _ = teacher.roi_forward(feats_w, split_rows(pw, row_img, bu), images_w.image_sizes)
            r = teacher.roi_scores(t_logits)[:, bg]
        is_fg = labels != bg
        w = bgt_weights(is_fg, r, row_img, num_images=bu)
        ce = F.cross_entropy(logits, labels.long(), reduction="none")
        rcnn_cls = (w * ce).sum()

        # 4. R-CNN regression on G_reg only (Eq. 10)
        if n_reg:
            props_r, labels_r, reg_t, _ = student.roi_targets(proposals, g_reg)
            logits_r, breg_r = student.roi_forward(feats_s, props_r, images_s.image_sizes)
            rcnn_reg = student.roi_loss(logits_r, breg_r, labels_r, reg_t)["roi_box"]
        else:
            rcnn_reg = logits.sum() * 0.0

        lam = c["lambda_u"]
        out = {
            "unsup_rpn_cls": lam * rpn["rpn_cls"],
            "unsup_rpn_box": lam * rpn["rpn_box"],
            "unsup_rcnn_cls": lam * rcnn_cls,
            "unsup_rcnn_box": lam * rcnn_reg,
        }
        self.step_log["bgt_mean_r"] = float(r[~is_fg].mean()) if bool((~is_fg).any()) else float("nan")
        return out

    def log_values(self) -> dict[str, float]:
        return {**self.meter.values(), "cls_threshold": float(self.cfg["cls_threshold"])}

    def export_metadata(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": float(self.cfg["cls_threshold"])}
