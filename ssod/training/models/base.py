"""The one model interface the trainer, the methods and the exporter see.

A model family (YOLO dense detector, torchvision Faster R-CNN) implements ``Detector``;
nothing outside ``ssod/training/models`` knows which family it holds. Families register
themselves in ``FAMILIES`` and ``build_model`` picks one from the spec, so adding a family
never adds an ``if "yolo" in name`` branch elsewhere.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from ssod.training.data.batch import Batch

Detections = dict[str, torch.Tensor]  # boxes (K,4) xyxy input pixels, scores (K,), labels (K,)
LOG = logging.getLogger("ssod")


def fit_imgsz(model: nn.Module, imgsz: int, doing: str = "training") -> int:
    """``imgsz`` rounded up to a multiple of the model's largest stride (a dense model's levels only
    line up there; ultralytics rounds the same way), with a warning when it moves."""
    stride = int(torch.as_tensor(getattr(model, "stride", 1)).max())
    if int(imgsz) % stride == 0:
        return int(imgsz)
    fixed = -(-int(imgsz) // stride) * stride
    LOG.warning("imgsz %s is not a multiple of the model's largest stride %d: %s at %d", imgsz, stride, doing, fixed)
    return fixed


class Detector(nn.Module, ABC):
    """A detector that can learn from a labeled batch and predict boxes.

    ``spec`` is a plain dict (strings and numbers) from which ``build_model`` rebuilds the
    same architecture; checkpoints store it next to the ``state_dict`` so that loading never
    unpickles code.
    """

    family: str = ""
    # Whether the family's eval forward may run under a reduced-precision autocast and still hand
    # back float32 outputs (what the teacher's bf16 pseudo-labelling needs; ``ema.teacher_dtype``).
    reduced_precision_inference: bool = False
    # True when ``loss`` is a sum over the batch's images (ultralytics scales its loss by the batch
    # size), False when it is a mean (torchvision): methods weigh an unlabeled batch of another size
    # against the labeled one with it.
    loss_sums_over_images: bool = False

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = dict(spec)
        self.names: list[str] = list(spec["names"])
        # dtype the EMA teacher's pseudo-labelling forward runs in (None = float32); set by the
        # trainer on its teacher only, applied by ``pseudo.eval_mode``. Validation stays float32.
        self.pseudo_label_dtype: torch.dtype | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @abstractmethod
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Supervised loss on a labeled batch: (scalar to backpropagate, named detached parts)."""

    @abstractmethod
    @torch.no_grad()
    def predict(
        self, img: torch.Tensor, conf: float = 0.001, iou: float = 0.7, max_det: int = 300
    ) -> list[Detections]:
        """Boxes in input pixels after NMS, one dict per image. Call in eval mode."""

    @abstractmethod
    def forward_raw(self, img: torch.Tensor) -> Any:
        """The family's raw dense outputs (what SSOD methods build their losses from)."""


ModelBuilder = Callable[[dict[str, Any]], Detector]
FAMILIES: dict[str, ModelBuilder] = {}
# model name prefix -> family, so "yolov8n", "yolo11n.yaml", "my/yolo.yaml" all resolve.
NAME_PREFIXES: list[tuple[str, str]] = []


def register_family(family: str, builder: ModelBuilder, prefixes: tuple[str, ...] = ()) -> None:
    FAMILIES[family] = builder
    NAME_PREFIXES.extend((p, family) for p in prefixes)


def family_of(model_name: str) -> str:
    """Which family builds ``model_name`` (longest matching prefix of the file's stem)."""
    from pathlib import Path

    stem = Path(str(model_name)).name.lower()
    matches = [(len(p), fam) for p, fam in NAME_PREFIXES if stem.startswith(p)]
    if not matches:
        known = ", ".join(sorted({p for p, _ in NAME_PREFIXES}))
        raise ValueError(f"unknown model '{model_name}': names must start with one of {known}")
    return max(matches)[1]


def build_model(spec: dict[str, Any]) -> Detector:
    """Rebuild a detector from its spec (``family`` key, or inferred from ``model``)."""
    _import_families()
    family = spec.get("family") or family_of(spec["model"])
    return FAMILIES[family]({**spec, "family": family})


def _import_families() -> None:
    # Importing a family module registers it.
    from ssod.training.models import yolo  # noqa: F401
    try:
        from ssod.training.models import frcnn  # noqa: F401
    except ImportError:
        pass
