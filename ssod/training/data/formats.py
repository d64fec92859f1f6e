"""Dataset specs users bring: an ultralytics-compatible ``data.yaml`` (YOLO txt or COCO JSON).

``load_dataset`` turns the YAML into a ``DatasetSpec`` of plain ``Sample`` records (boxes
normalised xyxy, so nothing downstream needs image sizes) plus a COCO ground-truth dict for
the val split, so evaluation and training read the same labels.

YAML keys (ultralytics ``data.yaml`` plus two extensions)::

    path: ../datasets/x      # root; relative to the YAML's folder; default: the YAML's folder
    train: images/train      # folder, list of folders, .txt list of files, or a COCO split:
    val: images/val          #   {images: DIR, annotations: FILE.json}; a list entry may also be
                             #   {images: DIR, labels: DIR}: YOLO labels in their own folder,
                             #   same relative names (what ``ssod label`` writes to OUT/labels)
    names: [cat, dog]        # list or {id: name}; optional for COCO splits (taken from the JSON)
    nc: 2                    # optional; must agree with names
    unlabeled: images/raw    # extension: images without labels (folder, list, .txt, COCO split)
    hidden_labels: hidden/raw  # extension: YOLO txt of the unlabeled images, same relative
                             #   names as in their folder (for a .txt list: relative to the
                             #   list's folder); only to measure pseudo-label quality

YOLO labels live where ultralytics looks (``img2label_paths``): the last ``/images/`` of the
image path becomes ``/labels/`` and the suffix ``.txt``. An image without a label file is a
background image (no objects), as in ultralytics. Lines are ``class xc yc w h`` normalised;
lines of an odd number >= 7 of columns are polygons (``class x1 y1 x2 y2 ...``) and become
their bounding box, as ultralytics does for segment labels.

Label validation — what is an error and what is repaired, and why:
    * ``LabelError`` (always): class id that is not an integer, negative or >= len(names);
      unknown image/category ids in COCO JSON. These mean the labels and ``names`` disagree;
      guessing would train on wrong classes.
    * image skipped with a warning: a YOLO label file that is damaged (a line of the wrong column
      count, non-numbers or NaN/inf, unreadable bytes), as ultralytics skips a corrupt label: one
      bad file among thousands must not stop the run. ``check="strict"`` makes it an error.
    * clipped with a warning: a box partly outside the image (more than ``EDGE_TOL``, which
      silently absorbs rounding in exported labels).
    * dropped with a warning: boxes entirely outside the image, with zero or negative width or
      height, or smaller than ``MIN_BOX`` (normalised) after clipping.
    * ``check="strict"`` turns the clipped and dropped cases into ``LabelError`` too.
    * COCO ``iscrowd`` annotations are not training targets; they stay in ``val_coco`` (as
      crowd regions pycocotools ignores) but not in the Samples.
Warnings go to ``logging.getLogger("ssod")``, at most ``MAX_WARNINGS`` lines, then a count.

``val_coco`` uses image id = index in ``DatasetSpec.val`` (0..n-1), so predictions made by
dataset index need no lookup; category id = class index. Val images whose header cannot be
read are left out of ``val`` with a warning, so every val image has a size.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssod_deploy.images import ImageReadError, discover_images, read_image_size

LOGGER = logging.getLogger("ssod")

EDGE_TOL = 1e-3  # normalised; coordinates this far outside [0, 1] are clipped silently
MIN_BOX = 1e-4  # normalised; smaller boxes (after clipping) are dropped
MAX_WARNINGS = 20
CHECK_MODES = ("clip", "strict")


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message is one line naming the file and problem."""


class LabelFileCorrupt(Exception):
    """A YOLO label file that cannot be parsed (a line of the wrong shape, not numbers, unreadable):
    the file is damaged, so its image is skipped with a warning (``LabelError`` under strict checks)."""


class LabelError(DatasetError):
    """A label that cannot be trusted (``file:line: problem``)."""


@dataclass
class Sample:
    """One image and its objects; boxes are xyxy normalised to [0, 1] of the original image."""

    path: str
    boxes: np.ndarray  # (n, 4) float32
    cls: np.ndarray  # (n,) int64
    size: tuple[int, int] | None = None  # (h, w) if known


