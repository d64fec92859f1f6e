"""`ssod data init`: a data.yaml for labeling tools' YOLO exports, with a split that stays put."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ssod.cli import app
from ssod.training.data.formats import DatasetError, load_dataset
from ssod.training.data.scaffold import init_dataset, split_of

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _export(tiny_demo: Path, dst: Path, side_by_side: bool = False) -> tuple[Path, list[Path]]:
    """The tiny demo's labeled train images as a Label Studio (images/ + labels/) or CVAT (side by side) export."""
    src = tiny_demo.parent
    labels = src / "labels" / "train"
    images = sorted(p for p in (src / "images" / "train").iterdir() if (labels / f"{p.stem}.txt").exists())
    img_dir = dst / ("obj_train_data" if side_by_side else "images")
    lab_dir = img_dir if side_by_side else dst / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for p in images:
        shutil.copy(p, img_dir / p.name)
        shutil.copy(labels / f"{p.stem}.txt", lab_dir / f"{p.stem}.txt")
    return img_dir, images


def test_label_studio_export_gets_a_yaml_training_accepts(tiny_demo, tmp_path, caplog):
    img_dir, images = _export(tiny_demo, tmp_path / "ls")
    (tmp_path / "ls" / "classes.txt").write_text("\n".join(DIGITS) + "\n")
    (tmp_path / "ls" / "labels" / f"{images[0].stem}.txt").unlink()  # one image not labeled yet
    unlabeled = tiny_demo.parent / "images" / "unlabeled"
    with caplog.at_level(logging.INFO, logger="ssod"):
        path, spec = init_dataset(img_dir, [unlabeled], tmp_path / "ls" / "data.yaml", val_fraction=0.25)
    assert spec.names == DIGITS
    assert len(spec.train) + len(spec.val) == len(images) and len(spec.val) >= 1
    assert len(spec.unlabeled) == len(list(unlabeled.iterdir()))
    assert "1 of 16 images have no label file" in caplog.text
    # the lists are relative to the YAML's folder (the dataset moves with it), the outside folder absolute
    assert (tmp_path / "ls" / "data.train.txt").read_text().startswith("./images/")
    assert str(unlabeled) in path.read_text()
    assert load_dataset(path).names == DIGITS
    with pytest.raises(DatasetError, match="exists; pass --force"):
        init_dataset(img_dir, out=path)


def test_split_is_stable_when_images_are_added(tiny_demo, tmp_path):
    img_dir, images = _export(tiny_demo, tmp_path / "ls")
    yaml_path = tmp_path / "data.yaml"
    _, before = init_dataset(img_dir, out=yaml_path, val_fraction=0.3)
    val_before = {s.path for s in before.val}
    for p in images[:6]:  # a new labeling round: more images, the old ones unchanged
        shutil.copy(img_dir / p.name, img_dir / f"new_{p.name}")
        shutil.copy(tmp_path / "ls" / "labels" / f"{p.stem}.txt", tmp_path / "ls" / "labels" / f"new_{p.stem}.txt")
    _, after = init_dataset(img_dir, out=yaml_path, val_fraction=0.3, force=True)
    assert len(after.train) + len(after.val) == len(images) + 6
    assert {s.path for s in after.val if "new_" not in s.path} == val_before
    assert split_of("a/b.jpg", 0.3) == split_of("a/b.jpg", 0.3)
    assert {split_of(f"{i}.jpg", 0.3) for i in range(50)} == {"train", "val"}


def test_cvat_export_without_names_file_names_classes_by_id(tiny_demo, tmp_path, caplog):
    img_dir, images = _export(tiny_demo, tmp_path / "cvat", side_by_side=True)
    _, spec = init_dataset(img_dir, out=tmp_path / "cvat" / "data.yaml")
    top = max(int(c) for s in [*spec.train, *spec.val] for c in s.cls)
    assert spec.names == [str(i) for i in range(top + 1)]
    assert "no class-name file" in caplog.text
    (tmp_path / "cvat" / "obj.names").write_text("\n".join(DIGITS))
    _, spec = init_dataset(img_dir, out=tmp_path / "cvat" / "data.yaml", force=True)
    assert spec.names == DIGITS


def test_errors_name_the_folder_and_the_problem(tiny_demo, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(next((tiny_demo.parent / "images" / "unlabeled").iterdir()), bare / "x.jpg")
    with pytest.raises(DatasetError, match="none of its 1 images has a YOLO label file"):
        init_dataset(bare, out=tmp_path / "d.yaml")
    with pytest.raises(DatasetError, match="no images found"):
        init_dataset(_empty(tmp_path), out=tmp_path / "d.yaml")
    img_dir, _ = _export(tiny_demo, tmp_path / "ls")
    with pytest.raises(DatasetError, match="between 0 and 1"):
        init_dataset(img_dir, out=tmp_path / "d.yaml", val_fraction=1.0)
    with pytest.raises(DatasetError, match="unlabeled folder not found"):
        init_dataset(img_dir, [tmp_path / "nowhere"], out=tmp_path / "d.yaml")
    r = CliRunner().invoke(app, ["data", "init", str(bare), "--out", str(tmp_path / "d.yaml")])
    assert r.exit_code == 1 and "none of its 1 images" in r.output


def test_cli_writes_and_prints_the_summary(tiny_demo, tmp_path):
    img_dir, images = _export(tiny_demo, tmp_path / "ls")
    (tmp_path / "ls" / "classes.txt").write_text("\n".join(DIGITS))
    r = CliRunner().invoke(app, ["data", "init", str(img_dir), "-u", str(tiny_demo.parent / "images" / "unlabeled"),
                                 "--out", str(tmp_path / "ls" / "data.yaml"), "--val", "0.25"])
    assert r.exit_code == 0, r.output
    assert "10 classes" in r.output and "ssod train --data" in r.output


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d
