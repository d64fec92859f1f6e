"""Offline pseudo-labeling of image folders with an exported model (`ssod label`, `ssod merge`).

Usable from Python without torch::

    from ssod_deploy.label import label_images, merge_outputs
    summary = label_images("photos/", "teacher.onnx", "out/", formats="coco,yolo")

Attributes load lazily, so ``ssod_deploy.label.cli`` (imported by ``ssod --help``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "label_images": "ssod_deploy.label.pipeline",
    "resolve_thresholds": "ssod_deploy.label.pipeline",
    "merge_outputs": "ssod_deploy.label.merge",
    "build_outputs": "ssod_deploy.label.writers",
    "FORMATS": "ssod_deploy.label.writers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssod_deploy.label' has no attribute {name!r}")
