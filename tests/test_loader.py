"""Datasets, collation and the paired loader on tiny synthetic images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ssod.training.data.batch import LABELED_KEYS, UNLABELED_KEYS
from ssod.training.data.formats import Sample
from ssod.training.data.loader import (
    LabeledDataset,
    PairedLoader,
    UnlabeledDataset,
    build_val_loader,
)
from ssod.training.data.views import LabeledAug, StrongAug, WeakAug

S = 64


def _write(path: Path, h: int, w: int, box_px: tuple[int, int, int, int] | None) -> None:
    img = np.full((h, w, 3), 20, np.uint8)
    if box_px is not None:
        x1, y1, x2, y2 = box_px
        img[y1:y2, x1:x2] = 255
    cv2.imwrite(str(path), img)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """8 labeled + 1 corrupt, 15 unlabeled + 1 corrupt (16 = divisible by the batch sizes)."""
    root = tmp_path_factory.mktemp("loader_data")
    rng = np.random.default_rng(0)
    labeled, unlabeled = [], []
    for k in range(23):
        h, w = (int(v) for v in rng.integers(48, 81, size=2))
        path = root / f"img{k:02d}.png"
        if k % 3 == 2:  # some images without objects
            _write(path, h, w, None)
            boxes = np.zeros((0, 4), np.float32)
        else:
            x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x2, y2 = x1 + int(rng.integers(12, w // 2)), y1 + int(rng.integers(12, h // 2))
            _write(path, h, w, (x1, y1, x2, y2))
            boxes = np.array([[x1 / w, y1 / h, x2 / w, y2 / h]], np.float32)
        sample = Sample(str(path), boxes, np.full(len(boxes), k % 2, np.int64), (h, w))
        (labeled if k < 8 else unlabeled).append(sample)
    bad = root / "corrupt.jpg"
    bad.write_bytes(b"this is not a jpeg")
    bad_sample = Sample(str(bad), np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), np.zeros(1, np.int64), (50, 70))
    labeled.insert(3, bad_sample)
    unlabeled.insert(5, bad_sample)
    return {"labeled": labeled, "unlabeled": unlabeled, "bad": str(bad)}


def _paired(data, ratio=1, workers=0, batch=2, seed=0, supervised=False, steps=None) -> PairedLoader:
    lab = LabeledDataset(data["labeled"], S, LabeledAug(mosaic_p=0.5, mixup_p=0.3), train=True, seed=seed)
    unl = None if supervised else UnlabeledDataset(
        [s.path for s in data["unlabeled"]], S, WeakAug(), StrongAug(), seed=seed, hidden=data["unlabeled"]
    )
    return PairedLoader(lab, unl, batch, unlabeled_ratio=ratio, workers=workers, seed=seed, steps_per_epoch=steps)


def _check_labeled(b: dict, B: int) -> None:
    assert tuple(b) == LABELED_KEYS
    assert b["img"].dtype == torch.float32 and b["img"].shape == (B, 3, S, S)
    assert 0.0 <= b["img"].min() and b["img"].max() <= 1.0
    n = len(b["cls"])
    assert b["boxes"].dtype == torch.float32 and b["boxes"].shape == (n, 4)
    assert b["cls"].dtype == torch.int64 and b["batch_idx"].dtype == torch.int64 and b["batch_idx"].shape == (n,)
    assert n == 0 or (0 <= b["batch_idx"].min() and b["batch_idx"].max() < B)
    assert (b["boxes"] >= 0).all() and (b["boxes"] <= S).all()
    assert b["M"].dtype == torch.float32 and b["M"].shape == (B, 3, 3)
    assert b["orig_size"].dtype == torch.int64 and b["orig_size"].shape == (B, 2)
    assert len(b["paths"]) == B and all(isinstance(p, str) for p in b["paths"])
    assert isinstance(b["skipped"], list)


def _check_unlabeled(u: dict, B: int) -> None:
    assert tuple(u) == UNLABELED_KEYS
    for k in ("weak", "strong"):
        assert u[k].dtype == torch.float32 and u[k].shape == (B, 3, S, S)
    for k in ("M_weak", "M_strong"):
        assert u[k].dtype == torch.float32 and u[k].shape == (B, 3, 3)
    assert u["erased"].dtype == torch.float32 and u["erased"].shape[0] == B and u["erased"].shape[2] == 4
    for img, rects in zip(u["strong"], u["erased"]):  # the last recorded cutout is one flat gray patch
        drawn = [r for r in rects.long().tolist() if r[2] > r[0]]
        if drawn:
            x1, y1, x2, y2 = drawn[-1]
            patch = img[:, y1:y2, x1:x2]
            assert (patch == patch[0, 0, 0]).all()
    assert u["orig_size"].dtype == torch.int64 and u["orig_size"].shape == (B, 2)
    n = len(u["gt_cls"])
    assert u["gt_boxes"].shape == (n, 4) and u["gt_boxes"].dtype == torch.float32
    assert u["gt_cls"].dtype == torch.int64 and u["gt_batch_idx"].dtype == torch.int64
    assert len(u["paths"]) == B and isinstance(u["skipped"], list)


def _flat(batches) -> list[torch.Tensor]:
    out = []
    for lb, ub in batches:
        out += [lb["img"], lb["boxes"], lb["cls"], lb["M"]]
        if ub is not None:
            out += [ub["weak"], ub["strong"], ub["M_weak"], ub["M_strong"], ub["gt_boxes"]]
    return out


def test_batches_follow_the_contract_and_ratio(data):
    for ratio in (1, 4):
        loader = _paired(data, ratio=ratio)
        assert len(loader) == 16 // 2  # the ratio sets the images per step, never the schedule
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader)
        for lb, ub in batches:
            _check_labeled(lb, 2)
            _check_unlabeled(ub, 2 * ratio)
        # the epoch walked the unlabeled set exactly `ratio` times (corrupt file replaced by its neighbour)
        seen = [p for _, ub in batches for p in ub["paths"]]
        assert data["bad"] not in seen and len(seen) == 16 * ratio
        walked = Counter(i for batch in loader._unl_sampler for _, i in batch)
        assert walked == {i: ratio for i in range(16)}
        # and the next epoch starts on fresh passes
        loader._unl_sampler.epoch = 1
        assert {p for batch in loader._unl_sampler for p, _ in batch} == set(range(ratio, 2 * ratio))
        assert sum(len(lb["cls"]) for lb, _ in batches) > 0


def test_hidden_labels_land_on_the_objects_of_the_weak_view(data):
    ds = UnlabeledDataset([s.path for s in data["unlabeled"]], S, WeakAug(), StrongAug(), seed=1,
                          hidden=data["unlabeled"])
    n_boxes = 0
    for i in range(len(ds)):
        item = ds[(0, i)]
        weak = item["weak"][0].float()
        for x1, y1, x2, y2 in item["gt_boxes"].tolist():
            inner = weak[int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1]
            assert inner.mean() > 240
            n_boxes += 1
    assert n_boxes >= 8


def test_a_larger_weak_view_is_drawn_from_the_file_and_leaves_the_strong_view_alone(tmp_path):
    """weak_size > imgsz (the teacher's enlarged view): the weak view comes at that size with the
    same draw (boxes scale by weak_size / imgsz), the strong view and its matrix do not change, and
    for a file larger than the view the weak view has detail an upsampled imgsz view lacks."""
    path = tmp_path / "big.png"
    img = np.full((240, 320, 3), 20, np.uint8)
    img[100:140, 60:100] = 255
    img[(np.arange(240) // 4) % 2 == 0, 200:300] = 200  # stripes 4 px: seen at 0.4x, averaged away at 0.2x
    cv2.imwrite(str(path), img)
    hidden = [Sample(str(path), np.array([[60 / 320, 100 / 240, 100 / 320, 140 / 240]], np.float32),
                     np.zeros(1, np.int64), (240, 320))]
    kw = dict(weak=WeakAug(), strong=StrongAug(), seed=3, hidden=hidden)
    plain = UnlabeledDataset([str(path)], S, **kw)
    big = UnlabeledDataset([str(path)], 2 * S, **kw)  # no weak_size: the reference at the big size
    enlarged = UnlabeledDataset([str(path)], S, weak_size=2 * S, **kw)
    with pytest.raises(ValueError, match="below imgsz"):
        UnlabeledDataset([str(path)], S, weak_size=S - 32, **kw)
    for key in [(0, 0), (1, 0), (2, 0)]:
        a, b = plain[key], enlarged[key]
        assert b["weak"].shape == (3, 2 * S, 2 * S) and b["strong"].shape == (3, S, S)
        assert torch.equal(a["M_strong"], b["M_strong"])
        assert (a["strong"].float() - b["strong"].float()).abs().mean() < 2  # one more INTER_AREA step
        assert torch.allclose(b["gt_boxes"], a["gt_boxes"] * 2, atol=1e-3)
        assert torch.equal(b["weak"], big[key]["weak"])  # what a 2S-pixel training would see
        upsampled = torch.nn.functional.interpolate(a["weak"][None].float(), scale_factor=2, mode="bilinear")[0]
        def contrast(view: torch.Tensor) -> float:  # the stripes' vertical contrast dominates the view's
            return float(view.float().diff(dim=1).abs().mean())

        assert contrast(b["weak"]) > 2.5 * contrast(upsampled)  # measured 3.8x


def test_epochs_are_deterministic_and_distinct(data):
    loader = _paired(data)
    a, b = _flat(loader.epoch(3)), _flat(loader.epoch(3))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    c = _flat(loader.epoch(4))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    # a fresh loader (a resumed run) sees the same epoch 3
    d = _flat(_paired(data).epoch(3))
    assert all(torch.equal(x, y) for x, y in zip(a, d))


def test_set_epoch_applies_to_integer_indices(data):
    ds = UnlabeledDataset([s.path for s in data["unlabeled"]], S, seed=7)
    ds.set_epoch(3)
    assert torch.equal(ds[4]["strong"], ds[(3, 4)]["strong"])
    assert not torch.equal(ds[4]["strong"], ds[(2, 4)]["strong"])


def test_corrupt_image_is_skipped_and_reported(data):
    bad = data["bad"]
    lab = LabeledDataset(data["labeled"], S, LabeledAug(), train=True)
    item = lab[(0, 3)]
    assert item["path"] == data["labeled"][4].path
    assert len(item["skipped"]) == 1 and item["skipped"][0][0] == bad and item["skipped"][0][1]
    unl = UnlabeledDataset([s.path for s in data["unlabeled"]], S)
    item = unl[(0, 5)]
    assert item["path"] == data["unlabeled"][6].path and item["skipped"][0][0] == bad
    # through the loader: the unlabeled epoch visits every index, so the skip shows up
    skipped = [s for _, ub in _paired(data).epoch(0) for s in ub["skipped"]]
    assert [s[0] for s in skipped] == [bad]
    # supervised epoch walks the labeled set once
    sup = _paired(data, supervised=True, batch=3)
    assert len(sup) == 3
    pairs = list(sup.epoch(0))
    assert all(ub is None for _, ub in pairs)
    lab_skipped = [s[0] for lb, _ in pairs for s in lb["skipped"]]
    assert bad in lab_skipped and set(lab_skipped) == {bad}  # mosaic partners may hit it too


def test_all_unreadable_raises_clear_error(tmp_path):
    paths = []
    for k in range(3):
        p = tmp_path / f"bad{k}.png"
        p.write_bytes(b"")
        paths.append(str(p))
    with pytest.raises(RuntimeError, match="unreadable"):
        UnlabeledDataset(paths, S)[0]


def test_val_loader_keeps_corrupt_files_as_blank_items(data):
    samples = data["labeled"]
    loader = build_val_loader(samples, S, batch=4, workers=0)
    batches = list(loader)
    assert [p for b in batches for p in b["paths"]] == [s.path for s in samples]  # order kept
    b = batches[0]
    _check_labeled(b, 4)
    assert [s[0] for s in b["skipped"]] == [data["bad"]]
    blank = b["img"][3]
    assert torch.allclose(blank, torch.full_like(blank, 114 / 255))
    assert (b["batch_idx"] != 3).all()
    assert b["orig_size"][3].tolist() == [50, 70]
    # letterbox only: boxes of a readable image are its normalised boxes scaled by M
    s0, M0 = samples[0], b["M"][0]
    h, w = s0.size
    exp = torch.from_numpy(s0.boxes * np.array([w, h, w, h], np.float32)) * M0[0, 0]
    exp[:, [0, 2]] += M0[0, 2]
    exp[:, [1, 3]] += M0[1, 2]
    torch.testing.assert_close(b["boxes"][b["batch_idx"] == 0], exp, atol=1e-4, rtol=0)


def test_supervised_set_smaller_than_a_batch_gives_one_step(data):
    lab = LabeledDataset(data["labeled"][:3], S, LabeledAug(), train=True)
    loader = PairedLoader(lab, None, batch_size=8, workers=0)
    (lb, ub), = list(loader.epoch(0))
    assert ub is None and lb["img"].shape[0] == 3


def test_too_few_unlabeled_images_is_a_clear_error(data):
    lab = LabeledDataset(data["labeled"], S, LabeledAug())
    unl = UnlabeledDataset([s.path for s in data["unlabeled"][:3]], S)
    with pytest.raises(ValueError, match="fewer than one unlabeled batch"):
        PairedLoader(lab, unl, batch_size=2, unlabeled_ratio=2, workers=0)


def test_workers_give_the_same_batches(data):
    a = _flat(_paired(data, workers=0, steps=3).epoch(1))
    loader = _paired(data, workers=2, steps=3)
    assert loader.workers == (1, 1)
    b = _flat(loader.epoch(1))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    # persistent workers pick up the next epoch from the sampler
    a2, b2 = _flat(_paired(data, workers=0, steps=3).epoch(2)), _flat(loader.epoch(2))
    assert all(torch.equal(x, y) for x, y in zip(a2, b2))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a2, a))


def test_mosaic_closes_at_its_epoch(data):
    """``aug.close_mosaic``: with ``mosaic_p`` 1 every labeled view is a mosaic (identity matrix)
    before ``mosaic_until_epoch`` and an ordinary view of its own image from then on."""
    geo = dict(flip_p=0.5, scale=(0.5, 1.5), translate=0.1, degrees=0.0, shear=0.0)
    ds = LabeledDataset(data["labeled"], S, LabeledAug(**geo, mosaic_p=1.0, mosaic_until_epoch=2), train=True, seed=3)
    plain = LabeledDataset(data["labeled"], S, LabeledAug(**geo), train=True, seed=3)
    for i in (0, 1, 4):
        for epoch in (0, 1):
            assert torch.equal(ds[(epoch, i)]["M"], torch.eye(3, dtype=ds[(epoch, i)]["M"].dtype))
        a, b = ds[(2, i)], plain[(2, i)]
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["boxes"], b["boxes"])


def test_strong_labeled_views_start_at_their_epoch_and_keep_the_boxes(data):
    """``aug.strong_labeled_p``: before ``strong_from_epoch`` the labeled views are those of a run
    without the option (a forked burn-in stays valid); after it the pixels change, the boxes not."""
    from ssod.training.data.views import labeled_strong

    geo = dict(flip_p=0.5, scale=(0.5, 1.5), translate=0.1, degrees=0.0, shear=0.0)
    plain = LabeledDataset(data["labeled"], S, LabeledAug(**geo), train=True, seed=3)
    strong = LabeledDataset(data["labeled"], S, LabeledAug(
        **geo, strong=labeled_strong({}, geo), strong_p=1.0, strong_from_epoch=2), train=True, seed=3)
    assert labeled_strong({}, geo).cutouts == ()
    changed = 0
    for i in (0, 1, 4, 5):
        for epoch in (0, 1):
            a, b = plain[(epoch, i)], strong[(epoch, i)]
            assert torch.equal(a["img"], b["img"]) and torch.equal(a["boxes"], b["boxes"])
        a, b = plain[(2, i)], strong[(2, i)]
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["cls"], b["cls"])
        changed += not torch.equal(a["img"], b["img"])
    assert changed >= 3
