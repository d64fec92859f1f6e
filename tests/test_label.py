"""`ssod label` / `ssod merge`: outputs, thresholds, resume after a crash, shards, bad files, safety.

A small deterministic fake Detector (same interface as ``ssod_deploy.detector.Detector``) makes
one box per image quadrant whose class scores are the quadrant's mean red / green values, so
the expected labels follow from the pixels. The real exported-ONNX path is covered by
tests/test_label_onnx.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ssod_deploy.boxes import letterbox, postprocess_dense, unletterbox_boxes
from ssod_deploy.detector import Detector
from ssod_deploy.label import label_images, merge_outputs
from ssod_deploy.label import journal as jn
from ssod_deploy.label.writers import REVIEW_COLUMNS, SafeTree, safe_join

TESTS = Path(__file__).resolve().parent
OUTPUT_FILES = ("coco.json", "labelstudio.json", "review.csv", "classes.txt")


# ------------------------------------------------------------------------------ fakes


@dataclass
class FakeMeta:
    names: list = field(default_factory=lambda: ["red", "green"])
    imgsz: int = 64
    stride: int = 32
    output_format: str = "dense"
    dynamic_batch: bool = True
    batch: int = 1
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    tau1: list | None = field(default_factory=lambda: [0.2, 0.3])
    tau2: list | None = field(default_factory=lambda: [0.5, 0.6])
    date: str = "2025-01-01T00:00:00+00:00"

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class FakeDetections:
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


class FakeDetector:
    """Quadrant boxes scored by mean red (class 0) / green (class 1) of the letterboxed input."""

    def __init__(self, meta: FakeMeta | None = None, delay: float = 0.0):
        self.metadata = meta or FakeMeta()
        self.backend = SimpleNamespace(name="fake", max_batch=None, metadata=self.metadata)
        self.delay = delay
        self.batch_sizes: list[int] = []
        self.input_dtype = np.dtype(np.float32)

    def preprocess_one(self, image: np.ndarray):
        canvas, params = letterbox(image, self.metadata.imgsz)
        return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32) / 255.0, params

    def letterbox_one(self, image: np.ndarray):
        return letterbox(image, self.metadata.imgsz)

    # the real grouping code, over this fake's infer/postprocess
    infer_each = Detector.infer_each
    _batch_buffer = Detector._batch_buffer
    postprocess_each = Detector.postprocess_each

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self.batch_sizes.append(len(batch))
        if self.delay:
            time.sleep(self.delay)
        b, _, s, _ = batch.shape
        h = s // 2
        centres = [(h / 2, h / 2), (1.5 * h, h / 2), (h / 2, 1.5 * h), (1.5 * h, 1.5 * h)]
        xywh = np.array([[cx, cy, 0.8 * h, 0.8 * h] for cx, cy in centres], np.float32).T  # (4, 4 anchors)
        q = batch[:, :2].reshape(b, 2, 2, h, 2, h).mean(axis=(3, 5)).reshape(b, 2, 4)
        return [np.concatenate([np.broadcast_to(xywh, (b, 4, 4)), q], 1).astype(np.float32)]

    def postprocess(self, raw, params, orig_hws, conf=None):
        m = self.metadata
        dets = postprocess_dense(raw[0], m.conf if conf is None else conf, m.iou, m.max_det)
        return [FakeDetections(unletterbox_boxes(b, p, hw), s, c) for (b, s, c), p, hw in zip(dets, params, orig_hws)]


def quadrant_image(rng: np.random.Generator, h: int = 60, w: int = 80) -> np.ndarray:
    im = np.zeros((h, w, 3), np.uint8)
    for qy in range(2):
        for qx in range(2):
            im[qy * h // 2 : (qy + 1) * h // 2, qx * w // 2 : (qx + 1) * w // 2] = rng.integers(0, 256, 3)
    return im


def make_folder(root: Path, n: int = 14, seed: int = 0, bad: bool = True) -> Path:
    """n quadrant JPEGs (a third in sub/), one black image (no boxes) and one non-image."""
    rng = np.random.default_rng(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        folder = root / "sub" if k % 3 == 0 else root
        Image.fromarray(quadrant_image(rng)).save(folder / f"im{k:02d}.jpg", quality=95)
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(root / "black.png")
    if bad:
        (root / "notes.jpg").write_text("not a picture")
    return root


def snapshot(out: Path) -> dict[str, bytes]:
    """Bytes of every output that must not depend on how the run was split or interrupted."""
    files = {name: (out / name).read_bytes() for name in OUTPUT_FILES if (out / name).exists()}
    for p in sorted((out / "labels").rglob("*")):
        if p.is_file():
            files[str(p.relative_to(out))] = p.read_bytes()
    return files


def run(src: Path, out: Path, **kw):
    kw.setdefault("detector", FakeDetector())
    kw.setdefault("batch", 3)
    return label_images(src, out=out, **kw)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images")


@pytest.fixture()
def reference(folder: Path, tmp_path: Path) -> Path:
    """One uninterrupted, unsharded run."""
    out = tmp_path / "ref"
    run(folder, out)
    return out


# ------------------------------------------------------------------------------ outputs


def test_outputs_exist_and_agree(folder: Path, reference: Path) -> None:
    summary = json.loads((reference / "summary.json").read_text())
    coco = json.loads((reference / "coco.json").read_text())
    assert summary["images"]["labeled"] == len(coco["images"]) == 15  # 14 quadrant + black
    assert summary["images"]["skipped"] == 1
    assert summary["skipped"] == [{"file": "notes.jpg", "reason": "not an image (unrecognised format)"}]
    assert [c["name"] for c in coco["categories"]] == ["red", "green"]
    names = [im["file_name"] for im in coco["images"]]
    assert "sub/im00.jpg" in names and "im01.jpg" in names
    assert all((im["width"], im["height"]) == (80, 60) for im in coco["images"])
    n_lab = sum(not a["uncertain"] for a in coco["annotations"])
    n_unc = sum(a["uncertain"] for a in coco["annotations"])
    assert n_lab == summary["boxes"]["labels_total"] > 0
    assert n_unc == summary["boxes"]["uncertain_total"] > 0
    assert (reference / "classes.txt").read_text() == "red\ngreen\n"
    # YOLO keeps the folder layout and holds label boxes only
    by_id = {im["id"]: im for im in coco["images"]}
    for im in coco["images"]:
        txt = reference / "labels" / Path(im["file_name"]).with_suffix(".txt")
        rows = np.loadtxt(txt, ndmin=2) if txt.stat().st_size else np.zeros((0, 5))
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"] and not a["uncertain"]]
        assert len(rows) == len(anns)
        for r, a in zip(rows, anns):
            x, y, w, h = a["bbox"]
            W, H = by_id[a["image_id"]]["width"], by_id[a["image_id"]]["height"]
            np.testing.assert_allclose(r, [a["category_id"], (x + w / 2) / W, (y + h / 2) / H, w / W, h / H], atol=1e-5)
    assert summary["throughput"]["images_this_run"] == 16


def test_coco_loads_with_pycocotools(reference: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(reference / "coco.json"))
    assert len(gt.getImgIds()) == 15 and len(gt.getAnnIds()) > 0
    # The pseudo-labels scored against themselves: AP must be exactly 1 if bbox/area/ids are sane.
    dets = gt.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in gt.dataset["annotations"]])
    ev = COCOeval(gt, dets, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_labelstudio_matches_import_schema(reference: Path) -> None:
    tasks = json.loads((reference / "labelstudio.json").read_text())
    coco = json.loads((reference / "coco.json").read_text())
    assert isinstance(tasks, list) and len(tasks) == len(coco["images"])
    anns_by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    for task, im in zip(tasks, coco["images"]):
        assert set(task) == {"data", "predictions"}
        assert task["data"]["image"].endswith(im["file_name"]) and task["data"]["image"].startswith("/data/local-files/?d=")
        (pred,) = task["predictions"]
        assert isinstance(pred["model_version"], str) and pred["model_version"]
        assert isinstance(pred["score"], float) and 0 <= pred["score"] <= 1
        anns = anns_by_image.get(im["id"], [])
        assert len(pred["result"]) == len(anns)
        ids = [r["id"] for r in pred["result"]]
        assert len(set(ids)) == len(ids)
        for r, a in zip(pred["result"], anns):
            assert r["type"] == "rectanglelabels" and r["from_name"] == "label" and r["to_name"] == "image"
            assert (r["original_width"], r["original_height"]) == (im["width"], im["height"])
            v = r["value"]
            assert set(v) == {"x", "y", "width", "height", "rotation", "rectanglelabels"}
            assert v["rectanglelabels"] == [["red", "green"][a["category_id"]]]
            assert 0 <= v["x"] and 0 <= v["y"] and v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6
            x, y, w, h = a["bbox"]  # percent of the original image size
            np.testing.assert_allclose([v["x"], v["y"], v["width"], v["height"]],
                                       [100 * x / im["width"], 100 * y / im["height"], 100 * w / im["width"],
                                        100 * h / im["height"]], atol=2e-3)
            assert r["score"] == a["score"]
            assert ("meta" in r) == a["uncertain"]


def test_review_ranks_uncertain_then_empty(reference: Path) -> None:
    with open(reference / "review.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == REVIEW_COLUMNS
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    flags = [r["flag"] for r in rows]
    n_unc = flags.count("uncertain")
    assert n_unc > 0 and flags[:n_unc] == ["uncertain"] * n_unc
    assert flags[n_unc] == "empty" and rows[n_unc]["file"] == "black.png"
    masses = [float(r["uncertain_score_mass"]) for r in rows[:n_unc]]
    assert masses == sorted(masses, reverse=True)
    assert all(flag == "" for flag in flags[n_unc + 1 :])


def test_conf_auto_reads_thresholds_from_metadata(folder: Path, tmp_path: Path) -> None:
    meta = FakeMeta(tau1=[0.3, 0.2], tau2=[0.7, 0.45])
    det = FakeDetector(meta)
    s = run(folder, tmp_path / "out", detector=det)
    assert s["thresholds"]["tau1"] == {"red": 0.3, "green": 0.2}
    assert s["thresholds"]["tau2"] == {"red": 0.7, "green": 0.45}
    assert "metadata" in s["thresholds"]["source"]
    # independent expectation straight from the detector, every box it finds
    expected = {}
    for p in sorted(folder.rglob("*.*")):
        try:
            img = np.asarray(Image.open(p).convert("RGB"))
        except Exception:
            continue
        x, params = det.preprocess_one(img)
        (d,) = det.postprocess(det.infer(x[None]), [params], [img.shape[:2]], conf=0.0)
        rel = p.relative_to(folder).as_posix()
        keep = d.scores >= np.array(meta.tau1)[d.labels]
        expected[rel] = sorted(zip(d.scores[keep].tolist(), d.labels[keep].tolist(),
                                   (d.scores[keep] < np.array(meta.tau2)[d.labels[keep]]).tolist()), reverse=True)
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    got = {im["file_name"]: [] for im in coco["images"]}
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    for a in coco["annotations"]:
        got[names[a["image_id"]]].append((a["score"], a["category_id"], a["uncertain"]))
    assert got.keys() == expected.keys()
    for k, exp in expected.items():
        g = sorted(got[k], reverse=True)
        assert [(c, u) for _, c, u in g] == [(c, u) for _, c, u in exp], k
        np.testing.assert_allclose([s for s, *_ in g], [s for s, *_ in exp], atol=1e-5)
    flags = [u for v in got.values() for *_, u in v]
    assert any(flags) and not all(flags)


def test_conf_float_and_missing_thresholds(folder: Path, tmp_path: Path) -> None:
    s = run(folder, tmp_path / "f", conf=0.55)
    coco = json.loads((tmp_path / "f" / "coco.json").read_text())
    assert coco["annotations"] and all(a["score"] >= 0.55 and not a["uncertain"] for a in coco["annotations"])
    assert s["thresholds"]["tau1"] == {"red": 0.55, "green": 0.55}
    s = run(folder, tmp_path / "m", detector=FakeDetector(FakeMeta(tau1=None, tau2=None, conf=0.4)))
    assert s["thresholds"]["tau2"] == {"red": 0.4, "green": 0.4} and s["thresholds"]["tau1"]["red"] == 0.1
    with pytest.raises(ValueError, match="--conf"):
        run(folder, tmp_path / "x", conf="high")


# ------------------------------------------------------------------------------ resume


def test_resume_after_injected_crash_is_byte_identical(folder: Path, reference: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "crash"
    real_append = jn.JournalWriter.append
    calls = {"n": 0}

    def failing_append(self, lines):
        calls["n"] += 1
        if calls["n"] == 3:  # two batches are safely on disk, the third dies half-written
            self._fh.write("".join(lines)[:25].encode())
            self._fh.flush()
            raise OSError("simulated crash")
        real_append(self, lines)

    monkeypatch.setattr(jn.JournalWriter, "append", failing_append)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(folder, out)
    monkeypatch.setattr(jn.JournalWriter, "append", real_append)
    assert not (out / "coco.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        run(folder, out)  # an existing journal is never silently overwritten
    det = FakeDetector()
    s = run(folder, out, detector=det, resume=True)
    assert s["throughput"]["done_before_this_run"] == 6 and s["throughput"]["images_this_run"] == 10
    assert sum(det.batch_sizes) < 16  # finished chunks were not inferred again
    assert snapshot(out) == snapshot(reference)
    idx = [json.loads(line)["i"] for line in (out / "journal.jsonl").read_text().splitlines()[1:]]
    assert sorted(idx) == list(range(16))  # nothing redone, nothing duplicated


@pytest.mark.parametrize("failure", ["infer", "load"])
def test_a_failing_lane_stops_the_run_and_resume_completes_it(folder: Path, reference: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """With two inference lanes, an error in the second lane's thread (inferring, or loading its
    session there) reaches the caller (no hang, no silent loss) and --resume finishes the run to
    the same bytes as one clean run."""
    from ssod_deploy.label import pipeline

    class Broken(FakeDetector):
        def infer(self, batch):
            time.sleep(0.02)
            raise RuntimeError("lane 1 device lost")

    def cannot_load() -> FakeDetector:
        time.sleep(0.02)
        raise RuntimeError("lane 1 device lost while loading")

    class Laned(FakeDetector):
        def cpu_lane_makers(self, lanes: int = 2):
            return [lambda: FakeDetector(delay=0.02), Broken if failure == "infer" else cannot_load]

    out = tmp_path / "laned"
    monkeypatch.setattr(pipeline, "_load_detector", lambda *a, **k: Laned())
    with pytest.raises(RuntimeError, match="lane 1 device lost"):
        label_images(folder, "model.onnx", out, batch=3)
    assert not (out / "coco.json").exists()
    monkeypatch.setattr(pipeline, "_load_detector", lambda *a, **k: FakeDetector())
    label_images(folder, "model.onnx", out, batch=3, resume=True)
    assert snapshot(out) == snapshot(reference)
    idx = [json.loads(line)["i"] for line in (out / "journal.jsonl").read_text().splitlines()[1:]]
    assert sorted(idx) == list(range(16))


def test_resume_after_sigkill_is_byte_identical(folder: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_label import FakeDetector
        from ssod_deploy.label import label_images
        label_images({str(folder)!r}, out={str(out)!r}, detector=FakeDetector(delay=0.2), batch=3)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    journal = out / "journal.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 1 + 5:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == -signal.SIGKILL, err  # really killed mid-run, not finished
    n_before = journal.read_bytes().count(b"\n") - 1
    assert 5 <= n_before < 16
    assert not (out / "coco.json").exists()
    s = run(folder, out, resume=True)
    assert s["throughput"]["done_before_this_run"] == n_before
    assert snapshot(out) == snapshot(reference)
    idx = [json.loads(line)["i"] for line in journal.read_text().splitlines()[1:]]
    assert sorted(idx) == list(range(16))


def test_resume_refuses_a_different_run(folder: Path, reference: Path) -> None:
    with pytest.raises(jn.JournalError, match="--batch \\(3 then, 4 now\\)"):
        run(folder, reference, resume=True, batch=4)
    with pytest.raises(jn.JournalError, match="conf: auto then, 0.5 now"):
        run(folder, reference, resume=True, conf=0.5)
    s = run(folder, reference, resume=True)  # a finished run just rebuilds its outputs
    assert s["throughput"]["images_this_run"] == 0


def test_one_writer_per_journal(tmp_path: Path) -> None:
    w = jn.create_journal(tmp_path / "journal.jsonl", jn.make_header(n_total=3))
    try:
        with pytest.raises(jn.JournalError, match="another"):
            jn.open_for_append(jn.read_journal(tmp_path / "journal.jsonl"))
    finally:
        w.close()
    jn.open_for_append(jn.read_journal(tmp_path / "journal.jsonl")).close()  # free again once closed


def test_torn_journal_line_is_cut_off(tmp_path: Path, folder: Path, reference: Path) -> None:
    text = (reference / "journal.jsonl").read_bytes()
    torn = tmp_path / "torn" / "journal.jsonl"
    torn.parent.mkdir()
    lines = text.splitlines(keepends=True)
    torn.write_bytes(b"".join(lines[:6]) + lines[6][:30])
    ix = jn.read_journal(torn)
    assert int(ix.done.sum()) == 5 and ix.valid_end == len(b"".join(lines[:6]))
    torn.write_bytes(b"".join(lines[:3]) + b"garbage\n" + b"".join(lines[3:]))
    with pytest.raises(jn.JournalError, match="line 4"):
        jn.read_journal(torn)


# ------------------------------------------------------------------------------ shards


def test_three_shards_merged_equal_one_run(folder: Path, reference: Path, tmp_path: Path) -> None:
    shards = [tmp_path / f"shard{i}" for i in range(3)]
    sizes = []
    for i, d in enumerate(shards):
        s = run(folder, d, shard=f"{i}/3")
        sizes.append(s["images"]["in_shard"])
    assert sum(sizes) == 16 and min(sizes) > 0
    s = merge_outputs(list(reversed(shards)), tmp_path / "merged")
    assert snapshot(tmp_path / "merged") == snapshot(reference)
    assert s["images"]["labeled"] == 15 and len(s["skipped"]) == 1
    assert len(s["throughput"]["shards"]) == 3

    with pytest.raises(ValueError, match="missing shard"):
        merge_outputs(shards[:2], tmp_path / "m2")
    with pytest.raises(ValueError, match="given twice"):
        merge_outputs([shards[0], shards[0], shards[1]], tmp_path / "m3")
    other = tmp_path / "other"
    run(folder, other, shard="2/3", conf=0.5)
    with pytest.raises(ValueError, match="settings"):
        merge_outputs([shards[0], shards[1], other], tmp_path / "m4")
    j = shards[1] / "journal.jsonl"
    j.write_bytes(b"".join(j.read_bytes().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match="incomplete"):
        merge_outputs(shards, tmp_path / "m5")


def test_shard_argument_is_validated(folder: Path, tmp_path: Path) -> None:
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            run(folder, tmp_path / "o", shard=bad)


# ------------------------------------------------------------------------------ bad files


def _png_with_size(path: Path, w: int, h: int) -> None:
    """A tiny valid PNG whose header then claims w x h pixels (a decompression bomb)."""
    import struct
    import zlib

    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length+type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_each_bad_file_kind_is_reported_and_skipped(tmp_path: Path) -> None:
    src = tmp_path / "bad"
    src.mkdir()
    rng = np.random.default_rng(3)
    good = quadrant_image(rng)
    Image.fromarray(good).save(src / "ok.jpg")
    (src / "empty.jpg").write_bytes(b"")
    full = (src / "ok.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (src / "text.png").write_text("hello, I am not a PNG")
    _png_with_size(src / "bomb.png", 40000, 40000)
    Image.fromarray(quadrant_image(rng, 200, 300)).save(src / "large.jpg")  # over the --max-pixels below
    os.symlink(src / "gone.jpg", src / "dangling.jpg")
    # odd but valid images: labeled, not skipped
    Image.fromarray(good).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(good[..., 0]).save(src / "gray.png")
    Image.fromarray((good[..., 1].astype(np.uint16) * 257)).save(src / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.fromarray(good).save(src / "rotated.jpg", exif=exif)

    s = run(src, tmp_path / "out", max_pixels=30_000)
    reasons = {d["file"]: d["reason"] for d in s["skipped"]}
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "text.png", "bomb.png", "large.jpg", "dangling.jpg"}
    assert "empty file" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["text.png"]
    assert "too large" in reasons["bomb.png"] and "too large" in reasons["large.jpg"]
    assert "not found" in reasons["dangling.jpg"]
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in coco["images"]}
    assert sizes == {"ok.jpg": (80, 60), "cmyk.jpg": (80, 60), "gray.png": (80, 60), "deep16.png": (80, 60),
                     "rotated.jpg": (60, 80)}
    rot = [a for a in coco["annotations"] if a["image_id"] == [i["id"] for i in coco["images"] if i["file_name"] == "rotated.jpg"][0]]
    assert rot and all(a["bbox"][0] + a["bbox"][2] <= 60 + 1e-6 and a["bbox"][1] + a["bbox"][3] <= 80 + 1e-6 for a in rot)


# ------------------------------------------------------------------------------ safety


def _tree(root: Path, exclude: Path) -> dict[str, float]:
    return {str(p): p.lstat().st_mtime for p in root.rglob("*") if exclude not in p.parents and p != exclude}


def test_names_cannot_escape_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    data = tmp_path / "data" / "imgs"
    outside = tmp_path / "outside"
    data.mkdir(parents=True)
    outside.mkdir()
    Image.fromarray(quadrant_image(rng)).save(data / "a.jpg")
    Image.fromarray(quadrant_image(rng)).save(outside / "x.jpg")
    Image.fromarray(quadrant_image(rng)).save(outside / "y.jpg")
    os.symlink(outside, data / "link")  # a symlinked folder pointing outside the source
    lst = data / "list.txt"
    lst.write_text(f"a.jpg\n../../outside/x.jpg\n{outside / 'y.jpg'}\nlink/y.jpg\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "vis").mkdir()
    os.symlink(outside, out / "vis" / "link")  # planted: a write through it would land outside
    before = _tree(tmp_path, out)

    s = run(lst, out, save_vis=10)
    assert s["images"]["labeled"] == 4
    names = [im["file_name"] for im in json.loads((out / "coco.json").read_text())["images"]]
    ext = f"_external{(outside / 'x.jpg').resolve().as_posix()}"
    assert names[0] == "a.jpg" and names[1] == ext and names[3] == "link/y.jpg"
    assert all(".." not in Path(n).parts for n in names)
    assert (out / "labels" / Path(ext).with_suffix(".txt")).is_file()
    assert _tree(tmp_path, out) == before  # nothing created or touched outside OUT
    assert not list(outside.rglob("*.txt")) and sorted(p.name for p in outside.iterdir()) == ["x.jpg", "y.jpg"]

    s = run(data, tmp_path / "out2")  # the folder itself: symlinked folder followed, names stay inside
    names = [im["file_name"] for im in json.loads((tmp_path / "out2" / "coco.json").read_text())["images"]]
    assert names == ["a.jpg", "link/x.jpg", "link/y.jpg"]
    assert _tree(tmp_path, tmp_path / "out2").keys() >= before.keys()

    for bad in ("../x", "/etc/passwd", "a/../../b", "", "..", "a/b/../../../c"):
        with pytest.raises(ValueError):
            safe_join(out, bad)


def test_safe_tree_checks_each_parent_once_and_refuses_planted_links(tmp_path: Path) -> None:
    root, outside = tmp_path / "labels", tmp_path / "outside"
    outside.mkdir()
    tree = SafeTree(root)
    assert tree.join("a/b/x.jpg", ".txt") == root / "a" / "b" / "x.txt" and (root / "a" / "b").is_dir()
    assert tree.join("a/b/y", ".txt") == root / "a" / "b" / "y.txt"  # a checked parent, same answer
    os.symlink(outside, root / "link")  # planted folder link: its real path is outside root
    with pytest.raises(ValueError, match="would leave"):
        tree.join("link/z.jpg", ".txt")
    with pytest.raises(ValueError, match="would leave"):
        SafeTree(root).join("link/deeper/z.jpg", ".txt")  # refused before any folder is made through the link
    os.symlink(outside / "t.txt", root / "a" / "b" / "t.txt")  # planted file link in a checked parent
    with pytest.raises(ValueError, match="symlink"):
        tree.join("a/b/t.jpg", ".txt")
    assert not list(outside.iterdir())  # nothing created outside


def test_out_inside_source_is_not_relabeled(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "imgs", n=4, bad=False)
    run(src, src / "labels-out", save_vis=2)
    s = run(src, src / "labels-out", resume=True)
    assert s["images"]["in_list"] == 5  # the previews in OUT/vis are not new inputs


def test_no_recursive_and_formats(folder: Path, tmp_path: Path) -> None:
    s = run(folder, tmp_path / "o", recursive=False, formats="yolo", save_conf=True)
    assert s["images"]["in_list"] == 11 and s["formats"] == ["yolo"]
    assert not (tmp_path / "o" / "coco.json").exists() and not (tmp_path / "o" / "labelstudio.json").exists()
    rows = [np.loadtxt(p, ndmin=2) for p in (tmp_path / "o" / "labels").glob("*.txt") if p.stat().st_size]
    assert rows and all(r.shape[1] == 6 and np.all(r[:, 5] >= 0.5) for r in rows)
    with pytest.raises(ValueError, match="unknown --format"):
        run(folder, tmp_path / "p", formats="coco,voc")


def test_save_vis_writes_n_previews(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "imgs", n=6)
    (src / "aaa_bad.jpg").write_text("x")  # sorted first: must not use up a preview slot
    run(src, tmp_path / "out", save_vis=3)
    vis = sorted(p.relative_to(tmp_path / "out" / "vis").as_posix() for p in (tmp_path / "out" / "vis").rglob("*.jpg"))
    assert len(vis) == 3 and "aaa_bad.jpg" not in vis
    im = Image.open(tmp_path / "out" / "vis" / vis[0])
    assert max(im.size) >= 480  # tiny images are enlarged so captions stay readable


def test_fixed_batch_model_gets_padded_batches(folder: Path, reference: Path, tmp_path: Path) -> None:
    """The pipeline relies on Detector.infer for fixed-batch models; chunks never exceed --batch."""
    det = FakeDetector()
    run(folder, tmp_path / "o", detector=det)
    assert max(det.batch_sizes) <= 3
    assert snapshot(tmp_path / "o") == snapshot(reference)


# ------------------------------------------------------------------------------ CLI


def test_cli_commands(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from typer.testing import CliRunner

    from ssod_deploy.label import cli, pipeline

    app = typer.Typer()
    app.command("label")(cli.label_command)
    app.command("merge")(cli.merge_command)
    runner = CliRunner()
    res = runner.invoke(app, ["label", "--help"], terminal_width=200)
    assert res.exit_code == 0
    for opt in ("--model", "--out", "--format", "--conf", "--iou", "--imgsz", "--batch", "--workers", "--backend",
                "--resume", "--shard", "--recursive", "--no-recursive", "--save-vis"):
        assert opt in res.output
    monkeypatch.setattr(pipeline, "_load_detector", lambda *a, **k: FakeDetector())
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"s{i}")
        res = runner.invoke(app, ["label", str(folder), "--model", "fake.onnx", "--out", str(outs[-1]),
                                  "--batch", "3", "--shard", f"{i}/2", "--no-progress"])
        assert res.exit_code == 0, res.output
        assert "labeled" in res.output
    res = runner.invoke(app, ["merge", *map(str, outs), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    single = tmp_path / "single"
    res = runner.invoke(app, ["label", str(folder), "-m", "fake.onnx", "-o", str(single), "--batch", "3"])
    assert res.exit_code == 0, res.output
    assert snapshot(tmp_path / "m") == snapshot(single)


def test_same_stem_images_keep_the_first_yolo_file_and_report_the_rest(tmp_path: Path) -> None:
    """a.jpg and a.png both map to labels/a.txt: the first in sorted order owns it, the other is
    reported (never overwritten, whatever order the writer threads finish in)."""
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    for name in ["a.jpg", "a.png", "b.jpg", "c.png"]:
        Image.fromarray(quadrant_image(rng)).save(src / name, quality=95)
    summary = run(src, tmp_path / "out")
    assert summary["yolo_name_collisions"] == [
        {"file": "a.png", "reason": "label file a.txt already written for another image with the same stem"}]
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    first = next(im for im in coco["images"] if im["file_name"] == "a.jpg")
    n_lab = sum(1 for a in coco["annotations"] if a["image_id"] == first["id"] and not a["uncertain"])
    rows = (tmp_path / "out" / "labels" / "a.txt").read_text().splitlines()
    assert len(rows) == n_lab
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == ["a.txt", "b.txt", "c.txt"]