@dataclass
class DatasetSpec:
    root: Path
    names: list[str]
    train: list[Sample]
    val: list[Sample]
    unlabeled: list[str] = field(default_factory=list)
    unlabeled_hidden: list[Sample] | None = None  # aligned with ``unlabeled``
    val_coco: dict | None = None
    source: str = ""  # the data.yaml this spec was loaded from

    @property
    def nc(self) -> int:
        return len(self.names)

    def summary(self, max_classes: int = 10) -> list[str]:
        """What training will see, in a few lines (ultralytics' dataset scan, for labeled and unlabeled
        splits); a class without a training box is called out: nothing can teach it."""
        counts = np.bincount(np.concatenate([s.cls for s in self.train] or [np.zeros(0, np.int64)]).astype(np.int64),
                             minlength=self.nc)
        background = sum(len(s.cls) == 0 for s in self.train)
        val_boxes = sum(len(s.cls) for s in self.val)
        per_class = ", ".join(f"{n} {c}" for n, c in zip(self.names[:max_classes], counts[:max_classes]))
        more = f", ... {self.nc - max_classes} more" if self.nc > max_classes else ""
        lines = [
            f"data {self.source or self.root}: {self.nc} classes; train {len(self.train)} images "
            f"({int(counts.sum())} boxes, {background} background), val {len(self.val)} images ({val_boxes} boxes), "
            f"unlabeled {len(self.unlabeled)} images",
            f"train boxes per class: {per_class}{more}",
        ]
        if val_boxes == 0:
            lines.append("warning: the val split has no boxes: mAP is undefined (nan) and best.pt follows the last epoch")
        missing = [n for n, c in zip(self.names, counts) if c == 0]
        if missing:
            lines.append(f"warning: no training box for {len(missing)} class(es): {', '.join(missing[:max_classes])}"
                         f"{', ...' if len(missing) > max_classes else ''} (the model cannot learn them)")
        return lines


# ----------------------------------------------------------------------------- issues
class _Issues:
    """Collects repairable label problems; raises at once in strict mode."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.lines: list[str] = []
        self.clipped = 0
        self.dropped = 0
        self.skipped = 0

    def add(self, where: str, problem: str, kind: str, strict_applies: bool = True) -> None:
        if self.strict and strict_applies:
            raise LabelError(f"{where}: {problem} (check='strict')")
        if kind == "clipped":
            self.clipped += 1
        elif kind == "dropped":
            self.dropped += 1
        elif kind == "skipped":
            self.skipped += 1
        self.lines.append(f"{where}: {problem}")

    def flush(self, source: str) -> None:
        for line in self.lines[:MAX_WARNINGS]:
            LOGGER.warning(line)
        if len(self.lines) > MAX_WARNINGS:
            LOGGER.warning("... and %d more warnings", len(self.lines) - MAX_WARNINGS)
        if self.lines:
            LOGGER.warning(
                "%s: %d label warnings (%d boxes clipped, %d boxes dropped, %d images skipped for damaged label "
                "files); check='strict' makes them errors", source, len(self.lines), self.clipped, self.dropped, self.skipped,
            )


def _clean_boxes(
    boxes: np.ndarray, where: Callable[[int], str], issues: _Issues
) -> tuple[np.ndarray, np.ndarray]:
    """Clip/drop normalised xyxy boxes; returns (clipped boxes, keep mask). Vectorized checks."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = np.clip(boxes, 0.0, 1.0)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    nonpositive = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    outside = ~nonpositive & ((w <= 0) | (h <= 0))
    tiny = ~nonpositive & ~outside & ((w < MIN_BOX) | (h < MIN_BOX))
    partly = ((boxes < -EDGE_TOL) | (boxes > 1 + EDGE_TOL)).any(1) & ~(nonpositive | outside | tiny)
    for i in np.flatnonzero(nonpositive | outside | tiny | partly):
        b = ", ".join(f"{v:.4g}" for v in boxes[i])
        if nonpositive[i]:
            issues.add(where(i), f"box has zero or negative width/height (xyxy {b}), dropped", "dropped")
        elif outside[i]:
            hint = "; coordinates must be normalised to 0-1" if boxes[i].max() > 1.5 else ""
            issues.add(where(i), f"box entirely outside the image (xyxy {b}){hint}, dropped", "dropped")
        elif tiny[i]:
            issues.add(where(i), f"box smaller than {MIN_BOX:g} of the image (xyxy {b}), dropped", "dropped")
        else:
            issues.add(where(i), f"box partly outside the image (xyxy {b}), clipped", "clipped")
    return clipped, ~(nonpositive | outside | tiny)


