"""Teacher pseudo-labels for every SSOD method and model family.

The teacher sees the weak view; the student learns on the strong view. This module turns the
teacher's per-image detections into one flat set of boxes (``PseudoLabels``: ``boxes`` (N,4)
xyxy pixels, ``scores`` (N,), ``labels`` (N,) int64, ``batch_idx`` (N,) int64, plus any other
per-box tensors a method attaches), moves them into the strong view through the recorded view
matrices, and measures them against hidden labels when the data has them.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from ssod.training.data.batch import Batch
from ssod.training.pseudo_geometry import clip_and_filter, map_boxes, map_edge_support, paint_rects, spare_objects

if TYPE_CHECKING:
    from ssod.training.models.base import Detections, Detector

PseudoLabels = dict[str, torch.Tensor]

__all__ = [
    "PseudoLabels", "eval_mode", "empty_pseudo", "concat_detections", "select", "teacher_detections", "enlarged_side",
    "on_enlarged", "weak_to_strong", "teacher_pseudo_labels", "match_hidden", "pseudo_label_quality",
    "true_pseudo_labels", "pseudo_batch", "QualityMeter",
]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no grad for the duration, restoring the previous mode (BN stats stay put).
    A model already in eval mode (the EMA teacher, every step) is not walked twice for nothing.
    A model with a ``pseudo_label_dtype`` (the trainer's teacher, ``ema.teacher_dtype``) also runs
    under autocast to that dtype; its outputs come back as float32."""
    was_training = model.training
    if was_training:
        model.eval()
    dtype = getattr(model, "pseudo_label_dtype", None)
    try:
        with torch.no_grad(), _autocast(model, dtype):
            yield model
    finally:
        if was_training:
            model.train()


def _autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> ContextManager[object]:
    if dtype is None:
        return nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype)


def empty_pseudo(device: torch.device | str = "cpu") -> PseudoLabels:
    return {
        "boxes": torch.zeros(0, 4, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.long, device=device),
        "batch_idx": torch.zeros(0, dtype=torch.long, device=device),
    }


def concat_detections(dets: list["Detections"], device: torch.device | str | None = None) -> PseudoLabels:
    """Per-image detection dicts -> one flat ``PseudoLabels`` with ``batch_idx``."""
    if device is None:
        device = dets[0]["boxes"].device if dets else "cpu"
    if not dets:
        return empty_pseudo(device)
    counts = torch.tensor([len(d["scores"]) for d in dets], device=device)
    return {
        "boxes": torch.cat([d["boxes"].reshape(-1, 4) for d in dets]).float().to(device),
        "scores": torch.cat([d["scores"].reshape(-1) for d in dets]).float().to(device),
        "labels": torch.cat([d["labels"].reshape(-1) for d in dets]).long().to(device),
        "batch_idx": torch.repeat_interleave(torch.arange(len(dets), device=device), counts),
    }


def hidden_pseudo_labels(unlabeled: Batch) -> PseudoLabels:
    """The unlabeled batch's hidden labels (weak view) as score-1 pseudo labels: a diagnostic upper
    bound that runs the unsupervised loss path on perfect pseudo labels."""
    device = unlabeled["weak"].device  # the loader's gt tensors stay on the CPU; the loss runs where the images are
    boxes = unlabeled["gt_boxes"].to(device, torch.float32).reshape(-1, 4)
    ones = torch.ones(len(boxes), device=device)
    return {"boxes": boxes, "scores": ones, "labels": unlabeled["gt_cls"].to(device, torch.long).reshape(-1),
            "batch_idx": unlabeled["gt_batch_idx"].to(device, torch.long).reshape(-1), "loc_quality": ones.clone()}


def select(pseudo: PseudoLabels, keep: torch.Tensor) -> PseudoLabels:
    """Index every per-box tensor with the same mask/index."""
    return {k: v[keep] for k, v in pseudo.items()}


def teacher_detections(
    teacher: "Detector", img: torch.Tensor, conf: float, iou: float, max_det: int
) -> PseudoLabels:
    """The teacher's boxes on ``img`` (its own view), eval mode and no grad, flattened."""
    with eval_mode(teacher):
        dets = teacher.predict(img, conf=conf, iou=iou, max_det=max_det)
    return concat_detections(dets, device=img.device)


def enlarged_side(side: int, scale: float, multiple: int) -> int:
    """``side`` times ``scale``, rounded to the nearest ``multiple`` (at least one): the teacher's
    enlarged views, whether upsampled here (``on_enlarged``) or drawn by the loader."""
    return max(int(multiple), round(int(side) * float(scale) / multiple) * int(multiple))


