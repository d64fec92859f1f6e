"""`ssod eval`: evaluate a checkpoint's teacher (or student), or an exported model, on a dataset's val split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssod.config import resolve_config
from ssod.training.engine.checkpoint import load_detector
from ssod.training.engine.evaluation import evaluate_detector, score_detections
from ssod.training.engine.plots import save_eval_plots
from ssod.training.engine.trainer import select_device

EXPORTED_SUFFIXES = (".onnx", ".engine")


def evaluate_exported(
    model: str, spec: Any, conf: float = 0.001, iou: float = 0.7, max_det: int = 300, batch: int = 16,
) -> dict[str, Any]:
    """COCO mAP, per-class AP, PR curves and confusion matrix of an exported model (ONNX / TensorRT)
    on ``spec.val``, through the runtime's ``ssod_deploy.Detector`` (the letterbox, network and NMS
    that ``ssod label`` runs; images decoded at full size), so an FP16 or INT8 export is checked on
    the user's own val images. The next batch decodes in a thread while this one runs, so decoding
    does not stall the model. A val image that cannot be read gets no detections (its boxes count
    as missed) and a warning, as in training's evaluation."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from ssod_deploy.detector import Detector
    from ssod_deploy.evaluate import detections_to_coco
    from ssod_deploy.images import ImageReadError, read_image

    def read(path: str) -> Any:
        try:
            return read_image(path)
        except ImageReadError as e:
            logging.getLogger("ssod").warning("skipped %s: %s", e.path, e.reason)
            return None

    det = Detector(model, conf=conf, iou=iou, max_det=max_det)
    if list(det.names) != list(spec.names):
        raise ValueError(f"{model}: class names {det.names} differ from the dataset's {list(spec.names)}")
    paths = [str(s.path) for s in spec.val]
    dets: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda: [read(p) for p in paths[:batch]])
        for start in range(0, len(paths), batch):
            images = pending.result()
            pending = pool.submit(lambda s=start + batch: [read(p) for p in paths[s:s + batch]])
            ids = [i for i, im in enumerate(images, start) if im is not None]
            found = det([im for im in images if im is not None])
            dets += detections_to_coco(ids, [d.boxes for d in found], [d.scores for d in found],
                                       [d.labels for d in found])
    return score_detections(spec, dets)


def evaluate_checkpoint(
    weights: str, data: str | None = None, imgsz: int | None = None, batch: int = 16,
    device: str = "auto", which: str = "teacher", out: str | None = None, workers: int = 2,
) -> tuple[dict[str, Any], Path]:
    from ssod.training.data.formats import load_dataset
    from ssod.training.data.loader import build_val_loader
    from ssod.training.models.base import fit_imgsz

    if Path(weights).suffix.lower() in EXPORTED_SUFFIXES:
        if not data:
            raise ValueError(f"{weights}: an exported model does not name its dataset: give --data data.yaml")
        if imgsz is not None or which != "teacher":
            raise ValueError(f"{weights}: an exported model is the teacher at the size it was exported at; "
                             "--imgsz and --which apply to checkpoints")
        spec = load_dataset(data)
        if not spec.val:
            raise ValueError(f"{data}: no val split to evaluate on")
        d = resolve_config()
        result = evaluate_exported(weights, spec, d["val_conf"], d["val_iou"], d["max_det"], batch)
        return result, _save(result, weights, data, out, "model")
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
    return result, _save(result, weights, data or cfg["data"], out, which)


def _save(result: dict[str, Any], weights: str, data: str, out: str | None, which: str) -> Path:
    """The JSON (atomically) and the two pictures next to it."""
    out_path = Path(out) if out else Path(weights).with_name(Path(weights).stem + f"_eval_{which}.json")
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"weights": str(weights), "data": str(data), **result}, indent=2, default=float))
    tmp.replace(out_path)
    save_eval_plots(result, out_path.with_name(out_path.stem + "_confusion.png"),
                    out_path.with_name(out_path.stem + "_pr.png"), f"{Path(weights).name} ({which})")
    return out_path
