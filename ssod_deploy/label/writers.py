"""Final outputs of `ssod label`, built by streaming the journal in image-index order.

Because every file here is a pure function of the journal (records in index order plus the
header), an interrupted-and-resumed run, a single run and merged shards all write the same
bytes. Nothing holds all detections in memory: records are read one at a time and each
output is streamed to a temporary file in OUT, then moved into place atomically.

Outputs (OUT/...):
    coco.json           images (id, file_name, width, height), annotations (bbox xywh, area,
                        score, uncertain), categories (id = class index, as in ssod's COCO I/O)
    labels/<rel>.txt    YOLO (ultralytics) txt per image, ``cls cx cy w h [conf]`` normalised,
                        *label* boxes only (score >= tau2): uncertain boxes are not labels
    classes.txt         class names, one per line (YOLO tools read it)
    labelstudio.json    Label Studio tasks with predictions (rectanglelabels, percent coords)
    review.csv          images ranked most doubtful first (see ``REVIEW_COLUMNS``)
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import numpy as np

from ssod_deploy.label.journal import JournalIndex

FORMATS = ("coco", "yolo", "labelstudio")
COCO_NAME = "coco.json"
LABELSTUDIO_NAME = "labelstudio.json"
REVIEW_NAME = "review.csv"
SUMMARY_NAME = "summary.json"
LABELS_DIR = "labels"
CLASSES_NAME = "classes.txt"
LS_URL_PREFIX = "/data/local-files/?d="  # Label Studio local storage; root = the labeled folder
REVIEW_COLUMNS = (
    "rank", "file", "width", "height", "n_labels", "n_uncertain",
    "uncertain_score_mass", "min_label_score", "flag",
)


def parse_formats(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'coco,yolo' -> ('coco', 'yolo') in canonical order; unknown names are an error."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted = {s.strip().lower() for s in items if s.strip()}
    unknown = wanted - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown --format {', '.join(sorted(unknown))}: choose from {','.join(FORMATS)}")
    if not wanted:
        raise ValueError(f"--format is empty: choose from {','.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in wanted)


# ------------------------------------------------------------------------------ safe paths


def safe_relpath(rel: str) -> PurePosixPath:
    """A relative posix path with no '..', '.', empty or absolute parts (else ValueError)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts) or "\x00" in rel:
        raise ValueError(f"{rel!r}: not a safe relative output path")
    return p


class SafeTree:
    """Output paths under one root, each guaranteed to stay inside it (parents created).

    Checked twice: lexically (no '..' parts) and on the real path of the parent folder, so a
    symlink planted inside ``root`` cannot redirect a write outside it either. A run writes
    thousands of files into a few folders, so each parent's real path is resolved once per tree
    (per file it cost 50-90 ms per 1,000 YOLO files, 14 ms now; docs/benchmarks.md Run D).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._real_root: str | None = None
        self._checked: set[Path] = set()

    def join(self, rel: str, suffix: str | None = None, exclusive: bool = False) -> Path:
        """``root/rel`` with its suffix replaced by ``suffix`` (ValueError if it would leave root).

        ``exclusive``: the caller creates the file with O_CREAT | O_EXCL, which refuses any
        existing path, a symlink included (open(2)), so the per-file lstat is skipped: in a
        folder a pool is creating files in, it queued behind them on the folder's lock (0.1-0.45
        ms per file where file creation itself was slow; docs/benchmarks.md Run E)."""
        p = safe_relpath(rel)
        if suffix is not None:
            p = p.with_suffix(suffix) if p.suffix else p.with_name(p.name + suffix)
        target = self.root.joinpath(*p.parts)
        parent = target.parent
        if parent not in self._checked:  # checked before any folder is made: a link is never followed
            if self._real_root is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self._real_root = os.path.realpath(self.root)
            real_parent = os.path.realpath(parent)
            if real_parent != self._real_root and not real_parent.startswith(self._real_root + os.sep):
                raise ValueError(f"{rel!r}: output path would leave {self.root}")
            parent.mkdir(parents=True, exist_ok=True)
            self._checked.add(parent)
        if not exclusive and target.is_symlink():
            raise ValueError(f"{rel!r}: refusing to write through a symlink at {target}")
        return target


def safe_join(root: Path, rel: str, suffix: str | None = None) -> Path:
    """One ``SafeTree(root).join(rel, suffix)``: for a single path; reuse a SafeTree for many."""
    return SafeTree(root).join(rel, suffix)


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def _public(path: str | os.PathLike, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) files; outputs get the usual umask modes."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_output(path: Path, mode: str = "w"):
    """Write to a temp file next to ``path``; fsync and rename into place only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _public(tmp)
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Pretty JSON, written atomically; non-ASCII names kept readable unless undecodable."""
    try:
        text = json.dumps(obj, indent=2, ensure_ascii=False)
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8 (lone surrogates)
        text = json.dumps(obj, indent=2)
    with atomic_output(path) as f:
        f.write(text + "\n")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


# ---------------------------------------------------------------------------- the builder


@dataclass
class BuildStats:
    """What the builder saw: feeds summary.json."""

    images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    label_counts: np.ndarray | None = None  # (nc,) boxes >= tau2 per class
    uncertain_counts: np.ndarray | None = None  # (nc,) boxes in [tau1, tau2) per class
    empty_images: int = 0
    uncertain_images: int = 0
    yolo_collisions: list[tuple[str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


class _ReviewRows:
    """Per-image doubt statistics in flat numpy buffers (a few bytes per image)."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._cur: list[tuple] = []

    dtype = np.dtype([("i", np.int64), ("w", np.int32), ("h", np.int32), ("nl", np.int32),
                      ("nu", np.int32), ("mass", np.float64), ("minl", np.float64)])

    def add(self, row: tuple) -> None:
        self._cur.append(row)
        if len(self._cur) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if self._cur:
            self._chunks.append(np.array(self._cur, dtype=self.dtype))
            self._cur = []

    def table(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, self.dtype)


