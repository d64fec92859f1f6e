"""Augmented views of one image, each with the 3x3 matrix that made it.

Every geometric augmentation is a single affine matrix ``M`` mapping *original image* pixels
to *view* pixels (a square ``imgsz`` canvas, see ``batch.py``), so boxes move between the
original, the weak view and the strong view with matrix algebra instead of by replaying
augmentations. Photometric operations never change geometry, which keeps the matrices exact.

Coordinates are continuous "corner" coordinates: pixel ``i`` covers ``[i, i+1)``, so a box
``(0, 0, w, h)`` is the whole image. ``warp`` converts to OpenCV's pixel-centre convention.

Everything here is numpy + OpenCV (it runs in DataLoader workers) and every random choice
comes from the ``np.random.Generator`` passed in, so a view is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

PAD_VALUE = 114  # ultralytics letterbox gray

__all__ = [
    "PAD_VALUE", "Rect", "WeakAug", "GeometryAug", "StrongAug", "LabeledAug",
    "letterbox_matrix", "random_affine_matrix", "warp",
    "transform_boxes", "clip_boxes", "valid_boxes", "filter_boxes",
    "color_jitter", "to_grayscale", "blur_kernel_size", "gaussian_blur", "cutout",
    "strong_photometric", "augment_hsv",
    "shrink", "source_matrix", "make_weak_strong", "mosaic4", "mosaic_view", "mixup",
]


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@dataclass
class WeakAug:
    """The teacher's view: letterbox + horizontal flip (+ optional mild scale)."""

    flip_p: float = 0.5
    scale: tuple[float, float] = (1.0, 1.0)


# One cutout pass: (probability, area fraction range, aspect ratio range) as in
# torchvision.transforms.RandomErasing(p, scale, ratio).
Cutout = tuple[float, tuple[float, float], tuple[float, float]]


@dataclass
class GeometryAug:
    """Random affine geometry shared by the student's strong view and the labeled branch, so both
    see the same kind of geometry (the trainer sets both from one config block)."""

    flip_p: float = 0.5
    scale: tuple[float, float] = (0.5, 1.5)
    translate: float = 0.1
    degrees: float = 0.0
    shear: float = 0.0


@dataclass
class StrongAug(GeometryAug):
    """The student's view: geometric jitter plus photometric noise.

    The photometric values (colour jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2,
    Gaussian blur sigma 0.1-2.0 with p=0.5, and the three cutout passes) are taken from the
    SED paper (Guo et al., "Scale-Equivalent Distillation for Semi-Supervised Object
    Detection", CVPR 2022), appendix table 2. Cutouts fill with one random gray level per
    rectangle (see ``cutout``). ``blur_sigma`` is in pixels of a ``BLUR_REF_PX`` canvas, the
    size of the images SED blurred, and scales with the view like the kernel does.
    """

    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutouts: tuple[Cutout, ...] = (
        (0.7, (0.05, 0.2), (0.3, 3.3)),
        (0.5, (0.02, 0.2), (0.1, 6.0)),
        (0.3, (0.02, 0.2), (0.05, 8.0)),
    )
    # True: draw the cutouts but leave painting them to the trainer, which skips those that would
    # hide a pseudo-labeled object (``pseudo_geometry.spare_objects``); the random draws are the same
    cutouts_deferred: bool = False
    # True: the strong view takes the weak view's geometry (flip, letterbox) at imgsz instead of a
    # draw of its own, SED's strong view ("without any geometric augmentation", appendix table 2):
    # the teacher's view is then always the larger one, which SED's scale argument asks for
    geometry_from_weak: bool = False


CUTOUT_MODES = (True, False, "spare_objects")


def strong_aug(aug: dict, geo: dict) -> StrongAug:
    """The strong view from the config's ``aug`` block (``strong_*`` keys) and shared geometry.
    A key missing (a run saved before the key existed, resumed) keeps ``StrongAug``'s default."""
    d = StrongAug
    mode = aug.get("strong_cutout", True)
    if mode not in CUTOUT_MODES:
        raise ValueError(f"aug.strong_cutout: {mode!r} is not one of true, false, spare_objects")
    return StrongAug(
        **geo, color_jitter_p=aug.get("strong_color_p", d.color_jitter_p),
        grayscale_p=aug.get("strong_gray_p", d.grayscale_p), blur_p=aug.get("strong_blur_p", d.blur_p),
        blur_sigma=tuple(aug.get("strong_blur_sigma", d.blur_sigma)),
        cutouts=d.cutouts if mode else (), cutouts_deferred=mode == "spare_objects",
        geometry_from_weak=_strong_geometry(aug) == "weak",
    )