# ----------------------------------------------------------------------------- YOLO txt
def img2label_path(img_path: str) -> str:
    """ultralytics' rule: last ``/images/`` -> ``/labels/``, suffix -> ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(str(img_path).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def _parse_yolo_rows(path: str, lines: list[tuple[int, list[str]]]) -> np.ndarray:
    """Rows of (cls, x1, y1, x2, y2) normalised; polygons become their box. Slow path, exact errors."""
    out = np.zeros((len(lines), 5), dtype=np.float64)
    for k, (lineno, parts) in enumerate(lines):
        n = len(parts)
        if n != 5 and not (n >= 7 and n % 2 == 1):
            raise LabelFileCorrupt(
                f"{path}:{lineno}: expected 5 columns 'class x_center y_center width height' "
                f"(or a polygon 'class x1 y1 x2 y2 x3 y3 ...'), got {n}"
            )
        try:
            vals = np.array([float(p) for p in parts], dtype=np.float64)
        except ValueError:
            bad = next(p for p in parts if not _is_float(p))
            raise LabelFileCorrupt(f"{path}:{lineno}: not a number: {bad!r}") from None
        if not np.isfinite(vals).all():
            raise LabelFileCorrupt(f"{path}:{lineno}: not a finite number: {' '.join(parts)!r}")
        if n == 5:
            xc, yc, w, h = vals[1:]
            out[k] = (vals[0], xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2)
        else:
            xy = vals[1:].reshape(-1, 2)
            out[k] = (vals[0], *xy.min(0), *xy.max(0))
    return out


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _check_classes(cls: np.ndarray, nc: int, where: Callable[[int], str]) -> np.ndarray:
    bad_int = cls != np.round(cls)
    bad_range = (cls < 0) | (cls >= nc)
    bad = np.flatnonzero(bad_int | bad_range)
    if len(bad):
        i = bad[0]
        c = cls[i]
        what = f"class id {c:g} is not an integer" if bad_int[i] else f"class id {c:g} out of range"
        raise LabelError(f"{where(i)}: {what}: names has {nc} classes (ids 0..{nc - 1})")
    return cls.astype(np.int64)


def read_yolo_labels(path: str, nc: int, issues: _Issues) -> tuple[np.ndarray, np.ndarray]:
    """One YOLO label file -> (boxes (n,4) float32 normalised xyxy, cls (n,) int64).

    A missing file means no objects. Raises ``LabelFileCorrupt`` on malformed lines and ``LabelError``
    on class ids that do not fit ``nc``.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    except (OSError, UnicodeDecodeError) as e:
        raise LabelFileCorrupt(f"{path}: cannot read label file ({e})") from None
    lines = [(i, ln.split()) for i, ln in enumerate(text.splitlines(), 1)]
    lines = [(i, p) for i, p in lines if p]
    if not lines:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    linenos = np.array([i for i, _ in lines])
    rows = None
    if all(len(p) == 5 for _, p in lines):  # fast path: one numpy conversion per file
        try:
            v = np.array([p for _, p in lines], dtype=np.float64)
            if np.isfinite(v).all():
                xy = v[:, 1:3]
                half = v[:, 3:5] / 2
                rows = np.concatenate([v[:, :1], xy - half, xy + half], axis=1)
        except ValueError:
            rows = None
    if rows is None:
        rows = _parse_yolo_rows(path, lines)
    where = lambda i: f"{path}:{linenos[i]}"  # noqa: E731
    cls = _check_classes(rows[:, 0], nc, where)
    boxes, keep = _clean_boxes(rows[:, 1:], where, issues)
    return boxes[keep].astype(np.float32), cls[keep]


# ----------------------------------------------------------------------------- COCO JSON
@dataclass
class _CocoSplit:
    samples: list[Sample]
    names: list[str]
    crowd: list[list[dict]]  # per sample: crowd annotations (category already remapped)
    areas: list[np.ndarray]  # per sample: COCO 'area' of each kept box (NaN if absent)


def _container_category(cats: list[dict], anns: list) -> dict | None:
    """The category that only groups the others (no annotation of its own, and its name is every other
    category's ``supercategory``), as Roboflow writes the dataset's name at id 0; None when there is none."""
    if len(cats) < 2:
        return None
    used = {a.get("category_id") for a in anns if isinstance(a, dict)}
    for c in cats:
        others = [o for o in cats if o is not c]
        if c["id"] not in used and all(o.get("supercategory") == c.get("name") for o in others):
            return c
    return None


