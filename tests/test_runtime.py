"""ssod_deploy runtime: Detector end to end on hand-made ONNX models, backend choice, torch-free use."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ssod_deploy.backends.onnxruntime import available_cores, choose_providers
from ssod_deploy.detector import POSTPROCESSORS, Detector, backend_for, preprocess_images, register_postprocess
from ssod_deploy.metadata import ModelMetadata

S = 64
NAMES = ["a", "b"]
# dense output (4 + nc, A): xywh in letterbox pixels, then class scores
DENSE = np.array(
    [
        # x    y    w   h   cls a  cls b
        [32, 32, 20, 10, 0.90, 0.05],  # kept
        [10, 10, 4, 4, 0.10, 0.60],  # kept (class b)
        [33, 32, 20, 10, 0.50, 0.01],  # same class, IoU ~0.9 with the first: suppressed
        [50, 50, 8, 8, 0.10, 0.20],  # below conf 0.25
    ],
    dtype=np.float32,
).T


def constant_model(path: Path, dense: np.ndarray = DENSE, batch: int | str = "batch", **meta_kw) -> Path:
    """ONNX (B,3,S,S) -> (B, 4+nc, A): the same ``dense`` for every image (batch taken from the input)."""
    c = dense[None]
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["b"]),
        helper.make_node("Concat", ["b", "rest"], ["target"], axis=0),
        helper.make_node("Expand", ["dense", "target"], ["output0"]),
    ]
    inits = [
        numpy_helper.from_array(c, "dense"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(c.shape[1:], np.int64), "rest"),
    ]
    graph = helper.make_graph(
        nodes, "const", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, S, S])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, *c.shape[1:]])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = ModelMetadata(names=NAMES, imgsz=S, dynamic_batch=batch == "batch",
                         batch=batch if isinstance(batch, int) else 1, **meta_kw)
    for k, v in meta.to_onnx_props().items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def expected_for(h: int, w: int) -> np.ndarray:
    """The two surviving boxes mapped back to an h x w original by hand."""
    scale = min(S / h, S / w)
    pad_x = round((S - round(w * scale)) / 2 - 0.1)
    pad_y = round((S - round(h * scale)) / 2 - 0.1)
    xywh = DENSE[:4, :2].T
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    out = (xyxy - [pad_x, pad_y, pad_x, pad_y]) / scale
    return np.clip(out, 0, [w, h, w, h]).astype(np.float32)


def test_detector_maps_boxes_to_original_pixels(tmp_path):
    det = Detector(constant_model(tmp_path / "m.onnx"))
    assert det.backend.name == "onnxruntime[CPUExecutionProvider]" and det.names == NAMES
    imgs = [np.zeros((128, 64, 3), np.uint8), np.zeros((50, 100, 3), np.uint8)]
    for img, d in zip(imgs, det(imgs)):
        np.testing.assert_allclose(d.boxes, expected_for(*img.shape[:2]), atol=1e-4)
        np.testing.assert_allclose(d.scores, [0.9, 0.6], rtol=1e-6)
        assert d.labels.tolist() == [0, 1] and d.labels.dtype == np.int64
    assert [len(d) for d in det(imgs, conf=0.7)] == [1, 1]
    assert det([]) == []


def test_stages_compose_like_call(tmp_path):
    det = Detector(constant_model(tmp_path / "m.onnx"), conf=0.05, iou=0.95)
    img = np.full((30, 90, 3), 200, np.uint8)
    x, params = det.preprocess([img, img])
    assert x.shape == (2, 3, S, S) and x.dtype == np.float32
    one, p1 = det.preprocess_one(img)
    np.testing.assert_array_equal(one, x[0])
    assert p1 == params[0]
    canvas_pad = x[0, :, 0, 0]  # letterbox border is gray 114, normalised
    np.testing.assert_allclose(canvas_pad, 114 / 255, rtol=1e-6)
    dets = det.postprocess(det.infer(x), params, [(30, 90)] * 2)
    assert len(dets[0]) == 4  # conf 0.05 and iou 0.95 keep the near-duplicate and the low box


def test_fixed_batch_model_is_padded_and_split(tmp_path):
    det = Detector(constant_model(tmp_path / "fixed.onnx", batch=2))
    assert det.backend.max_batch == 2
    imgs = [np.zeros((S, S, 3), np.uint8)] * 5
    assert [len(d) for d in det(imgs)] == [2] * 5


def test_nms_output_format(tmp_path):
    rows = np.zeros((1, 5, 6), np.float32)
    rows[0, :3] = [[10, 10, 20, 20, 0.9, 1], [30, 30, 40, 40, 0.4, 0], [0, 0, 5, 5, 0.2, 1]]
    rows[0, 3:, 5] = -1
    path = tmp_path / "nms.onnx"
    model = onnx.load(str(constant_model(path)))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(rows, "dense"))
    model.graph.initializer[3].CopyFrom(numpy_helper.from_array(np.array([5, 6], np.int64), "rest"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 5, 6]))
    del model.metadata_props[:]
    for k, v in ModelMetadata(names=NAMES, imgsz=S, output_format="nms", conf=0.1).to_onnx_props().items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    (d,) = Detector(path, conf=0.3)([np.zeros((S, S, 3), np.uint8)])
    assert d.scores.tolist() == pytest.approx([0.9, 0.4]) and d.labels.tolist() == [1, 0]
    np.testing.assert_allclose(d.boxes[0], [10, 10, 20, 20])


def test_postprocess_registry_takes_new_formats(tmp_path):
    calls = []

    def boxes_scores_labels(raw, conf, iou, max_det):
        calls.append((conf, iou, max_det))
        return [(np.array([[0, 0, 32, 32]], np.float32), np.array([0.5], np.float32), np.array([1]))] * len(raw[0])

    register_postprocess("boxes_scores_labels", boxes_scores_labels)
    try:
        det = Detector(constant_model(tmp_path / "m.onnx", output_format="boxes_scores_labels"), iou=0.3)
        (d,) = det([np.zeros((128, 128, 3), np.uint8)])
        np.testing.assert_allclose(d.boxes, [[0, 0, 64, 64]])  # scaled back x2
        assert calls == [(0.25, 0.3, 300)]
    finally:
        POSTPROCESSORS.pop("boxes_scores_labels")
    with pytest.raises(ValueError, match="output format 'boxes_scores_labels' is unknown"):
        Detector(tmp_path / "m.onnx")


def test_backend_selection_and_errors(tmp_path, monkeypatch):
    assert backend_for("x.onnx") == "onnxruntime" and backend_for("x.engine") == "tensorrt"
    assert backend_for("x.pt") == "torch" and backend_for("x.bin", "onnxruntime") == "onnxruntime"
    with pytest.raises(ValueError, match="unknown model type '.bin'"):
        backend_for("x.bin")
    with pytest.raises(ValueError, match="unknown backend"):
        backend_for("x.onnx", "openvino")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Detector(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx: ONNX Runtime cannot load the model"):
        Detector(tmp_path / "junk.onnx")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    ModelMetadata(names=NAMES, imgsz=S).save_sidecar(engine)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        Detector(engine)


def test_provider_choice_and_threads(tmp_path, caplog):
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"]) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.INFO, logger="ssod"):
        det = Detector(constant_model(tmp_path / "m.onnx"))
    assert det.backend.session.get_session_options().intra_op_num_threads == available_cores()
    lines = [r.getMessage() for r in caplog.records if "onnxruntime" in r.getMessage()]
    assert len(lines) == 1 and "CPUExecutionProvider" in lines[0]
    assert Detector(tmp_path / "m.onnx", threads=1).backend.session.get_session_options().intra_op_num_threads == 1
    from ssod_deploy.backends.onnxruntime import _with_options

    name, opts = _with_options("TensorrtExecutionProvider", Path("/models/m.onnx"))
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == "/models/.trt_cache"
    assert not any("fp16" in k or "int8" in k for k in opts)  # precision comes from the model
    assert _with_options("CPUExecutionProvider", Path("m.onnx")) == "CPUExecutionProvider"


def test_preprocess_normalisation_from_metadata():
    meta = ModelMetadata(names=NAMES, imgsz=8, normalize={"scale": 1.0, "mean": [10, 20, 30], "std": [2, 4, 5]},
                         letterbox={"pad_value": 0})
    img = np.full((8, 8, 3), [50, 60, 70], np.uint8)
    x, _ = preprocess_images([img], meta)
    np.testing.assert_allclose(x[0, :, 0, 0], [20, 10, 8])


# ------------------------------------------------------------------------------- torch-free

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "ultralytics"}:
                raise ModuleNotFoundError(f"No module named '{name}' (blocked by test)", name=name)
    sys.meta_path.insert(0, BlockTorch())
    """
)


