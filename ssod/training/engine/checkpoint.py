"""Checkpoints: plain data only, written atomically, loaded with ``weights_only=True``.

A checkpoint holds tensors, numbers, strings, lists and dicts — never pickled code — so a
checkpoint downloaded from somewhere cannot run code when loaded. Layout::

    version, epoch (completed), iteration, model_spec, names, student, teacher, ema_updates,
    optimizer, scaler, method, method_state, extra (method modules' state), config,
    best_fitness, metrics
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_VERSION = 1


def plain(obj: Any) -> Any:
    """Convert paths, tuples and numpy scalars to types ``weights_only`` loading accepts."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, torch.Tensor):  # numpy scalar
        return obj.item()
    return obj


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: a killed process leaves the previous file intact, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: not an ssod checkpoint that loads safely (weights_only=True): {first}"
        ) from None
    if not isinstance(ckpt, dict) or "model_spec" not in ckpt:
        raise ValueError(f"{path}: not an ssod checkpoint (no model_spec)")
    return ckpt


def load_detector(path: str | Path, which: str = "teacher", map_location: str = "cpu"):
    """Rebuild the detector stored in a checkpoint (``teacher`` = EMA, or ``student``)."""
    from ssod.training.models.base import build_model

    ckpt = load_checkpoint(path, map_location)
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', not {which!r}")
    model = build_model(ckpt["model_spec"])
    model.load_state_dict(ckpt[which])
    return model.eval(), ckpt