def _load_coco_split(images_dir: Path, ann_file: Path, issues: _Issues, names: list[str] | None) -> _CocoSplit:
    """One COCO split. With ``names`` (data.yaml's) the categories map to them by name when the JSON has
    the same names in another order (id order would swap classes silently); with other names, by id
    order, and a warning says which category became which class."""
    src = str(ann_file)
    try:
        with open(ann_file, encoding="utf-8") as f:
            js = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{src}: cannot read COCO JSON ({' '.join(str(e).split())})") from None
    if not isinstance(js, dict) or not isinstance(js.get("images"), list) or not isinstance(js.get("categories"), list):
        raise DatasetError(f"{src}: not a COCO detection file (needs 'images' and 'categories' lists)")
    cats = sorted(js["categories"], key=lambda c: c["id"])
    container = _container_category(cats, js.get("annotations") or [])
    if container is not None:  # Roboflow's COCO exports: the dataset's name as a category of its own
        cats = [c for c in cats if c is not container]
        LOGGER.info("%s: category %s %r holds the others (their supercategory, no boxes of its own): not a class",
                    src, container["id"], container.get("name"))
    cat_ids = [c["id"] for c in cats]
    cat_names = [str(c.get("name", c["id"])) for c in cats]
    if len(set(cat_ids)) != len(cat_ids):
        raise DatasetError(f"{src}: duplicate category ids")
    if names is not None and len(cats) != len(names):
        raise DatasetError(f"{src}: {len(cats)} categories but names has {len(names)} classes")
    cat_index = {cid: i for i, cid in enumerate(cat_ids)}
    if names is not None and cat_names != list(names):
        if sorted(cat_names) == sorted(names) and len(set(names)) == len(names):
            position = {n: i for i, n in enumerate(names)}
            cat_index = {cid: position[n] for cid, n in zip(cat_ids, cat_names)}
        else:
            pairs = ", ".join(f"{cid} {n!r} -> {names[i]!r}" for i, (cid, n) in enumerate(zip(cat_ids, cat_names)))
            issues.add(src, f"category names differ from data.yaml names; mapped by id order: {pairs}", "names")

    images = js["images"]
    bad = next((im for im in images if not isinstance(im, dict) or "id" not in im or "file_name" not in im), None)
    if bad is not None:
        raise DatasetError(f"{src}: every image needs 'id' and 'file_name', got {str(bad)[:80]}")
    img_index = {img["id"]: i for i, img in enumerate(images)}
    paths: list[str] = []
    sizes = np.zeros((len(images), 2), np.float64)  # (h, w)
    present = np.ones(len(images), bool)
    for i, img in enumerate(images):
        p = images_dir / img["file_name"]
        if not p.exists() and (images_dir / Path(img["file_name"]).name).exists():
            p = images_dir / Path(img["file_name"]).name
        paths.append(os.path.abspath(p))
        if not p.exists():
            present[i] = False
            issues.add(f"{src}: image id {img['id']}", f"file not found: {p}, image skipped", "missing", False)
            continue
        if img.get("width") and img.get("height"):
            sizes[i] = (img["height"], img["width"])
        else:
            try:
                sizes[i] = read_image_size(p)
            except ImageReadError as e:
                present[i] = False
                issues.add(f"{src}: image id {img['id']}", f"{e}, image skipped", "missing", False)

    anns = js.get("annotations") or []
    m = len(anns)
    try:
        a_img = np.array([img_index[a["image_id"]] for a in anns], dtype=np.int64)
    except KeyError as e:
        raise LabelError(f"{src}: annotation refers to unknown image id {e.args[0]}") from None
    try:
        a_cat = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
    except KeyError as e:
        raise LabelError(f"{src}: annotation refers to unknown category id {e.args[0]}") from None
    try:
        bbox = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(m, 4)
    except (KeyError, ValueError, TypeError):
        bad = next(a for a in anns if not (isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4))
        raise LabelError(f"{src}: annotation id {bad.get('id')}: bbox must be [x, y, w, h]") from None
    if not np.isfinite(bbox).all():
        bad = anns[int(np.flatnonzero(~np.isfinite(bbox).all(1))[0])]
        raise LabelError(f"{src}: annotation id {bad.get('id')}: bbox has NaN/inf")
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    area = np.array([float(a.get("area", np.nan)) for a in anns], dtype=np.float64)
    use = present[a_img] if m else np.zeros(0, bool)

    sel = np.flatnonzero(use & ~crowd)
    hw = sizes[a_img[sel]]
    b = bbox[sel]
    norm = np.stack([b[:, 0] / hw[:, 1], b[:, 1] / hw[:, 0], (b[:, 0] + b[:, 2]) / hw[:, 1],
                     (b[:, 1] + b[:, 3]) / hw[:, 0]], axis=1) if len(sel) else np.zeros((0, 4))
    where = lambda i: f"{src}: annotation id {anns[sel[i]].get('id')} (image {images[a_img[sel[i]]]['file_name']})"  # noqa: E731
    norm, keep = _clean_boxes(norm, where, issues)
    sel, norm = sel[keep], norm[keep]

    order = np.argsort(a_img[sel], kind="stable")
    sel, norm = sel[order], norm[order]
    bounds = np.searchsorted(a_img[sel], np.arange(len(images) + 1))
    crowd_by_img: dict[int, list[dict]] = {}
    for j in np.flatnonzero(use & crowd):
        a = anns[j]
        crowd_by_img.setdefault(int(a_img[j]), []).append(
            {"bbox": bbox[j].tolist(), "category_id": int(a_cat[j]), "area": float(a.get("area", bbox[j, 2] * bbox[j, 3]))}
        )
    samples, crowds, areas = [], [], []
    for i in np.flatnonzero(present):
        s, e = bounds[i], bounds[i + 1]
        samples.append(Sample(paths[i], norm[s:e].astype(np.float32), a_cat[sel[s:e]],
                              (int(sizes[i, 0]), int(sizes[i, 1]))))
        crowds.append(crowd_by_img.get(int(i), []))
        areas.append(area[sel[s:e]])
    return _CocoSplit(samples, list(names) if names is not None else cat_names, crowds, areas)


