"""`ssod export`: the EMA teacher -> ONNX (FP32 / FP16 / INT8 Q/DQ, optional in-graph NMS) -> TensorRT.

Pipeline (each step one module):
    checkpoint -> ``onnx.torch_to_onnx`` (legacy tracer, dynamic batch) -> ``onnx.simplify`` (onnxslim)
    -> ``precision.to_fp16`` | ``precision.quantize_int8`` (+ ``calibration.CalibrationReader``)
    -> ``onnx.add_nms`` -> ``onnx.set_metadata`` -> file
    -> ``tensorrt.build_engine`` (``--format trt``; needs TensorRT, else instructions to finish on the target).
NMS is appended after the precision step, so it always runs in FP32 and is never quantized.

Families differ only through ``Detector.export_info()`` (see ``onnx.DEFAULT_EXPORT_INFO``): a
family whose network ends in its own NMS (Faster R-CNN) gets conf/iou/max_det baked into its
export module and writes the ``nms`` layout directly; one whose traced graph pins the batch
exports a fixed batch; precisions it cannot take are refused with a one-line error.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ssod")

FORMATS = ("onnx", "trt")
DEFAULT_MAX_BATCH = 16  # upper bound of a dynamic TensorRT profile unless --batch is larger
DEFAULT_WORKSPACE_MIB = 4096


def default_output(weights: Path, fmt: str, half: bool, int8: bool, nms: bool, which: str,
                   int8_target: str = "tensorrt") -> Path:
    """``last.pt`` -> ``last.onnx``, ``last_int8cpu_nms.onnx``, ``last_student_fp16.engine``, ``last_int8.engine``...

    ``int8cpu`` marks the uint8-activation model for ONNX Runtime on CPU; ``int8`` is the Q/DQ
    model TensorRT takes.
    """
    parts = [weights.stem] + (["student"] if which == "student" else [])
    parts += ["fp16"] if half else [("int8cpu" if int8_target == "cpu" else "int8")] if int8 else []
    parts += ["nms"] if nms else []
    return weights.with_name("_".join(parts) + (".engine" if fmt == "trt" else ".onnx"))


def _paths(weights: Path, fmt: str, out: str | Path | None, half: bool, int8: bool, nms: bool, which: str,
           int8_target: str) -> tuple[Path, Path | None]:
    """(onnx path, engine path or None)."""
    name = default_output(weights, fmt, half, int8, nms, which, int8_target)
    target = Path(out).expanduser() if out else name
    if out and (target.is_dir() or not target.suffix):
        target = target / name.name
    if fmt == "onnx":
        if target.suffix.lower() != ".onnx":
            raise ValueError(f"--out {target}: an ONNX export must end in .onnx")
        return target, None
    if target.suffix.lower() == ".onnx":
        return target, target.with_suffix(".engine")
    return target.with_suffix(".onnx"), target


def export_model(
    weights: str | Path,
    format: str = "onnx",  # noqa: A002 -- the CLI flag's name
    imgsz: int | None = None,
    batch: int = 1,
    dynamic: bool = True,
    half: bool = False,
    int8: bool = False,
    calib: str | Path | None = None,
    calib_size: int = 256,
    nms: bool = False,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    opset: int = 17,
    which: str = "teacher",
    out: str | Path | None = None,
    calib_method: str = "entropy",
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    int8_target: str = "auto",
    rect: bool = True,
) -> Path:
    """Export a checkpoint's teacher (or student); returns the .onnx or .engine written.

    ``weights`` may also be an ssod ``.onnx`` with ``format="trt"``: the engine is built from it
    (what to run on the GPU machine after exporting elsewhere). ``int8_target``: ``tensorrt``
    (signed symmetric activations, what TensorRT requires), ``cpu`` (uint8 activations, ONNX
    Runtime's fast x86 path) or ``auto`` (tensorrt for ``format="trt"``, else cpu). Raises ValueError /
    FileNotFoundError for bad input, ``TensorRTUnavailable`` (a RuntimeError) when TensorRT is
    needed but missing — after writing the ONNX and the engine's metadata sidecar.
    """
    weights = Path(weights).expanduser()
    fmt = {"engine": "trt", "tensorrt": "trt"}.get(str(format).lower(), str(format).lower())
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if half and int8:
        raise ValueError("--half and --int8 are exclusive: choose one precision")
    if which not in ("teacher", "student"):
        raise ValueError(f"--which must be teacher or student, not {which!r}")
    if batch < 1 or max_det < 1 or calib_size < 1:
        raise ValueError(f"--batch, --max-det and --calib-size must be >= 1 (got {batch}, {max_det}, {calib_size})")
    if (calib is not None or calib_size != 256) and not int8:
        log.warning("--calib/--calib-size only apply with --int8; ignored")
    if not 0.0 <= conf < 1.0 or not 0.0 < iou <= 1.0:
        raise ValueError(f"--conf must be in [0, 1) and --iou in (0, 1] (got {conf}, {iou})")
    if int8_target not in ("auto", "tensorrt", "cpu"):
        raise ValueError(f"--int8-target must be auto, tensorrt or cpu, not {int8_target!r}")
    int8_target = ("tensorrt" if fmt == "trt" else "cpu") if int8_target == "auto" else int8_target
    if int8 and fmt == "trt" and int8_target != "tensorrt":
        raise ValueError("--int8-target cpu makes uint8 activations, which TensorRT cannot build: use tensorrt")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file not found")
    if weights.suffix.lower() == ".onnx":
        if fmt != "trt":
            raise ValueError(f"{weights}: already an ONNX; use --format trt to build an engine from it")
        return _engine_from_onnx(weights, out, batch, dynamic, workspace_mib)

    from ssod.export.onnx import add_nms, export_info, save, set_metadata, simplify, torch_to_onnx
    from ssod.training.engine.checkpoint import load_detector
    from ssod_deploy.metadata import ModelMetadata

    t0 = time.perf_counter()
    model, ckpt = load_detector(weights, which)
    info = export_info(model)
    family = getattr(model, "family", "yolo")
    precision = "fp16" if half else "int8" if int8 else "fp32"
    if precision not in info["precisions"]:
        raise ValueError(f"--half/--int8: the {family} family exports {'/'.join(info['precisions'])} only "
                         "(its graph cannot be converted reliably); export without them")
    if dynamic and not info["dynamic_batch"]:
        log.info(f"the {family} family exports a fixed batch of {batch} (--static implied)")
        dynamic = False
    if rect and not info["rect"]:
        log.info(f"the {family} family exports a fixed {imgsz or 'training'}-px square input (--square implied)")
        rect = False
    if rect and fmt == "trt":
        # An engine is tuned per input shape: one square shape keeps one profile and the fastest
        # kernels for it (as ultralytics' engines do); rectangular inputs are the ONNX Runtime path.
        rect = False
    if nms and info["nms_in_graph"]:
        log.info(f"the {family} family has NMS in its graph already: --nms changes nothing")
    if fmt == "trt" and not info["tensorrt_verified"]:
        log.warning(f"a TensorRT build of a {family} graph has never been verified (no GPU here); "
                    "if it fails, run the .onnx with ONNX Runtime")
    cfg = ckpt.get("config") or {}
    imgsz = int(imgsz or cfg.get("imgsz") or 640)
    stride = int(max(float(s) for s in getattr(model, "stride", [32])))
    if imgsz % stride:
        raise ValueError(f"--imgsz {imgsz} must be a multiple of the model stride {stride}")
    onnx_path, engine_path = _paths(weights, fmt, out, half, int8, nms, which, int8_target)
    em = dict(ckpt.get("export_metadata") or {})
    meta = ModelMetadata(
        names=list(ckpt["names"]), imgsz=imgsz, stride=stride, family=family,
        rect=rect, dynamic_batch=dynamic, batch=batch, precision=precision,
        conf=conf, iou=iou, max_det=max_det, tau1=em.pop("tau1", None), tau2=em.pop("tau2", None),
        method=str(em.pop("method", ckpt.get("method", "supervised"))),
        extra={"weights": which, "epoch": ckpt.get("epoch"), "opset": opset,
               "exporter": "torchscript (dynamo=False)", **em},
    )

    calib_paths = _calibration_images(calib, ckpt, calib_method) if int8 else None  # fail before tracing

    # A family whose network ends in NMS gets the thresholds baked into its export module.
    module = model.export_module(conf=conf, iou=iou, max_det=max_det) if info["nms_in_graph"] else None
    proto, meta.output_format, out_shape = torch_to_onnx(model, imgsz, batch, dynamic, opset, module=module, rect=rect)
    proto = simplify(proto)
    if half or int8:
        proto = _reduce_precision(proto, meta, out_shape, half, calib_paths, calib_size, calib_method, dynamic,
                                  int8_target)
        if int8:
            meta.extra["calibration"]["source"] = str(calib) if calib is not None else "unlabeled"
    if nms and not info["nms_in_graph"]:
        proto = add_nms(proto, meta)
    set_metadata(proto, meta)
    save(proto, onnx_path)
    log.info(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB, {meta.precision}, "
             f"output {meta.output_format}, {time.perf_counter() - t0:.1f}s)")
    if fmt == "onnx":
        return onnx_path
    return _build_or_explain(onnx_path, engine_path, meta, batch, dynamic, workspace_mib)


def _reduce_precision(proto: Any, meta: Any, out_shape: tuple[int, ...], half: bool, calib_paths: Any,
                      calib_size: int, calib_method: str, dynamic: bool, int8_target: str) -> Any:
    from ssod.export.precision import count_qdq, decode_tail_nodes, quantize_int8, take_pixels, to_fp16

    try:
        # INT8 also keeps the head's output convs (DFL and class logits) in FP32: measured on the demo
        # teacher, -0.3/-0.56 AP points (CPU/TensorRT Q/DQ) instead of -0.5/-0.6; FP16 needs only the decode.
        keep = decode_tail_nodes(proto, int(out_shape[-1]), with_output_convs=not half,
                                 input_shape=(out_shape[0], 3, meta.imgsz, meta.imgsz))
    except ValueError as e:  # a family whose output is not laid out along an anchor axis
        log.warning(f"decode tail not found ({e}); reducing precision everywhere")
        keep = []
    if half:
        return to_fp16(proto, keep)

    import tempfile

    from ssod.export.calibration import CalibrationReader
    from ssod.export.onnx import INPUT_NAME
    from ssod_deploy.detector import plain_scale
    from ssod_deploy.images import SkipReport

    skipped = SkipReport()
    t = time.perf_counter()
    reader = CalibrationReader.from_folder(
        calib_paths, meta, size=calib_size, input_name=INPUT_NAME, batch=8 if dynamic else meta.batch,
        fixed_batch=not dynamic, skipped=skipped,
    )
    if len(skipped):
        log.warning(f"calibration: {skipped.summary_line()}")
    scale = plain_scale(meta)
    pixel_input = (INPUT_NAME, scale) if scale is not None and int8_target == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="ssod-int8-") as tmp:
        q, calib_method = quantize_int8(proto, Path(tmp) / "int8.onnx", reader, keep, method=calib_method,
                                        target=int8_target, pixel_input=pixel_input)
    pixels = pixel_input is not None and take_pixels(q, *pixel_input)
    nq, ndq = count_qdq(q)
    meta.extra["calibration"] = {"images": reader.num_images, "skipped": len(skipped), "method": calib_method,
                                 "target": int8_target, "activations": "s8" if int8_target == "tensorrt" else "u8",
                                 "input": "uint8 pixels" if pixels else "float32"}
    log.info(f"INT8 for {int8_target}: calibrated on {reader.num_images} images ({calib_method}, "
             f"{time.perf_counter() - t:.0f}s), "
             f"{nq} Q / {ndq} DQ nodes, {len(keep)} decode nodes kept FP32"
             f"{', input uint8 pixels' if pixels else ''}")
    return q


def _calibration_images(calib: str | Path | None, ckpt: dict[str, Any], method: str) -> list[Path]:
    """``--calib`` images, or the training data's unlabeled pool: what the teacher will label."""
    from ssod.export.precision import CALIB_METHODS

    if method not in CALIB_METHODS:
        raise ValueError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, not {method!r}")
    if calib is None:
        return [Path(p) for p in _unlabeled_pool(ckpt)]
    from ssod_deploy.images import discover_images

    paths = discover_images(Path(calib).expanduser())
    if not paths:
        raise ValueError(f"{calib}: no images for INT8 calibration")
    return paths


def _unlabeled_pool(ckpt: dict[str, Any]) -> list[str]:
    data = (ckpt.get("config") or {}).get("data")
    hint = "pass --calib DIR (a folder of images like the ones the model will see)"
    if not data:
        raise ValueError(f"the checkpoint does not name its training data: {hint}")
    from ssod.training.data.formats import load_dataset

    try:
        spec = load_dataset(data)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the training data {data} for calibration ({e}): {hint}") from None
    if not spec.unlabeled:
        raise ValueError(f"{data} has no unlabeled images: {hint}")
    return list(spec.unlabeled)


def _engine_profile(batch: int, dynamic: bool) -> tuple[int, int, int] | None:
    from ssod_deploy.engine_utils import batch_profile

    return batch_profile(batch, dynamic, DEFAULT_MAX_BATCH) if dynamic else None


def _build_or_explain(onnx_path: Path, engine_path: Path, meta: Any, batch: int, dynamic: bool,
                      workspace_mib: int) -> Path:
    from ssod.export.tensorrt import TensorRTUnavailable, build_engine, finish_on_target_message
    from ssod_deploy.engine_utils import import_tensorrt

    profile = _engine_profile(batch, dynamic)
    try:
        trt = import_tensorrt()
    except RuntimeError as e:
        # the sidecar is written now, so an engine built on the target with trtexec is usable as is
        meta.save_sidecar(engine_path, source_onnx=onnx_path.name, profile=list(profile) if profile else None)
        onnx_args = " ".join(shlex.quote(x) for x in [onnx_path.name, "--format", "trt", "--batch", str(batch)]
                             + ([] if dynamic else ["--static"])
                             + ([] if workspace_mib == DEFAULT_WORKSPACE_MIB else ["--workspace", str(workspace_mib)]))
        raise TensorRTUnavailable(
            finish_on_target_message(onnx_path, engine_path, meta, profile, str(e).split(";")[0], onnx_args,
                                     workspace_mib)
        ) from None
    return build_engine(onnx_path, engine_path, meta, profile, workspace_mib,
                        engine_path.with_suffix(".timing.cache"), trt=trt)


def _engine_from_onnx(onnx_path: Path, out: str | Path | None, batch: int, dynamic: bool, workspace_mib: int) -> Path:
    from ssod_deploy.metadata import ModelMetadata

    import onnx

    from ssod.export.precision import qdq_activation_type

    meta = ModelMetadata.from_onnx(onnx_path)
    if meta.rect:
        raise ValueError(
            f"{onnx_path}: exported for rectangular inputs (dynamic height/width); TensorRT engines are built "
            "for one square size: export the checkpoint with --format trt, or with --square for an ONNX to build from"
        )
    if qdq_activation_type(onnx.load(str(onnx_path))) == "u8":
        raise ValueError(
            f"{onnx_path}: INT8 with uint8 activations (made for ONNX Runtime on CPU); TensorRT needs signed "
            "symmetric Q/DQ: export with --format trt --int8 (or --int8-target tensorrt)"
        )
    engine_path = Path(out).expanduser() if out else onnx_path.with_suffix(".engine")
    if engine_path.suffix.lower() == ".onnx":
        raise ValueError(f"--out {engine_path}: an engine path must not end in .onnx")
    dynamic = dynamic and meta.dynamic_batch
    if not meta.dynamic_batch:
        batch = meta.batch
    return _build_or_explain(onnx_path, engine_path, meta, batch, dynamic, workspace_mib)


__all__ = ["export_model", "default_output", "FORMATS"]
