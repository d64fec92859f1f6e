"""`ssod eval`: evaluate a checkpoint's teacher (or student) on a dataset's val split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssod.training.engine.checkpoint import load_detector
from ssod.training.engine.evaluation import evaluate_detector
from ssod.training.engine.trainer import select_device


def evaluate_checkpoint(
    weights: str, data: str | None = None, imgsz: int | None = None, batch: int = 16,
    device: str = "auto", which: str = "teacher", out: str | None = None, workers: int = 2,
) -> tuple[dict[str, Any], Path]:
    from ssod.training.data.formats import load_dataset
    from ssod.training.data.loader import build_val_loader
    from ssod.training.engine.plots import save_eval_plots
    from ssod.training.models.base import fit_imgsz

    dev = select_device(device)
    model, ckpt = load_detector(weights, which)
    model.to(dev)
    cfg = ckpt["config"]
    spec = load_dataset(data or cfg["data"])
    if list(spec.names) != list(ckpt["names"]):
        raise ValueError(f"{data or cfg['data']}: class names {spec.names} differ from the checkpoint's {ckpt['names']}")
    if not spec.val:
        raise ValueError(f"{data or cfg['data']}: no val split to evaluate on")
    loader = build_val_loader(spec.val, fit_imgsz(model, imgsz or cfg["imgsz"], "evaluating"), batch, workers)
    result = evaluate_detector(model, loader, spec, dev, conf=cfg["val_conf"], iou=cfg["val_iou"], max_det=cfg["max_det"])
    out_path = Path(out) if out else Path(weights).with_name(Path(weights).stem + f"_eval_{which}.json")
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"weights": str(weights), "data": str(data or cfg["data"]), **result}, indent=2, default=float))
    tmp.replace(out_path)
    save_eval_plots(result, out_path.with_name(out_path.stem + "_confusion.png"),
                    out_path.with_name(out_path.stem + "_pr.png"), f"{Path(weights).name} ({which})")
    return result, out_path