# ----------------------------------------------------------------------------- val COCO gt
def build_coco_gt(
    samples: Sequence[Sample],
    names: Sequence[str],
    root: Path | None = None,
    crowd: Sequence[list[dict]] | None = None,
    areas: Sequence[np.ndarray] | None = None,
) -> dict:
    """COCO ground truth for ``samples`` (sizes required): image id = index, category id = class."""
    images, anns = [], []
    for i, s in enumerate(samples):
        if s.size is None:
            raise ValueError(f"{s.path}: image size unknown, cannot build COCO ground truth")
        h, w = s.size
        fname = s.path
        if root is not None:
            rel = os.path.relpath(s.path, root)
            fname = s.path if rel.startswith("..") else Path(rel).as_posix()
        images.append({"id": i, "file_name": fname, "width": int(w), "height": int(h)})
        px = s.boxes.astype(np.float64) * [w, h, w, h]
        xywh = np.round(np.concatenate([px[:, :2], px[:, 2:] - px[:, :2]], axis=1), 3)
        box_area = xywh[:, 2] * xywh[:, 3]
        if areas is not None:
            box_area = np.where(np.isnan(areas[i]), box_area, areas[i])
        for b, c, a in zip(xywh.tolist(), s.cls.tolist(), box_area.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": b,
                         "area": a, "iscrowd": 0})
        for cr in crowd[i] if crowd is not None else []:
            anns.append({"id": len(anns) + 1, "image_id": i, **cr, "iscrowd": 1})
    return {
        "info": {"description": "ssod val ground truth"}, "licenses": [], "images": images,
        "annotations": anns, "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
    }


