"""TensorRT engine backend (TensorRT 10/11 tensor-name API, CUDA memory through cuda-python).

The engine is a plain serialized plan (what ``ssod export --format trt`` and ``trtexec
--saveEngine`` write); its metadata is the ``<engine>.json`` sidecar. tensorrt and cuda-python
are imported when a backend is created, so this module imports anywhere.

NOT VERIFIED ON A GPU in this repository's CI (no GPU, TensorRT not installable there): the code
follows the TensorRT 10 Python API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) and cuda-python's runtime bindings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ssod_deploy.engine_utils import import_tensorrt, tensorrt_version
from ssod_deploy.metadata import ModelMetadata

log = logging.getLogger("ssod")


def import_cudart() -> Any:
    """cuda-python's runtime module (new layout ``cuda.bindings.runtime``, old ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise RuntimeError(
                "running a TensorRT engine needs cuda-python for GPU memory: pip install cuda-python"
            ) from None
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (err, *values); raise on a non-success error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error during {what}: {err}")
    return values[0] if len(values) == 1 else values


class TensorRTBackend:
    """Runs a serialized TensorRT engine; one input (images), any outputs."""

    def __init__(self, path: str | Path, threads: int | None = None):
        trt = import_tensorrt()
        self._trt = trt
        self._cudart = cudart = import_cudart()
        self.path = Path(path)
        self.metadata: ModelMetadata = ModelMetadata.from_sidecar(self.path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ValueError(
                f"{self.path}: TensorRT {trt.__version__} cannot deserialize this engine (built by another "
                "TensorRT version or GPU, or an ultralytics engine with a metadata header); rebuild it on this "
                "machine with `ssod export --format trt`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        if len(self.inputs) != 1:
            raise ValueError(f"{self.path}: expected one input tensor, found {self.inputs}")
        self.input_name = self.inputs[0]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if shape[0] == -1:  # dynamic batch: bounded by optimisation profile 0
            _, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.max_batch: int | None = int(hi[0])
        else:
            self.max_batch = int(shape[0])
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.name = f"tensorrt[{'.'.join(map(str, tensorrt_version(trt)))}]"
        log.info(f"{self.path.name}: TensorRT {trt.__version__}, max batch {self.max_batch}")

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_check(self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        x = np.ascontiguousarray(batch, dtype=self.dtypes[self.input_name])
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ValueError(f"{self.path}: input shape {x.shape} is outside the engine's optimisation profile")
        ptr = self._device(self.input_name, x.nbytes)
        _check(cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, self.stream), "copy to GPU")
        self.context.set_tensor_address(self.input_name, ptr)
        host: dict[str, np.ndarray] = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.path}: output {name} has a data-dependent shape {shape}")
            host[name] = np.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self._device(name, host[name].nbytes))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        for name, arr in host.items():
            ptr = self._buffers[name][0]
            _check(cudart.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes, d2h, self.stream), "copy from GPU")
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return [host[n].astype(np.float32, copy=False) for n in self.outputs]

    def __del__(self) -> None:
        try:
            for ptr, _ in self._buffers.values():
                self._cudart.cudaFree(ptr)
            self._cudart.cudaStreamDestroy(self.stream)
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass
