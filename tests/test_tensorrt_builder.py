"""TensorRT builder and engine backend against in-test fakes of the few tensorrt/cuda interfaces used.

TensorRT cannot be installed here and there is no GPU: these fakes record what ssod asks of
TensorRT (network flags, optimisation profile, workspace, timing cache, bytes written) and, for
the runtime, emulate device memory with host buffers so the copy/bind/execute plumbing runs.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ssod_deploy.engine_utils import batch_profile, check_tensorrt_version, strongly_typed_flags, trtexec_command
from ssod_deploy.metadata import ModelMetadata

NAMES = ["a", "b", "c"]
S = 64


# ----------------------------------------------------------------------------------- fakes


class _Enum:
    def __init__(self, **values):
        self.__dict__.update(values)


class FakeTensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class FakeNetwork:
    def __init__(self, flags, inputs):
        self.flags, self._inputs = flags, inputs

    @property
    def num_inputs(self):
        return len(self._inputs)

    def get_input(self, i):
        return self._inputs[i]


class FakeParser:
    def __init__(self, network, logger, trt):
        self.network, self.trt, self.errors = network, trt, []

    def parse_from_file(self, path):
        self.trt.log["parsed"] = path
        if self.trt.parse_errors:
            self.errors = list(self.trt.parse_errors)
            return False
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeCache:
    def __init__(self, data):
        self.data = bytes(data)

    def serialize(self):
        return self.data + b"+new"


class FakeConfig:
    def __init__(self):
        self.pools, self.profiles, self.cache, self.flags = {}, [], None, []

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return FakeCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache, self.ignore_mismatch = cache, ignore_mismatch
        return True

    def get_timing_cache(self):
        return self.cache

    def set_flag(self, flag):  # TensorRT 11 has no precision flags: ssod must never call this
        raise AssertionError(f"builder flag {flag} set: precision must come from the ONNX")


class FakeBuilder:
    def __init__(self, logger, trt):
        self.trt = trt

    def create_network(self, flags):
        net = FakeNetwork(flags, [FakeTensor("images", self.trt.input_shape)])
        self.trt.log["network"] = net
        return net

    def create_builder_config(self):
        cfg = FakeConfig()
        self.trt.log["config"] = cfg
        return cfg

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        return None if self.trt.fail_build else b"PLAN-BYTES"


def fake_tensorrt(version="10.3.0", strongly_typed=True, input_shape=(-1, 3, S, S)) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch's lazy imports call find_spec
    trt.__version__ = version
    trt.log, trt.parse_errors, trt.fail_build, trt.input_shape = {}, [], False, input_shape
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.NetworkDefinitionCreationFlag = _Enum(**({"STRONGLY_TYPED": 1} if strongly_typed else {}))
    trt.MemoryPoolType = _Enum(WORKSPACE="workspace")
    trt.Builder = lambda logger: FakeBuilder(logger, trt)
    trt.OnnxParser = lambda network, logger: FakeParser(network, logger, trt)
    return trt


@pytest.fixture()
def onnx_model(tmp_path) -> tuple[Path, ModelMetadata]:
    meta = ModelMetadata(names=NAMES, imgsz=S, tau1=[0.1] * 3, tau2=[0.6] * 3, method="efficient_teacher")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"onnx")  # the fake parser does not read it
    return path, meta


# --------------------------------------------------------------------------------- builder


def test_dynamic_build_profile_workspace_cache_and_plain_engine(onnx_model, tmp_path):
    from ssod.export.tensorrt import build_engine

    onnx_path, meta = onnx_model
    trt = fake_tensorrt()
    engine = tmp_path / "out" / "m.engine"
    cache = tmp_path / "m.timing.cache"
    cache.write_bytes(b"old")
    build_engine(onnx_path, engine, meta, profile=(1, 4, 16), workspace_mib=1024, timing_cache=cache, trt=trt)

    assert trt.log["network"].flags == 1 << 1  # STRONGLY_TYPED
    cfg = trt.log["config"]
    assert cfg.pools == {"workspace": 1024 << 20}
    (prof,) = cfg.profiles
    assert prof.shapes == {"images": ((1, 3, S, S), (4, 3, S, S), (16, 3, S, S))}
    assert cfg.cache.data == b"old" and cfg.ignore_mismatch is False
    assert cache.read_bytes() == b"old+new"
    assert engine.read_bytes() == b"PLAN-BYTES"  # the plan only: no header in front
    side = json.loads(ModelMetadata.sidecar_path(engine).read_text())
    assert side["names"] == NAMES and side["tau2"] == [0.6] * 3
    assert side["extra"]["engine"] == {"tensorrt": "10.3.0", "profile": [1, 4, 16], "source_onnx": "m.onnx",
                                       "workspace_mib": 1024}
    assert ModelMetadata.from_sidecar(engine).method == "efficient_teacher"


def test_static_build_adds_no_profile_and_tensorrt11_has_no_flag(onnx_model, tmp_path):
    from ssod.export.tensorrt import build_engine

    onnx_path, meta = onnx_model
    trt = fake_tensorrt("11.1.0", strongly_typed=False, input_shape=(2, 3, S, S))
    build_engine(onnx_path, tmp_path / "m.engine", meta, profile=None, trt=trt)
    assert trt.log["network"].flags == 0  # 11.x: always strongly typed
    assert trt.log["config"].profiles == []
    assert not (tmp_path / "m.timing.cache").exists()  # no cache asked for


def test_build_errors_are_clear(onnx_model, tmp_path):
    from ssod.export.tensorrt import build_engine

    onnx_path, meta = onnx_model
    trt = fake_tensorrt()
    trt.parse_errors = ["In node 12 (NonMaxSuppression): unsupported"]
    with pytest.raises(RuntimeError, match="cannot parse the ONNX: In node 12"):
        build_engine(onnx_path, tmp_path / "m.engine", meta, (1, 1, 1), trt=trt)
    trt = fake_tensorrt()
    trt.fail_build = True
    with pytest.raises(RuntimeError, match="failed to build the engine"):
        build_engine(onnx_path, tmp_path / "m.engine", meta, (1, 1, 1), trt=trt)
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(ValueError, match="needs a .min, opt, max. batch profile"):
        build_engine(onnx_path, tmp_path / "m.engine", meta, None, trt=fake_tensorrt())
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        build_engine(onnx_path, tmp_path / "m.engine", meta, (4, 2, 8), trt=fake_tensorrt())
    with pytest.raises(RuntimeError, match="dynamic beyond the batch axis"):
        build_engine(onnx_path, tmp_path / "m.engine", meta, (1, 1, 1), trt=fake_tensorrt(input_shape=(-1, 3, -1, -1)))


def test_version_policy():
    for v in ("10.0.1", "10.13.3", "11.0.0", "11.4.1"):
        assert check_tensorrt_version(types.SimpleNamespace(__version__=v))[0] in (10, 11)
    with pytest.raises(RuntimeError, match=r"TensorRT 8\.6\.1 is too old: ssod needs TensorRT 10\.x or 11\.x .*strongly typed"):
        check_tensorrt_version(types.SimpleNamespace(__version__="8.6.1"))
    assert strongly_typed_flags(fake_tensorrt()) == 2 and strongly_typed_flags(fake_tensorrt(strongly_typed=False)) == 0
    assert batch_profile(4, True, 16) == (1, 4, 16) and batch_profile(32, True, 16) == (1, 32, 32)
    assert batch_profile(2, False) == (2, 2, 2)


def test_trtexec_line():
    line = trtexec_command("m.onnx", "m.engine", "images", 640, (1, 8, 16), 2048, "m.timing.cache")
    assert line == (
        "trtexec --onnx=m.onnx --saveEngine=m.engine --stronglyTyped --memPoolSize=workspace:2048M "
        "--minShapes=images:1x3x640x640 --optShapes=images:8x3x640x640 --maxShapes=images:16x3x640x640 "
        "--timingCacheFile=m.timing.cache"
    )
    assert "Shapes" not in trtexec_command("m.onnx", "m.engine", "images", 640, None)


def test_export_model_builds_engine_through_fake_tensorrt(tmp_path, monkeypatch):
    """The whole `ssod export --format trt` path, from checkpoint and from an exported .onnx."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    import onnx
    from test_export import make_checkpoint, write_images

    from ssod.export import export_model
    from ssod.export.precision import qdq_activation_type

    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    ckpt = make_checkpoint(tmp_path / "tiny.pt")
    write_images(tmp_path / "calib", 4)
    engine = export_model(ckpt, format="trt", batch=2, int8=True, calib=tmp_path / "calib")
    assert engine == tmp_path / "tiny_int8.engine" and engine.read_bytes() == b"PLAN-BYTES"
    assert Path(trt.log["parsed"]) == tmp_path / "tiny_int8.onnx"
    assert qdq_activation_type(onnx.load(str(tmp_path / "tiny_int8.onnx"))) == "s8"  # what TensorRT accepts
    assert trt.log["config"].profiles[0].shapes["images"] == ((1, 3, S, S), (2, 3, S, S), (16, 3, S, S))
    assert ModelMetadata.from_sidecar(engine).precision == "int8"
    again = export_model(tmp_path / "tiny_int8.onnx", format="trt", out=tmp_path / "again.plan")
    assert again.read_bytes() == b"PLAN-BYTES" and ModelMetadata.from_sidecar(again).names == ["cat", "dog", "bird"]
    cpu = export_model(ckpt, int8=True, calib=tmp_path / "calib", out=tmp_path / "cpu.onnx", rect=False)  # uint8
    with pytest.raises(ValueError, match="uint8 activations .* TensorRT needs signed"):
        export_model(cpu, format="trt")


# --------------------------------------------------------------------------------- runtime


class FakeDevice:
    """cuda-python's runtime API over host memory: pointers are real addresses of numpy buffers."""

    def __init__(self):
        self.buffers, self.freed = {}, []
        self.cudaMemcpyKind = _Enum(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def cudaStreamCreate(self):
        return (0, 7)

    def cudaMalloc(self, n):
        buf = np.zeros(n, np.uint8)
        self.buffers[buf.ctypes.data] = buf
        return (0, buf.ctypes.data)

    def cudaFree(self, ptr):
        self.freed.append(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


class FakeEngine:
    """One input ``images`` (dynamic batch, profile max 4) and one output ``output0`` = per-image means."""

    def __init__(self):
        self.num_io_tensors = 2

    def get_tensor_name(self, i):
        return ["images", "output0"][i]

    def get_tensor_mode(self, name):
        return "in" if name == "images" else "out"

    def get_tensor_dtype(self, name):
        return "f32"

    def get_tensor_shape(self, name):
        return (-1, 3, S, S) if name == "images" else (-1, 7, 4)

    def get_tensor_profile_shape(self, name, profile):
        return ((1, 3, S, S), (2, 3, S, S), (4, 3, S, S))

    def create_execution_context(self):
        return FakeContext()


class FakeContext:
    def __init__(self):
        self.addr, self.shape = {}, None

    def set_input_shape(self, name, shape):
        if shape[0] > 4:
            return False
        self.shape = shape
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], 7, 4)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def execute_async_v3(self, stream):
        b = self.shape[0]
        x = np.ctypeslib.as_array(ctypes.cast(self.addr["images"], ctypes.POINTER(ctypes.c_float)), (b, 3, S, S))
        y = np.ctypeslib.as_array(ctypes.cast(self.addr["output0"], ctypes.POINTER(ctypes.c_float)), (b, 7, 4))
        y[:] = x.mean(axis=(1, 2, 3))[:, None, None]
        return True