# ----------------------------------------------------------------------------- data.yaml
class _Ctx:
    """What every split loader needs: where we are, the class count, the issue sink."""

    def __init__(self, yaml_path: Path, root: Path, issues: _Issues):
        self.yaml = yaml_path
        self.root = root
        self.issues = issues

    def err(self, key: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.yaml}: '{key}': {problem}")

    def resolve(self, key: str, value: Any) -> Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise self.err(key, f"expected a path, got {value!r}")
        p = Path(os.path.expanduser(str(value)))
        p = p if p.is_absolute() else self.root / p
        if not p.exists() and str(value).startswith("../") and (self.root / str(value)[3:]).exists():
            p = self.root / str(value)[3:]  # Roboflow's exports: '../train/images' next to the YAML (ultralytics' rule)
        if not p.exists():
            raise self.err(key, f"path not found: {p}")
        return Path(os.path.abspath(p))

    def entries(self, key: str, value: Any) -> list[tuple[Path, Path | None]]:
        """(images: folder, .txt list or file; its labels folder or None = ultralytics' place) per entry."""
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise self.err(key, "empty list")
        out: list[tuple[Path, Path | None]] = []
        for v in values:
            if not isinstance(v, dict):
                out.append((self.resolve(key, v), None))
            elif "annotations" in v:
                raise self.err(key, "a COCO split {images, annotations} must be the split's only entry, not in a list")
            elif sorted(v) != ["images", "labels"]:
                raise self.err(key, f"an entry with its own labels is {{images: DIR, labels: DIR}}, got keys {sorted(v)}")
            else:
                out.append((self.resolve(f"{key}.images", v["images"]), self.resolve(f"{key}.labels", v["labels"])))
        return out


def _is_coco_split(value: Any) -> bool:
    return isinstance(value, dict) and "labels" not in value  # {images, labels} is a YOLO entry


def _coco_paths(ctx: _Ctx, key: str, value: dict) -> tuple[Path, Path]:
    missing = [k for k in ("images", "annotations") if k not in value]
    if missing:
        raise ctx.err(key, f"a COCO split needs 'images' and 'annotations' (missing {', '.join(missing)})")
    return ctx.resolve(f"{key}.images", value["images"]), ctx.resolve(f"{key}.annotations", value["annotations"])


def _images_with_rel(ctx: _Ctx, key: str, value: Any, labeled: bool = True) -> tuple[list[str], list[str], list[str]]:
    """Images of a YOLO-style split, their names relative to the folder/list they came from, and
    their label files (ultralytics' place, or ``labels/<relative name>.txt`` for an entry with
    its own labels folder; ``labeled=False`` refuses such an entry)."""
    paths, rels, label_paths = [], [], []
    for entry, labels in ctx.entries(key, value):
        if labels is not None and not labeled:
            raise ctx.err(key, "unlabeled images take no labels folder (hidden_labels holds diagnostic ones)")
        try:
            found = discover_images(entry)
        except (ValueError, FileNotFoundError) as e:
            raise ctx.err(key, " ".join(str(e).split())) from None
        base = entry if entry.is_dir() else entry.parent
        for p in found:
            ap = os.path.abspath(p)
            rel = os.path.relpath(ap, base)
            rel = Path(rel).name if rel.startswith("..") else rel
            paths.append(ap)
            rels.append(rel)
            label_paths.append(img2label_path(ap) if labels is None else str((labels / rel).with_suffix(".txt")))
    if not paths:
        raise ctx.err(key, f"no images found in {value}")
    return paths, rels, label_paths


def _yolo_samples(ctx: _Ctx, paths: list[str], nc: int, label_paths: list[str] | None = None,
                  skip_corrupt: bool = True) -> list[Sample]:
    """Samples of ``paths`` with their YOLO labels; an image whose label file is damaged is left out with a
    warning (``skip_corrupt``; else ``LabelError``: lists that must stay aligned with ``paths``)."""
    label_paths = label_paths or [img2label_path(p) for p in paths]
    out = []
    for p, lp in zip(paths, label_paths):
        try:
            boxes, cls = read_yolo_labels(lp, nc, ctx.issues)
        except LabelFileCorrupt as e:  # one damaged file in thousands must not stop the run (strict: it does)
            if not skip_corrupt:
                raise LabelError(str(e)) from None
            ctx.issues.add(str(e), "image skipped", "skipped")
            continue
        out.append(Sample(p, boxes, cls, None))
    return out


