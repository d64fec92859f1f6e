"""ONNX -> TensorRT engine with the TensorRT Python API: strongly typed, dynamic-batch profile, timing cache.

Precision is the ONNX's own (FP32, FP16 mixed precision, or INT8 Q/DQ): the network is built
strongly typed, the only mode TensorRT 11 has (TensorRT 10 needs the STRONGLY_TYPED flag, which
11 keeps but ignores). The result is a plain serialized plan — loadable by trtexec, DeepStream and
``ssod_deploy`` — plus an ``<engine>.json`` metadata sidecar.

tensorrt is imported lazily (``ssod_deploy.engine_utils.import_tensorrt``); ``build_engine``
takes the module as an argument so tests can drive it with a fake of the few interfaces used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ssod_deploy.engine_utils import (
    import_tensorrt,
    strongly_typed_flags,
    tensorrt_version,
    trtexec_command,
)
from ssod_deploy.metadata import ModelMetadata

log = logging.getLogger("ssod")


class TensorRTUnavailable(RuntimeError):
    """TensorRT is missing or too old here; the message says how to finish on the target."""


def finish_on_target_message(
    onnx_path: Path, engine_path: Path, meta: ModelMetadata, profile: tuple[int, int, int] | None,
    reason: str, export_args: str, workspace_mib: int,
) -> str:
    """What to run on the GPU machine: ``ssod export model.onnx --format trt`` or the trtexec line.

    The engine's metadata sidecar is already written, so an engine built by trtexec under the
    suggested name is usable by ``ssod_deploy`` as it is.
    """
    trtexec = trtexec_command(
        onnx_path.name, engine_path.name, "images", meta.imgsz, profile, workspace_mib,
        timing_cache=engine_path.with_suffix(".timing.cache").name,
    )
    sidecar = ModelMetadata.sidecar_path(engine_path)
    return (
        f"{reason}. Wrote {onnx_path} ({meta.precision}, output {meta.output_format}) and the engine's "
        f"metadata {sidecar}. To finish on the target GPU machine (TensorRT 10.x or 11.x), copy both files "
        f"there and in their folder run either\n"
        f"  ssod export {export_args}\n"
        f"or\n"
        f"  {trtexec}"
    )


def write_sidecar(onnx_path: str | Path, engine_path: str | Path, **engine_info: Any) -> Path:
    """``<engine>.json`` from the ONNX's metadata (for engines built with trtexec)."""
    meta = ModelMetadata.from_onnx(onnx_path)
    return meta.save_sidecar(engine_path, source_onnx=Path(onnx_path).name, **engine_info)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    meta: ModelMetadata,
    profile: tuple[int, int, int] | None,
    workspace_mib: int = 4096,
    timing_cache: str | Path | None = None,
    trt: Any = None,
) -> Path:
    """Build and save a plain engine + sidecar. ``profile`` = (min, opt, max) batch for a dynamic input.

    The timing cache (read if present, written after the build) makes rebuilds on the same GPU
    fast; it is machine-specific, as the engine is.
    """
    trt = trt or import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "unknown error"
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse the ONNX: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    dynamic_inputs = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d == -1 for d in shape[1:]):
            raise RuntimeError(f"{onnx_path}: input {tensor.name} {shape} is dynamic beyond the batch axis")
        if shape[0] == -1:
            dynamic_inputs.append((tensor.name, shape))
    if dynamic_inputs:
        if profile is None:
            raise ValueError(f"{onnx_path}: dynamic batch needs a (min, opt, max) batch profile")
        lo, opt, hi = profile
        if not 1 <= lo <= opt <= hi:
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {profile}")
        prof = builder.create_optimization_profile()
        for name, shape in dynamic_inputs:
            prof.set_shape(name, (lo, *shape[1:]), (opt, *shape[1:]), (hi, *shape[1:]))
        config.add_optimization_profile(prof)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is rejected

    log.info(f"building TensorRT {trt.__version__} engine from {onnx_path.name} (strongly typed, {meta.precision})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, engine_path)
    if cache_path is not None:
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    meta.save_sidecar(
        engine_path,
        tensorrt=".".join(map(str, tensorrt_version(trt))),
        profile=list(profile) if dynamic_inputs and profile else None,
        source_onnx=onnx_path.name,
        workspace_mib=int(workspace_mib),
    )
    return engine_path