def on_enlarged(
    detect: Callable[[torch.Tensor], PseudoLabels], img: torch.Tensor, scale: float, multiple: int
) -> PseudoLabels:
    """``detect`` run on ``img`` enlarged ``scale`` times (bilinear, each side rounded to ``multiple``),
    its boxes mapped back into ``img`` pixels. Scale 1 calls ``detect(img)`` as it is."""
    if scale == 1.0:
        return detect(img)
    h, w = img.shape[-2:]
    size = (enlarged_side(h, scale, multiple), enlarged_side(w, scale, multiple))
    d = detect(F.interpolate(img, size=size, mode="bilinear", align_corners=False))
    back = [w / size[1], h / size[0]] * 2
    d["boxes"] = d["boxes"] * d["boxes"].new_tensor(back)
    if "edge_support" in d:  # per-edge pixel coordinates (Localization Distillation) scale like the boxes
        d["edge_support"] = d["edge_support"] * d["edge_support"].new_tensor(back)[:, None]
    return d


def weak_to_strong(
    pseudo: PseudoLabels, unlabeled: Batch, min_size: float = 2.0, min_visible: float = 0.25
) -> PseudoLabels:
    """Move weak-view boxes into the strong view; drop boxes that left it or became degenerate.

    Boxes with less than ``min_visible`` of their mapped area left visible — outside the view or
    under the strong view's cutouts (``erased``, when the batch has it) — are dropped too: the
    student cannot see them, and a label on a gray patch teaches hallucination. Every other
    per-box tensor in ``pseudo`` is filtered with the same mask; ``edge_support``/``edge_dist``
    (the teacher's per-edge distributions, Localization Distillation) move with the boxes.

    Deferred cutouts (``cutouts_pending``, ``aug.strong_cutout: spare_objects``) are settled by
    the first call of a step, against its boxes: those that alone would hide one of them are
    dropped, the rest painted into ``unlabeled["strong"]`` and recorded in ``erased`` (the batch
    is changed in place, once; later calls of the step see the painted view).
    """
    imgsz = int(unlabeled["strong"].shape[-1])
    mapped = map_boxes(pseudo["boxes"], pseudo["batch_idx"], unlabeled["M_weak"], unlabeled["M_strong"])
    pending = unlabeled.pop("cutouts_pending", None)
    if pending is not None:
        apply = spare_objects(pending, mapped, pseudo["batch_idx"], imgsz, min_size, min_visible)
        unlabeled["strong"] = paint_rects(unlabeled["strong"], pending, apply)
        unlabeled["erased"] = (pending[..., :4] * apply[..., None]).to(unlabeled["erased"])
    if pseudo["boxes"].numel() == 0:
        return {k: v for k, v in pseudo.items()}
    clipped, keep = clip_and_filter(
        mapped, imgsz, min_size=min_size, min_visible=min_visible,
        erased=unlabeled.get("erased"), batch_idx=pseudo["batch_idx"],
    )
    out = select(pseudo, keep)
    if "edge_support" in out:  # mapped unclipped: their spacing is one teacher bin in this view
        out["edge_support"], out["edge_dist"] = map_edge_support(
            out["edge_support"], out["edge_dist"], out["boxes"], out["batch_idx"], unlabeled["M_weak"],
            unlabeled["M_strong"],
        )
    out["boxes"] = clipped[keep]
    return out


def teacher_pseudo_labels(
    teacher: "Detector",
    unlabeled: Batch,
    conf: float,
    iou: float,
    max_det: int,
    min_size: float = 2.0,
    min_visible: float = 0.25,
) -> PseudoLabels:
    """Teacher boxes from the weak view, expressed in the strong view (what the student sees)."""
    weak = teacher_detections(teacher, unlabeled["weak"], conf, iou, max_det)
    return weak_to_strong(weak, unlabeled, min_size=min_size, min_visible=min_visible)


