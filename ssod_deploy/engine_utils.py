"""TensorRT version policy and the commands to build an engine on the target, shared by exporter and runtime.

ssod builds and runs engines with the TensorRT 10/11 API: tensor-name I/O, ``set_input_shape``,
``execute_async_v3`` and strongly typed networks, where precision comes from the ONNX (an FP16
mixed-precision model or Q/DQ nodes). TensorRT 11 removed the FP16/INT8 builder flags and the
INT8 calibrators, and always builds strongly typed; TensorRT 10 needs the STRONGLY_TYPED flag.
Older releases lack what ssod uses; ``import_tensorrt`` says so in one line.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

SUPPORTED_MAJORS = (10, 11)
_WHAT_OLD_LACKS = {
    8: "TensorRT 8.x has no strongly typed networks, so it cannot take precision from the ONNX",
}


def tensorrt_version(trt: Any) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(trt.__version__).split(".")[:3] if x.isdigit())
    except (AttributeError, ValueError):
        return (0,)


def check_tensorrt_version(trt: Any) -> tuple[int, ...]:
    """Raise RuntimeError for TensorRT < 10 (saying what it lacks); returns the version tuple."""
    ver = tensorrt_version(trt)
    major = ver[0] if ver else 0
    if major < SUPPORTED_MAJORS[0]:
        lacks = _WHAT_OLD_LACKS.get(major, "it lacks the strongly typed build and I/O API ssod uses")
        raise RuntimeError(
            f"TensorRT {'.'.join(map(str, ver)) or '?'} is too old: ssod needs TensorRT 10.x or 11.x ({lacks}); "
            "JetPack 6 ships TensorRT 10, or run the .onnx with onnxruntime"
        )
    return ver


def import_tensorrt() -> Any:
    """``import tensorrt`` with a clear RuntimeError when it is missing or too old."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError(
            f"TensorRT is not installed here ({e}); on the GPU machine install TensorRT 10 or 11 "
            "(pip install tensorrt, or JetPack 6 on Jetson)"
        ) from None
    check_tensorrt_version(trt)
    return trt


def strongly_typed_flags(trt: Any) -> int:
    """``create_network`` flags: STRONGLY_TYPED where the enum has it (required on 10, ignored on 11)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def batch_profile(batch: int, dynamic: bool, max_batch: int | None = None) -> tuple[int, int, int]:
    """(min, opt, max) batch for the optimisation profile: dynamic = 1 .. max, optimised for ``batch``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not dynamic:
        return batch, batch, batch
    top = max(batch, max_batch or batch)
    return 1, batch, top


def trtexec_command(
    onnx_path: str | Path, engine_path: str | Path, input_name: str, imgsz: int,
    profile: tuple[int, int, int] | None, workspace_mib: int = 4096, timing_cache: str | Path | None = None,
) -> str:
    """The trtexec line equivalent to ``ssod export --format trt`` (TensorRT 10 and 11 alike).

    ``--stronglyTyped`` is required on 10.x and a no-op on 11.x (always strongly typed), so one
    line serves both.
    """
    args = [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped",
        f"--memPoolSize=workspace:{int(workspace_mib)}M",
    ]
    if profile is not None:
        lo, opt, hi = profile
        shape = f"3x{imgsz}x{imgsz}"
        args += [f"--minShapes={input_name}:{lo}x{shape}", f"--optShapes={input_name}:{opt}x{shape}",
                 f"--maxShapes={input_name}:{hi}x{shape}"]
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)
