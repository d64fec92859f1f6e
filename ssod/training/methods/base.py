"""What a training method is: teacher targets in, student losses out.

A method never touches the loop. Each step the trainer hands it the labeled batch, the
unlabeled batch (weak and strong views, or ``None`` for supervised training), the student and
the EMA teacher; it returns named, already-weighted loss tensors which the trainer sums.
Epoch-level state (per-class thresholds, ...) lives in the method, is exposed through
``state_dict`` (plain tensors/numbers/lists only: checkpoints load with ``weights_only=True``)
and is saved by the checkpoint hook. A method may add trainer hooks through ``hooks()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ssod.training.data.batch import Batch

if TYPE_CHECKING:
    from ssod.training.engine.hooks import Hook
    from ssod.training.models.base import Detector


class Method:
    name: str = "base"
    uses_unlabeled: bool = False

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = dict(cfg)
        self.epoch = 0
        self.burn_in = False  # True while only the supervised part runs (set by the trainer)
        # Extra per-step numbers to log (not summed into the loss), e.g. loss parts.
        self.step_log: dict[str, float] = {}

    def losses(
        self,
        labeled: Batch,
        unlabeled: Batch | None,
        student: "Detector",
        teacher: "Detector | None",
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def hooks(self) -> list["Hook"]:
        return []

    def log_values(self) -> dict[str, float]:
        """Numbers the metrics logger writes to the CSV after each epoch."""
        return {}

    def export_metadata(self) -> dict[str, Any]:
        """What an exported model carries from this method (e.g. per-class thresholds)."""
        return {"method": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, cfg: dict[str, Any]) -> Method:
    from ssod.training import methods  # noqa: F401  (imports register every method)

    if name not in METHODS:
        raise ValueError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](cfg)
