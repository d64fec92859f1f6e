"""data.yaml parsing: YOLO and COCO splits, label validation, val COCO ground truth."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssod.training.data.formats import (
    DatasetError,
    LabelError,
    img2label_path,
    load_dataset,
)

W, H = 64, 48  # non-square so x/y mix-ups show

# image name -> YOLO lines (class xc yc w h); None = no label file (background image)
TRAIN = {
    "a.jpg": "0 0.5 0.5 0.25 0.5\n1 0.25 0.25 0.125 0.25\n",
    "b.png": None,
    "sub/c.jpg": "1 0.75 0.5 0.5 0.5\n",
}
VAL = {"v1.jpg": "1 0.5 0.5 0.5 0.5\n0 0.125 0.125 0.25 0.25\n", "v2.jpg": ""}
UNLABELED = ["u1.jpg", "deep/u2.jpg"]
HIDDEN = {"u1.txt": "0 0.5 0.5 0.5 0.5\n", "deep/u2.txt": "1 0.5 0.5 0.25 0.25\n"}


def _img(path: Path, w: int = W, h: int = H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def _txt(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _yaml(root: Path, text: str, name: str = "data.yaml") -> Path:
    p = root / name
    p.write_text(text)
    return p


@pytest.fixture()
def yolo(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for split, files in (("train", TRAIN), ("val", VAL)):
        for name, lines in files.items():
            _img(root / "images" / split / name)
            if lines is not None:
                _txt(root / "labels" / split / Path(name).with_suffix(".txt"), lines)
    for name in UNLABELED:
        _img(root / "raw" / name)
    for name, lines in HIDDEN.items():
        _txt(root / "hidden" / name, lines)
    return root


def _expected(lines: str) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([ln.split() for ln in lines.splitlines() if ln.strip()], float).reshape(-1, 5)
    xy, half = v[:, 1:3], v[:, 3:5] / 2
    return np.concatenate([xy - half, xy + half], 1), v[:, 0].astype(np.int64)


def _by_name(samples):
    return {Path(s.path).name: s for s in samples}


def test_img2label_path_replaces_last_images_component():
    p = os.path.join(os.sep, "d", "images", "x", "images", "a.b.jpg")
    assert img2label_path(p) == os.path.join(os.sep, "d", "images", "x", "labels", "a.b.txt")


def test_yolo_folders_names_list(yolo: Path):
    y = _yaml(yolo, "train: images/train\nval: images/val\nunlabeled: raw\nhidden_labels: hidden\nnames: [cat, dog]\n")
    spec = load_dataset(y)
    assert spec.names == ["cat", "dog"] and spec.root == yolo and spec.source == str(y)
    tr = _by_name(spec.train)
    assert sorted(tr) == ["a.jpg", "b.png", "c.jpg"]
    for name, lines in TRAIN.items():
        s = tr[Path(name).name]
        assert s.boxes.dtype == np.float32 and s.cls.dtype == np.int64
        if lines is None:
            assert s.boxes.shape == (0, 4) and s.cls.shape == (0,)
        else:
            boxes, cls = _expected(lines)
            np.testing.assert_allclose(s.boxes, boxes, atol=1e-6)
            np.testing.assert_array_equal(s.cls, cls)
    assert [Path(s.path).name for s in spec.val] == ["v1.jpg", "v2.jpg"]
    assert all(s.size == (H, W) for s in spec.val)
    assert [Path(p).name for p in spec.unlabeled] == ["u2.jpg", "u1.jpg"]  # deep/u2 sorts first
    hid = {Path(s.path).name: s for s in spec.unlabeled_hidden}
    np.testing.assert_allclose(hid["u1.jpg"].boxes, [[0.25, 0.25, 0.75, 0.75]])
    np.testing.assert_array_equal(hid["u2.jpg"].cls, [1])


def test_yolo_lists_txt_and_names_dict(yolo: Path):
    (yolo / "train.txt").write_text("images/train/a.jpg\n./images/train/sub/c.jpg\n\n")
    y = _yaml(yolo, f"path: {yolo}\ntrain: [train.txt, images/train/b.png]\nval: [images/val]\n"
                    "unlabeled: [raw/deep, raw/u1.jpg]\nnames: {0: cat, 1: dog}\nnc: 2\n")
    spec = load_dataset(y)
    assert spec.names == ["cat", "dog"]
    assert [Path(s.path).name for s in spec.train] == ["a.jpg", "c.jpg", "b.png"]
    np.testing.assert_array_equal(_by_name(spec.train)["c.jpg"].cls, [1])
    assert len(spec.val) == 2 and len(spec.unlabeled) == 2 and spec.unlabeled_hidden is None


def test_relative_path_key_is_relative_to_yaml(yolo: Path, tmp_path: Path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    y = _yaml(cfg, "path: ../ds\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n")
    assert load_dataset(y).root == yolo


def test_val_coco_from_yolo_is_a_valid_gt(yolo: Path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    spec = load_dataset(_yaml(yolo, "train: images/train\nval: images/val\nnames: [cat, dog]\n"))
    gt = spec.val_coco
    assert [im["id"] for im in gt["images"]] == [0, 1]
    assert gt["images"][0]["width"] == W and gt["images"][0]["height"] == H
    assert [c["id"] for c in gt["categories"]] == [0, 1]
    a = gt["annotations"][0]
    assert a["bbox"] == pytest.approx([16, 12, 32, 24]) and a["area"] == pytest.approx(32 * 24)
    assert a["category_id"] == 1 and a["iscrowd"] == 0 and a["id"] >= 1
    # the gt scored against itself is perfect: ids and boxes are consistent for pycocotools
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    dets = [{"image_id": x["image_id"], "category_id": x["category_id"], "bbox": x["bbox"], "score": 1.0}
            for x in gt["annotations"]]
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def _coco_json(path: Path, files: dict[str, str | None], cat_ids=(7, 3), crowd: bool = False) -> None:
    """COCO file equivalent to the YOLO labels; class k -> category id sorted(cat_ids)[k]."""
    ids = sorted(cat_ids)
    images, anns = [], []
    for i, (name, lines) in enumerate(files.items()):
        images.append({"id": 100 + i, "file_name": name, "width": W, "height": H})
        if lines:
            boxes, cls = _expected(lines)
            for b, c in zip(boxes, cls):
                x1, y1, x2, y2 = b * [W, H, W, H]
                anns.append({"id": len(anns) + 5, "image_id": 100 + i, "category_id": ids[c],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    if crowd:
        anns.append({"id": 999, "image_id": 100, "category_id": ids[0], "bbox": [0, 0, 10, 10],
                     "area": 100.0, "iscrowd": 1})
    cats = [{"id": c, "name": {3: "cat", 7: "dog"}.get(c, f"c{c}")} for c in cat_ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco_splits_parse_to_the_same_samples(yolo: Path):
    _coco_json(yolo / "ann" / "train.json", TRAIN)
    _coco_json(yolo / "ann" / "val.json", VAL, crowd=True)
    ref = load_dataset(_yaml(yolo, "train: images/train\nval: images/val\nnames: [cat, dog]\n", "yolo.yaml"))
    spec = load_dataset(_yaml(yolo, "train: {images: images/train, annotations: ann/train.json}\n"
                                    "val: {images: images/val, annotations: ann/val.json}\n", "coco.yaml"))
    assert spec.names == ["cat", "dog"]  # from the JSON, in sorted category-id order
    for a, b in ((ref.train, spec.train), (ref.val, spec.val)):
        da, db = _by_name(a), _by_name(b)
        assert sorted(da) == sorted(db)
        for k in da:
            np.testing.assert_allclose(db[k].boxes, da[k].boxes, atol=1e-6)
            np.testing.assert_array_equal(db[k].cls, da[k].cls)
            assert db[k].path == da[k].path
    assert spec.train[0].size == (H, W)
    gt = spec.val_coco
    assert [im["id"] for im in gt["images"]] == [0, 1] and [c["id"] for c in gt["categories"]] == [0, 1]
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["category_id"] == 0 and crowd[0]["image_id"] == 0
    assert len(gt["annotations"]) == len(ref.val_coco["annotations"]) + 1


def test_roboflow_export_layout_loads(tmp_path: Path):
    """Roboflow writes `train: ../train/images` in a data.yaml that sits next to train/: ultralytics reads
    it (a '../' path that does not exist is tried without it), so ssod does too."""
    root = tmp_path / "rf"
    for split in ("train", "valid"):
        _img(root / split / "images" / "a.jpg")
        _txt(root / split / "labels" / "a.txt", "1 0.5 0.5 0.25 0.25\n")
    y = _yaml(root, "train: ../train/images\nval: ../valid/images\ntest: ../test/images\nnc: 2\n"
                    "names: ['x', 'y']\nroboflow:\n  workspace: w\n  version: 1\n")
    spec = load_dataset(y)
    assert [s.cls.tolist() for s in spec.train] == [[1]] and len(spec.val) == 1
    assert spec.train[0].path == str(root / "train" / "images" / "a.jpg")
    with pytest.raises(DatasetError, match="path not found"):  # no such folder either way: still an error
        load_dataset(_yaml(root, "train: ../nowhere/images\nval: ../valid/images\nnames: [x, y]\n", "bad.yaml"))


def test_summary_counts_what_training_sees(yolo: Path):
    spec = load_dataset(_yaml(yolo, "train: images/train\nval: images/val\nunlabeled: raw\nnames: [cat, dog, fox]\n"))
    lines = spec.summary()
    assert "3 classes; train 3 images (3 boxes, 1 background), val 2 images (2 boxes), unlabeled 2 images" in lines[0]
    assert lines[1] == "train boxes per class: cat 1, dog 2, fox 0"
    assert lines[2].startswith("warning: no training box for 1 class(es): fox")
    assert spec.summary(max_classes=1)[1] == "train boxes per class: cat 1, ... 2 more"


def test_coco_categories_map_to_yaml_names_by_name(yolo: Path, caplog):
    """data.yaml names in another order than the JSON's categories: by name, not id order (a silent swap);
    other names: id order, with a warning naming the file and the pairing."""
    _coco_json(yolo / "ann" / "val.json", VAL)  # categories 3 'cat', 7 'dog'
    ref = load_dataset(_yaml(yolo, "train: images/train\nval: images/val\nnames: [cat, dog]\n", "ref.yaml"))
    val = "val: {images: images/val, annotations: ann/val.json}\n"
    swapped = load_dataset(_yaml(yolo, "train: images/train\n" + val + "names: [dog, cat]\n", "swapped.yaml"))
    assert swapped.names == ["dog", "cat"]
    a, b = _by_name(ref.val), _by_name(swapped.val)
    for k in a:
        np.testing.assert_array_equal(b[k].cls, 1 - a[k].cls)
    assert [c["name"] for c in swapped.val_coco["categories"]] == ["dog", "cat"]
    caplog.clear()
    renamed = load_dataset(_yaml(yolo, "train: images/train\n" + val + "names: [kitten, puppy]\n", "renamed.yaml"))
    for k in a:
        np.testing.assert_array_equal(_by_name(renamed.val)[k].cls, a[k].cls)
    assert "val.json" in caplog.text and "3 'cat' -> 'kitten', 7 'dog' -> 'puppy'" in caplog.text


def test_roboflow_coco_container_category_is_not_a_class(yolo: Path, caplog):
    """Roboflow's COCO exports put the dataset's name at category 0 (the others' supercategory, no boxes)."""
    caplog.set_level(logging.INFO, logger="ssod")
    _coco_json(yolo / "ann" / "val.json", VAL)  # categories 3 'cat', 7 'dog'
    js = json.loads((yolo / "ann" / "val.json").read_text())
    for c in js["categories"]:
        c["supercategory"] = "pets"
    js["categories"].insert(0, {"id": 0, "name": "pets", "supercategory": "none"})
    (yolo / "ann" / "val.json").write_text(json.dumps(js))
    ref = load_dataset(_yaml(yolo, "train: images/train\nval: images/val\nnames: [cat, dog]\n", "ref.yaml"))
    val = "val: {images: images/val, annotations: ann/val.json}\n"
    for names in ("", "names: [cat, dog]\n"):  # from the JSON, or given
        spec = load_dataset(_yaml(yolo, "train: images/train\n" + val + names if names else
                                  "train: {images: images/val, annotations: ann/val.json}\n" + val))
        assert spec.names == ["cat", "dog"]
        a, b = _by_name(ref.val), _by_name(spec.val)
        for k in a:
            np.testing.assert_array_equal(b[k].cls, a[k].cls)
    assert "category 0 'pets' holds the others" in caplog.text
    js["annotations"][0]["category_id"] = 0  # boxes of its own: a real class, kept
    (yolo / "ann" / "val.json").write_text(json.dumps(js))
    spec = load_dataset(_yaml(yolo, "train: {images: images/val, annotations: ann/val.json}\n" + val, "kept.yaml"))
    assert spec.names == ["pets", "cat", "dog"]


def test_coco_unknown_category_is_an_error(yolo: Path):
    _coco_json(yolo / "ann" / "val.json", VAL)
    js = json.loads((yolo / "ann" / "val.json").read_text())
    js["annotations"][0]["category_id"] = 42
    (yolo / "ann" / "val.json").write_text(json.dumps(js))
    y = _yaml(yolo, "train: images/train\nval: {images: images/val, annotations: ann/val.json}\nnames: [cat, dog]\n")
    with pytest.raises(LabelError, match=r"val\.json.*unknown category id 42"):
        load_dataset(y)


# ----------------------------------------------------------------------------- bad labels
def _one_label(yolo: Path, text: str) -> Path:
    _txt(yolo / "labels" / "train" / "a.txt", text)
    return _yaml(yolo, "train: images/train\nval: images/val\nnames: [cat, dog]\n")


@pytest.mark.parametrize(
    "line, problem",
    [
        ("5 0.5 0.5 0.2 0.2", "class id 5 out of range"),
        ("-1 0.5 0.5 0.2 0.2", "class id -1 out of range"),
        ("0.5 0.5 0.5 0.2 0.2", "not an integer"),
    ],
)
def test_class_id_that_does_not_fit_names_is_a_label_error_naming_file_and_line(yolo: Path, line: str, problem: str):
    y = _one_label(yolo, f"0 0.5 0.5 0.2 0.2\n\n{line}\n")
    with pytest.raises(LabelError) as e:
        load_dataset(y)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{os.sep}a.txt:3:" in msg and problem in msg


@pytest.mark.parametrize(
    "line, problem",
    [
        ("0 0.5 0.5 0.2", "expected 5 columns"),
        ("0 0.5 0.5 0.2 0.2 0.9", "got 6"),
        ("0 0.5 abc 0.2 0.2", "not a number: 'abc'"),
        ("0 0.5 nan 0.2 0.2", "not a finite number"),
    ],
)
def test_damaged_label_file_skips_its_image_with_a_warning(yolo: Path, line: str, problem: str, caplog):
    y = _one_label(yolo, f"0 0.5 0.5 0.2 0.2\n\n{line}\n")
    spec = load_dataset(y)
    assert sorted(_by_name(spec.train)) == ["b.png", "c.jpg"]  # a.jpg left out, the others kept
    warning = next(r.getMessage() for r in caplog.records if "a.txt" in r.getMessage())
    assert "\n" not in warning and f"{os.sep}a.txt:3:" in warning and problem in warning and "image skipped" in warning
    assert "1 images skipped for damaged label files" in caplog.text
    with pytest.raises(LabelError, match=rf"a\.txt:3: .*{problem[:8]}.*strict"):
        load_dataset(y, check="strict")


def test_polygon_line_becomes_its_box(yolo: Path):
    spec = load_dataset(_one_label(yolo, "1 0.1 0.2 0.5 0.1 0.3 0.6\n"))
    s = _by_name(spec.train)["a.jpg"]
    np.testing.assert_allclose(s.boxes, [[0.1, 0.1, 0.5, 0.6]], atol=1e-6)
    np.testing.assert_array_equal(s.cls, [1])


def test_partly_outside_clipped_degenerate_dropped_with_warnings(yolo: Path, caplog):
    text = (
        "0 0.9 0.5 0.4 0.2\n"      # 1: x2 = 1.1 -> clipped
        "1 0.5 0.5 0.0 0.2\n"      # 2: zero width -> dropped
        "1 1.5 0.5 0.2 0.2\n"      # 3: entirely outside -> dropped
        "0 0.5 0.5 0.00005 0.2\n"  # 4: tiny -> dropped
        "1 0.5 0.5 0.2 0.2\n"      # 5: fine
        "0 0.5 0.5 1.0004 0.2\n"   # 6: within the silent tolerance -> clipped quietly
    )
    y = _one_label(yolo, text)
    with caplog.at_level(logging.WARNING, logger="ssod"):
        spec = load_dataset(y)
    s = _by_name(spec.train)["a.jpg"]
    np.testing.assert_allclose(s.boxes, [[0.7, 0.4, 1.0, 0.6], [0.4, 0.4, 0.6, 0.6], [0.0, 0.4, 1.0, 0.6]], atol=1e-6)
    np.testing.assert_array_equal(s.cls, [0, 1, 0])
    log = caplog.text
    assert "a.txt:1: box partly outside the image" in log and "clipped" in log
    for n in (2, 3, 4):
        assert f"a.txt:{n}: " in log
    assert "a.txt:5:" not in log and "a.txt:6:" not in log
    assert "1 boxes clipped, 3 boxes dropped" in log


@pytest.mark.parametrize("line", ["0 0.9 0.5 0.4 0.2", "1 0.5 0.5 0.0 0.2"])
def test_strict_mode_raises_on_repairable_boxes(yolo: Path, line: str):
    y = _one_label(yolo, f"1 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(LabelError, match=r"a\.txt:2: box .*strict"):
        load_dataset(y, check="strict")
    load_dataset(y)  # the default mode repairs it


def test_warnings_are_aggregated(yolo: Path, caplog):
    y = _one_label(yolo, "0 0.95 0.5 0.2 0.2\n" * 50)
    with caplog.at_level(logging.WARNING, logger="ssod"):
        load_dataset(y)
    assert len(caplog.records) <= 23
    assert "and 30 more" in caplog.text and "50 label warnings" in caplog.text


# ----------------------------------------------------------------------------- yaml errors
@pytest.mark.parametrize(
    "text, match",
    [
        ("val: images/val\nnames: [a]\n", r"data\.yaml: missing required key 'train'"),
        ("train: images/train\nnames: [a]\n", r"data\.yaml: missing required key 'val'"),
        ("train: images/train\nval: images/val\n", r"data\.yaml: missing required key 'names'"),
        ("train: images/nope\nval: images/val\nnames: [a, b]\n", r"data\.yaml: 'train': path not found: .*nope"),
        ("train: images/train\nval: images/val\nnames: [a, b]\nunlabeled: zzz\n", r"'unlabeled': path not found"),
        ("path: nowhere\ntrain: images/train\nval: images/val\nnames: [a, b]\n", r"'path': path not found"),
        ("train: images/train\nval: images/val\nnames: {0: a, 2: b}\n", r"'names': class ids must be 0..1"),
        ("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n", r"'nc': nc=3 but names has 2"),
        ("train: {images: images/train}\nval: images/val\nnames: [a, b]\n", r"'train': .*missing annotations"),
        ("train: [images/train\n", r"data\.yaml: cannot parse YAML"),
    ],
)
def test_yaml_errors_are_one_line_and_name_the_key(yolo: Path, text: str, match: str):
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset(_yaml(yolo, text))
    assert "\n" not in str(e.value)


def test_missing_yaml_and_bad_check_mode(tmp_path: Path, yolo: Path):
    with pytest.raises(DatasetError, match="dataset YAML not found"):
        load_dataset(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match="check must be one of"):
        load_dataset(_yaml(yolo, "train: images/train\nval: images/val\nnames: [a, b]\n"), check="lenient")


def test_unreadable_val_image_is_left_out(yolo: Path, caplog):
    (yolo / "images" / "val" / "v2.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="ssod"):
        spec = load_dataset(_yaml(yolo, "train: images/train\nval: images/val\nnames: [a, b]\n"))
    assert [Path(s.path).name for s in spec.val] == ["v1.jpg"]
    assert len(spec.val_coco["images"]) == 1 and "v2.jpg" in caplog.text


def test_train_entry_with_its_own_labels_folder(yolo: Path):
    """The next round of training: ``ssod label``'s OUT/labels mirrors the pseudo-labeled folder,
    so {images: raw, labels: round1/labels} adds those images with those labels to a split;
    an image without a label file there is background. Misuse is a one-line error."""
    _txt(yolo / "round1" / "labels" / "u1.txt", "1 0.5 0.5 0.5 0.5\n")  # deep/u2.jpg: no file
    y = _yaml(yolo, "train: [images/train, {images: raw, labels: round1/labels}]\nval: images/val\nnames: [a, b]\n")
    spec = load_dataset(y)
    got = _by_name(spec.train)
    assert set(got) == {"a.jpg", "b.png", "c.jpg", "u1.jpg", "u2.jpg"}
    boxes, cls = _expected("1 0.5 0.5 0.5 0.5\n")
    np.testing.assert_allclose(got["u1.jpg"].boxes, boxes, atol=1e-6)
    assert got["u1.jpg"].cls.tolist() == cls.tolist() and len(got["u2.jpg"].cls) == 0
    ref_boxes, _ = _expected(TRAIN["a.jpg"])
    np.testing.assert_allclose(got["a.jpg"].boxes, ref_boxes, atol=1e-6)  # plain entries: ultralytics' place
    assert len(load_dataset(_yaml(yolo, "train: {images: raw, labels: round1/labels}\nval: images/val\n"
                                         "names: [a, b]\n", "single.yaml")).train) == 2
    for text, match in [
        ("train: [images/train, {images: raw, label: round1/labels}]", "got keys"),
        ("train: [images/train, {images: raw, annotations: x.json}]", "only entry"),
        ("train: [images/train, {images: raw, labels: nowhere}]", "path not found"),
        ("train: images/train\nunlabeled: [{images: raw, labels: round1/labels}]", "no labels folder"),
    ]:
        with pytest.raises(DatasetError, match=match):
            load_dataset(_yaml(yolo, text + "\nval: images/val\nnames: [a, b]\n", "bad.yaml"))
