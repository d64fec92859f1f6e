"""PyTorch checkpoint backend: run the EMA teacher of an ssod ``.pt`` without exporting it.

Only usable where torch (and the training package) is installed; torch is imported when a
backend is created, never at module import, so ``ssod_deploy`` stays importable without torch.
The network is the same ``export_module()`` the exporter traces, so its raw output matches the
exported ONNX and the shared post-processing applies unchanged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ssod_deploy.metadata import ModelMetadata

log = logging.getLogger("ssod")


class TorchCheckpointBackend:
    """``which``: ``teacher`` (EMA, default) or ``student``; ``imgsz`` defaults to the training size."""

    def __init__(
        self, path: str | Path, threads: int | None = None, which: str | None = None,
        imgsz: int | None = None, device: str = "cpu",
    ):
        try:
            import torch
            from ssod.export.onnx import export_info
            from ssod.training.engine.checkpoint import load_detector
        except ImportError as e:
            raise ImportError(
                f"{path}: running a .pt checkpoint needs torch and the ssod training package "
                f"({e}); export it with `ssod export` and run the .onnx instead",
                name=getattr(e, "name", None),
            ) from e

        self._torch = torch
        self.path = Path(path)
        which = which or os.environ.get("SSOD_WEIGHTS", "teacher")
        model, ckpt = load_detector(self.path, which)
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.module = model.export_module().to(self.device)
        cfg = ckpt.get("config") or {}
        meta = dict(ckpt.get("export_metadata") or {})
        self.metadata = ModelMetadata(
            names=list(ckpt["names"]),
            imgsz=int(imgsz or cfg.get("imgsz") or 640),
            stride=int(max(float(s) for s in getattr(model, "stride", [32]))),
            family=getattr(model, "family", "yolo"),
            output_format=str(getattr(self.module, "output_format", "dense")),
            dynamic_batch=True,
            rect=bool(export_info(model)["rect"]),  # as its default export, so .pt and .onnx agree
            conf=0.25,  # the exporter's default, so a .pt and its .onnx behave alike
            iou=float(cfg.get("val_iou", 0.7)),
            max_det=int(cfg.get("max_det", 300)),
            tau1=meta.pop("tau1", None),
            tau2=meta.pop("tau2", None),
            method=str(meta.pop("method", ckpt.get("method", "supervised"))),
            extra={"weights": which, **meta},
        )
        self.max_batch = None
        self.name = f"torch[{self.device}]"
        log.info(f"{self.path.name}: torch {torch.__version__} on {self.device} ({which})")

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            out = self.module(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.float().cpu().numpy() for o in outs]
