"""Efficient Teacher's Pseudo Label Assigner for two-stage (Faster R-CNN) students.

Same teacher side as the dense path (one teacher pass on the weak view enlarged ``teacher_scales``
times, per-class tau1/tau2 from the Epoch Adaptor, every teacher score observed, boxes moved into
the strong view; the fused multi-scale teacher is dense-only); the student side maps ET's three loss
indicators (seed 004) onto the two stages:

* RPN (objectness + box): learns from the *reliable* boxes (>= tau2[c]) class-agnostically,
  through torchvision's matcher and sampler. ET gives uncertain boxes a soft objectness target;
  a two-stage RPN has no teacher objectness per pseudo box, so ssod *ignores* them instead:
  sampled background anchors whose IoU with an uncertain box is >= ``rpn_ignore_iou`` (0.3,
  torchvision's RPN background threshold, i.e. anchors that would not be background if the box
  were a label) get no loss.
* R-CNN classification: from reliable boxes (ET's L_u^cls counts only p >= tau2); sampled
  background rows with IoU >= ``roi_ignore_iou`` (0.5, torchvision's foreground threshold) with
  an uncertain box are ignored (weight 0) rather than pushed to background or soft-weighted:
  an uncertain box is as likely an object as not, and a hard 0 never adds a wrong label.
* R-CNN regression: from reliable boxes only (ET's L_u^reg on reliable boxes; its extra
  "teacher objectness >= 0.99" gate has no two-stage analogue).

One backbone pass over [labeled images, strong views] feeds the supervised loss (torchvision's,
through the same API calls as ``FasterRCNNDetector.loss``), the unsupervised loss and the
gradient-reversed domain discriminator (on the FPN levels)::

    L = L_sup + lambda_u * (w_cls (L_rpn_cls + L_rcnn_cls) + w_box (L_rpn_box + L_rcnn_box)) + da_weight * L_da

torchvision's losses are batch means (not ultralytics' sums over images), so no image-count
factors appear; ``unsup_dfl_weight`` has no two-stage term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ssod.training.data.batch import Batch
from ssod.training.methods.two_stage.common import (
    image_index,
    max_iou_same_image,
    proposals_from_raw,
    pseudo_targets,
    require_two_stage,
    slice_feats,
    slice_images,
)
from ssod.training.models.frcnn import SIZE_DIVISIBLE
from ssod.training.pseudo import (
    PseudoLabels, eval_mode, on_enlarged, select, teacher_detections, weak_to_strong,
)

if TYPE_CHECKING:
    from ssod.training.methods.efficient_teacher import EfficientTeacher
    from ssod.training.models.base import Detector

__all__ = ["two_stage_losses", "two_stage_feature_channels", "frcnn_losses", "labeled_pseudo"]


def two_stage_feature_channels(student: "Detector") -> list[int]:
    """Channels of each FPN level (the domain discriminator's inputs), from one dry forward in eval mode."""
    require_two_stage(student, "efficient_teacher")
    p = next(student.parameters())
    size = 64
    with eval_mode(student):
        feats = student.backbone_features(student.prepare(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)))
    return [int(f.shape[1]) for f in feats.values()]


def labeled_pseudo(labeled: Batch) -> PseudoLabels:
    """A labeled batch's boxes as flat pseudo labels (degenerate boxes dropped, as the model's own loss does)."""
    boxes = torch.as_tensor(labeled["boxes"], dtype=torch.float32).reshape(-1, 4)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {
        "boxes": boxes[ok],
        "labels": torch.as_tensor(labeled["cls"]).reshape(-1).long()[ok],
        "batch_idx": torch.as_tensor(labeled["batch_idx"]).reshape(-1).long()[ok],
        "scores": torch.ones(int(ok.sum()), device=boxes.device),
    }