STRONG_GEOMETRIES = ("independent", "weak")


def labeled_strong(aug: dict, geo: dict) -> StrongAug:
    """The strong chain labeled images get (``aug.strong_labeled_p``): the unlabeled strong view's
    colour jitter, grayscale and blur, without its cutouts.

    Why: Unbiased Teacher trains its supervised loss on strong labeled views as well, and Soft
    Teacher's labeled pipeline carries its colour transforms, so the student's two streams meet
    the same photometric distribution (what Efficient Teacher's domain discriminator aligns in
    feature space). Cutouts are left out (Soft Teacher's choice): on labeled images they would hide
    ground-truth boxes that then need dropping, and the labels are the scarce part.
    """
    return replace(strong_aug({**aug, "strong_cutout": False}, geo), geometry_from_weak=False)


def _strong_geometry(aug: dict) -> str:
    mode = aug.get("strong_geometry", "independent")
    if mode not in STRONG_GEOMETRIES:
        raise ValueError(f"aug.strong_geometry: {mode!r} is not one of {', '.join(STRONG_GEOMETRIES)}")
    return mode


@dataclass
class LabeledAug(GeometryAug):
    """Supervised-branch augmentation: geometry like ``StrongAug`` plus ultralytics-style HSV.

    ``mosaic_p``/``mixup_p`` are available but off by default, so labeled images have the
    same kind of geometry as the strong unlabeled view; turn them on for extra regularisation.
    Mosaic stops at epoch ``mosaic_until_epoch`` (ultralytics' ``close_mosaic``: the last epochs
    train on whole images, as validation and the teacher see them).
    """

    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    mosaic_p: float = 0.0
    mosaic_until_epoch: int = 2**31 - 1
    mixup_p: float = 0.0
    mixup_alpha: float = 32.0
    # the student's strong photometric chain on labeled images too, with probability strong_p from
    # epoch strong_from_epoch on (the end of burn-in: a forked run's burn-in stays the one it forked)
    strong: StrongAug | None = None
    strong_p: float = 0.0
    strong_from_epoch: int = 0


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def letterbox_matrix(h: int, w: int, imgsz: int) -> np.ndarray:
    """Original -> letterboxed canvas, exactly as ultralytics ``LetterBox`` (center, scaleup).

    scale ``r = min(imgsz/h, imgsz/w)``; the padding is split in two and rounded the same way
    (``round(d/2 - 0.1)`` on the top/left) so boxes agree with ultralytics/deploy preprocessing.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"letterbox_matrix: image size must be positive, got h={h}, w={w}")
    r = min(imgsz / h, imgsz / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    left = round((imgsz - new_w) / 2 - 0.1)
    top = round((imgsz - new_h) / 2 - 0.1)
    return np.array([[r, 0.0, left], [0.0, r, top], [0.0, 0.0, 1.0]], dtype=np.float64)


def random_affine_matrix(
    h: int,
    w: int,
    imgsz: int,
    rng: np.random.Generator,
    flip_p: float = 0.5,
    scale: tuple[float, float] = (1.0, 1.0),
    translate: float = 0.0,
    degrees: float = 0.0,
    shear: float = 0.0,
) -> np.ndarray:
    """Letterbox, then a random flip/scale/shear/rotation about the canvas centre and a shift.

    ``translate`` is a fraction of ``imgsz``, ``degrees``/``shear`` are maximum angles in
    degrees. The draws happen in a fixed order so the same rng state gives the same matrix.
    """
    flip = rng.random() < flip_p
    s = rng.uniform(scale[0], scale[1])
    a = math.radians(rng.uniform(-degrees, degrees))
    shx = math.tan(math.radians(rng.uniform(-shear, shear)))
    shy = math.tan(math.radians(rng.uniform(-shear, shear)))
    tx, ty = rng.uniform(-translate, translate, size=2) * imgsz

    c = imgsz / 2.0
    to_centre = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]], dtype=np.float64)
    flip_m = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    scale_m = np.diag([s, s, 1.0])
    shear_m = np.array([[1, shx, 0], [shy, 1, 0], [0, 0, 1]], dtype=np.float64)
    cos, sin = math.cos(a), math.sin(a)
    rot_m = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], dtype=np.float64)
    back = np.array([[1, 0, c + tx], [0, 1, c + ty], [0, 0, 1]], dtype=np.float64)
    aug = back @ rot_m @ shear_m @ scale_m @ flip_m @ to_centre
    return aug @ letterbox_matrix(h, w, imgsz)


def warp(img: np.ndarray, M: np.ndarray, imgsz: int, pad_value: int = PAD_VALUE) -> np.ndarray:
    """Render the view ``M`` of ``img`` on an ``imgsz`` square canvas (bilinear, gray border).

    ``M`` is in corner coordinates; OpenCV samples at pixel centres, so the matrix handed to
    ``cv2.warpAffine`` is ``T(-0.5) @ M @ T(+0.5)``. This keeps warped content aligned with
    ``transform_boxes`` and a pure letterbox geometrically equal to ``cv2.resize`` + padding; the
    interpolated pixel values still differ slightly from ``cv2.resize`` (measured: mean 1.2/255),
    which is why ``ssod eval`` and the deployed runtime can differ by ~0.2 AP points.
    """
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=np.float64)
    unshift = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]], dtype=np.float64)
    W = (unshift @ np.asarray(M, dtype=np.float64) @ shift)[:2]
    return cv2.warpAffine(
        img, W, (imgsz, imgsz), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(pad_value,) * 3,
    )


def transform_boxes(boxes: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Map xyxy boxes through ``M``: transform the 4 corners, take their min/max."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = boxes.T
    xs = np.stack([x1, x2, x2, x1], axis=1)  # (n, 4)
    ys = np.stack([y1, y1, y2, y2], axis=1)
    M = np.asarray(M, dtype=np.float64)
    tx = M[0, 0] * xs + M[0, 1] * ys + M[0, 2]
    ty = M[1, 0] * xs + M[1, 1] * ys + M[1, 2]
    out = np.stack([tx.min(1), ty.min(1), tx.max(1), ty.max(1)], axis=1)
    return out.astype(np.float32)


def clip_boxes(boxes: np.ndarray, imgsz: int) -> np.ndarray:
    """Clip xyxy boxes to the ``[0, imgsz]`` canvas."""
    return np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0.0, float(imgsz))


def valid_boxes(
    mapped: np.ndarray, clipped: np.ndarray, min_size: float = 2.0, min_visible: float = 0.25
) -> np.ndarray:
    """Keep mask: boxes still at least ``min_size`` px wide/high after clipping and with at
    least ``min_visible`` of their mapped (unclipped) area inside the canvas."""
    mapped = np.asarray(mapped, dtype=np.float64).reshape(-1, 4)
    clipped = np.asarray(clipped, dtype=np.float64).reshape(-1, 4)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area_m = (mapped[:, 2] - mapped[:, 0]) * (mapped[:, 3] - mapped[:, 1])
    area_c = cw * ch
    visible = area_c >= min_visible * area_m
    return (cw >= min_size) & (ch >= min_size) & (area_m > 0) & visible


def filter_boxes(
    boxes: np.ndarray, cls: np.ndarray, M: np.ndarray, imgsz: int,
    min_size: float = 2.0, min_visible: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Map boxes through ``M``, clip to the canvas and drop the ones that left it."""
    mapped = transform_boxes(boxes, M)
    clipped = clip_boxes(mapped, imgsz)
    keep = valid_boxes(mapped, clipped, min_size, min_visible)
    return clipped[keep], np.asarray(cls, dtype=np.int64).reshape(-1)[keep]


