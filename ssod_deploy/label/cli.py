"""typer commands `ssod label` and `ssod merge` (registered by ssod/cli.py).

Kept import-light: the engine (onnxruntime, OpenCV) loads only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

_FORMAT_HELP = "Outputs, comma-separated: coco (coco.json), yolo (labels/*.txt + classes.txt), labelstudio (labelstudio.json). review.csv and summary.json are always written."


def label_command(
    source: Path = typer.Argument(..., metavar="DIR", help="Folder of images (searched recursively by default), one image, or a .txt list of image paths."),
    model: str = typer.Option(..., "--model", "-m", help="Exported teacher: .onnx, TensorRT .engine, or an ssod .pt checkpoint (needs torch)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/label/<DIR name>). Nothing is ever written outside it."),
    format: str = typer.Option("coco,yolo,labelstudio", "--format", help=_FORMAT_HELP),
    conf: str = typer.Option("auto", "--conf", help="auto: per-class thresholds from the model metadata (score >= tau2 is a label, tau1..tau2 is kept and flagged uncertain); a number in [0, 1]: one threshold for every class, no uncertain band."),
    iou: Optional[float] = typer.Option(None, "--iou", help="NMS IoU threshold (default: the model's, usually 0.7)."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="Input size; must match the size the model was exported for (default: read from the model)."),
    batch: int = typer.Option(8, "--batch", help="Images per inference call. Shards and resumed runs must use the same value."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode/letterbox threads (default: CPU cores, at most 8)."),
    lanes: int = typer.Option(0, "--lanes", help="CPU inference lanes: sessions splitting the cores, running batches side by side (0 = auto: 2 on a CPU with >= 2 cores, 1 on GPUs). Each lane holds its own activations: --lanes 1 saves ~370 MB at imgsz 640, batch 8, for ~5-35% less speed on 2 cores."),
    backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | tensorrt | torch (auto picks by model file type)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT (kill -9 included): finished images are not redone, outputs equal an uninterrupted run."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: label only shard I of N (0-based, e.g. $SLURM_ARRAY_TASK_ID/4); combine the shard folders with `ssod merge`."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Search sub-folders of DIR."),
    save_vis: int = typer.Option(0, "--save-vis", help="Save N preview images with boxes drawn to OUT/vis (uncertain boxes dashed)."),
    save_conf: bool = typer.Option(False, "--save-conf", help="Add a confidence column to the YOLO txt files."),
    max_pixels: int = typer.Option(178_956_970, "--max-pixels", help="Skip images with more pixels than this (guards against decompression bombs)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with images/s and ETA."),
) -> None:
    """Pseudo-label a folder of images with an exported teacher: resumable, shardable, never stops on a bad file."""
    from ssod_deploy.label.pipeline import label_images

    summary = label_images(
        source, model, out, formats=format, conf=conf, iou=iou, imgsz=imgsz, batch=batch, workers=workers,
        lanes=lanes, backend=backend, resume=resume, shard=shard, recursive=recursive, save_vis=save_vis,
        save_conf=save_conf, max_pixels=max_pixels, progress=progress,
    )
    typer.echo(_summary_line(summary))


def merge_command(
    inputs: list[Path] = typer.Argument(..., metavar="OUT_1 OUT_2 ...", help="Output folders of `ssod label --shard i/n` runs (every shard of the job, once)."),
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the merged outputs (identical to what one unsharded run writes)."),
    format: str = typer.Option("coco,yolo,labelstudio", "--format", help=_FORMAT_HELP),
    save_conf: bool = typer.Option(False, "--save-conf", help="Add a confidence column to the YOLO txt files."),
) -> None:
    """Merge the output folders of sharded `ssod label` runs into one."""
    from ssod_deploy.label.merge import merge_outputs

    summary = merge_outputs(inputs, out, formats=format, save_conf=save_conf)
    typer.echo(_summary_line(summary))


def _summary_line(summary: dict) -> str:
    im, bx, tp = summary["images"], summary["boxes"], summary.get("throughput") or {}
    rate = f", {tp['images_per_s']:.1f} img/s" if tp.get("images_per_s") else ""
    return (
        f"labeled {im['labeled']} images ({bx['labels_total']} labels, {bx['uncertain_total']} uncertain), "
        f"skipped {im['skipped']}{rate} -> {summary['out']}"
    )
