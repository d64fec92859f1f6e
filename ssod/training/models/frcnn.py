"""torchvision Faster R-CNN (MobileNetV3-Large FPN, ResNet-50 FPN) behind ``Detector``.

The networks, matchers, samplers, box coder and losses are torchvision's own; this module
translates between ssod's batch contract and torchvision's conventions and opens the two stages
up for SSOD methods (the two-stage contract, /work/FRCNN_API.md):

- Input images are already square ``imgsz`` canvases (batch contract), so the adapter
  normalises them with torchvision's ImageNet mean/std but never resizes them
  (``GeneralizedRCNNTransform`` is bypassed): every box, anchor and proposal is in input pixels,
  as for YOLO. A side that is not a multiple of 32 is zero-padded on the right/bottom, exactly
  what ``GeneralizedRCNNTransform.batch_images`` does.
- Class ids: targets and detections use ssod ids ``0..nc-1``; ROI-level tensors (logit
  columns, ROI labels) keep torchvision's layout, column 0 = background (``bg_index``),
  class ``c`` = column ``c + 1``.
- Anchors: torchvision sizes its anchors for images resized to ``min_size=800``. Since we do not
  resize, the anchor sizes are scaled by ``imgsz / 800`` (spec ``anchor_scale`` overrides), so an
  object covers the same fraction of anchors as in torchvision's setting. Anchor sizes are not
  weights: torchvision checkpoints still load.

Every architecture is built with ``weights=None, weights_backbone=None``: nothing is downloaded,
and weights only come from a local file (``load_weights``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator, concat_box_prediction_layers

from ssod.training.data.batch import Batch
from ssod.training.models.base import Detections, Detector, register_family

log = logging.getLogger("ssod")

Targets = list[dict[str, Tensor]]

# ssod model name -> torchvision builder. Both torchvision names are accepted as aliases.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn_mobilenet_v3": fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_resnet50": fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
}
TORCHVISION_MIN_SIZE = 800  # the image side torchvision's anchor sizes are designed for (its default min_size)
SIZE_DIVISIBLE = 32  # GeneralizedRCNNTransform pads batches to a multiple of this
SMOOTH_L1_BETA = 1 / 9  # torchvision's RPN and Fast R-CNN box losses


def _scaled_anchor_generator(gen: AnchorGenerator, scale: float) -> AnchorGenerator:
    """The same anchor layout (count per location, aspect ratios) with every size times ``scale``."""
    sizes = tuple(tuple(float(s) * scale for s in level) for level in gen.sizes)
    return AnchorGenerator(sizes, gen.aspect_ratios)


class FasterRCNNDetector(Detector):
    """A torchvision ``FasterRCNN`` (``self.net``) speaking ssod's batch, detection and two-stage contracts.

    Spec keys: ``model`` (``fasterrcnn_mobilenet_v3`` | ``fasterrcnn_resnet50``), ``names``,
    ``imgsz`` (the training input side; sets the anchor scale and the default clip size),
    optional ``anchor_scale`` (overrides ``imgsz / 800``).
    """

    family = "frcnn"
    two_stage = True  # methods test this capability, never the model name
    bg_index = 0  # ROI-level column / label of the background class

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        if not self.names:
            raise ValueError(f"model '{spec['model']}': spec 'names' is empty")
        name = Path(str(spec["model"])).name.lower()
        if name not in ARCHITECTURES:
            raise ValueError(
                f"unknown Faster R-CNN model '{spec['model']}': use one of fasterrcnn_mobilenet_v3, fasterrcnn_resnet50"
            )
        for key in ("width", "depth"):
            if spec.get(key) is not None:
                log.warning(f"model '{spec['model']}': '{key}' applies to YOLO models only; ignored")
        self.imgsz = int(spec.get("imgsz") or TORCHVISION_MIN_SIZE)
        scale = spec.get("anchor_scale")
        self.anchor_scale = float(scale) if scale is not None else self.imgsz / TORCHVISION_MIN_SIZE
        if not self.anchor_scale > 0:
            raise ValueError(f"model '{spec['model']}': anchor_scale must be > 0, got {self.anchor_scale}")
        net = ARCHITECTURES[name](
            weights=None, weights_backbone=None, num_classes=self.num_classes + 1,
            min_size=self.imgsz, max_size=self.imgsz,
        )
        net.rpn.anchor_generator = _scaled_anchor_generator(net.rpn.anchor_generator, self.anchor_scale)
        self.net = net
        self.register_buffer("pixel_mean", torch.tensor(net.transform.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(net.transform.image_std).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------- helpers
    @property
    def rpn(self) -> nn.Module:
        return self.net.rpn

    @property
    def roi_heads(self) -> nn.Module:
        return self.net.roi_heads

    @staticmethod
    def batch_targets(batch: Batch) -> Targets:
        """Labeled batch (flat boxes/cls/batch_idx) -> one dict(boxes, labels) per image, ssod ids.

        Degenerate boxes (zero width or height) are dropped: torchvision's matcher would match
        them to every anchor of IoU 0 and their regression targets would be infinite.
        """
        img = batch["img"]
        b = img.shape[0]
        boxes = torch.as_tensor(batch["boxes"], dtype=torch.float32, device=img.device).reshape(-1, 4)
        cls = torch.as_tensor(batch["cls"], device=img.device).reshape(-1).long()
        bidx = torch.as_tensor(batch["batch_idx"], device=img.device).reshape(-1).long()
        if not len(boxes) == len(cls) == len(bidx):
            raise ValueError(f"batch has {len(boxes)} boxes, {len(cls)} cls, {len(bidx)} batch_idx: lengths must match")
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, cls, bidx = boxes[ok], cls[ok], bidx[ok]
        order = torch.sort(bidx, stable=True).indices
        sizes = torch.bincount(bidx, minlength=b).tolist()
        return [{"boxes": bx, "labels": lb} for bx, lb in zip(boxes[order].split(sizes), cls[order].split(sizes))]

    @staticmethod
    def _tv_targets(targets: Targets) -> Targets:
        """ssod ids -> torchvision ids (class c -> c + 1), float boxes; other keys dropped."""
        return [{"boxes": t["boxes"].float().reshape(-1, 4), "labels": t["labels"].long().reshape(-1) + 1}
                for t in targets]

    # ----------------------------------------------------------------------------- two-stage API
    def prepare(self, img: Tensor) -> ImageList:
        """(B, 3, S, S) in [0, 1] -> normalised ``ImageList`` (padded to a multiple of 32, never resized)."""
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(img.shape)}")
        h, w = int(img.shape[-2]), int(img.shape[-1])
        x = (img - self.pixel_mean.to(img.dtype)) / self.pixel_std.to(img.dtype)
        ph, pw = (-h) % SIZE_DIVISIBLE, (-w) % SIZE_DIVISIBLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return ImageList(x, [(h, w)] * int(img.shape[0]))

    def backbone_features(self, images: ImageList) -> "OrderedDict[str, Tensor]":
        """FPN levels (finest first), torchvision's backbone + FPN."""
        feats = self.net.backbone(images.tensors)
        return feats if isinstance(feats, OrderedDict) else OrderedDict([("0", feats)])

    def _rpn_head(self, images: ImageList, feats: Mapping[str, Tensor]) -> tuple[list[Tensor], Tensor, Tensor, list[Any]]:
        """(anchors per image, objectness (B, A), deltas (B, A, 4), anchors per level) from one head pass."""
        levels = list(feats.values())
        obj, deltas = self.rpn.head(levels)  # torchvision's head loops over levels (its API)
        anchors = self.rpn.anchor_generator(images, levels)
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in obj]  # traceable, as torchvision
        b = len(anchors)
        obj, deltas = concat_box_prediction_layers(obj, deltas)
        return anchors, obj.reshape(b, -1), deltas.reshape(b, -1, 4), per_level

    def rpn_raw(self, images: ImageList, feats: Mapping[str, Tensor]) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """(anchors list[(A, 4)], objectness logits (B, A), deltas (B, A, 4), level_of_anchor (A,) int64).

        Every anchor of every level, concatenated in torchvision's order (level, then y, x, anchor).
        """
        anchors, obj, deltas, per_level = self._rpn_head(images, feats)
        counts = torch.as_tensor([int(n) for n in per_level], device=obj.device)
        level = torch.repeat_interleave(torch.arange(len(per_level), device=obj.device), counts)
        return anchors, obj, deltas, level

    def rpn_decode_proposals(
        self, images: ImageList, anchors: list[Tensor], objectness: Tensor, deltas: Tensor,
        per_level: Tensor | list[Any],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Proposals from raw RPN outputs (``rpn_raw``'s, so a method runs the head once): torchvision's
        decoding, per-level top-n, clipping, small-box removal, score threshold and NMS (train or eval
        top-n per the module's mode). ``per_level``: ``level_of_anchor`` or anchors per level.
        Deltas are detached: Faster R-CNN never backpropagates through proposals. Scores are sigmoid probabilities.
        """
        if isinstance(per_level, Tensor):
            per_level = torch.bincount(per_level).tolist()
        b = objectness.shape[0]
        boxes = self.rpn.box_coder.decode(deltas.detach().reshape(-1, 4), anchors).view(b, -1, 4)
        return self.rpn.filter_proposals(boxes, objectness.detach(), images.image_sizes, per_level)

    def rpn_proposals(self, images: ImageList, feats: Mapping[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(proposals list[(P_i, 4)], objectness probabilities list[(P_i,)]) as torchvision's RPN makes them."""
        anchors, obj, deltas, per_level = self._rpn_head(images, feats)
        return self.rpn_decode_proposals(images, anchors, obj, deltas, per_level)

    @torch.no_grad()
    def rpn_targets(self, anchors: list[Tensor], targets: Targets) -> tuple[Tensor, Tensor]:
        """torchvision's anchor matcher (IoU 0.7 / 0.3, low-quality matches kept) + balanced sampling.

        Returns labels (B, A) float: 1 = sampled foreground, 0 = sampled background, -1 = not in
        the loss (between thresholds or not sampled); matched_boxes (B, A, 4) input pixels.
        """
        labels, matched = self.rpn.assign_targets_to_anchors(anchors, self._tv_targets(targets))
        pos, neg = self.rpn.fg_bg_sampler(labels)  # per-image masks: torchvision's API is per image
        pos, neg = torch.stack(pos).bool(), torch.stack(neg).bool()
        out = torch.full_like(pos, -1.0, dtype=torch.float32)
        out[neg] = 0.0
        out[pos] = 1.0
        return out, torch.stack(matched)

    def rpn_loss(
        self, anchors: list[Tensor], objectness: Tensor, deltas: Tensor, labels: Tensor, matched_boxes: Tensor,
        weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """torchvision's RPN loss over the anchors with ``labels >= 0``, for the whole batch at once.

        ``rpn_cls``: BCE with logits, mean over the sampled anchors. ``rpn_box``: smooth-L1
        (beta 1/9) on the deltas of the foreground anchors, summed and divided by the number of
        sampled anchors. ``weights`` (B, A) multiply each anchor's terms; the classification term
        is then normalised by the weights' sum over the sampled anchors, the box term keeps
        torchvision's count normaliser (so weights of 1 give torchvision's loss exactly).
        """
        sampled = labels >= 0
        pos = labels > 0
        n = sampled.sum().clamp(min=1)
        w = torch.ones_like(objectness) if weights is None else weights.to(objectness.dtype)
        if not bool(sampled.any()):
            zero = objectness.sum() * 0.0 + deltas.sum() * 0.0
            return {"rpn_cls": zero, "rpn_box": zero}
        bce = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled].to(objectness.dtype),
                                                 reduction="none")
        cls = (bce * w[sampled]).sum() / w[sampled].sum().clamp(min=1e-12)
        target = self.rpn.box_coder.encode_single(matched_boxes[pos], torch.stack(anchors)[pos])
        box = F.smooth_l1_loss(deltas[pos], target, beta=SMOOTH_L1_BETA, reduction="none").sum(1)
        return {"rpn_cls": cls, "rpn_box": (box * w[pos]).sum() / n}

    def roi_forward(
        self, feats: Mapping[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """(class_logits (R, nc + 1), box_regression (R, 4 * (nc + 1))), R = all proposals in image order."""
        x = self.roi_heads.box_roi_pool(feats, proposals, image_sizes)
        x = self.roi_heads.box_head(x)
        return self.roi_heads.box_predictor(x)

    @torch.no_grad()
    def roi_targets(self, proposals: list[Tensor], targets: Targets) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """torchvision's ``select_training_samples``: gt boxes appended to the proposals, matched
        (IoU 0.5), 512 sampled per image with 25% foreground.

        Returns (sampled proposals per image, labels (R,) torchvision ids with 0 = background,
        regression_targets (R, 4), matched_idxs (R,) index of the matched target box within its
        image; torchvision clamps it to >= 0, so use ``labels`` to tell background rows).
        """
        props, matched, labels, reg = self.roi_heads.select_training_samples(
            [p.detach() for p in proposals], self._tv_targets(targets)
        )
        return props, torch.cat(labels), torch.cat(reg), torch.cat(matched)

    def roi_loss(
        self, class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor,
        cls_weight: Tensor | None = None, reg_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """torchvision's ``fastrcnn_loss`` with optional per-row weights.

        ``roi_cls``: cross-entropy, ``sum(cls_weight * CE) / sum(cls_weight)`` (the mean when
        unweighted; Soft Teacher's Eq. 5 normalisation is the caller's choice of weights).
        ``roi_box``: smooth-L1 (beta 1/9) of the ``labels[row]`` column over the rows of
        ``reg_mask`` (default ``labels > 0``), summed and divided by R.
        """
        r = class_logits.shape[0]
        if r == 0:
            zero = class_logits.sum() * 0.0 + box_regression.sum() * 0.0
            return {"roi_cls": zero, "roi_box": zero}
        labels = labels.long()
        ce = F.cross_entropy(class_logits, labels, reduction="none")
        if cls_weight is None:
            cls = ce.mean()
        else:
            w = cls_weight.to(ce.dtype)
            cls = (ce * w).sum() / w.sum().clamp(min=1e-12)
        rows = torch.where(labels > 0 if reg_mask is None else reg_mask.bool())[0]
        reg = box_regression.reshape(r, -1, 4)[rows, labels[rows]]
        box = F.smooth_l1_loss(reg, regression_targets[rows], beta=SMOOTH_L1_BETA, reduction="sum") / r
        return {"roi_cls": cls, "roi_box": box}

    def decode_roi(
        self, box_regression: Tensor, proposals: list[Tensor], image_size: tuple[int, int] | None = None
    ) -> Tensor:
        """(R, nc + 1, 4) boxes in input pixels, clipped to ``image_size`` (default: the spec's imgsz)."""
        boxes = self.roi_heads.box_coder.decode(box_regression, proposals)
        h, w = image_size or (self.imgsz, self.imgsz)
        return torch.minimum(boxes.clamp(min=0), boxes.new_tensor([w, h, w, h]))

    @staticmethod
    def roi_scores(class_logits: Tensor) -> Tensor:
        """(R, nc + 1) class probabilities, column 0 = background."""
        return F.softmax(class_logits, -1)

    # ----------------------------------------------------------------------------- Detector API
    def forward_raw(self, img: Tensor) -> tuple[ImageList, "OrderedDict[str, Tensor]"]:
        """(normalised images, FPN features): where every two-stage method starts."""
        images = self.prepare(img)
        return images, self.backbone_features(images)

    def forward(self, img: Tensor) -> tuple[ImageList, "OrderedDict[str, Tensor]"]:
        return self.forward_raw(img)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Supervised Faster R-CNN loss through the two-stage API (what torchvision computes in
        training mode): RPN objectness + box, Fast R-CNN classification + box, each with weight 1.
        """
        targets = self.batch_targets(batch)
        images, feats = self.forward_raw(batch["img"])
        anchors, obj, deltas, level = self.rpn_raw(images, feats)
        labels, matched = self.rpn_targets(anchors, targets)
        parts = self.rpn_loss(anchors, obj, deltas, labels, matched)
        proposals, _ = self.rpn_decode_proposals(images, anchors, obj, deltas, level)
        props, roi_labels, reg_t, _ = self.roi_targets(proposals, targets)
        logits, reg = self.roi_forward(feats, props, images.image_sizes)
        parts.update(self.roi_loss(logits, reg, roi_labels, reg_t))
        total = sum(parts.values())
        return total, {k: v.detach() for k, v in parts.items()}

    def detect(
        self, img: Tensor, conf: float, iou: float, max_det: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Flat detections of a batch: (boxes (K, 4), scores (K,), labels (K,) ssod ids, image index (K,)),
        grouped by image, by descending score inside an image, at most ``max_det`` per image.

        torchvision's post-processing (every foreground class of every proposal is a candidate,
        score > conf, boxes smaller than 0.01 px dropped, class-aware NMS), vectorised over the
        batch: one ``batched_nms`` call with groups = image x class.
        """
        images, feats = self.forward_raw(img)
        proposals, _ = self.rpn_proposals(images, feats)
        logits, reg = self.roi_forward(feats, proposals, images.image_sizes)
        h, w = images.image_sizes[0]
        boxes = self.decode_roi(reg, proposals, (h, w))[:, 1:]  # (R, nc, 4) foreground columns
        scores = self.roi_scores(logits)[:, 1:]  # (R, nc)
        nc = scores.shape[1]
        if len(proposals) == 1:  # also the traced export graph: no repeat_interleave needed
            img_of_row = torch.zeros(scores.shape[0], dtype=torch.long, device=img.device)
        else:
            counts = torch.tensor([len(p) for p in proposals], device=img.device)
            img_of_row = torch.repeat_interleave(torch.arange(len(proposals), device=img.device), counts)
        ri, ci = torch.where(scores > conf)
        boxes, scores = boxes[ri, ci], scores[ri, ci]
        wh = boxes[:, 2:] - boxes[:, :2]
        ok = (wh >= 1e-2).all(1)
        boxes, scores, labels, bi = boxes[ok], scores[ok], ci[ok], img_of_row[ri[ok]]
        keep = torchvision.ops.batched_nms(boxes, scores, bi * nc + labels, iou)  # sorted by score
        if len(proposals) == 1:  # one image (and the traced export graph): a plain slice
            keep = keep[:max_det]
        else:
            img_of = bi[keep]
            order = torch.sort(img_of, stable=True).indices  # group by image, score order kept inside
            keep, img_of = keep[order], img_of[order]
            n = torch.bincount(img_of, minlength=len(proposals))
            rank = torch.arange(len(keep), device=keep.device) - (torch.cumsum(n, 0) - n)[img_of]
            keep = keep[rank < max_det]
        return boxes[keep], scores[keep], labels[keep], bi[keep]

    @torch.no_grad()
    def predict(self, img: Tensor, conf: float = 0.001, iou: float = 0.7, max_det: int = 300) -> list[Detections]:
        """Boxes (xyxy input pixels), scores and ssod labels per image after class-aware NMS.

        Call in eval mode: the RPN keeps its test-time top-n there (torchvision's behaviour).
        """
        boxes, scores, labels, bi = self.detect(img, conf, iou, max_det)
        sizes = torch.bincount(bi, minlength=img.shape[0]).tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(boxes.split(sizes), scores.split(sizes), labels.long().split(sizes))
        ]

    # ----------------------------------------------------------------------------- export
    def export_info(self) -> dict[str, Any]:
        """What the exporter needs to know about this family's graph (see ``ssod.export``).

        NMS is part of the network (torchvision's post-processing), so the graph already ends
        in the ``nms`` layout; the legacy tracer unrolls torchvision's per-image loops, which
        pins the batch to the traced size; RoIAlign and the data-dependent NMS/TopK are exported
        in FP32 only.
        """
        return {"output_format": "nms", "dynamic_batch": False, "rect": False, "nms_in_graph": True, "precisions": ("fp32",),
                "tensorrt_verified": False}

    def export_module(self, nms: bool = True, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> nn.Module:
        """An eval copy whose forward(img (B, 3, S, S) in [0, 1]) returns (B, max_det, 6) rows
        ``x1, y1, x2, y2, score, class`` sorted by score; padding rows are zeros with class -1
        (the runtime's ``nms`` layout). ``conf``/``iou``/``max_det`` are baked into the graph.
        """
        if not nms:
            raise ValueError("Faster R-CNN always exports with NMS in the graph (torchvision's post-processing)")
        return _FasterRCNNExport(self, conf, iou, max_det).eval()

    # ----------------------------------------------------------------------------- weights
    def load_weights(self, path: str | Path) -> dict[str, int]:
        """Initialise from a local file, copying every tensor whose name and shape match.

        Accepts an ssod checkpoint (its EMA teacher, else ``model``/``student``) or a plain
        torchvision ``FasterRCNN`` state_dict (keys without this wrapper's ``net.`` prefix; a
        box predictor of another class count is skipped). Always ``weights_only=True``.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a torch checkpoint (not a torch.save zip archive)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- unpickling errors come in many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not a checkpoint that loads safely (weights_only=True): {first}") from None
        source = _tensors_of(ckpt, path)
        own = self.state_dict()
        match: dict[str, Tensor] = {}
        for k, v in source.items():
            key = k if k in own else f"net.{k}"
            if key in own and tuple(v.shape) == tuple(own[key].shape):
                match[key] = v
        if not match:
            raise ValueError(f"{path}: no tensor matches model '{self.spec['model']}' (different architecture?)")
        self.load_state_dict(match, strict=False)
        log.info(f"{path}: loaded {len(match)}/{len(own)} tensors ({len(source)} in file)")
        return {"matched": len(match), "total": len(own), "source": len(source)}


def _tensors_of(ckpt: Any, path: Path) -> dict[str, Tensor]:
    """The state_dict inside a checkpoint: ssod (teacher > model > student) or a bare state_dict."""
    if isinstance(ckpt, Mapping):
        for key in ("teacher", "model", "student", "state_dict"):
            v = ckpt.get(key)
            if isinstance(v, Mapping) and v and all(isinstance(t, Tensor) for t in v.values()):
                return dict(v)
        if ckpt and all(isinstance(t, Tensor) for t in ckpt.values()):
            return dict(ckpt)
    raise ValueError(f"{path}: no model weights found (expected an ssod checkpoint or a torchvision state_dict)")


class _FasterRCNNExport(nn.Module):
    """Export wrapper: image (B, 3, S, S) in [0, 1] -> (B, max_det, 6) detections (the ``nms`` layout).

    Runs ``FasterRCNNDetector.detect`` on an eval copy, image by image; each image's rows are
    padded to ``max_det`` by concatenating a padding block and slicing, which traces without loops
    over detections. Eager mode takes any batch; the traced graph has the traced batch.
    """

    output_format = "nms"
    output_names = ["detections"]

    def __init__(self, det: FasterRCNNDetector, conf: float, iou: float, max_det: int):
        super().__init__()
        self.det = copy.deepcopy(det).float().eval()
        self.det.requires_grad_(False)
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)
        if self.max_det < 1:
            raise ValueError(f"max_det must be >= 1, got {max_det}")
        self.register_buffer("pad_row", torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, -1.0]]), persistent=False)

    def forward(self, img: Tensor) -> Tensor:
        with _gather_merge_levels():
            return self._forward(img)

    def _forward(self, img: Tensor) -> Tensor:
        # One image at a time: the single-image path has no sort/bincount (ONNX has no stable sort);
        # traced, the loop is unrolled for the traced batch, as torchvision's per-image RPN loop is.
        out = []
        for i in range(img.shape[0]):
            boxes, scores, labels, _ = self.det.detect(img[i : i + 1], self.conf, self.iou, self.max_det)
            rows = torch.cat((boxes, scores[:, None], labels[:, None].to(boxes.dtype)), 1)  # (K, 6)
            pad = self.pad_row.to(rows.dtype).expand(self.max_det, 6)
            out.append(torch.cat((rows, pad))[: self.max_det])
        return torch.stack(out)


def _merge_levels_by_gather(levels: Tensor, unmerged: list[Tensor]) -> Tensor:
    """torchvision's traced multi-level RoIAlign merge, as one row Gather.

    torchvision merges the per-level pooled features with an element-wise ``scatter`` (an
    index tensor expanded to (R, C, 7, 7)): ONNX Runtime's CPU ScatterElements spent 38% of the
    whole Faster R-CNN graph's time on it (measured, 1 thread, 320 px). The per-level results
    are concatenated in level order, each level's rows in ascending RoI index (``where``), i.e.
    in the order of a stable sort of ``levels``; the inverse of that permutation puts every row
    back at its RoI's index. Same values, bit for bit.
    """
    n = levels.shape[0]
    # float keys: exact below 2**24 RoIs, and TopK (what argsort exports to) takes floats everywhere
    key = levels.to(torch.float32) * n + torch.arange(n, device=levels.device, dtype=torch.float32)
    order = torch.argsort(key)
    return torch.cat(unmerged, 0)[torch.argsort(order)]


@contextlib.contextmanager
def _gather_merge_levels() -> Iterator[None]:
    """Trace with ``_merge_levels_by_gather`` in place of torchvision's scatter merge (only the
    traced path calls it; eager inference is unaffected)."""
    from torchvision.ops import poolers

    original = poolers._onnx_merge_levels
    poolers._onnx_merge_levels = _merge_levels_by_gather
    try:
        yield
    finally:
        poolers._onnx_merge_levels = original


register_family("frcnn", FasterRCNNDetector, prefixes=("fasterrcnn",))
