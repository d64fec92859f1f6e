"""The `ssod export` command (registered in ssod/cli.py): parse, call ``export_model``, print."""

from __future__ import annotations

from typing import Optional

import typer

TRT_PENDING_EXIT = 3  # the ONNX was written; the engine must be built on the target (message says how)


def export_command(
    weights: Optional[str] = typer.Argument(None, help="An ssod checkpoint (last.pt / best.pt), or an exported .onnx to build a TensorRT engine from (or give it as --weights)."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx | trt (TensorRT engine, built from the ONNX; needs TensorRT 10/11 and a GPU)."),  # noqa: A002
    imgsz: Optional[int] = typer.Option(None, help="Input size in pixels: the long side (or the square side with --square); default: the training size; a multiple of the model stride."),
    rect: bool = typer.Option(True, "--rect/--square", help="Rectangular inputs (default for ONNX: each image letterboxed to its smallest stride-multiple rectangle, same-shaped images batched together, as ultralytics predict does: fewer pixels to run) or a fixed square input (always for TensorRT engines and Faster R-CNN)."),
    batch: int = typer.Option(1, help="Batch size: the fixed batch with --static; with a dynamic batch, the TensorRT profile's optimum (profile 1..max(batch, 16))."),
    dynamic: bool = typer.Option(True, "--dynamic/--static", help="Dynamic batch axis (default) or a fixed batch of --batch images."),
    half: bool = typer.Option(False, "--half", help="Mixed-precision FP16 ONNX (FP32 inputs/outputs, box decode kept FP32)."),
    int8: bool = typer.Option(False, "--int8", help="INT8 Q/DQ ONNX from post-training static quantization (calibrated on --calib)."),
    calib: Optional[str] = typer.Option(None, help="Calibration images for --int8: a folder, image list (.txt) or image (default: the training data's unlabeled folder)."),
    calib_size: int = typer.Option(256, help="Number of calibration images for --int8 (spread over the folder)."),
    calib_method: str = typer.Option("entropy", help="INT8 activation calibration: entropy (KL divergence) | percentile (99.999%) | minmax."),
    int8_target: str = typer.Option("auto", help="INT8 activations for: tensorrt (signed symmetric, what TensorRT needs) | cpu (uint8, ONNX Runtime's fast CPU path) | auto (tensorrt with --format trt, else cpu)."),
    nms: bool = typer.Option(False, "--nms/--no-nms", help="Put NMS inside the graph: output (B, max-det, 6) x1,y1,x2,y2,score,class."),
    conf: float = typer.Option(0.25, help="Score threshold: applied in the graph with --nms, else the runtime's default (stored in the model)."),
    iou: float = typer.Option(0.7, help="NMS IoU threshold (in the graph with --nms, else the runtime's default)."),
    max_det: int = typer.Option(300, help="Maximum detections per image."),
    opset: int = typer.Option(17, help="ONNX opset (17 recommended; 13 or newer)."),
    weights_opt: Optional[str] = typer.Option(None, "--weights", help="The checkpoint, as an option (as `ssod train --weights`); same as the argument."),
    which: str = typer.Option("teacher", "--which", help="teacher (the EMA teacher, default) | student."),
    out: Optional[str] = typer.Option(None, help="Output file (.onnx / .engine) or folder (default: next to the weights, e.g. last_int8cpu.onnx, last_fp16.engine)."),
    workspace: int = typer.Option(4096, help="TensorRT builder workspace limit in MiB."),
) -> None:
    """Export the EMA teacher to ONNX (FP32/FP16/INT8, optional in-graph NMS) or a TensorRT engine."""
    from ssod.export import export_model
    from ssod.export.tensorrt import TensorRTUnavailable

    if weights_opt in ("teacher", "student") and weights is not None:  # its old meaning: the part to export
        which, weights_opt = weights_opt, None
    if (weights is None) == (weights_opt is None):
        typer.secho("error: give the checkpoint once: `ssod export WEIGHTS` or `ssod export --weights WEIGHTS`",
                    fg="red", err=True)
        raise typer.Exit(1)
    weights = weights or weights_opt

    try:
        path = export_model(
            weights, format=format, imgsz=imgsz, batch=batch, dynamic=dynamic, half=half, int8=int8,
            calib=calib, calib_size=calib_size, nms=nms, conf=conf, iou=iou, max_det=max_det, opset=opset,
            which=which, out=out, calib_method=calib_method, workspace_mib=workspace, int8_target=int8_target, rect=rect,
        )
    except TensorRTUnavailable as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(TRT_PENDING_EXIT) from None
    typer.echo(f"exported {path}")