def frcnn_losses(
    model: "Detector", images: Any, feats: Any, targets: list[dict[str, Tensor]],
    uncertain: PseudoLabels | None = None, rpn_ignore_iou: float = 0.3, roi_ignore_iou: float = 0.5,
) -> dict[str, Tensor]:
    """Faster R-CNN's four losses on ``targets``; rows/anchors near an ``uncertain`` box ignored.

    Without uncertain boxes this is exactly ``FasterRCNNDetector.loss`` from given features.
    """
    anchors, obj, deltas, level = model.rpn_raw(images, feats)
    rpn_labels, matched = model.rpn_targets(anchors, targets)
    has_unc = uncertain is not None and uncertain["boxes"].numel() > 0
    if has_unc:
        from torchvision.ops import box_iou

        b, a = obj.shape
        iou = box_iou(uncertain["boxes"].float(), anchors[0].float())  # (U, A): every image has the same anchors
        near = torch.zeros(b, a, device=obj.device).scatter_reduce(
            0, uncertain["batch_idx"].long()[:, None].expand(-1, a), iou, reduce="amax"
        ) >= rpn_ignore_iou
        rpn_labels = torch.where((rpn_labels == 0) & near, torch.full_like(rpn_labels, -1.0), rpn_labels)
    out = dict(model.rpn_loss(anchors, obj, deltas, rpn_labels, matched))
    proposals = proposals_from_raw(model, images, feats, anchors, obj, deltas, level)
    props, labels, reg_t, _ = model.roi_targets(proposals, targets)
    logits, breg = model.roi_forward(feats, props, images.image_sizes)
    weight = None
    if has_unc:
        row_img = image_index([len(p) for p in props], logits.device)
        mi = max_iou_same_image(torch.cat(props), row_img, uncertain["boxes"], uncertain["batch_idx"].long())
        ignore = (labels == model.bg_index) & (mi >= roi_ignore_iou)
        weight = (~ignore).float()
    out.update(model.roi_loss(logits, breg, labels, reg_t, cls_weight=weight))
    return out


def two_stage_losses(
    m: "EfficientTeacher", labeled: Batch, unlabeled: Batch, student: "Detector", teacher: "Detector"
) -> dict[str, Tensor]:
    """One Efficient Teacher step for a two-stage student (see the module docstring)."""
    require_two_stage(student, m.name)
    c = m.cfg
    adaptor = m._ensure(student.names)
    device = unlabeled["weak"].device
    tau1, tau2 = m.thresholds(device)
    floor = adaptor.floor() if c["adaptive_thresholds"] else float(tau1.min())
    weak = on_enlarged(lambda x: teacher_detections(teacher, x, floor, c["nms_iou"], c["max_det"]),
                       unlabeled["weak"], m.pass_scales(unlabeled)[0], SIZE_DIVISIBLE)
    bu, bl = int(unlabeled["weak"].shape[0]), int(labeled["img"].shape[0])
    if c["adaptive_thresholds"]:
        m.observe_teacher(adaptor, weak["scores"], weak["labels"], bu)
    weak = m.diagnostic_source(weak, unlabeled)
    weak = select(weak, weak["scores"] >= tau1[weak["labels"]])
    weak["reliable"] = weak["scores"] >= tau2[weak["labels"]]
    m.meter.add_images(bu)
    m.meter.add_quality("pl", weak, unlabeled, iou=c["quality_iou"])
    m.meter.add_quality("pl_reliable", select(weak, weak["reliable"]), unlabeled, iou=c["quality_iou"])
    strong = weak_to_strong(weak, unlabeled, c["min_box_size"], c["min_visible"])
    reliable, uncertain = select(strong, strong["reliable"]), select(strong, ~strong["reliable"])
    n_rel, n_unc = len(reliable["scores"]), len(uncertain["scores"])
    m.meter.add_count("pl_reliable", n_rel)
    m.meter.add_count("pl_uncertain", n_unc)
    m.record_targets(unlabeled["strong"], strong)

    img = torch.cat((labeled["img"], unlabeled["strong"].to(labeled["img"].dtype)), 0)
    images = student.prepare(img)
    feats = student.backbone_features(images)
    lab, unl = slice(0, bl), slice(bl, bl + bu)
    sup = frcnn_losses(student, slice_images(images, lab), slice_feats(feats, lab), pseudo_targets(labeled_pseudo(labeled), bl))
    uns = frcnn_losses(
        student, slice_images(images, unl), slice_feats(feats, unl), pseudo_targets(reliable, bu), uncertain,
        c["rpn_ignore_iou"], c["roi_ignore_iou"],
    )
    lam = m.unsup_weight()  # lambda_u, ramped by unsup_warmup_epochs
    out = {
        "sup": sum(sup.values()),
        "unsup_cls": lam * c["unsup_cls_weight"] * (uns["rpn_cls"] + uns["roi_cls"]),
        "unsup_box": lam * c["unsup_box_weight"] * (uns["rpn_box"] + uns["roi_box"]),
    }
    m.step_log = {
        **{f"sup_{k}": float(v.detach()) for k, v in sup.items()},
        **{f"unsup_{k}": float(v.detach()) for k, v in uns.items()},
    }  # pseudo-label counts and da_acc: per-epoch method/ values (the meter)
    if c["domain_adaptation"] and m.disc is not None:
        domain = torch.cat((torch.zeros(bl, device=img.device), torch.ones(bu, device=img.device)))
        da, acc = m.disc.loss(list(feats.values()), domain, c["grl_coeff"])
        out["da"] = c["da_weight"] * da
        m.da_acc.append(float(acc))
    return out
