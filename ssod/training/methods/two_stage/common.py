"""Model-facing helpers shared by the two-stage methods (Soft Teacher, DTG, Efficient Teacher).

They speak the two-stage contract of ``ssod.training.models.frcnn`` (``prepare``,
``backbone_features``, ``rpn_raw``, ``rpn_targets``, ``rpn_loss``, ``roi_forward``,
``roi_targets``, ``roi_loss``, ``decode_roi``, ``roi_scores``, ``bg_index``) and the batch
contract (weak/strong views with their matrices). torchvision's detection API takes one tensor
per image (proposal lists, target dicts); rows are otherwise kept flat with an image index and
every selection here is vectorised over the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ssod.training.pseudo import PseudoLabels
from ssod.training.pseudo_geometry import clip_and_filter, map_boxes

if TYPE_CHECKING:
    from torchvision.models.detection.image_list import ImageList

    from ssod.training.models.base import Detector

__all__ = [
    "TWO_STAGE_API", "require_two_stage", "image_index", "split_rows", "topk_per_image", "map_rows",
    "pseudo_targets", "roi_encode", "rpn_decode_all", "proposals_from_raw", "slice_images", "slice_feats",
    "max_iou_same_image",
]

TWO_STAGE_API = (
    "prepare", "backbone_features", "rpn_raw", "rpn_targets", "rpn_loss", "rpn_proposals", "roi_forward",
    "roi_targets", "roi_loss", "decode_roi", "roi_scores", "bg_index",
)


def require_two_stage(model: "Detector", method: str) -> None:
    """Clear one-line error when ``model`` lacks the two-stage capability a method needs."""
    missing = [n for n in TWO_STAGE_API if not hasattr(model, n)]
    if not getattr(model, "two_stage", False) or missing:
        raise ValueError(
            f"method '{method}' needs a two-stage (Faster R-CNN) model; model family "
            f"'{getattr(model, 'family', type(model).__name__)}' is not one"
            + (f" (lacks {missing})" if missing else "")
            + ": use --model fasterrcnn_mobilenet_v3 / fasterrcnn_resnet50, or --method mean_teacher"
        )


def image_index(counts: list[int] | Tensor, device: torch.device | str) -> Tensor:
    """Row -> image index for rows laid out image after image with ``counts`` rows each."""
    c = torch.as_tensor(counts, device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(c.numel(), device=device), c)


def split_rows(x: Tensor, image_idx: Tensor, num_images: int) -> list[Tensor]:
    """Rows sorted by image (stable) -> one tensor per image (torchvision's list API)."""
    order = torch.sort(image_idx, stable=True).indices
    counts = torch.bincount(image_idx, minlength=num_images).tolist()
    return list(x[order].split(counts))


def topk_per_image(priority: Tensor, image_idx: Tensor, k: int | Tensor) -> Tensor:
    """Bool mask of the ``k`` highest-priority rows of each image (one sort, no loop over images).

    ``k`` is one number or one per image (a tensor indexed by image).
    """
    if priority.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=priority.device)
    n_img = int(image_idx.max()) + 1
    order = torch.argsort(priority, descending=True, stable=True)
    order = order[torch.sort(image_idx[order], stable=True).indices]  # by image, priority inside
    counts = torch.bincount(image_idx, minlength=n_img)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=priority.device) - starts[image_idx[order]]
    mask = torch.zeros_like(priority, dtype=torch.bool)
    kk = k[image_idx[order]] if isinstance(k, Tensor) else k
    mask[order[rank < kk]] = True
    return mask


def map_rows(
    boxes: Tensor, image_idx: Tensor, M_from: Tensor, M_to: Tensor, imgsz: int,
    min_size: float = 1.0, min_visible: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Boxes of one view -> the other view (clipped), and which of them are still usable there."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), torch.zeros(0, dtype=torch.bool, device=boxes.device)
    mapped = map_boxes(boxes, image_idx, M_from, M_to)
    return clip_and_filter(mapped, imgsz, min_size=min_size, min_visible=min_visible)


def pseudo_targets(pseudo: PseudoLabels, num_images: int) -> list[dict[str, Tensor]]:
    """Flat pseudo labels -> torchvision-style targets, one dict(boxes, labels) per image (ssod ids)."""
    idx = pseudo["batch_idx"].long()
    boxes = split_rows(pseudo["boxes"].float().reshape(-1, 4), idx, num_images)
    labels = split_rows(pseudo["labels"].long(), idx, num_images)
    return [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]


def _coder(model: "Detector", stage: str) -> Any:
    head = getattr(model, "roi_heads" if stage == "roi" else "rpn", None)
    coder = getattr(head, "box_coder", None)
    if coder is None:
        raise ValueError(f"two-stage model {type(model).__name__} exposes no {stage} box coder ('{stage}.box_coder')")
    return coder


def roi_encode(model: "Detector", target_boxes: Tensor, proposals: Tensor) -> Tensor:
    """Fast R-CNN regression targets (R, 4) of ``target_boxes`` w.r.t. ``proposals`` (the model's own box coder)."""
    if target_boxes.numel() == 0:
        return target_boxes.reshape(0, 4)
    return _coder(model, "roi").encode_single(target_boxes.float(), proposals.float())


def rpn_decode_all(model: "Detector", deltas: Tensor, anchors: list[Tensor]) -> Tensor:
    """Every anchor's regressed box (B, A, 4) with the model's RPN box coder (no top-n, no NMS)."""
    b = deltas.shape[0]
    return _coder(model, "rpn").decode(deltas.detach().reshape(-1, 4), anchors).view(b, -1, 4)


def proposals_from_raw(
    model: "Detector", images: "ImageList", feats: Any, anchors: list[Tensor], obj: Tensor, deltas: Tensor, level: Tensor
) -> list[Tensor]:
    """The model's proposals from an RPN pass already made (``rpn_decode_proposals`` when the model
    has it, else a second head pass through ``rpn_proposals``)."""
    fn = getattr(model, "rpn_decode_proposals", None)
    if fn is not None:
        return fn(images, anchors, obj, deltas, level)[0]
    return model.rpn_proposals(images, feats)[0]


def slice_images(images: "ImageList", sl: slice) -> "ImageList":
    from torchvision.models.detection.image_list import ImageList

    return ImageList(images.tensors[sl], list(images.image_sizes[sl]))


def slice_feats(feats: Any, sl: slice) -> Any:
    return type(feats)((k, v[sl]) for k, v in feats.items())


def max_iou_same_image(boxes: Tensor, boxes_img: Tensor, others: Tensor, others_img: Tensor) -> Tensor:
    """For each box, its largest IoU with an ``others`` box of the same image (0 if none)."""
    from torchvision.ops import box_iou

    if boxes.numel() == 0 or others.numel() == 0:
        return boxes.new_zeros(boxes.shape[0])
    iou = box_iou(boxes.float(), others.float())
    iou = torch.where(boxes_img[:, None] == others_img[None, :], iou, torch.zeros_like(iou))
    return iou.amax(1)
