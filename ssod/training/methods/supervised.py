"""Supervised training on the labeled part only: the baseline and the burn-in of every method."""

from __future__ import annotations

import torch

from ssod.training.methods.base import Method, register_method


@register_method
class Supervised(Method):
    name = "supervised"
    uses_unlabeled = False

    def losses(self, labeled, unlabeled, student, teacher) -> dict[str, torch.Tensor]:
        total, parts = student.loss(labeled)
        self.step_log = {f"sup_{k}": float(v) for k, v in parts.items()}
        return {"sup": total}