# ---------------------------------------------------------------------------------------------
# Photometric (pixel values only: shape and geometry never change)
# ---------------------------------------------------------------------------------------------
def _lut(img: np.ndarray, gain: float, offset: float = 0.0) -> np.ndarray:
    """``clip(gain * x + offset)`` for every uint8 value, as one table lookup."""
    table = np.clip(np.arange(256, dtype=np.float32) * gain + offset + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(img, table)


def color_jitter(
    img: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """torchvision ``ColorJitter`` semantics on an RGB uint8 image (ops in random order).

    Like torchvision on uint8 tensors each op rounds back to uint8; brightness/contrast are
    lookup tables and saturation one ``addWeighted`` so a 640 px view costs a few ms.
    """
    fb = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
    fc = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    fs = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
    fh = rng.uniform(-hue, hue)
    out = img
    for k in rng.permutation(4):
        if k == 0:
            out = _lut(out, fb)
        elif k == 1:  # blend with the mean luma (torchvision adjust_contrast)
            mean = float(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY).mean())
            out = _lut(out, fc, (1 - fc) * mean)
        elif k == 2:  # blend with the grayscale image (adjust_saturation)
            gray = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            out = cv2.addWeighted(out, fs, gray, 1 - fs, 0.0)
        elif round(fh * 180) % 180:  # rotate the hue circle (OpenCV uint8 H is in [0, 180))
            hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
            table = ((np.arange(256) + round(fh * 180)) % 180).astype(np.uint8)
            hsv[..., 0] = table[hsv[..., 0]]
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return out


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """Three-channel grayscale (keeps the tensor layout the model expects)."""
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[..., None], 3, axis=2)