def test_tensorrt_backend_plumbing_with_fakes(tmp_path, monkeypatch):
    trt = fake_tensorrt()
    trt.TensorIOMode = _Enum(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: np.float32
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: FakeEngine() if data == b"PLAN" else None)
    device = FakeDevice()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("ssod_deploy.backends.tensorrt.import_cudart", lambda: device)
    from ssod_deploy.backends.tensorrt import TensorRTBackend

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"PLAN")
    ModelMetadata(names=NAMES, imgsz=S).save_sidecar(engine)
    be = TensorRTBackend(engine)
    assert be.max_batch == 4 and be.name == "tensorrt[10.3.0]"
    x = np.random.default_rng(0).random((3, 3, S, S), dtype=np.float32)
    (y,) = be.infer(x)
    np.testing.assert_allclose(y[:, 0, 0], x.mean(axis=(1, 2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="outside the engine's optimisation profile"):
        be.infer(np.zeros((5, 3, S, S), np.float32))

    from ssod_deploy.detector import Detector

    det = Detector(engine)  # 6 images through a max-batch-4 engine: split into 4 + 2
    assert len(det.infer(np.zeros((6, 3, S, S), np.float32))[0]) == 6
    engine.write_bytes(b"other")
    with pytest.raises(ValueError, match="cannot deserialize this engine"):
        TensorRTBackend(engine)