def _names(data: dict, ctx: _Ctx) -> list[str] | None:
    names, nc = data.get("names"), data.get("nc")
    if names is None:
        if nc is None:
            return None
        return [f"class_{i}" for i in range(int(nc))]
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise ctx.err("names", "dict keys must be class ids 0..n-1") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise ctx.err("names", f"class ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
        names = [by_id[i] for i in range(len(by_id))]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    else:
        raise ctx.err("names", f"expected a list or {{id: name}} dict, got {type(names).__name__}")
    if not names:
        raise ctx.err("names", "at least one class is required")
    if nc is not None and int(nc) != len(names):
        raise ctx.err("nc", f"nc={nc} but names has {len(names)} entries")
    return names


def load_dataset(yaml_path: str | os.PathLike, check: str = "clip") -> DatasetSpec:
    """Parse a data.yaml (YOLO and/or COCO splits) into a ``DatasetSpec`` (see module doc)."""
    import yaml

    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    yaml_path = Path(os.path.abspath(os.path.expanduser(str(yaml_path))))
    if not yaml_path.is_file():
        raise DatasetError(f"{yaml_path}: dataset YAML not found")
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"{yaml_path}: cannot parse YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping of keys (path, train, val, names)")

    issues = _Issues(strict=check == "strict")
    ctx = _Ctx(yaml_path, yaml_path.parent, issues)
    if data.get("path") not in (None, ""):
        ctx.root = ctx.resolve("path", data["path"])
    for key in ("train", "val"):
        if data.get(key) in (None, "", []):
            raise DatasetError(f"{yaml_path}: missing required key '{key}'")
    names = _names(data, ctx)
    coco_names: list[str] | None = None

    def coco_split(key: str) -> _CocoSplit:
        nonlocal coco_names
        images_dir, ann = _coco_paths(ctx, key, data[key])
        split = _load_coco_split(images_dir, ann, issues, names)
        if names is None:
            if coco_names is not None and split.names != coco_names:
                raise ctx.err(key, f"categories {split.names} differ from the other split's {coco_names}")
            coco_names = split.names
        return split

    # COCO splits first: they may define the names the YOLO splits need
    splits: dict[str, _CocoSplit] = {k: coco_split(k) for k in ("train", "val", "unlabeled") if _is_coco_split(data.get(k))}
    names = names or coco_names
    if names is None:
        raise DatasetError(f"{yaml_path}: missing required key 'names'")
    nc = len(names)

    def split_samples(key: str) -> list[Sample]:
        if key in splits:
            return splits[key].samples
        paths, _, label_paths = _images_with_rel(ctx, key, data[key])
        return _yolo_samples(ctx, paths, nc, label_paths)

    train = split_samples("train")
    val = split_samples("val")
    if "val" in splits:
        sp = splits["val"]
        val_coco = build_coco_gt(val, names, ctx.root, sp.crowd, sp.areas)
    else:
        val = _with_sizes(val, issues)
        if not val:
            raise ctx.err("val", "no readable images")
        val_coco = build_coco_gt(val, names, ctx.root)

    unlabeled: list[str] = []
    hidden: list[Sample] | None = None
    if data.get("unlabeled") not in (None, "", []):
        if "unlabeled" in splits:
            hidden = splits["unlabeled"].samples
            unlabeled = [s.path for s in hidden]
        else:
            unlabeled, rels, _ = _images_with_rel(ctx, "unlabeled", data["unlabeled"], labeled=False)
        if data.get("hidden_labels") not in (None, ""):
            if "unlabeled" in splits:
                raise ctx.err("hidden_labels", "not used with a COCO 'unlabeled' split (its annotations are the hidden labels)")
            hdir = ctx.resolve("hidden_labels", data["hidden_labels"])
            lps = [str((hdir / r).with_suffix(".txt")) for r in rels]
            if not any(os.path.exists(p) for p in lps):
                LOGGER.warning("%s: 'hidden_labels' %s has no label file for any unlabeled image", yaml_path, hdir)
            hidden = _yolo_samples(ctx, unlabeled, nc, lps, skip_corrupt=False)  # aligned with `unlabeled`
    elif data.get("hidden_labels") not in (None, ""):
        raise ctx.err("hidden_labels", "given without 'unlabeled'")

    issues.flush(str(yaml_path))
    return DatasetSpec(
        root=ctx.root, names=list(names), train=train, val=val, unlabeled=unlabeled,
        unlabeled_hidden=hidden, val_coco=val_coco, source=str(yaml_path),
    )


def _with_sizes(samples: list[Sample], issues: _Issues) -> list[Sample]:
    """Fill ``size`` from image headers; unreadable images are left out with a warning."""
    out = []
    for s in samples:
        try:
            s.size = read_image_size(s.path)
        except ImageReadError as e:
            issues.add(s.path, f"unreadable val image ({e.reason}), left out of val", "missing", False)
            continue
        out.append(s)
    return out