def match_hidden(
    pseudo: PseudoLabels,
    gt_boxes: torch.Tensor,
    gt_cls: torch.Tensor,
    gt_batch_idx: torch.Tensor,
    iou: float = 0.5,
) -> torch.Tensor:
    """(N,) bool: which pseudo boxes match a hidden box (a true positive at ``iou``).

    ``pseudo`` and the hidden labels must be in the same view (the hidden labels come in the
    weak view). Matching is one-to-one, same image and class, IoU >= ``iou``, decided by score:
    in each round every unmatched box proposes to its best free hidden box and each hidden box
    accepts its highest-scoring proposer (the top box always gets its first choice, as in
    COCO's greedy matching). Vectorised over all boxes of the batch; rounds <= matches.
    """
    n_pred, n_gt = int(pseudo["scores"].numel()), int(gt_cls.numel())
    device = pseudo["boxes"].device
    matched = torch.zeros(n_pred, dtype=torch.bool, device=device)
    if n_pred == 0 or n_gt == 0:
        return matched
    gt_boxes, gt_cls, gt_batch_idx = gt_boxes.to(device).float(), gt_cls.to(device), gt_batch_idx.to(device)
    ious = box_iou(pseudo["boxes"].float(), gt_boxes)
    same = (pseudo["batch_idx"][:, None] == gt_batch_idx[None, :]) & (pseudo["labels"][:, None] == gt_cls[None, :])
    ok = same & (ious >= iou)
    # Unique priority = rank by score (ties broken by position), so acceptance is never ambiguous.
    order = torch.argsort(pseudo["scores"], descending=True, stable=True)
    priority = torch.empty(n_pred, dtype=torch.long, device=device)
    priority[order] = torch.arange(n_pred, 0, -1, device=device)
    gt_free = torch.ones(n_gt, dtype=torch.bool, device=device)
    while True:
        cand = ok & ~matched[:, None] & gt_free[None, :]
        proposing = cand.any(1)
        if not bool(proposing.any()):
            break
        choice = torch.where(cand, ious, torch.full_like(ious, -1.0)).argmax(1)
        best = torch.zeros(n_gt, dtype=torch.long, device=device).scatter_reduce(
            0, choice[proposing], priority[proposing], reduce="amax"
        )
        win = proposing & (priority == best[choice])
        matched |= win
        gt_free[choice[win]] = False
    return matched


def pseudo_label_quality(
    pseudo: PseudoLabels,
    gt_boxes: torch.Tensor,
    gt_cls: torch.Tensor,
    gt_batch_idx: torch.Tensor,
    iou: float = 0.5,
) -> tuple[int, int, int]:
    """(true positives, predicted boxes, hidden boxes): pseudo-label precision = tp/n_pred, recall
    = tp/n_gt, with the one-to-one matching of ``match_hidden``."""
    tp = int(match_hidden(pseudo, gt_boxes, gt_cls, gt_batch_idx, iou).sum())
    return tp, int(pseudo["scores"].numel()), int(gt_cls.numel())


def true_pseudo_labels(pseudo: PseudoLabels, unlabeled: Batch, iou: float = 0.5) -> PseudoLabels:
    """Only the pseudo boxes (weak view) that match a hidden label: a DIAGNOSTIC that removes the
    teacher's false positives and keeps its misses, to tell which of the two costs more."""
    keep = match_hidden(pseudo, unlabeled["gt_boxes"], unlabeled["gt_cls"], unlabeled["gt_batch_idx"], iou)
    return select(pseudo, keep)


def pseudo_batch(pseudo: PseudoLabels, unlabeled: Batch) -> Batch:
    """A labeled-batch dict on the strong view whose labels are the (strong-view) pseudo boxes.

    Lets a method reuse the family's own supervised loss (``Detector.loss``) on pseudo labels.
    """
    return {
        "img": unlabeled["strong"],
        "boxes": pseudo["boxes"].float(),
        "cls": pseudo["labels"].long(),
        "batch_idx": pseudo["batch_idx"].long(),
        "M": unlabeled["M_strong"],
        "orig_size": unlabeled.get("orig_size"),
        "paths": unlabeled.get("paths", []),
        "skipped": [],
    }


class QualityMeter:
    """Per-epoch pseudo-label counters: boxes per image and precision/recall against hidden labels."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.images = 0
        self.counts: dict[str, float] = {}
        self.match: dict[str, list[int]] = {}  # name -> [tp, n_pred, n_gt]

    def add_images(self, n: int) -> None:
        self.images += int(n)

    def add_count(self, name: str, n: float) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + float(n)

    def add_quality(self, name: str, pseudo: PseudoLabels, unlabeled: Batch, iou: float = 0.5) -> None:
        """Match ``pseudo`` (weak view) against the batch's hidden labels, if it has any."""
        gt_cls = unlabeled.get("gt_cls")
        if gt_cls is None or gt_cls.numel() == 0:
            return
        tp, n_pred, n_gt = pseudo_label_quality(
            pseudo, unlabeled["gt_boxes"], gt_cls, unlabeled["gt_batch_idx"], iou=iou
        )
        acc = self.match.setdefault(name, [0, 0, 0])
        acc[0] += tp
        acc[1] += n_pred
        acc[2] += n_gt

    def values(self) -> dict[str, float]:
        out = {f"{k}_per_img": v / max(self.images, 1) for k, v in self.counts.items()}
        for name, (tp, n_pred, n_gt) in self.match.items():
            out[f"{name}_precision"] = tp / n_pred if n_pred else float("nan")  # undefined, not 0
            out[f"{name}_recall"] = tp / n_gt if n_gt else float("nan")
        return out
