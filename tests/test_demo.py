"""The offline demo dataset: deterministic, loadable, labels consistent with the images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssod.training.data import demo
from ssod.training.data.formats import load_dataset

SMALL = dict(n_train=40, n_val=10, size=(64, 96), progress=False)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("demos")
    return {
        "a": demo.make_demo_dataset(base / "a", seed=3, labeled_ratio=0.25, **SMALL),
        "b": demo.make_demo_dataset(base / "b", seed=3, labeled_ratio=0.25, **SMALL),
        "r": demo.make_demo_dataset(base / "r", seed=3, labeled_ratio=0.5, **SMALL),
    }


def _files(yaml_path: Path) -> dict[str, bytes]:
    root = yaml_path.parent
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(demos):
    a, b = _files(demos["a"]), _files(demos["b"])
    assert a.keys() == b.keys()
    assert a == b
    assert {"data.yaml", "demo.json", "annotations/val.json"} <= a.keys()


def test_labeled_ratio_changes_split_not_content(demos):
    a, r = _files(demos["a"]), _files(demos["r"])
    by_name = lambda fs: {Path(k).name: v for k, v in fs.items() if k.endswith(".jpg")}  # noqa: E731
    ia, ir = by_name(a), by_name(r)
    assert ia.keys() == ir.keys() and len(ia) == 50
    assert ia == ir
    labeled_a = {Path(k).name for k in a if k.startswith("images/train/")}
    labeled_r = {Path(k).name for k in r if k.startswith("images/train/")}
    assert len(labeled_a) == 10 and len(labeled_r) == 20


def test_different_seed_differs(tmp_path, demos):
    other = demo.make_demo_dataset(tmp_path / "s4", seed=4, labeled_ratio=0.25, **SMALL)
    assert (other.parent / "images/val/val_000000.jpg").read_bytes() != (
        demos["a"].parent / "images/val/val_000000.jpg"
    ).read_bytes()


def test_loads_with_hidden_labels_and_valid_boxes(demos):
    spec = load_dataset(demos["a"], check="strict")
    assert spec.names == [str(i) for i in range(10)]
    assert len(spec.train) == 10 and len(spec.unlabeled) == 30 and len(spec.val) == 10
    assert spec.unlabeled_hidden is not None and len(spec.unlabeled_hidden) == 30
    for s in spec.train + spec.val + spec.unlabeled_hidden:
        assert 1 <= len(s.boxes) <= demo.MAX_OBJECTS  # every image has at least one digit
        assert ((s.boxes >= 0) & (s.boxes <= 1)).all()
        assert ((s.boxes[:, 2:] - s.boxes[:, :2]) > 0).all()
        assert ((s.cls >= 0) & (s.cls < 10)).all()
    for s in spec.val:
        h, w = s.size
        assert 64 <= h <= 96 and 64 <= w <= 96
    stamp = json.loads((demos["a"].parent / "demo.json").read_text())
    assert stamp["n_labeled"] == 10 and stamp["n_unlabeled"] == 30


def test_val_json_matches_yolo_labels_and_loads_in_pycocotools(demos):
    from pycocotools.coco import COCO

    root = demos["a"].parent
    coco = COCO(str(root / "annotations/val.json"))
    spec = load_dataset(demos["a"])
    assert sorted(coco.getImgIds()) == list(range(10))
    assert len(coco.getAnnIds()) == sum(len(s.boxes) for s in spec.val)
    for i, s in enumerate(spec.val):
        info = coco.loadImgs(i)[0]
        assert info["file_name"] == Path(s.path).name and (info["height"], info["width"]) == s.size
        anns = coco.loadAnns(coco.getAnnIds(imgIds=i))
        px = np.array([a["bbox"] for a in anns]).reshape(-1, 4)
        px[:, 2:] += px[:, :2]
        h, w = s.size
        np.testing.assert_allclose(px / [w, h, w, h], s.boxes, atol=1e-5)
        np.testing.assert_array_equal([a["category_id"] for a in anns], s.cls)


def test_boxes_cover_the_pasted_digit():
    """Pixels inside a box differ from the background render at those pixels; outside they do not."""
    img, boxes, cls = demo.render_image("val", 5, seed=0, size=(96, 96))
    rng = np.random.default_rng([0, demo.SPLIT_IDS["val"], 5])
    h, w = (int(v) for v in rng.integers(96, 97, size=2))
    bg = np.clip(np.rint(demo._background(rng, h, w)), 0, 255).astype(np.uint8)
    changed = np.abs(img.astype(int) - bg.astype(int)).max(2) > 40
    inside = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in boxes.astype(int):
        inside[y1:y2, x1:x2] = True
        assert changed[y1:y2, x1:x2].mean() > 0.15
    assert changed[~inside].mean() < 0.01
    assert len(boxes) == len(cls) >= 1


def test_train_and_val_digits_are_disjoint():
    _, labels, pools = demo._digit_crops()
    assert len(pools["train"]) == 4000 and len(pools["val"]) == 1000
    assert not set(pools["train"]) & set(pools["val"])
    assert (np.bincount(labels[pools["val"]]) == 100).all()


def test_existing_stamp_is_reused_and_foreign_folder_refused(demos, tmp_path):
    yaml_path = demos["a"]
    before = yaml_path.stat().st_mtime_ns
    again = demo.make_demo_dataset(yaml_path.parent, seed=3, labeled_ratio=0.25, **SMALL)
    assert again == yaml_path and yaml_path.stat().st_mtime_ns == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        demo.make_demo_dataset(foreign, **SMALL)
    assert (foreign / "keep.txt").exists()
    assert not list(tmp_path.glob("mine.tmp-*"))


def test_other_stamp_is_regenerated(tmp_path):
    out = tmp_path / "d"
    demo.make_demo_dataset(out, seed=0, labeled_ratio=0.5, n_train=4, n_val=2, size=(64, 64), progress=False)
    demo.make_demo_dataset(out, seed=0, labeled_ratio=1.0, n_train=4, n_val=2, size=(64, 64), progress=False)
    assert len(list((out / "images/train").iterdir())) == 4
    assert not (out / "images/unlabeled").exists()
    spec = load_dataset(out / "data.yaml")
    assert len(spec.train) == 4 and spec.unlabeled == [] and spec.unlabeled_hidden is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no tmp/old folders left


def test_cache_dir_and_preview(tmp_path, monkeypatch, demos):
    monkeypatch.setenv("SSOD_CACHE", str(tmp_path / "cache"))
    assert demo.default_demo_dir() == tmp_path / "cache" / "demo-v1-seed0-r0.1"
    png = demo.save_preview(demos["a"], tmp_path / "preview.png", n=4)
    with Image.open(png) as im:
        assert im.size[0] >= 2 * 96 and im.mode == "RGB"


def test_bad_arguments():
    with pytest.raises(ValueError, match="labeled_ratio"):
        demo.make_demo_dataset(Path("/nonexistent/x"), labeled_ratio=0.0)
    with pytest.raises(ValueError, match="size"):
        demo.make_demo_dataset(Path("/nonexistent/x"), size=(96, 64))
