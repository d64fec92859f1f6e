"""`ssod label` with a real exported model: train a tiny teacher a few steps, export ONNX, label.

Slow-ish (one tiny training run, ~30 s on 2 cores, shared by the module's tests). Checks what the
fake detector cannot: ONNX Runtime plumbing, thresholds read from a real model's metadata,
agreement with ``Detector`` called directly, and that resumed / sharded runs stay byte-identical
with real floating-point inference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TINY = {"model": "yolov8n", "width": 0.0625, "depth": 0.33, "imgsz": 64}


@pytest.fixture(scope="module")
def teacher(tiny_demo: Path, tmp_path_factory) -> tuple[Path, Path, list[float], list[float]]:
    """(teacher.onnx with per-class tau1/tau2 in its metadata, image folder, tau1, tau2)."""
    import onnx

    from ssod.config import resolve_config
    from ssod.export import export_model
    from ssod.export.onnx import set_metadata
    from ssod.training.engine.trainer import Trainer
    from ssod_deploy.detector import Detector
    from ssod_deploy.images import discover_images, read_image
    from ssod_deploy.metadata import ModelMetadata

    root = tmp_path_factory.mktemp("label_onnx")
    cfg = resolve_config(None, data=str(tiny_demo), epochs=1, batch=4, workers=0, out=str(root / "runs"),
                         warmup_epochs=0.5, plots=False, **TINY)
    run_dir = Path(Trainer(cfg).train()["run_dir"])
    plain = export_model(run_dir / "weights" / "last.pt", format="onnx", out=root / "plain.onnx")
    images = Path(tiny_demo).parent / "images"

    # A one-epoch model scores ~1e-4..1e-3; put "learned" thresholds at quantiles of its own best
    # class scores (different per class) so labels and uncertain boxes both occur.
    det = Detector(plain)
    x, _ = det.preprocess([read_image(p) for p in discover_images(images)])
    best = det.infer(x)[0][:, 4:, :].max(1).ravel()
    nc = len(det.metadata.names)
    tau1 = [float(np.quantile(best, 0.80 + 0.005 * c)) for c in range(nc)]
    tau2 = [float(np.quantile(best, 0.97)) for _ in range(nc)]
    proto = onnx.load(str(plain))
    meta = ModelMetadata.from_onnx(proto)
    meta.tau1, meta.tau2, meta.method = tau1, tau2, "efficient_teacher"
    path = root / "teacher.onnx"
    onnx.save(set_metadata(proto, meta), str(path))
    return path, images, tau1, tau2


def _snapshot(out: Path) -> dict[str, bytes]:
    files = {n: (out / n).read_bytes() for n in ("coco.json", "labelstudio.json", "review.csv")}
    files.update({str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "labels").rglob("*.txt"))})
    return files


def test_onnx_label_matches_detector_and_metadata(teacher, tmp_path: Path) -> None:
    from ssod_deploy.detector import Detector
    from ssod_deploy.images import discover_images, read_image
    from ssod_deploy.label import label_images

    model, images, tau1, tau2 = teacher
    s = label_images(images, model, tmp_path / "out", batch=4)
    assert s["model"]["backend"].startswith("onnxruntime")
    assert "metadata" in s["thresholds"]["source"]
    assert list(s["thresholds"]["tau1"].values()) == pytest.approx(tau1, rel=1e-5)
    assert s["images"]["labeled"] == 40 and s["images"]["skipped"] == 0
    assert s["boxes"]["labels_total"] > 0 and s["boxes"]["uncertain_total"] > 0

    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    det = Detector(model)
    t1, t2 = np.array(tau1), np.array(tau2)
    files = discover_images(images)
    ref = det([read_image(p) for p in files], conf=float(t1.min()) - 1e-6)
    by_name = {im["file_name"]: im["id"] for im in coco["images"]}
    for p, d in zip(files, ref):
        keep = d.scores >= t1[d.labels]
        anns = [a for a in coco["annotations"] if a["image_id"] == by_name[p.relative_to(images).as_posix()]]
        assert len(anns) == int(keep.sum())
        order = np.argsort(-d.scores[keep], kind="stable")
        boxes = d.boxes[keep][order]
        got = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])
        if len(anns):
            np.testing.assert_allclose(got, boxes, atol=0.02)
            np.testing.assert_allclose([a["score"] for a in anns], d.scores[keep][order], rtol=1e-4)
            assert [a["uncertain"] for a in anns] == (d.scores[keep][order] < t2[d.labels[keep][order]]).tolist()


def test_onnx_shards_and_resume_are_byte_identical(teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssod_deploy.label import journal as jn
    from ssod_deploy.label import label_images, merge_outputs

    model, images, *_ = teacher
    label_images(images, model, tmp_path / "ref", batch=4)
    ref = _snapshot(tmp_path / "ref")

    shards = [tmp_path / f"s{i}" for i in range(3)]
    for i, d in enumerate(shards):
        label_images(images, model, d, batch=4, shard=f"{i}/3")
    merge_outputs(shards, tmp_path / "merged")
    assert _snapshot(tmp_path / "merged") == ref

    real = jn.JournalWriter.append
    n = {"calls": 0}

    def crash(self, lines):
        n["calls"] += 1
        if n["calls"] == 4:
            raise OSError("simulated crash")
        real(self, lines)

    monkeypatch.setattr(jn.JournalWriter, "append", crash)
    with pytest.raises(RuntimeError):
        label_images(images, model, tmp_path / "crash", batch=4)
    monkeypatch.setattr(jn.JournalWriter, "append", real)
    s = label_images(images, model, tmp_path / "crash", batch=4, resume=True)
    assert s["throughput"]["done_before_this_run"] == 12
    assert _snapshot(tmp_path / "crash") == ref


def test_cpu_lanes_give_the_same_outputs_as_one_session(teacher, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two inference lanes (two 1-thread sessions taking chunks in turn, the default on a
    2-core CPU) write exactly what one session on every core (``lanes=1``) writes: lanes change
    who runs a batch, not what it holds."""
    import ssod_deploy.backends.onnxruntime as ort_backend
    from ssod_deploy.detector import Detector
    from ssod_deploy.label import label_images

    model, images, *_ = teacher
    monkeypatch.setattr(ort_backend, "available_cores", lambda: 2)
    lanes = Detector(model).cpu_lanes()
    assert len(lanes) == 2 and {d.backend.session.get_session_options().intra_op_num_threads for d in lanes} == {1}
    used = []
    real = Detector.infer_each

    def infer_each(self, canvases):
        used.append(id(self))
        time.sleep(0.02)  # a slow batch: the other lane surely takes the next chunk meanwhile
        return real(self, canvases)

    monkeypatch.setattr(Detector, "infer_each", infer_each)
    sessions = []
    real_init = ort_backend.OnnxRuntimeBackend.__init__

    def counted_init(self, *a, **k):
        sessions.append(k.get("threads"))
        real_init(self, *a, **k)

    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "__init__", counted_init)
    label_images(images, model, tmp_path / "lanes", batch=2)
    assert len(set(used)) == 2  # both lanes ran batches
    assert sessions == [1, 1]  # the model is loaded as the first lane: no full-core session thrown away
    used.clear()
    label_images(images, model, tmp_path / "one", batch=2, lanes=1)  # --lanes 1: one session
    assert len(set(used)) == 1
    assert _snapshot(tmp_path / "lanes") == _snapshot(tmp_path / "one")
