"""DTG-SSOD (Li et al., NeurIPS 2022; seed 002) for two-stage (Faster R-CNN) students.

Dense teacher guidance instead of sparse pseudo boxes. One step after burn-in:

R-CNN stage
  * one-to-one correspondence: the teacher's RPN proposals (weak view, eval mode) are mapped
    into the strong view through the recorded matrices and fed to the *student's* R-CNN, so
    teacher row i and student row i look at the same region;
  * Inverse NMS Clustering (``dtg_ops.inverse_nms_clustering``): each teacher proposal is one
    candidate — its best foreground class, that class's probability and regressed box (a
    proposal is one student sample, so it gets one label; with tau = 0.45 a second class above
    tau is possible but rare) — and the teacher's class-aware NMS (score >= 0.45, IoU 0.5)
    is inverted: members of a cluster get the cluster's class and its kept box (mapped into the
    strong view) as regression target; candidates below tau are background;
  * rows per image: every clustered proposal that stays visible in the strong view, then random
    background ones up to ``rcnn_samples`` (the paper uses all teacher proposals: too slow here);
  * classification: softmax Focal loss (Eq. 2, gamma 1.5 as Unbiased Teacher), averaged over
    the rows (Unbiased Teacher's normalisation; Eq. 2's per-cluster 1/N_j leaves the background
    rows' normaliser unspecified); regression: smooth-L1 towards the kept box with the
    supervised loss's normalisation (Eq. 3's f_reg);
  * Rank Matching (Eq. 4-5): KL(teacher || student) of the softmax over each cluster's members'
    target-class logits, averaged over clusters, weight beta.

RPN stage
  * candidates: the teacher's anchors with objectness >= 0.9 among its ``rpn_max_candidates``
    best per image, their boxes = the teacher's decoded proposals; INC inverts torchvision's RPN
    NMS (per image and FPN level, IoU 0.7);
  * anchor correspondence (``dtg_ops.match_anchors``): a sampled teacher anchor is mapped into the
    strong view, its FPN level chosen by scale, and the student anchor of largest IoU on that
    level receives its label: cluster member -> objectness 1 and the kept box as regression
    target, below tau -> background; ``rpn_samples`` anchors per image (at most
    ``rpn_pos_fraction`` clustered, the rest random background), torchvision's RPN loss;
  * Rank Matching over the RPN clusters' objectness logits (``rm_rpn``).

    L = L_sup + alpha * (L_rpn + L_rcnn_cls + L_rcnn_reg + beta * (L_RM_rcnn + L_RM_rpn))   (Eq. 1, 6)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ssod.training.data.batch import Batch
from ssod.training.methods.base import register_method
from ssod.training.methods.two_stage.seeded import SeededStepMethod
from ssod.training.methods.two_stage.common import (
    image_index,
    map_rows,
    proposals_from_raw,
    roi_encode,
    rpn_decode_all,
    split_rows,
    topk_per_image,
)
from ssod.training.methods.two_stage.dtg_ops import (
    inverse_nms_clustering,
    match_anchors,
    rank_matching_loss,
    softmax_focal_loss,
)
from ssod.training.pseudo import eval_mode

if TYPE_CHECKING:
    from ssod.training.models.base import Detector

__all__ = ["DTG"]


@register_method
class DTG(SeededStepMethod):
    name = "dtg"
    uses_unlabeled = True

    FRACTIONS = ("rcnn_score_thr", "rpn_score_thr", "rpn_pos_fraction")

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        c = self.cfg
        if c["temperature"] <= 0:
            raise ValueError(f"method 'dtg': temperature must be > 0, got {c['temperature']}")

    # --------------------------------------------------------------------------- step
    def unsupervised_losses(self, unlabeled: Batch, student: "Detector", teacher: "Detector") -> dict[str, Tensor]:
        c = self.cfg
        weak_img, strong_img = unlabeled["weak"], unlabeled["strong"]
        device, imgsz = weak_img.device, int(strong_img.shape[-1])
        gen = self._generator(device)

        # teacher: one backbone + RPN pass on the weak view, R-CNN on its own proposals
        with eval_mode(teacher):
            images_w = teacher.prepare(weak_img)
            feats_w = teacher.backbone_features(images_w)
            anchors_t, obj_t, deltas_t, level_t = teacher.rpn_raw(images_w, feats_w)
            props_w = proposals_from_raw(teacher, images_w, feats_w, anchors_t, obj_t, deltas_t, level_t)
            t_logits, t_breg = teacher.roi_forward(feats_w, props_w, images_w.image_sizes)
            t_dec = teacher.decode_roi(t_breg, props_w)
            rpn_boxes_t = rpn_decode_all(teacher, deltas_t, anchors_t)

        images_s = student.prepare(strong_img)
        feats_s = student.backbone_features(images_s)
        anchors_s, obj_s, deltas_s, level_s = student.rpn_raw(images_s, feats_s)

        rcnn = self._rcnn_stage(student, teacher, unlabeled, props_w, t_logits, t_dec, feats_s, images_s, gen, imgsz)
        rpn = self._rpn_stage(unlabeled, anchors_t, obj_t, rpn_boxes_t, level_t, student, anchors_s, obj_s,
                              deltas_s, level_s, gen, imgsz)
        lam, beta = c["lambda_u"], c["beta"]
        out = {
            "unsup_rpn_cls": lam * rpn["rpn_cls"],
            "unsup_rpn_box": lam * rpn["rpn_box"],
            "unsup_rcnn_cls": lam * rcnn["cls"],
            "unsup_rcnn_box": lam * rcnn["box"],
            "unsup_rm": lam * beta * (rcnn["rm"] + (rpn["rm"] if c["rm_rpn"] else 0.0)),
        }
        self.meter.add_count("clusters", rcnn["n_clusters"])
        self.meter.add_count("rcnn_fg_rows", rcnn["n_fg"])
        self.meter.add_count("rpn_clusters", rpn["n_clusters"])
        return out

    # --------------------------------------------------------------------------- R-CNN stage
    def _rcnn_stage(
        self, student: "Detector", teacher: "Detector", unlabeled: Batch, props_w: list[Tensor], t_logits: Tensor,
        t_dec: Tensor, feats_s: Any, images_s: Any, gen: torch.Generator, imgsz: int,
    ) -> dict[str, Any]:
        c = self.cfg
        bu = len(props_w)
        device = t_logits.device
        bg = int(student.bg_index)
        row_img = image_index([len(p) for p in props_w], device)
        P = torch.cat(props_w) if props_w else t_logits.new_zeros(0, 4)
        probs = teacher.roi_scores(t_logits).clone()
        probs[:, bg] = -1.0
        score, col = probs.max(1)  # best foreground column (torchvision id) and its probability
        boxes = t_dec[torch.arange(len(col), device=device), col]
        inc = inverse_nms_clustering(boxes, score, col, c["rcnn_score_thr"], c["rcnn_nms_iou"], group=row_img)
        fg = inc.cluster >= 0
        # pseudo-label quality of the teacher's kept boxes (what its NMS outputs), weak view
        keep = inc.keep
        self.meter.add_images(bu)
        self.meter.add_quality("pl", {"boxes": boxes[keep], "scores": score[keep], "labels": col[keep] - 1,
                                      "batch_idx": row_img[keep]}, unlabeled, iou=c["quality_iou"])

        # rows: visible in the strong view; all clustered first, then random background
        ps, ok = map_rows(P, row_img, unlabeled["M_weak"], unlabeled["M_strong"], imgsz, c["min_box_size"], c["min_visible"])
        rand = torch.rand(len(P), generator=gen, device=gen.device).to(device)
        prio = torch.where(ok, fg.float() * 2.0 + rand, torch.full_like(rand, -1.0))
        rows = torch.nonzero(topk_per_image(prio, row_img, int(c["rcnn_samples"])) & ok).flatten()
        if rows.numel() == 0:
            zero = next(iter(feats_s.values())).sum() * 0.0
            return {"cls": zero, "box": zero, "rm": zero, "n_clusters": 0, "n_fg": 0}
        tgt_s, _ = map_rows(inc.targets, row_img, unlabeled["M_weak"], unlabeled["M_strong"], imgsz, 0.0, 0.0)
        rimg = row_img[rows]
        props_s = split_rows(ps[rows], rimg, bu)  # rows are already grouped by image (P is image-ordered)
        s_logits, s_breg = student.roi_forward(feats_s, props_s, images_s.image_sizes)
        labels = torch.where(fg[rows], col[rows], torch.full_like(col[rows], bg))
        cls = softmax_focal_loss(s_logits, labels, c["focal_gamma"]).mean()
        reg_t = torch.zeros(len(rows), 4, device=device)
        fr = fg[rows]
        if bool(fr.any()):
            reg_t[fr] = roi_encode(student, tgt_s[rows][fr], ps[rows][fr])
        box = student.roi_loss(s_logits, s_breg, labels, reg_t)["roi_box"]
        # Rank Matching over each cluster's members (target-class logits)
        tgt_col = labels[fr][:, None]
        rm = rank_matching_loss(
            s_logits[fr].gather(1, tgt_col).squeeze(1), t_logits[rows][fr].gather(1, tgt_col).squeeze(1),
            inc.cluster[rows][fr], c["temperature"],
        )
        n_clusters = int(torch.unique(inc.cluster[rows][fr]).numel())
        return {"cls": cls, "box": box, "rm": rm, "n_clusters": n_clusters, "n_fg": int(fr.sum())}

    # --------------------------------------------------------------------------- RPN stage
    def _rpn_stage(
        self, unlabeled: Batch, anchors_t: list[Tensor], obj_t: Tensor, rpn_boxes_t: Tensor, level_t: Tensor,
        student: "Detector", anchors_s: list[Tensor], obj_s: Tensor, deltas_s: Tensor, level_s: Tensor,
        gen: torch.Generator, imgsz: int,
    ) -> dict[str, Any]:
        """Teacher RPN clusters -> labels of the corresponding student anchors (see the module docstring).

        Square canvases of one size make every image's anchors identical (batch contract), so the
        student anchors of image 0 serve the whole batch.
        """
        c = self.cfg
        b, a_t = obj_t.shape
        device = obj_t.device
        img = torch.arange(b, device=device).repeat_interleave(a_t)
        lvl = level_t.to(device).repeat(b)
        n_lvl = int(level_t.max()) + 1 if level_t.numel() else 1
        logit_t = obj_t.reshape(-1)
        score = torch.sigmoid(logit_t)
        top = topk_per_image(score, img, int(c["rpn_max_candidates"]))
        inc = inverse_nms_clustering(
            rpn_boxes_t.reshape(-1, 4), torch.where(top, score, torch.zeros_like(score)),
            torch.zeros_like(img), c["rpn_score_thr"], c["rpn_nms_iou"], group=img * n_lvl + lvl,
        )
        fg = inc.cluster >= 0
        anchors_flat = torch.stack(anchors_t).reshape(-1, 4)
        am, ok = map_rows(anchors_flat, img, unlabeled["M_weak"], unlabeled["M_strong"], imgsz, c["min_box_size"], c["min_visible"])
        rand = torch.rand(len(score), generator=gen, device=gen.device).to(device)
        n_pos_max = int(round(c["rpn_samples"] * c["rpn_pos_fraction"]))
        pos = topk_per_image(torch.where(fg & ok, rand, torch.full_like(rand, -1.0)), img, n_pos_max) & fg & ok
        n_pos = torch.bincount(img[pos], minlength=b)
        neg = topk_per_image(torch.where(~fg & ok, rand, torch.full_like(rand, -1.0)), img,
                             int(c["rpn_samples"]) - n_pos) & ~fg & ok
        sel = torch.nonzero(pos | neg).flatten()
        labels_s = torch.full(obj_s.shape, -1.0, device=device)
        matched = torch.zeros(*obj_s.shape, 4, device=device)
        if sel.numel() == 0:
            zero = obj_s.sum() * 0.0 + deltas_s.sum() * 0.0
            return {"rpn_cls": zero, "rpn_box": zero, "rm": zero, "n_clusters": 0}
        s_idx = match_anchors(am[sel], anchors_s[0], level_s)
        s_img = img[sel]
        is_pos = pos[sel]
        # background first, then foreground: a student anchor claimed by both stays foreground
        labels_s[s_img[~is_pos], s_idx[~is_pos]] = 0.0
        labels_s[s_img[is_pos], s_idx[is_pos]] = 1.0
        tgt, _ = map_rows(inc.targets[sel[is_pos]], s_img[is_pos], unlabeled["M_weak"], unlabeled["M_strong"], imgsz, 0.0, 0.0)
        matched[s_img[is_pos], s_idx[is_pos]] = tgt
        loss = student.rpn_loss(anchors_s, obj_s, deltas_s, labels_s, matched)
        rm = rank_matching_loss(
            obj_s[s_img[is_pos], s_idx[is_pos]], logit_t[sel[is_pos]], inc.cluster[sel[is_pos]], c["temperature"]
        )
        n_clusters = int(torch.unique(inc.cluster[sel[is_pos]]).numel())
        return {**loss, "rm": rm, "n_clusters": n_clusters}

    # --------------------------------------------------------------------------- reporting
    def log_values(self) -> dict[str, float]:
        return dict(self.meter.values())

    def export_metadata(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": float(self.cfg["rcnn_score_thr"])}
