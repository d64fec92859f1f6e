"""Augmented views: recorded matrices must say exactly where the pixels went."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssod.config import resolve_config
from ssod.training.data.views import (
    BLUR_REF_PX,
    StrongAug,
    WeakAug,
    blur_kernel_size,
    clip_boxes,
    filter_boxes,
    gaussian_blur,
    letterbox_matrix,
    make_weak_strong,
    mixup,
    mosaic4,
    mosaic_view,
    random_affine_matrix,
    shrink,
    strong_aug,
    strong_photometric,
    transform_boxes,
    valid_boxes,
    warp,
)
from ssod.training.pseudo_geometry import clip_and_filter, map_boxes

NO_PHOTO = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, cutouts=())


def white_box_image(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return img


def white_bbox(view: np.ndarray) -> np.ndarray:
    """xyxy (corner coordinates) of the pixels that are mostly white."""
    ys, xs = np.nonzero(view[..., 0] > 127)
    assert len(xs), "the white box vanished from the view"
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("degrees,shear,tol", [(0.0, 0.0, 1.0), (10.0, 5.0, 1.5)])
def test_box_follows_weak_and_strong_views(degrees, shear, tol):
    h, w, S = 90, 120, 128
    box = (30, 20, 70, 50)
    img = white_box_image(h, w, box)
    weak = WeakAug(flip_p=0.5, scale=(0.8, 1.2))
    strong = StrongAug(flip_p=0.5, scale=(0.5, 1.5), translate=0.1, degrees=degrees, shear=shear, **NO_PHOTO)
    gt = np.array([box], np.float32)
    flips = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        wv, Mw, sv, Ms = make_weak_strong(img, S, weak, strong, rng)
        assert wv.shape == sv.shape == (S, S, 3) and Mw.shape == Ms.shape == (3, 3)
        flips.update({bool(Mw[0, 0] < 0), bool(Ms[0, 0] < 0)})
        for view, M in ((wv, Mw), (sv, Ms)):
            expected = clip_boxes(transform_boxes(gt, M), S)[0]
            np.testing.assert_allclose(white_bbox(view), expected, atol=tol)
        # weak -> strong through the recorded matrices (what pseudo-labels do)
        weak_box = torch.from_numpy(transform_boxes(gt, Mw))
        to_strong = map_boxes(
            weak_box, torch.zeros(1, dtype=torch.long),
            torch.from_numpy(Mw).float()[None], torch.from_numpy(Ms).float()[None],
        )
        clipped, keep = clip_and_filter(to_strong, S)
        assert keep.item()
        np.testing.assert_allclose(clipped[0].numpy(), white_bbox(sv), atol=tol)
    assert flips == {True, False}, "seeds did not exercise both flipped and unflipped views"


def test_flip_only_is_an_exact_mirror():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    M = random_affine_matrix(64, 64, 64, np.random.default_rng(0), flip_p=1.0)
    np.testing.assert_allclose(M, [[-1, 0, 64], [0, 1, 0], [0, 0, 1]], atol=1e-9)
    np.testing.assert_array_equal(warp(img, M, 64), img[:, ::-1])
    np.testing.assert_allclose(transform_boxes(np.array([[10, 5, 20, 30]]), M), [[44, 5, 54, 30]])


def test_letterbox_matches_ultralytics():
    from ultralytics.data.augment import LetterBox

    for h, w, S in [(50, 100, 200), (77, 131, 64), (131, 77, 96), (64, 64, 64)]:
        p = LetterBox(new_shape=(S, S), auto=False, scaleup=True).get_params({"img": np.zeros((h, w, 3))})
        M = letterbox_matrix(h, w, S)
        np.testing.assert_allclose(M[0], [p["ratio"][0], 0, p["left"]])
        np.testing.assert_allclose(M[1], [0, p["ratio"][1], p["top"]])


def test_scale_only_view():
    h, w, S = 50, 100, 200
    img = white_box_image(h, w, (40, 10, 60, 40))
    M_lb = letterbox_matrix(h, w, S)
    np.testing.assert_allclose(M_lb, [[2, 0, 0], [0, 2, 50], [0, 0, 1]])
    M = random_affine_matrix(h, w, S, np.random.default_rng(1), flip_p=0.0, scale=(0.5, 0.5))
    # half scale about the canvas centre (100, 100) on top of the letterbox
    np.testing.assert_allclose(M, [[1, 0, 50], [0, 1, 75], [0, 0, 1]], atol=1e-9)
    box = transform_boxes(np.array([[40, 10, 60, 40]]), M)[0]
    np.testing.assert_allclose(box, [90, 85, 110, 115])
    np.testing.assert_allclose(white_bbox(warp(img, M, S)), box, atol=1.0)


def test_shrunk_source_keeps_matrices_of_the_original():
    h, w, S = 300, 400, 64
    img = white_box_image(h, w, (100, 60, 300, 240))
    small = shrink(img, S)
    assert max(small.shape[:2]) == S
    rng = np.random.default_rng(3)
    wv, Mw, sv, Ms = make_weak_strong(small, S, WeakAug(), StrongAug(**NO_PHOTO), rng, orig_hw=(h, w))
    for view, M in ((wv, Mw), (sv, Ms)):
        expected = clip_boxes(transform_boxes(np.array([[100, 60, 300, 240]]), M), S)[0]
        np.testing.assert_allclose(white_bbox(view), expected, atol=1.0)


def test_strong_geometry_weak_takes_the_weak_views_geometry_at_imgsz():
    """``aug.strong_geometry: weak`` (SED's strong view): the strong view is the weak view's flip and
    letterbox at imgsz (the weak one may be larger: the teacher's scale), not a draw of its own
    (same seed, independent geometry: another view); a typo in the mode is an error."""
    h, w, S, big = 90, 120, 64, 80
    img = white_box_image(h, w, (30, 20, 70, 50))
    aug = {"strong_geometry": "weak", "strong_cutout": False, "strong_color_p": 0.0, "strong_gray_p": 0.0,
           "strong_blur_p": 0.0}
    geo = dict(flip_p=0.5, scale=(0.5, 1.5), translate=0.1)
    strong = strong_aug(aug, geo)
    assert strong.geometry_from_weak and not strong_aug({}, geo).geometry_from_weak
    flips = set()
    for seed in range(6):
        wv, Mw, sv, Ms = make_weak_strong(img, S, WeakAug(), strong, np.random.default_rng(seed), weak_size=big)
        np.testing.assert_allclose(Ms, np.diag([S / big, S / big, 1.0]) @ Mw, atol=1e-9)
        flips.add(bool(Ms[0, 0] < 0))
        expected = clip_boxes(transform_boxes(np.array([[30, 20, 70, 50]]), Ms), S)[0]
        np.testing.assert_allclose(white_bbox(sv), expected, atol=1.0)
    assert flips == {True, False}
    photo = {**aug, "strong_color_p": 1.0, "strong_blur_p": 1.0}
    a = make_weak_strong(img, S, WeakAug(), strong_aug(photo, geo), np.random.default_rng(0), weak_size=big)[2]
    b = make_weak_strong(img, S, WeakAug(), strong_aug({**photo, "strong_geometry": "independent"}, geo),
                         np.random.default_rng(0), weak_size=big)[2]
    assert a.shape == b.shape and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="strong_geometry"):
        strong_aug({"strong_geometry": "same"}, geo)


def test_boxes_leaving_the_image_are_dropped():
    S = 100
    boxes = np.array([[10, 10, 30, 30], [80, 40, 98, 60], [60, 0, 70, 10], [0, 0, 0.5, 50]], np.float32)
    cls = np.array([0, 1, 2, 3])
    M = np.array([[1, 0, 35], [0, 1, 0], [0, 0, 1]], np.float64)  # shift right by 35 px
    kept, kept_cls = filter_boxes(boxes, cls, M, S)
    # box 1 is pushed out entirely, box 2 keeps 5/10 of its width (visible), box 3 is too thin
    np.testing.assert_array_equal(kept_cls, [0, 2])
    np.testing.assert_allclose(kept, [[45, 10, 65, 30], [95, 0, 100, 10]])
    mapped = transform_boxes(boxes, M)
    keep = valid_boxes(mapped, clip_boxes(mapped, S), min_visible=0.6)
    np.testing.assert_array_equal(keep, [True, False, False, False])
    # the torch twin agrees
    t_clip, t_keep = clip_and_filter(torch.from_numpy(mapped), S)
    np.testing.assert_array_equal(t_keep.numpy(), [True, False, True, False])
    np.testing.assert_allclose(t_clip[t_keep].numpy(), kept)


def test_map_boxes_round_trip_and_empty():
    rng = np.random.default_rng(0)
    Ms = torch.from_numpy(np.stack([
        random_affine_matrix(80, 120, 96, rng, 0.5, (0.5, 1.5), 0.1) for _ in range(3)
    ])).float()
    Mo = torch.from_numpy(np.stack([
        random_affine_matrix(80, 120, 96, rng, 0.5, (0.5, 1.5), 0.1) for _ in range(3)
    ])).float()
    xy = torch.rand(7, 2) * 60
    boxes = torch.cat([xy, xy + torch.rand(7, 2) * 30 + 1], 1)
    bidx = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    there = map_boxes(boxes, bidx, Ms, Mo)
    back = map_boxes(there, bidx, Mo, Ms)
    torch.testing.assert_close(back, boxes, atol=1e-3, rtol=0)
    # matches the numpy path per image
    for b in range(3):
        m = bidx == b
        T = (Mo[b].double() @ torch.linalg.inv(Ms[b].double())).numpy()
        np.testing.assert_allclose(there[m].numpy(), transform_boxes(boxes[m].numpy(), T), atol=1e-3)
    empty = map_boxes(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), Ms, Mo)
    assert empty.shape == (0, 4)


def test_colour_ops_change_colours_not_geometry():
    S = 64
    img = np.empty((S, S, 3), np.uint8)
    img[:] = (30, 60, 90)
    img[10:30, 20:50] = (200, 100, 50)
    inside = np.zeros((S, S), bool)
    inside[10:30, 20:50] = True
    aug = StrongAug(color_jitter_p=1.0, grayscale_p=0.5, blur_p=0.0, cutouts=())
    changed = 0
    for seed in range(8):
        out = strong_photometric(img, aug, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        # every pixel of one input colour has one output colour: nothing moved
        for region in (inside, ~inside):
            vals = out[region].reshape(-1, 3)
            assert (vals == vals[0]).all()
        assert (out[inside][0] != out[~inside][0]).any()
        changed += int((out != img).any())
    assert changed >= 6


def test_blur_spreads_symmetrically_and_kernel_scales():
    assert blur_kernel_size(1000) == 23 and blur_kernel_size(640) == 15 and blur_kernel_size(64) == 3
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(32, 2000, 37))
    S = 128
    img = white_box_image(S, S, (40, 50, 80, 70))
    sigma = 2.0 * BLUR_REF_PX / S  # 2 px on this 128 px view
    aug = StrongAug(color_jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_sigma=(sigma, sigma), cutouts=())
    out = strong_photometric(img, aug, np.random.default_rng(0))
    assert not np.array_equal(out, img)
    ys, xs = np.nonzero(out[..., 0] > 0)
    r = blur_kernel_size(S) // 2
    np.testing.assert_array_equal([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [40 - r, 50 - r, 80 + r, 70 + r])
    wts = out[..., 0].astype(np.float64)
    yy, xx = np.mgrid[:S, :S]
    np.testing.assert_allclose([(wts * xx).sum() / wts.sum(), (wts * yy).sum() / wts.sum()], [59.5, 59.5], atol=0.05)


def test_blur_sigma_is_relative_to_sed_image_size():
    """SED's sigma refers to ~1000 px images: the same setting blurs a smaller view proportionally less."""
    aug = StrongAug(color_jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_sigma=(2.0, 2.0), cutouts=())
    for S in (128, 1000):
        img = white_box_image(S, S, (S // 4, S // 3, S // 2, S // 2))
        out = strong_photometric(img, aug, np.random.default_rng(0))
        np.testing.assert_array_equal(out, gaussian_blur(img, 2.0 * S / BLUR_REF_PX, blur_kernel_size(S)))
    assert BLUR_REF_PX == 1000


def test_strong_aug_reads_the_config():
    cfg = resolve_config(None)
    geo = dict(flip_p=0.5, scale=(0.5, 1.5), translate=0.1, degrees=0.0, shear=0.0)
    assert strong_aug(cfg["aug"], geo) == StrongAug(**geo)  # the config's defaults are SED's
    aug = {**cfg["aug"], "strong_blur_p": 0.0, "strong_gray_p": 0.0, "strong_cutout": False,
           "strong_color_p": 0.3, "strong_blur_sigma": [0.5, 1.0]}
    s = strong_aug(aug, geo)
    assert (s.blur_p, s.grayscale_p, s.cutouts, s.color_jitter_p, s.blur_sigma) == (0.0, 0.0, (), 0.3, (0.5, 1.0))
    old_run = {k: v for k, v in cfg["aug"].items() if not k.startswith("strong_")}  # saved before the keys existed
    assert strong_aug(old_run, geo) == StrongAug(**geo)


def test_cutout_erases_a_rectangle_inside_the_range():
    S = 64
    img = np.zeros((S, S, 3), np.uint8)
    aug = StrongAug(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, cutouts=((1.0, (0.05, 0.2), (0.3, 3.3)),))
    hit = 0
    for seed in range(10):
        out = strong_photometric(img, aug, np.random.default_rng(seed))
        ys, xs = np.nonzero(out[..., 0] != 0)
        if len(xs) == 0:  # the random gray was 0
            continue
        hit += 1
        area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        assert area == len(xs)  # a solid rectangle
        assert 0.04 * S * S <= area <= 0.21 * S * S
    assert hit >= 8


def test_mosaic_boxes_stay_inside_and_on_their_objects():
    S = 96
    rng = np.random.default_rng(0)
    sizes = [(60, 80), (100, 50), (64, 64), (40, 120)]
    images, boxes, classes = [], [], []
    for k, (h, w) in enumerate(sizes):
        x1, y1 = w // 4, h // 4
        images.append(white_box_image(h, w, (x1, y1, x1 + w // 2, y1 + h // 2)))
        boxes.append(np.array([[x1, y1, x1 + w // 2, y1 + h // 2]], np.float32))
        classes.append(np.array([k]))
    n_boxes = 0
    for seed in range(10):
        img, b, c = mosaic4(images, boxes, classes, S, np.random.default_rng(seed))
        assert img.shape == (S, S, 3) and b.dtype == np.float32 and c.dtype == np.int64
        assert len(b) == len(c) <= 4
        assert (b >= 0).all() and (b <= S).all()
        for x1, y1, x2, y2 in b:
            patch = img[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1, 0]
            assert patch.size == 0 or patch.mean() > 200
        n_boxes += len(b)
    assert n_boxes >= 10  # the window shows about a quarter of each image: 16 of the 40 boxes at these seeds
    with pytest.raises(ValueError, match="exactly 4"):
        mosaic4(images[:3], boxes[:3], classes[:3], S, rng)


def test_mosaic_keeps_object_scale_and_follows_its_view():
    """Ultralytics' mosaic: at view scale 1 an object is drawn at the size the image's long-side-
    ``imgsz`` resize gives it (the old halved canvas drew it at half); a flip / scale view moves
    the boxes and the pixels together."""
    S = 128
    h, w = 64, 128  # r = S / 128 = 1: the 32 x 16 box stays 32 x 16
    box = (48, 24, 80, 40)
    images = [white_box_image(h, w, box) for _ in range(4)]
    boxes = [np.array([box], np.float32)] * 4
    classes = [np.array([k]) for k in range(4)]
    sizes = []
    for seed in range(20):
        _, b, _ = mosaic4(images, boxes, classes, S, np.random.default_rng(seed))
        full = (b[:, 0] > 0) & (b[:, 1] > 0) & (b[:, 2] < S) & (b[:, 3] < S)
        sizes += [(x2 - x1, y2 - y1) for x1, y1, x2, y2 in b[full]]
    assert sizes and np.allclose(sizes, (32, 16), atol=1e-3)
    rng = np.random.default_rng(3)
    affine = random_affine_matrix(S, S, S, rng, flip_p=1.0, scale=(0.5, 0.5))
    for seed in range(5):
        img, b, c = mosaic4(images, boxes, classes, S, np.random.default_rng(seed), view=mosaic_view(S, affine))
        inside = b[(b[:, 0] > 0) & (b[:, 2] < S)]
        assert len(inside) and np.allclose(inside[:, 2] - inside[:, 0], 16, atol=1e-3)  # scale 0.5
        for x1, y1, x2, y2 in b:
            patch = img[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1, 0]
            assert patch.size == 0 or patch.mean() > 200


def test_mixup_blends_and_concatenates():
    a = np.full((8, 8, 3), 200, np.uint8)
    b = np.zeros((8, 8, 3), np.uint8)
    img, boxes, cls = mixup(a, np.ones((1, 4)), np.array([1]), b, np.zeros((2, 4)), np.array([2, 3]),
                            np.random.default_rng(0))
    assert 60 < img.mean() < 140 and boxes.shape == (3, 4) and cls.tolist() == [1, 2, 3]


def test_cutouts_report_the_rectangles_they_erase():
    """``erased`` receives every cutout rectangle (xyxy, gray level); inside each the image is that gray."""
    img = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    aug = StrongAug(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                    cutouts=((1.0, (0.05, 0.1), (0.5, 2.0)), (1.0, (0.05, 0.1), (0.5, 2.0))))
    for seed in range(4):
        erased: list = []
        out = strong_photometric(img, aug, np.random.default_rng(seed), erased)
        assert len(erased) == 2
        assert np.array_equal(out, strong_photometric(img, aug, np.random.default_rng(seed)))  # same draws
        changed = np.zeros(img.shape[:2], bool)
        for x1, y1, x2, y2, gray in reversed(erased):  # a later cutout may cover part of an earlier one
            region = np.zeros(img.shape[:2], bool)
            region[int(y1):int(y2), int(x1):int(x2)] = True
            own = out[region & ~changed]
            assert region.any() and (own == gray).all()
            changed |= region
        assert np.array_equal(out[~changed], img[~changed])  # nothing outside them moved