def build_outputs(
    index: JournalIndex,
    out: Path,
    formats: Sequence[str] = FORMATS,
    save_conf: bool = False,
    ls_url_prefix: str = LS_URL_PREFIX,
) -> BuildStats:
    """Write every requested output (plus review.csv) from the journal; returns statistics."""
    out = Path(out)
    header = index.header
    names: list[str] = list(header["names"])
    nc = len(names)
    model_version = str(header.get("model_version", "ssod"))
    stats = BuildStats(label_counts=np.zeros(nc, np.int64), uncertain_counts=np.zeros(nc, np.int64))
    review = _ReviewRows()
    formats = tuple(formats)

    with _Outputs(out, formats) as outs, (
        _YoloFiles(outs.labels_tmp, save_conf) if outs.labels_tmp is not None else nullcontext()
    ) as yolo:
        image_id = 0
        ann_id = 0
        for rec in index.iter_records():
            if "skip" in rec:
                stats.skipped.append((rec["f"], rec["skip"]))
                continue
            image_id += 1
            rel, h, w = rec["f"], int(rec["h"]), int(rec["w"])
            boxes = np.asarray(rec["b"], np.float64).reshape(-1, 4)
            scores = np.asarray(rec["s"], np.float64).reshape(-1)
            labels = np.asarray(rec["c"], np.int64).reshape(-1)
            unc = np.asarray(rec["u"], bool).reshape(-1)
            is_lab = ~unc
            stats.images += 1
            stats.label_counts += np.bincount(labels[is_lab], minlength=nc)[:nc]
            stats.uncertain_counts += np.bincount(labels[unc], minlength=nc)[:nc]
            n_lab, n_unc = int(is_lab.sum()), int(unc.sum())
            stats.empty_images += n_lab + n_unc == 0
            stats.uncertain_images += n_unc > 0
            review.add((rec["i"], w, h, n_lab, n_unc, float(scores[unc].sum()),
                        float(scores[is_lab].min()) if n_lab else np.nan))

            if outs.coco_images is not None:
                outs.coco_images.write(("" if image_id == 1 else ",\n") + _dumps(
                    {"id": image_id, "file_name": rel, "width": w, "height": h}))
                ann_id = _write_coco_annotations(outs.coco_anns, image_id, ann_id, boxes, scores, labels, unc)
            if outs.ls is not None:
                outs.ls.write(("" if image_id == 1 else ",\n") + _dumps(
                    _labelstudio_task(rel, h, w, boxes, scores, labels, unc, names, model_version, ls_url_prefix)))
            if yolo is not None:
                collision = yolo.add(rel, h, w, boxes[is_lab], scores[is_lab], labels[is_lab])
                if collision:
                    stats.yolo_collisions.append((rel, collision))

        if yolo is not None:
            stats.yolo_collisions += yolo.close()
        categories = [{"id": i, "name": n} for i, n in enumerate(names)]
        outs.finish(categories, names)
    stats.outputs = list(outs.written)
    _write_review(index, review.table(), out / REVIEW_NAME)
    stats.outputs.append(REVIEW_NAME)
    return stats


