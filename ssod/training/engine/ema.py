"""The EMA teacher: an exponential moving average of the student's weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """Keeps ``self.model``, an EMA copy of the student, in eval mode and without gradients.

    decay_t = decay * (1 - exp(-t / tau)): a ramp so that early on, while the student moves
    fast, the teacher follows it instead of averaging in the random initialisation.
    Floating-point parameters *and* buffers (BatchNorm statistics) are averaged; integer
    buffers (``num_batches_tracked``) are copied.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, tau: float = 500.0, updates: int = 0):
        # ``floor`` (0 = off) bounds the decay from below; SSOD methods raise it after burn-in so
        # the teacher never follows a student that is learning from its own pseudo labels.
        self.floor = 0.0
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    def current_decay(self) -> float:
        ramp = self.decay * (1 - math.exp(-self.updates / self.tau)) if self.tau > 0 else self.decay
        return max(ramp, self.floor)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        ema_state = self.model.state_dict()
        for k, v in student.state_dict().items():
            e = ema_state[k]
            if e.dtype.is_floating_point:
                e.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                e.copy_(v)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Make the teacher an exact copy of the student (the burn-in -> SSOD switch)."""
        self.model.load_state_dict(student.state_dict())