BLUR_REF_PX = 1000  # SED blurs 800-1333 px images: its 23 px kernel and 0.1-2.0 px sigma refer to ~1000 px


def blur_kernel_size(imgsz: int) -> int:
    """Odd Gaussian kernel size scaled from SED's 23 px at ~1000 px images.

    SED blurs 800-1333 px images with a 23 px kernel; the kernel truncates the Gaussian, so it
    bounds how far (relative to the image) the blur can smear. Keeping ``23 * imgsz / 1000``
    keeps that relative extent on our smaller canvases (a 23 px kernel at 64 px would wipe out
    a third of the image), with a floor of 3.
    """
    k = int(round(23 * imgsz / BLUR_REF_PX))
    k = max(3, k)
    return k if k % 2 == 1 else k + 1


def gaussian_blur(img: np.ndarray, sigma: float, ksize: int) -> np.ndarray:
    return cv2.GaussianBlur(img, (ksize, ksize), sigmaX=sigma, sigmaY=sigma)


Rect = tuple[float, float, float, float, float]  # x1, y1, x2, y2 (pixels), gray level 0-255


def cutout(
    img: np.ndarray, area: tuple[float, float], ratio: tuple[float, float],
    rng: np.random.Generator, erased: list[Rect] | None = None, paint: bool = True,
) -> np.ndarray:
    """Erase one random rectangle (RandomErasing's area/aspect sampling, 10 tries).

    The fill is one uniformly random gray level per rectangle: a constant patch hides the
    content like torchvision's per-pixel noise does, costs nothing and, unlike the dataset
    mean (~114, the pad colour), cannot be confused with the letterbox border. The erased
    rectangle (xyxy pixels and its gray level) is appended to ``erased`` when given, so that
    pseudo boxes it hides can be dropped (``pseudo.weak_to_strong``): a label on a gray patch
    teaches hallucination. ``paint=False`` only draws and records it (deferred cutouts).
    """
    H, W = img.shape[:2]
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        a = rng.uniform(area[0], area[1]) * H * W
        r = math.exp(rng.uniform(*log_r))
        h = int(round(math.sqrt(a * r)))
        w = int(round(math.sqrt(a / r)))
        if 0 < h < H and 0 < w < W:
            y = int(rng.integers(0, H - h + 1))
            x = int(rng.integers(0, W - w + 1))
            gray = int(rng.integers(0, 256))
            if erased is not None:
                erased.append((float(x), float(y), float(x + w), float(y + h), float(gray)))
            if not paint:
                return img
            out = img.copy()
            out[y:y + h, x:x + w] = gray
            return out
    return img


def strong_photometric(
    img: np.ndarray, aug: StrongAug, rng: np.random.Generator, erased: list[Rect] | None = None,
) -> np.ndarray:
    """SED's photometric chain: colour jitter, grayscale, blur, then the cutout passes (their
    rectangles appended to ``erased`` when given)."""
    if rng.random() < aug.color_jitter_p:
        img = color_jitter(img, aug.brightness, aug.contrast, aug.saturation, aug.hue, rng)
    if rng.random() < aug.grayscale_p:
        img = to_grayscale(img)
    if rng.random() < aug.blur_p:
        # SED's sigma is in ~1000 px pixels: unscaled, sigma 2 on a 160 px view smears as much
        # of the image as sigma 12.5 would on SED's, and wipes out objects a few cells wide
        size = max(img.shape[:2])
        sigma = rng.uniform(*aug.blur_sigma) * size / BLUR_REF_PX
        img = gaussian_blur(img, sigma, blur_kernel_size(size))
    for p, area, ratio in aug.cutouts:
        if rng.random() < p:
            img = cutout(img, area, ratio, rng, erased, paint=not aug.cutouts_deferred)
    return img


