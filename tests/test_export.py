"""`ssod export`: ONNX fidelity to torch, in-graph NMS, metadata, FP16, INT8 calibration, CLI.

The tiny checkpoint has Kaiming-random convolutions (not the near-zero init of an untrained
ultralytics model), so its outputs depend on the input and its activations have real ranges:
a comparison with torch can fail, and the percentile calibrator sees non-constant tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from ssod.export import export_model
from ssod.export.calibration import CalibrationReader, select_calibration_images
from ssod.export.onnx import OUTPUT_NAME, append_dense_nms
from ssod.export.precision import count_qdq, decode_tail_nodes, qdq_activation_type
from ssod.training.engine.checkpoint import save_checkpoint
from ssod.training.models.base import build_model
from ssod_deploy.boxes import postprocess_dense
from ssod_deploy.detector import Detector, preprocess_images
from ssod_deploy.images import SkipReport
from ssod_deploy.metadata import ModelMetadata

NAMES = ["cat", "dog", "bird"]
TAU1, TAU2 = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
IMGSZ = 64


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    spec = {"model": "yolov8n", "width": 0.0625, "depth": 0.33, "names": NAMES}
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Conv2d) and "dfl" not in name:
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / mod.weight[0].numel()) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
    sd = model.state_dict()
    save_checkpoint({
        "model_spec": model.spec, "names": NAMES, "teacher": sd, "student": sd, "epoch": 3,
        "config": {"imgsz": IMGSZ, "data": None}, "method": "efficient_teacher",
        "export_metadata": {"method": "efficient_teacher", "tau1": TAU1, "tau2": TAU2},
    }, path)
    return path


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        p = folder / f"img_{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=95)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("export")
    make_checkpoint(d / "tiny.pt")
    write_images(d / "calib", 10)
    (d / "calib" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (d / "calib" / "empty.png").write_bytes(b"")
    good = (d / "calib" / "img_00.jpg").read_bytes()
    (d / "calib" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return d


@pytest.fixture(scope="module")
def fp32_onnx(work) -> Path:
    return export_model(work / "tiny.pt", out=work / "fp32.onnx")


def torch_module(ckpt: Path):
    from ssod.training.engine.checkpoint import load_detector

    model, _ = load_detector(ckpt, "teacher")
    return model.export_module()


def batch_of(work: Path, n: int) -> np.ndarray:
    from ssod_deploy.images import read_image

    paths = sorted((work / "calib").glob("img_*.jpg"))[:n]
    meta = ModelMetadata(names=NAMES, imgsz=IMGSZ)
    return preprocess_images([read_image(p) for p in paths], meta)[0]


# ------------------------------------------------------------------------------------ FP32


def test_onnx_matches_torch_and_batch_is_dynamic(work, fp32_onnx):
    sess = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    x = batch_of(work, 5)
    onnx_out = sess.run(None, {"images": x})[0]
    with torch.no_grad():
        ref = torch_module(work / "tiny.pt")(torch.from_numpy(x)).numpy()
    assert onnx_out.shape == ref.shape == (5, 4 + len(NAMES), 84)
    assert np.abs(onnx_out[:, :4] - ref[:, :4]).max() < 1e-3  # box pixels
    assert np.abs(onnx_out[:, 4:] - ref[:, 4:]).max() < 1e-4  # class probabilities
    assert np.abs(ref[0] - ref[1]).max() > 1e-2  # outputs depend on the image: the comparison can fail
    singles = np.concatenate([sess.run(None, {"images": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(singles, onnx_out, atol=1e-4)


def test_rect_export_takes_rectangles_and_matches_torch(work, fp32_onnx):
    """Default ONNX export: dynamic H, W; mixed-aspect images padded into one batch give the
    same detections as one at a time, and as the torch teacher."""
    meta = ModelMetadata.from_onnx(fp32_onnx)
    assert meta.rect
    sess = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(48, 64), (64, 30), (64, 64)]]
    det = Detector(fp32_onnx, conf=0.05)
    singles = [det.preprocess_one(im) for im in imgs]
    assert [x.shape[1:] for x, _ in singles] == [(64, 64), (64, 32), (64, 64)]  # 48 rounds up to 64, 30 to 32
    assert singles[0][1][2] == 8.0  # 48 rows centred in 64: 8 px of padding on top
    canvases = [det.letterbox_one(im)[0] for im in imgs]
    assert [c.shape[:2] for c in canvases] == [x.shape[1:] for x, _ in singles]
    groups = det.infer_each(canvases)
    assert sorted(idx for idx, _ in groups) == [[0, 2], [1]]  # batched per shape, never padded together
    assert groups[0][1][0].shape[-1] == 84 and groups[1][1][0].shape[-1] == 42  # anchors follow H, W
    batched = det(imgs)
    ref = Detector(work / "tiny.pt", conf=0.05)(imgs)
    for i, im in enumerate(imgs):
        one = det([im])[0]
        assert len(batched[i].boxes) == len(one.boxes) == len(ref[i].boxes) > 0
        np.testing.assert_allclose(batched[i].boxes, one.boxes, atol=1e-3)
        np.testing.assert_allclose(batched[i].boxes, ref[i].boxes, atol=1e-2)
    square = export_model(work / "tiny.pt", out=work / "square.onnx", rect=False)
    assert not ModelMetadata.from_onnx(square).rect
    sq = ort.InferenceSession(str(square), providers=["CPUExecutionProvider"])
    assert sq.get_inputs()[0].shape == ["batch", 3, IMGSZ, IMGSZ]
    with pytest.raises(ValueError, match="rectangular inputs"):
        export_model(fp32_onnx, format="trt")


def test_metadata_round_trips(work, fp32_onnx):
    meta = ModelMetadata.from_onnx(fp32_onnx)
    assert meta.names == NAMES and meta.imgsz == IMGSZ and meta.stride == 32
    assert meta.tau1 == TAU1 and meta.tau2 == TAU2 and meta.method == "efficient_teacher"
    assert meta.precision == "fp32" and meta.output_format == "dense" and meta.dynamic_batch
    assert meta.family == "yolo" and meta.ssod_version and meta.date
    props = {p.key: p.value for p in onnx.load(str(fp32_onnx)).metadata_props}
    assert props["names"] == repr({0: "cat", 1: "dog", 2: "bird"}) and props["imgsz"] == "[64, 64]"
    sess = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"])
    assert ModelMetadata.from_onnx(sess) == meta
    assert ModelMetadata.from_json(meta.to_json()) == meta
    engine = work / "x.engine"
    meta.save_sidecar(engine, tensorrt="10.3.0")
    back = ModelMetadata.from_sidecar(engine)
    assert back.names == NAMES and back.tau2 == TAU2 and back.extra["engine"]["tensorrt"] == "10.3.0"


def test_metadata_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="tau1 has 2 values for 3 classes"):
        ModelMetadata(names=NAMES, imgsz=64, tau1=[0.1, 0.2])
    with pytest.raises(ValueError, match="lacks"):
        ModelMetadata.from_json(json.dumps({"names": NAMES}))
    assert ModelMetadata.from_json(json.dumps({"names": NAMES, "imgsz": 64, "future_key": 1})).extra == {"future_key": 1}


def test_decode_tail_is_the_head_end_only(fp32_onnx):
    model = onnx.load(str(fp32_onnx))
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[2:]] == ["height", "width"]
    with pytest.raises(ValueError, match="84 anchors"):  # rect export: the anchor axis is symbolic ...
        decode_tail_nodes(model, anchors=84)
    pin = (1, 3, IMGSZ, IMGSZ)  # ... until the input shape is pinned
    tail = decode_tail_nodes(model, anchors=84, input_shape=pin)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert any("dfl" in t for t in tail) and "Softmax" in {ops[t] for t in tail}
    assert all("model.22" in t for t in tail)  # nothing from the backbone or neck
    assert model.graph.node[-1].name in tail
    wider = decode_tail_nodes(model, anchors=84, with_output_convs=True, input_shape=pin)
    assert set(tail) < set(wider) and sum(ops[n] == "Conv" for n in set(wider) - set(tail)) == 6  # 3 levels x (box, cls)


# ------------------------------------------------------------------------------------ NMS


def identity_dense_model(nc: int, anchors: int) -> onnx.ModelProto:
    """An ONNX whose ``output0`` is its input: lets the NMS graph be tested on chosen dense outputs."""
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("dense_in", TensorProto.FLOAT, ["batch", 4 + nc, anchors])
    out = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 4 + nc, anchors])
    graph = helper.make_graph([helper.make_node("Identity", ["dense_in"], [OUTPUT_NAME])], "g", [inp], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def random_dense(rng, b: int, nc: int, a: int) -> np.ndarray:
    xy = rng.uniform(0, 64, (b, 2, a))
    wh = rng.uniform(2, 30, (b, 2, a))
    scores = rng.uniform(0, 1, (b, nc, a)) ** 3  # many low, few high: realistic and tie-free
    return np.concatenate([xy, wh, scores], 1).astype(np.float32)


# A > max_det, A < max_det, and a symbolic A (rect exports: the anchor count follows H and W)
@pytest.mark.parametrize("anchors,max_det", [(200, 50), (40, 100), ("anchors", 50)])
def test_nms_in_graph_matches_numpy(anchors, max_det):
    nc = 3
    model = append_dense_nms(identity_dense_model(nc, anchors), nc, conf=0.2, iou=0.5, max_det=max_det)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = random_dense(np.random.default_rng(0), 4, nc, 120 if isinstance(anchors, str) else anchors)
    out = sess.run(None, {"dense_in": x})[0]
    assert out.shape == (4, max_det, 6)
    for i, (boxes, scores, labels) in enumerate(postprocess_dense(x, conf=0.2, iou=0.5, max_det=max_det)):
        rows = out[i][out[i, :, 4] > 0]
        order = np.argsort(-scores, kind="stable")
        assert len(rows) == len(scores) > 0
        np.testing.assert_allclose(rows[:, 4], scores[order], rtol=1e-6)
        np.testing.assert_allclose(rows[:, :4], boxes[order], atol=1e-4)
        np.testing.assert_array_equal(rows[:, 5], labels[order])
        pad = out[i][out[i, :, 4] == 0]
        assert (pad[:, 5] == -1).all() and (pad[:, :5] == 0).all()


def test_exported_nms_model_equals_dense_plus_numpy_nms(work, fp32_onnx):
    nms_path = export_model(work / "tiny.pt", nms=True, conf=0.05, iou=0.6, max_det=20, out=work / "nms.onnx")
    assert ModelMetadata.from_onnx(nms_path).output_format == "nms"
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((work / "calib").glob("img_*.jpg"))[:4]]
    a, b = Detector(fp32_onnx, conf=0.05, iou=0.6, max_det=20)(imgs), Detector(nms_path)(imgs)
    assert sum(len(d) for d in a) > 4
    for da, db in zip(a, b):
        oa, ob = np.argsort(-da.scores), np.argsort(-db.scores)
        np.testing.assert_allclose(da.scores[oa], db.scores[ob], rtol=1e-5)
        np.testing.assert_allclose(da.boxes[oa], db.boxes[ob], atol=1e-3)
        np.testing.assert_array_equal(da.labels[oa], db.labels[ob])


def test_static_batch_export(work):
    path = export_model(work / "tiny.pt", dynamic=False, batch=2, out=work / "static.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [2, 3, "height", "width"]
    meta = ModelMetadata.from_onnx(path)
    assert not meta.dynamic_batch and meta.batch == 2
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((work / "calib").glob("img_*.jpg"))[:3]]
    dets = Detector(path, conf=0.05)(imgs)  # 3 images through a batch-2 model: padded, not dropped
    ref = Detector(work / "tiny.pt", conf=0.05)(imgs)
    assert [len(d) for d in dets] == [len(d) for d in ref]


# ------------------------------------------------------------------------------ precision


def test_fp16_model_is_half_with_fp32_io_and_decode(work, fp32_onnx):
    path = export_model(work / "tiny.pt", half=True, out=work / "fp16.onnx")
    model = onnx.load(str(path))
    f16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert f16 > 20
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == sess.get_outputs()[0].type == "tensor(float)"
    assert model.graph.node[-1].op_type != "Cast"  # the decode ends in FP32, not in a cast back from FP16
    x = batch_of(work, 3)
    ref = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    out = sess.run(None, {"images": x})[0]
    assert np.abs(out[:, :4] - ref[:, :4]).max() < 0.5  # pixels
    assert np.abs(out[:, 4:] - ref[:, 4:]).max() < 0.02
    assert ModelMetadata.from_onnx(path).precision == "fp16"


def test_int8_model_has_qdq_and_runs(work, fp32_onnx):
    path = export_model(work / "tiny.pt", int8=True, calib=work / "calib", calib_size=16, out=work / "int8.onnx")
    model = onnx.load(str(path))
    nq, ndq = count_qdq(model)
    assert nq > 20 and ndq > 20
    tail = set(decode_tail_nodes(onnx.load(str(fp32_onnx)), anchors=84, input_shape=(1, 3, IMGSZ, IMGSZ)))
    q_inputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in model.graph.node:  # the decode tail reads no dequantized tensor except where the head feeds it
        if n.name in tail and n.op_type not in ("Concat", "Reshape", "Shape"):  # Shape reads no values
            assert not set(n.input) & q_inputs, n.name
    meta = ModelMetadata.from_onnx(path)
    assert meta.precision == "int8"
    cal = meta.extra["calibration"]
    assert cal["images"] == 10 and cal["skipped"] == 3 and cal["method"] == "entropy"
    assert cal["target"] == "cpu" and qdq_activation_type(model) == "u8"  # ONNX Runtime's fast x86 path
    assert cal["input"] == "uint8 pixels" and model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    x = batch_of(work, 3)
    pixels = np.rint(x * 255).astype(np.uint8)
    ref = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": pixels})[0]
    assert out.shape == ref.shape
    assert np.abs(out[:, 4:] - ref[:, 4:]).mean() < 0.05  # close on average, not identical
    assert not np.array_equal(out, ref)


def _with_input_quantizer(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """The pixel-input model with a float input and a uint8 QuantizeLinear in front again."""
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for n in g.node:
        n.input[:] = ["images_q" if i == "images" else i for i in n.input]
    g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "images_q_scale"),
                          numpy_helper.from_array(np.array(0, np.uint8), "images_q_zp")])
    g.node.insert(0, helper.make_node("QuantizeLinear", ["images", "images_q_scale", "images_q_zp"], ["images_q"]))
    g.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return m


def test_int8_pixel_input_is_bit_identical_to_the_float_input(work, tmp_path):
    """The removed input quantizer was the identity on pixels: the same model with it restored and
    fed normalised floats gives the same bits, and the Detector feeds the pixel model uint8."""
    from ssod.export.precision import take_pixels
    from ssod_deploy.images import read_image

    path = export_model(work / "tiny.pt", int8=True, calib=work / "calib", calib_size=16, out=work / "int8.onnx")
    pix = onnx.load(str(path))
    flt = _with_input_quantizer(pix, 1 / 255)
    x = batch_of(work, 3)
    pixels = np.rint(x * 255).astype(np.uint8)
    a = ort.InferenceSession(pix.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": pixels})
    b = ort.InferenceSession(flt.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    assert all(np.array_equal(u, v) for u, v in zip(a, b))

    det = Detector(path)
    assert det.input_dtype == np.uint8
    imgs = [read_image(p) for p in sorted((work / "calib").glob("img_*.jpg"))[:3]]
    xd, _ = det.preprocess(imgs)
    assert xd.dtype == np.uint8 and np.array_equal(xd, pixels)
    assert np.array_equal(det.infer(xd)[0], a[0])
    whole = det(imgs)  # letterbox_one + infer_each (the labeling path's reused uint8 batch buffer)
    _, params = det.preprocess(imgs)
    one_by_one = det.postprocess(a, params, [im.shape[:2] for im in imgs])
    for u, v in zip(whole, one_by_one):
        assert np.array_equal(u.boxes, v.boxes) and np.array_equal(u.scores, v.scores)
    with pytest.raises(ValueError, match="takes uint8 input"):
        det.infer(x)

    # calibration images that never reach white still give a pixel input: the range is fixed, not measured
    dim = tmp_path / "dim"
    dim.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 180, (IMGSZ, IMGSZ, 3), dtype=np.uint8)).save(dim / f"d{i}.png")
    dim_model = onnx.load(str(export_model(work / "tiny.pt", int8=True, calib=dim, out=tmp_path / "dim.onnx")))
    assert dim_model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    # a quantizer that is not the identity on pixels stays: other scale, other zero point, two consumers
    assert not take_pixels(_with_input_quantizer(pix, 1.01 / 255), "images", 1 / 255)
    odd_zp = _with_input_quantizer(pix, 1 / 255)
    next(t for t in odd_zp.graph.initializer if t.name == "images_q_zp").CopyFrom(
        onnx.numpy_helper.from_array(np.array(1, np.uint8), "images_q_zp"))
    assert not take_pixels(odd_zp, "images", 1 / 255)
    two = _with_input_quantizer(pix, 1 / 255)
    two.graph.node.append(onnx.helper.make_node("Identity", ["images"], ["images_copy"]))
    assert not take_pixels(two, "images", 1 / 255)
    again = _with_input_quantizer(pix, 1 / 255)
    assert take_pixels(again, "images", 1 / 255)
    assert again.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_calibration_reader_preprocesses_like_runtime_and_skips_bad_files(work):
    meta = ModelMetadata(names=NAMES, imgsz=IMGSZ)
    skipped = SkipReport()
    reader = CalibrationReader.from_folder(work / "calib", meta, size=100, batch=4, skipped=skipped)
    assert reader.num_images == 10 and len(reader) == 3  # 4 + 4 + 2
    assert sorted(Path(p).name for p, _ in skipped.items) == ["broken.jpg", "empty.png", "truncated.jpg"]
    batches = list(reader)
    assert [b["images"].shape for b in batches] == [(4, 3, IMGSZ, IMGSZ)] * 2 + [(2, 3, IMGSZ, IMGSZ)]
    x = np.concatenate([b["images"] for b in batches])
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    from ssod_deploy.images import read_image

    good = sorted((work / "calib").glob("img_*.jpg"))
    expected = preprocess_images([read_image(p) for p in good], meta)[0]
    np.testing.assert_array_equal(x, expected)
    reader.set_range(1, 2)  # the quantizer walks one batch at a time
    assert reader.get_next()["images"].shape[0] == 4 and reader.get_next() is None
    fixed = CalibrationReader(good[:3], meta, batch=2, fixed_batch=True)
    assert [b["images"].shape[0] for b in fixed] == [2]
    # fewer than all: every unreadable file drawn is replaced by a readable one, so the set keeps its size
    for size in (5, 9):
        skipped = SkipReport()
        some = CalibrationReader.from_folder(work / "calib", meta, size=size, skipped=skipped)
        assert some.num_images == size
        assert size + len(skipped.items) <= 13


def test_calibration_errors_are_clear(work, tmp_path):
    meta = ModelMetadata(names=NAMES, imgsz=IMGSZ)
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no readable calibration images.*bad.jpg"):
        CalibrationReader.from_folder(tmp_path, meta)
    with pytest.raises(ValueError, match="no unlabeled images|pass --calib"):
        export_model(work / "tiny.pt", int8=True, out=tmp_path / "x.onnx")  # checkpoint names no data
    chosen = select_calibration_images([f"{i}.jpg" for i in range(50)], 8)
    assert len(chosen) == 8 == len(set(chosen)) and chosen == sorted(chosen, key=lambda p: int(p.stem))


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture()
def cli_app():
    import typer

    from ssod.cli import clean_errors
    from ssod.export.cli import export_command

    app = typer.Typer()
    app.command("export")(clean_errors(export_command))
    app.command("noop")(lambda: None)  # two commands: typer keeps "export" as a sub-command
    return app


def test_cli_trt_without_tensorrt_writes_onnx_and_explains(work, cli_app, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import tensorrt -> ImportError
    out = tmp_path / "model.engine"
    res = CliRunner().invoke(cli_app, ["export", str(work / "tiny.pt"), "--format", "trt", "--batch", "4", "--out", str(out)])
    assert res.exit_code != 0
    msg = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert (tmp_path / "model.onnx").is_file() and not out.exists()
    assert (tmp_path / "model.engine.json").is_file()  # metadata ready for an engine built on the target
    assert "TensorRT is not installed" in msg
    assert "ssod export model.onnx --format trt --batch 4" in msg
    assert "trtexec --onnx=model.onnx --saveEngine=model.engine --stronglyTyped" in msg
    assert "--minShapes=images:1x3x64x64" in msg and "--maxShapes=images:16x3x64x64" in msg


def test_cli_user_errors_exit_1(work, cli_app):
    from typer.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(cli_app, ["export", str(work / "tiny.pt"), "--half", "--int8"])
    assert res.exit_code == 1 and "exclusive" in res.output
    res = runner.invoke(cli_app, ["export", str(work / "missing.pt")])
    assert res.exit_code == 1 and "not found" in res.output
    res = runner.invoke(cli_app, ["export", str(work / "tiny.pt"), "--imgsz", "70"])
    assert res.exit_code == 1 and "multiple of the model stride 32" in res.output
    res = runner.invoke(cli_app, ["export", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0
    for flag in ("--format", "--imgsz", "--batch", "--dynamic", "--half", "--int8", "--calib", "--calib-size",
                 "--no-nms", "--conf", "--iou", "--max-det", "--opset", "--weights", "--which", "--out"):
        assert flag in res.output, flag
    res = runner.invoke(cli_app, ["export"])
    assert res.exit_code == 1 and "give the checkpoint once" in res.output
    res = runner.invoke(cli_app, ["export", str(work / "tiny.pt"), "--weights", str(work / "tiny.pt")])
    assert res.exit_code == 1 and "give the checkpoint once" in res.output
    res = runner.invoke(cli_app, ["export", "--weights", str(work / "missing.pt")])  # the option form of the path
    assert res.exit_code == 1 and "not found" in res.output
    for args in (["--which", "student"], ["--weights", "student"]):  # the part to export (the old flag still works)
        out = work / f"student_{args[0][2:]}.onnx"
        res = runner.invoke(cli_app, ["export", str(work / "tiny.pt"), *args, "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert out.exists()


def test_default_output_names():
    from ssod.export import default_output

    w = Path("run/weights/last.pt")
    assert default_output(w, "onnx", False, False, False, "teacher") == Path("run/weights/last.onnx")
    assert default_output(w, "onnx", False, True, True, "teacher", "cpu").name == "last_int8cpu_nms.onnx"
    assert default_output(w, "trt", False, True, False, "teacher", "tensorrt").name == "last_int8.engine"
    assert default_output(w, "trt", True, False, False, "student").name == "last_student_fp16.engine"
