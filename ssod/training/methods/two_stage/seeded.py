"""What Soft Teacher and DTG share around their step: pseudo-label counters and a per-step seed."""

from __future__ import annotations

from typing import Any

import torch

from ssod.training.engine.hooks import Hook
from ssod.training.methods.base import Method
from ssod.training.methods.mean_teacher import MeterHook
from ssod.training.pseudo import QualityMeter


class SeededStepMethod(Method):
    """A method whose random draws (box jitter, background sampling) are seeded from (seed, step),
    so a resumed run draws exactly what an uninterrupted one would; the step count is its state."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.meter = QualityMeter()
        self._gen: torch.Generator | None = None
        self._steps = 0

    def hooks(self) -> list[Hook]:
        return [MeterHook(self)]

    def start_epoch(self) -> None:
        self.meter.reset()

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        self._gen.manual_seed(int(self.cfg["seed"]) * 1_000_003 + self._steps)
        return self._gen

    def state_dict(self) -> dict[str, Any]:
        return {"steps": int(self._steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = int(state.get("steps", 0))
