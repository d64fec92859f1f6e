"""What Soft Teacher and DTG share around their step: pseudo-label counters and a per-step seed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ssod.training.data.batch import Batch
from ssod.training.methods.mean_teacher import MeteredMethod
from ssod.training.methods.two_stage.common import require_two_stage

if TYPE_CHECKING:
    from ssod.training.models.base import Detector


class SeededStepMethod(MeteredMethod):
    """A method whose random draws (box jitter, background sampling) are seeded from (seed, step),
    so a resumed run draws exactly what an uninterrupted one would; the step count is its state."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self._gen: torch.Generator | None = None
        self._steps = 0

    def losses(
        self, labeled: Batch, unlabeled: Batch | None, student: "Detector", teacher: "Detector | None"
    ) -> dict[str, Tensor]:
        """The supervised loss, then the method's ``unsupervised_losses`` (each logged per step).

        The unlabeled part does not run during burn-in, nor without unlabeled images or a teacher.
        When it does, both models must be two-stage and the step counter, the seed of this step's
        draws, advances.
        """
        sup, parts = student.loss(labeled)
        self.step_log = {f"sup_{k}": float(v) for k, v in parts.items()}
        if self.burn_in or unlabeled is None or teacher is None:
            return {"sup": sup}
        require_two_stage(student, self.name)
        require_two_stage(teacher, self.name)
        self._steps += 1
        unsup = self.unsupervised_losses(unlabeled, student, teacher)
        self.step_log.update({k: float(v.detach()) for k, v in unsup.items()})
        return {"sup": sup, **unsup}

    def unsupervised_losses(self, unlabeled: Batch, student: "Detector", teacher: "Detector") -> dict[str, Tensor]:
        """Named, already-weighted losses of the unlabeled batch (weak and strong views)."""
        raise NotImplementedError

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        self._gen.manual_seed(int(self.cfg["seed"]) * 1_000_003 + self._steps)
        return self._gen

    def state_dict(self) -> dict[str, Any]:
        return {"steps": int(self._steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = int(state.get("steps", 0))
