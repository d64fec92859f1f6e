"""Mean Teacher with hard pseudo labels: the SSOD baseline every method must beat.

Each step the EMA teacher detects on the weak view; its boxes scoring >= ``threshold`` (one
value for all classes) become ordinary labels of the strong view, and the student's own
supervised loss (``Detector.loss``, any model family) is applied to them::

    L = L_sup(labeled) + lambda_u * L_sup(strong view, pseudo labels)

``lambda_u`` defaults to 1.0: pseudo labels are treated exactly like labels, which is the
classic self-training / Mean Teacher setting (STAC, Unbiased Teacher's box branch) and gives
the baseline no tuned advantage or handicap; efficient_teacher uses the same weight (its paper's
3.0 lost to 1.0 with a few hundred labels, docs/benchmarks.md Run 19), so the two differ in their
targets, not in how much the unlabeled half counts. Hard 0.5-threshold labels carry the
teacher's false positives and missed objects at full strength: a larger weight only amplifies
confirmation bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ssod.training.data.batch import Batch
from ssod.training.engine.hooks import Hook
from ssod.training.methods.base import Method, register_method
from ssod.training.pseudo import QualityMeter, pseudo_batch, select, teacher_detections, weak_to_strong

if TYPE_CHECKING:
    from ssod.training.models.base import Detector

__all__ = ["MeanTeacher", "MeterHook", "MeteredMethod"]


class MeterHook(Hook):
    """Starts each epoch's pseudo-label counters (a method's ``start_epoch``)."""

    def __init__(self, method: Any):
        self.method = method

    def before_epoch(self, trainer: Any) -> None:
        self.method.start_epoch()


class MeteredMethod(Method):
    """A method that measures its pseudo labels per epoch: ``self.meter``, reset by ``MeterHook``."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.meter = QualityMeter()

    def hooks(self) -> list[Hook]:
        return [MeterHook(self)]

    def start_epoch(self) -> None:
        self.meter.reset()


@register_method
class MeanTeacher(MeteredMethod):
    name = "mean_teacher"
    uses_unlabeled = True

    FRACTIONS = ("threshold",)

    def losses(
        self, labeled: Batch, unlabeled: Batch | None, student: "Detector", teacher: "Detector | None"
    ) -> dict[str, torch.Tensor]:
        sup, parts = student.loss(labeled)
        self.step_log = {f"sup_{k}": float(v) for k, v in parts.items()}
        if self.burn_in or unlabeled is None or teacher is None:
            return {"sup": sup}
        c = self.cfg
        weak = teacher_detections(teacher, unlabeled["weak"], c["threshold"], c["nms_iou"], c["max_det"])
        weak = select(weak, weak["scores"] >= c["threshold"])  # predict's conf may be exclusive/inclusive
        self.meter.add_images(unlabeled["weak"].shape[0])
        self.meter.add_quality("pl", weak, unlabeled, iou=c["quality_iou"])
        strong = weak_to_strong(weak, unlabeled, c["min_box_size"], c["min_visible"])
        self.meter.add_count("pl_boxes", len(strong["scores"]))
        self.record_targets(unlabeled["strong"], strong)
        unsup, uparts = student.loss(pseudo_batch(strong, unlabeled))
        self.step_log.update({f"unsup_{k}": float(v) for k, v in uparts.items()})
        lam = self.unsup_weight()
        self.step_log["lambda_u"] = lam
        if student.loss_sums_over_images:  # lambda weighs the parts per image, at any labeled:unlabeled ratio
            unsup = unsup * (labeled["img"].shape[0] / max(unlabeled["weak"].shape[0], 1))
        return {"sup": sup, "unsup": lam * unsup}

    def log_values(self) -> dict[str, float]:
        return {**self.meter.values(), "threshold": float(self.cfg["threshold"])}

    def export_metadata(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": float(self.cfg["threshold"])}
