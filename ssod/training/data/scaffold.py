"""``ssod data init``: a data.yaml for a folder of YOLO-labeled images and folders of unlabeled ones.

What labeling tools export (Label Studio's YOLO export: ``images/`` + ``labels/`` + ``classes.txt``;
CVAT's YOLO 1.1: images and ``.txt`` side by side + ``obj.names``; any ultralytics dataset) has no
val split and no ``unlabeled:`` key. This writes both, the way ultralytics' ``autosplit`` does,
with two choices made for SSOD work:

* **The split is a hash of each image's path relative to the folder**, not a seeded shuffle:
  labeling more images later and running ``init`` again keeps every earlier image in its split,
  so a val score stays comparable across labeling rounds.
* **Images without a label file are called out.** ultralytics trains them as background
  (no objects); in a folder that is being labeled they are more often simply not labeled yet,
  which would teach the detector that their objects are background. They are kept (as
  ultralytics would) and counted in a warning naming the unlabeled folder as their place.

The split lists are written next to the YAML (``<stem>.train.txt``, ``<stem>.val.txt``, paths
relative to them), all three files atomically; the result is loaded back with ``load_dataset``
before returning, so a YAML this writes is one training accepts.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ssod.training.data.formats import DatasetError, DatasetSpec, img2label_path, load_dataset
from ssod_deploy.images import discover_images
from ssod_deploy.label.writers import atomic_output

__all__ = ["NAME_FILES", "init_dataset", "split_of"]

log = logging.getLogger("ssod")

# class-name files labeling tools write next to their YOLO export, in the order they are looked for
NAME_FILES = ("classes.txt", "obj.names", "names.txt", "classes.names")


def split_of(relative_path: str, val_fraction: float) -> str:
    """'val' or 'train' for an image, from a hash of its relative path (stable as the folder grows)."""
    return "val" if _path_hash(relative_path) < val_fraction else "train"


def _path_hash(relative_path: str) -> float:
    """A uniform number in [0, 1) fixed by the path."""
    return int.from_bytes(hashlib.sha1(relative_path.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64


def init_dataset(
    labeled: str | os.PathLike,
    unlabeled: Sequence[str | os.PathLike] = (),
    out: str | os.PathLike = "data.yaml",
    val_fraction: float = 0.2,
    names_file: str | os.PathLike | None = None,
    force: bool = False,
) -> tuple[Path, DatasetSpec]:
    """Write ``out`` (a data.yaml) and its split lists for ``labeled``; return its path and the loaded spec."""
    labeled, out = Path(labeled).resolve(), Path(out).resolve()
    if not labeled.is_dir():
        raise DatasetError(f"{labeled}: not a folder of labeled images")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val {val_fraction}: the val fraction must be between 0 and 1")
    lists = {s: out.with_name(f"{out.stem}.{s}.txt") for s in ("train", "val")}
    existing = [p for p in (out, *lists.values()) if p.exists()]
    if existing and not force:
        raise DatasetError(f"{existing[0]}: exists; pass --force to overwrite it")
    images = discover_images(labeled)
    if not images:
        raise DatasetError(f"{labeled}: no images found (looked for image files in it and its sub-folders)")
    has_label = [os.path.isfile(img2label_path(str(p))) for p in images]
    if not any(has_label):
        raise DatasetError(
            f"{labeled}: none of its {len(images)} images has a YOLO label file (ultralytics' place: "
            f".../labels/x.txt for .../images/x.jpg, or x.txt beside x.jpg)")
    unlabeled_dirs = [Path(u).resolve() for u in unlabeled]
    for u in unlabeled_dirs:
        if not u.exists():
            raise DatasetError(f"{u}: unlabeled folder not found")
    names = _names(labeled, names_file, [p for p, ok in zip(images, has_label) if ok])

    split = {"train": [], "val": []}
    keys = [p.relative_to(labeled).as_posix() if p.is_relative_to(labeled) else str(p) for p in images]
    for p, key in zip(images, keys):
        split[split_of(key, val_fraction)].append(p)
    if not split["val"]:  # a handful of images: the one with the smallest hash goes to val
        first = min(range(len(images)), key=lambda i: _path_hash(keys[i]))
        split["val"].append(images[first])
        split["train"].remove(images[first])
    if not split["train"]:
        raise DatasetError(f"{labeled}: {len(images)} image(s) are too few to split into train and val")
    missing = len(images) - sum(has_label)
    if missing:
        log.warning(f"{labeled}: {missing} of {len(images)} images have no label file and train as background "
                    "images (no objects); if they are just not labeled yet, move them to an unlabeled folder")

    for s, path in lists.items():
        with atomic_output(path) as f:  # './' as ultralytics writes: a name starting with '#' is no comment
            f.writelines(f"{_listed(p, path.parent)}\n" for p in split[s])
    lines = [
        f"# written by `ssod data init {labeled}`: {len(split['train'])} train / {len(split['val'])} val images "
        f"(val fraction {val_fraction:g}, by a hash of each relative path: adding images keeps the others' split)",
        f"train: {lists['train'].name}",
        f"val: {lists['val'].name}",
    ]
    if unlabeled_dirs:
        lines.append("unlabeled: [" + ", ".join(_quote(_relative(u, out.parent)) for u in unlabeled_dirs) + "]")
    lines.append("names: [" + ", ".join(_quote(n) for n in names) + "]")
    with atomic_output(out) as f:
        f.write("\n".join(lines) + "\n")
    return out, load_dataset(out)


def _names(labeled: Path, names_file: str | os.PathLike | None, label_images: list[Path]) -> list[str]:
    """Class names from ``names_file``, a labeling tool's names file near the images, or the label ids."""
    candidates = [Path(names_file)] if names_file else [d / n for d in (labeled, labeled.parent) for n in NAME_FILES]
    for path in candidates:
        if path.is_file():
            names = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            if not names:
                raise DatasetError(f"{path}: the class-name file is empty")
            log.info(f"class names from {path}: {', '.join(names)}")
            return names
        if names_file:
            raise DatasetError(f"{path}: class-name file not found")
    top = -1
    for p in label_images:  # no names file: the ids the labels use, named by number
        for ln in Path(img2label_path(str(p))).read_text(encoding="utf-8", errors="replace").splitlines():
            head = ln.split(maxsplit=1)[:1]
            if head and head[0].isdigit():
                top = max(top, int(head[0]))
    if top < 0:
        raise DatasetError(f"{labeled}: the label files hold no boxes and no class-name file was found "
                           f"({', '.join(NAME_FILES)})")
    log.warning(f"{labeled}: no class-name file ({', '.join(NAME_FILES)}); classes named 0..{top} from the labels' ids "
                "(edit `names:` in the YAML, or pass --names FILE)")
    return [str(i) for i in range(top + 1)]


def _relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` when it lies inside it (it moves with the YAML), else absolute."""
    return path.relative_to(start).as_posix() if path.is_relative_to(start) else str(path)


def _listed(path: Path, start: Path) -> str:
    """A split-list line: ``./`` + the path relative to the list's folder, or the absolute path."""
    rel = _relative(path, start)
    return rel if os.path.isabs(rel) else f"./{rel}"


def _quote(text: str) -> str:
    """A YAML flow scalar for a name or path, quoted so ``yes``, ``1.0`` or ``a: b`` stay strings."""
    return "'" + text.replace("'", "''") + "'"