def augment_hsv(
    img: np.ndarray, hgain: float, sgain: float, vgain: float, rng: np.random.Generator
) -> np.ndarray:
    """ultralytics' HSV gain jitter (RGB input) for labeled images."""
    if not (hgain or sgain or vgain):
        return img
    r = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * r[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
    hsv = cv2.merge((cv2.LUT(h, lut_h), cv2.LUT(s, lut_s), cv2.LUT(v, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


# ---------------------------------------------------------------------------------------------
# Composite views
# ---------------------------------------------------------------------------------------------
def shrink(img: np.ndarray, imgsz: int) -> np.ndarray:
    """Downscale (INTER_AREA) so the long side is at most ``imgsz``, as ultralytics'
    ``load_image`` does: warping a large photo straight to a small canvas with bilinear
    sampling aliases badly. Never enlarges."""
    h, w = img.shape[:2]
    r = imgsz / max(h, w)
    if r >= 1:
        return img
    size = (max(round(w * r), 1), max(round(h * r), 1))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def source_matrix(img: np.ndarray, orig_hw: tuple[int, int] | None) -> np.ndarray:
    """Pixels of ``img`` -> pixels of the original when ``img`` is a resized copy of it."""
    if orig_hw is None:
        return np.eye(3)
    h, w = img.shape[:2]
    return np.diag([orig_hw[1] / w, orig_hw[0] / h, 1.0])


def make_weak_strong(
    img: np.ndarray,
    imgsz: int,
    weak: WeakAug,
    strong: StrongAug,
    rng: np.random.Generator,
    orig_hw: tuple[int, int] | None = None,
    erased: list[Rect] | None = None,
    weak_size: int | None = None,
    weak_src: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two independent geometric draws from the original; the strong one also gets the
    photometric chain. Returns ``(weak_img, M_weak, strong_img, M_strong)``; the strong view's
    cutout rectangles are appended to ``erased`` when given.

    ``img`` may be a resized copy (``shrink``) of an original of size ``orig_hw``; the
    matrices always refer to the original's pixels. ``weak_size`` (default ``imgsz``) is the
    weak view's side, drawn from ``weak_src`` (default ``img``; another resized copy of the same
    original, e.g. a less shrunk one for a larger weak view). The random draws do not depend on
    either, so the strong view is the same whatever the weak view's size.
    """
    h, w = orig_hw if orig_hw is not None else img.shape[:2]
    weak_size = int(weak_size or imgsz)
    weak_src = img if weak_src is None else weak_src
    M_weak = random_affine_matrix(h, w, weak_size, rng, weak.flip_p, weak.scale)
    M_strong = random_affine_matrix(
        h, w, imgsz, rng, strong.flip_p, strong.scale, strong.translate, strong.degrees,
        strong.shear,
    )
    if strong.geometry_from_weak:  # the draw above still happens: the photometric draws stay the same
        M_strong = np.diag([imgsz / weak_size, imgsz / weak_size, 1.0]) @ M_weak
    weak_img = warp(weak_src, M_weak @ source_matrix(weak_src, orig_hw), weak_size)
    src = source_matrix(img, orig_hw)
    strong_img = strong_photometric(warp(img, M_strong @ src, imgsz), strong, rng, erased)
    return weak_img, M_weak, strong_img, M_strong


def mosaic4(
    images: list[np.ndarray],
    boxes_list: list[np.ndarray],
    cls_list: list[np.ndarray],
    imgsz: int,
    rng: np.random.Generator,
    view: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ultralytics' 4-image mosaic: objects keep their scale, the view sees a window of the layout.

    As ultralytics ``Mosaic``: each image is scaled to long side ``imgsz`` and put in its own
    quadrant around a centre drawn in ``[imgsz/2, 3*imgsz/2]`` on a ``2*imgsz`` canvas, which clips
    them; ``view`` maps canvas pixels to the ``imgsz`` output (the caller's random affine, see
    ``mosaic_view``; None = the central window at scale 1, ultralytics' crop). Halving the canvas
    instead (ssod's first mosaic did) shrinks every object to half size, which hurts the small
    objects SSOD data is full of. Each image is warped once, straight to the output, and drawn
    only where its part of the canvas lands. Boxes are in pixels of each input image; the result's
    boxes are in output pixels, clipped and filtered. A mosaic has no single original image,
    hence no matrix: callers record the identity.
    """
    if len(images) != 4 or len(boxes_list) != 4 or len(cls_list) != 4:
        raise ValueError("mosaic4 needs exactly 4 images, box arrays and class arrays")
    S = imgsz
    view = mosaic_view(S) if view is None else np.asarray(view, dtype=np.float64)
    xc, yc = rng.uniform(0.5 * S, 1.5 * S, size=2)
    out = np.full((S, S, 3), PAD_VALUE, dtype=np.uint8)
    out_boxes, out_cls = [], []
    for i, (im, bx, cl) in enumerate(zip(images, boxes_list, cls_list)):
        h, w = im.shape[:2]
        r = S / max(h, w)
        x0 = xc - w * r if i in (0, 2) else xc  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
        y0 = yc - h * r if i in (0, 1) else yc
        # the part of the image inside the canvas, in source pixels (whole pixels, rounded outwards)
        sx1, sy1 = max(0, int(np.floor(-x0 / r))), max(0, int(np.floor(-y0 / r)))
        sx2, sy2 = min(w, int(np.ceil((2 * S - x0) / r))), min(h, int(np.ceil((2 * S - y0) / r)))
        if sx2 <= sx1 or sy2 <= sy1:
            continue
        to_canvas = np.array([[r, 0, x0], [0, r, y0], [0, 0, 1]], dtype=np.float64)
        M = view @ to_canvas @ np.array([[1, 0, sx1], [0, 1, sy1], [0, 0, 1]], dtype=np.float64)
        crop = np.ascontiguousarray(im[sy1:sy2, sx1:sx2])
        drawn = warp(np.full(crop.shape[:2], 255, np.uint8), M, S, pad_value=0) > 127
        np.copyto(out, warp(crop, M, S), where=drawn[..., None])
        canvas_boxes = clip_boxes(transform_boxes(bx, to_canvas), 2 * S)
        keep = (canvas_boxes[:, 2] > canvas_boxes[:, 0]) & (canvas_boxes[:, 3] > canvas_boxes[:, 1])
        b, c = filter_boxes(canvas_boxes[keep], np.asarray(cl, dtype=np.int64).reshape(-1)[keep], view, S)
        out_boxes.append(b)
        out_cls.append(c)
    return (
        out,
        np.concatenate(out_boxes or [np.zeros((0, 4))]).astype(np.float32).reshape(-1, 4),
        np.concatenate(out_cls or [np.zeros(0)]).astype(np.int64),
    )


def mosaic_view(imgsz: int, affine: np.ndarray | None = None) -> np.ndarray:
    """Canvas (``2*imgsz``) -> output matrix: the centre window, then ``affine`` about the output centre.

    ``affine`` is a ``random_affine_matrix(imgsz, imgsz, imgsz, ...)`` draw (its letterbox is the
    identity), so a mosaic gets the same flip / scale / shift ranges as any other labeled view,
    about the mosaic's centre as ultralytics' ``RandomPerspective(border=-imgsz/2)`` does.
    """
    window = np.array([[1, 0, -imgsz / 2], [0, 1, -imgsz / 2], [0, 0, 1]], dtype=np.float64)
    return (np.eye(3) if affine is None else np.asarray(affine, dtype=np.float64)) @ window


def mixup(
    img1: np.ndarray, boxes1: np.ndarray, cls1: np.ndarray,
    img2: np.ndarray, boxes2: np.ndarray, cls2: np.ndarray,
    rng: np.random.Generator, alpha: float = 32.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blend two same-size views with ``Beta(alpha, alpha)`` weight; keep both box sets."""
    if img1.shape != img2.shape:
        raise ValueError(f"mixup needs equal image shapes, got {img1.shape} and {img2.shape}")
    lam = rng.beta(alpha, alpha)
    img = (img1.astype(np.float32) * lam + img2.astype(np.float32) * (1 - lam) + 0.5)
    return (
        np.clip(img, 0, 255).astype(np.uint8),
        np.concatenate([np.asarray(boxes1, np.float32).reshape(-1, 4),
                        np.asarray(boxes2, np.float32).reshape(-1, 4)]),
        np.concatenate([np.asarray(cls1, np.int64).reshape(-1),
                        np.asarray(cls2, np.int64).reshape(-1)]),
    )