def test_runtime_runs_an_exported_model_without_torch(tmp_path):
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_export import make_checkpoint, write_images

    from ssod.export import export_model

    onnx_path = export_model(make_checkpoint(tmp_path / "tiny.pt"), out=tmp_path / "tiny.onnx")
    imgs = write_images(tmp_path / "imgs", 3)
    ref = Detector(tmp_path / "tiny.pt", conf=0.05)  # torch backend, same post-processing
    from ssod_deploy.images import read_image

    expected = [len(d) for d in ref([read_image(p) for p in imgs])]
    script = BLOCKER + textwrap.dedent(
        f"""
        from ssod_deploy.detector import Detector
        from ssod_deploy.images import read_image
        det = Detector({str(onnx_path)!r}, conf=0.05)
        dets = det([read_image(p) for p in {[str(p) for p in imgs]!r}])
        try:
            Detector({str(tmp_path / 'tiny.pt')!r})
            torch_backend = "loaded?!"
        except ImportError as e:
            torch_backend = str(e)
        print(json.dumps({{"counts": [len(d) for d in dets], "backend": det.backend.name,
                          "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                          "torch_backend": torch_backend}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] == [] and out["backend"].startswith("onnxruntime")
    assert out["counts"] == expected and sum(expected) > 0
    assert "needs torch" in out["torch_backend"] and "ssod export" in out["torch_backend"]
