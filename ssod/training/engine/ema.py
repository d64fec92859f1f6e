"""The EMA teacher: an exponential moving average of the student's weights, and the precision
its pseudo-labelling forward runs in."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

TEACHER_PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16_matmul() -> bool:
    """True where the CPU multiplies bfloat16 in hardware, so oneDNN has native bf16 convolutions:
    Intel AMX tiles (Sapphire Rapids and later) or AVX512-BF16 (Cooper Lake, AMD Zen 4 and later).
    yolov8n teacher, 16 x 192 px, one thread: 110 -> 44 ms on AMX (docs/benchmarks.md Run 16),
    137 -> 80 ms with AVX512-BF16 on an AMD EPYC (Run 18). Elsewhere bf16 is emulated and no faster."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)  # private probes: absent in some torch builds
        if probe is not None and probe():
            return True
    return False


def teacher_dtype(setting: str, device: torch.device, model: Any) -> torch.dtype | None:
    """The dtype of the teacher's pseudo-labelling forward (None = float32) for ``teacher_precision``.

    Why: the teacher forward is most of what an SSOD step adds over a supervised one, and pseudo
    labels need far less precision than gradients (scores are thresholded, boxes are targets a
    stride apart in the DFL bins). ``auto`` takes bf16 on a CPU with hardware bf16 (AMX or
    AVX512-BF16) and keeps float32 elsewhere; on CUDA the teacher already runs inside the trainer's
    ``amp`` autocast, so ``auto`` adds nothing there. Validation and export never use this dtype.
    """
    if setting not in TEACHER_PRECISIONS:
        raise ValueError(f"teacher_precision '{setting}': use one of {', '.join(TEACHER_PRECISIONS)}")
    if setting == "fp32":
        return None
    supported = bool(getattr(model, "reduced_precision_inference", False))
    if setting == "bf16":
        if not supported:
            raise ValueError(f"teacher_precision bf16: {type(model).__name__} does not support a reduced-precision "
                             "teacher; use fp32 (or auto)")
        return torch.bfloat16
    return torch.bfloat16 if supported and device.type == "cpu" and cpu_has_bf16_matmul() else None


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
