"""ONNX Runtime backend: TensorRT EP, then CUDA EP, then CPU, whichever this install can run.

The execution providers are picked from ``onnxruntime.get_available_providers()`` in that
order; the one log line names the providers the session really uses (ONNX Runtime silently
drops a GPU provider whose libraries are missing). Intra-op threads default to the cores this
process may run on (``os.sched_getaffinity``), not the machine's total, which matters in
containers and on shared machines.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ssod_deploy.metadata import ModelMetadata

log = logging.getLogger("ssod")

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def choose_providers(available: list[str], preferred: tuple[str, ...] = PREFERRED_PROVIDERS) -> list[str]:
    """The preferred providers this build has, best first (CPU always last and always present)."""
    chosen = [p for p in preferred if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


_LOGGED: set[tuple[str, int, str]] = set()


def cpu_only_install() -> bool:
    """True when this onnxruntime build has no GPU provider to try (sessions run on the CPU)."""
    import onnxruntime as ort

    return choose_providers(ort.get_available_providers()) == ["CPUExecutionProvider"]


def _with_options(provider: str, model_path: Path) -> str | tuple[str, dict]:
    """TensorRT EP: cache built engines next to the model (a rebuild takes minutes on Jetson).

    Precision is left to the model: without trt_fp16_enable/trt_int8_enable the EP builds a
    strongly typed network, so an FP16 or Q/DQ ONNX runs at the precision it was exported in.
    """
    if provider != "TensorrtExecutionProvider":
        return provider
    cache = str(model_path.parent / ".trt_cache")
    return provider, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                      "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}


class OnnxRuntimeBackend:
    """Runs an ssod ONNX model; ``metadata`` comes from the model's ``metadata_props``."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or available_cores())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: GPU provider fallbacks are reported below
        wanted = providers or choose_providers(ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=opts, providers=[_with_options(p, self.path) for p in wanted]
            )
        except Exception as e:  # noqa: BLE001 -- ORT raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.path}: ONNX Runtime cannot load the model: {first}") from None
        self.metadata: ModelMetadata = ModelMetadata.from_onnx(self.session)
        used = self.session.get_providers()
        self.name = f"onnxruntime[{used[0]}]"
        self.cpu_only = used[0] == "CPUExecutionProvider"  # concurrent sessions may split the cores
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # float16 models are fed float32 cast here; uint8: the model takes pixels (INT8 for the CPU)
        self.input_dtype = {"tensor(float16)": np.float16, "tensor(uint8)": np.uint8}.get(inp.type, np.float32)
        batch_dim = inp.shape[0] if inp.shape else None
        self.max_batch: int | None = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        threads_s = f"{opts.intra_op_num_threads} thread{'s' if opts.intra_op_num_threads != 1 else ''}"
        line = (f"{self.path.name}: onnxruntime {ort.__version__} on {', '.join(used)} "
                f"({threads_s}, {self.metadata.precision}, output {self.metadata.output_format})")
        key = (str(self.path.resolve()), self.path.stat().st_mtime_ns, line)
        if key not in _LOGGED:  # CPU lanes load the same file several times: say it once
            _LOGGED.add(key)
            log.info(line)

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        outs = self.session.run(self.output_names, {self.input_name: x})
        return [np.asarray(o) for o in outs]