class _Outputs:
    """Temp files for each output; moved into place together only when the build succeeds."""

    def __init__(self, out: Path, formats: Sequence[str]):
        self.out = out
        self.formats = formats
        self.coco_images = self.coco_anns = self.ls = None
        self.labels_tmp: Path | None = None
        self._tmp_files: list[tuple[Any, Path, Path]] = []  # (fh, tmp, final)
        self.written: list[str] = []

    def _tmp(self, final: Path):
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.out)
        _public(tmp)
        fh = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self._tmp_files.append((fh, Path(tmp), final))
        return fh

    def __enter__(self) -> _Outputs:
        self.out.mkdir(parents=True, exist_ok=True)
        if "coco" in self.formats:
            self.coco_images = self._tmp(self.out / COCO_NAME)
            self.coco_images.write('{"images":[\n')
            fd, tmp = tempfile.mkstemp(prefix=".coco-annotations.", suffix=".tmp", dir=self.out)
            self.coco_anns = os.fdopen(fd, "w+", encoding="utf-8", newline="")
            self._anns_tmp = Path(tmp)
        if "labelstudio" in self.formats:
            self.ls = self._tmp(self.out / LABELSTUDIO_NAME)
            self.ls.write("[\n")
        if "yolo" in self.formats:
            self.labels_tmp = Path(tempfile.mkdtemp(prefix=".labels.", suffix=".tmp", dir=self.out))
            _public(self.labels_tmp, directory=True)
        return self

    def finish(self, categories: list[dict], names: list[str]) -> None:
        if self.coco_images is not None:
            f = self.coco_images
            f.write('\n],\n"annotations":[\n')
            self.coco_anns.flush()
            self.coco_anns.seek(0)
            shutil.copyfileobj(self.coco_anns, f, 1 << 20)
            f.write("\n],\n" + '"categories":' + _dumps(categories) + "}\n")
        if self.ls is not None:
            self.ls.write("\n]\n")
        for fh, tmp, final in self._tmp_files:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(tmp, final)
            self.written.append(final.name)
        self._tmp_files = []
        if self.labels_tmp is not None:
            (self.labels_tmp / CLASSES_NAME).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
            os.replace(self.labels_tmp / CLASSES_NAME, self.out / CLASSES_NAME)
            _replace_dir(self.labels_tmp, self.out / LABELS_DIR)
            self.labels_tmp = None
            self.written += [f"{LABELS_DIR}/", CLASSES_NAME]

    def __exit__(self, *exc) -> None:
        for fh, tmp, _ in self._tmp_files:  # only left over when the build failed
            fh.close()
            tmp.unlink(missing_ok=True)
        if self.coco_anns is not None:
            self.coco_anns.close()
            self._anns_tmp.unlink(missing_ok=True)
        if self.labels_tmp is not None:
            shutil.rmtree(self.labels_tmp, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Swap a freshly built folder into place (the old one is removed after the swap)."""
    old = None
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ formats


def _write_coco_annotations(f, image_id: int, ann_id: int, boxes: np.ndarray, scores: np.ndarray,
                            labels: np.ndarray, unc: np.ndarray) -> int:
    if not len(boxes):
        return ann_id
    wh = boxes[:, 2:] - boxes[:, :2]
    xywh = np.round(np.concatenate([boxes[:, :2], wh], 1), 2).tolist()
    area = np.round(wh[:, 0] * wh[:, 1], 2).tolist()
    parts = []
    for k in range(len(boxes)):
        ann_id += 1
        parts.append(_dumps({
            "id": ann_id, "image_id": image_id, "category_id": int(labels[k]), "bbox": xywh[k],
            "area": area[k], "iscrowd": 0, "score": float(scores[k]), "uncertain": bool(unc[k]),
        }))
    f.write(("" if ann_id == len(boxes) else ",\n") + ",\n".join(parts))
    return ann_id


def _labelstudio_task(rel: str, h: int, w: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                      unc: np.ndarray, names: list[str], model_version: str, url_prefix: str) -> dict:
    """One Label Studio task: data.image + one prediction whose results are rectanglelabels.

    Coordinates are percentages of the original image (what Label Studio stores); the
    prediction ``score`` is the mean box score (0 for an image with no boxes), so sorting
    tasks by prediction score in the Data Manager shows the least confident images first.
    """
    pct = np.round(
        np.stack([boxes[:, 0] / w, boxes[:, 1] / h, (boxes[:, 2] - boxes[:, 0]) / w,
                  (boxes[:, 3] - boxes[:, 1]) / h], 1) * 100.0, 4,
    ).tolist() if len(boxes) else []
    results = [
        {
            "id": f"r{k}",
            "type": "rectanglelabels",
            "from_name": "label",
            "to_name": "image",
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "value": {"x": x, "y": y, "width": bw, "height": bh, "rotation": 0,
                      "rectanglelabels": [names[int(labels[k])]]},
            "score": float(scores[k]),
            **({"meta": {"text": ["uncertain"]}} if unc[k] else {}),
        }
        for k, (x, y, bw, bh) in enumerate(pct)
    ]
    return {
        "data": {"image": url_prefix + quote(rel), "file": rel,
                 "n_labels": int((~unc).sum()), "n_uncertain": int(unc.sum())},
        "predictions": [{
            "model_version": model_version,
            "score": round(float(scores.mean()), 5) if len(scores) else 0.0,
            "result": results,
        }],
    }


def _yolo_text(h: int, w: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, save_conf: bool) -> str:
    """One image's YOLO label file: ``class cx cy w h [conf]`` per box, normalised to the image."""
    if not len(boxes):
        return ""
    cxcy = (boxes[:, :2] + boxes[:, 2:]) / 2 / (w, h)
    bwh = (boxes[:, 2:] - boxes[:, :2]) / (w, h)
    cols = [labels[:, None].astype(np.float64), np.clip(cxcy, 0, 1), np.clip(bwh, 0, 1)]
    fmt = ["%d", "%.6f", "%.6f", "%.6f", "%.6f"]
    if save_conf:
        cols.append(scores[:, None])
        fmt.append("%.5f")
    buf = io.StringIO()
    np.savetxt(buf, np.concatenate(cols, 1), fmt=" ".join(fmt))
    return buf.getvalue()


def _create_exclusive(target: Path, text: str) -> bool:
    """Write a new file; False when it exists already ('x': never overwrite a sibling's labels)."""
    try:
        with open(target, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
    except FileExistsError:
        return False
    return True


class _YoloFiles:
    """The per-image YOLO label files, created by a small thread pool.

    One file per image means one file creation per image: cheap on a local disk, milliseconds
    each on network file systems (where 50,000 images would take minutes serially). Which of two
    same-stem images owns a name is decided here, in the caller's order, so outputs stay
    deterministic; the pool only creates files.
    """

    def __init__(self, root: Path, save_conf: bool, threads: int = 8):
        self.root, self.save_conf = root, save_conf
        self.tree = SafeTree(root)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssod-yolo")
        self.taken: set[Path] = set()
        self.pending: list[tuple[str, Path, Future]] = []

    def _clash(self, target: Path) -> str:
        return f"label file {target.relative_to(self.root)} already written for another image with the same stem"

    def add(self, rel: str, h: int, w: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> str | None:
        """Queue ``labels/<rel>.txt``; returns a reason instead when another image took that name."""
        target = self.tree.join(rel, ".txt", exclusive=True)  # _create_exclusive: O_EXCL
        if target in self.taken:
            return self._clash(target)
        self.taken.add(target)
        text = _yolo_text(h, w, boxes, scores, labels, self.save_conf)
        self.pending.append((rel, target, self.pool.submit(_create_exclusive, target, text)))
        return None

    def __enter__(self) -> _YoloFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)  # also on errors: no file is still being written afterwards

    def close(self) -> list[tuple[str, str]]:
        """Wait for every file; (rel, reason) for names a case-insensitive file system merged."""
        self.pool.shutdown(wait=True)
        clashes = [(rel, self._clash(t)) for rel, t, f in self.pending if not f.result()]  # .result() re-raises I/O errors
        self.pending.clear()
        return clashes


def _write_review(index: JournalIndex, rows: np.ndarray, path: Path) -> None:
    """review.csv: images with uncertain boxes first (most uncertain score mass first), then
    images with no boxes at all (flag ``empty``: a miss or a true background), then the rest by
    their weakest label score. Ties keep image order."""
    has_unc = rows["nu"] > 0
    empty = (rows["nl"] == 0) & ~has_unc
    group = np.where(has_unc, 0, np.where(empty, 1, 2))
    minl = np.where(np.isnan(rows["minl"]), 1.0, rows["minl"])
    # lexsort: last key is primary
    order = np.lexsort((rows["i"], minl, -rows["nu"], -rows["mass"], group))
    with atomic_output(path) as f, open(index.path, "rb") as jf:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(REVIEW_COLUMNS)
        for rank, r in enumerate(order, 1):
            row = rows[r]
            rel = json.loads(index.read_line(jf, int(row["i"])).decode("utf-8", "surrogateescape"))["f"]
            flag = "uncertain" if has_unc[r] else ("empty" if empty[r] else "")
            wr.writerow([
                rank, rel.encode("utf-8", "backslashreplace").decode("utf-8"), int(row["w"]), int(row["h"]),
                int(row["nl"]), int(row["nu"]), f"{row['mass']:.6g}",
                "" if np.isnan(row["minl"]) else f"{row['minl']:.6g}", flag,
            ])


def class_counts(names: Iterable[str], counts: np.ndarray) -> dict[str, int]:
    return {n: int(c) for n, c in zip(names, counts)}
