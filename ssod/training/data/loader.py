"""Datasets and the per-step (labeled, unlabeled) loader.

Reproducibility: an item is a pure function of its *key* ``(pass, index)``; its rng is
``np.random.default_rng([seed, pass, index])``. The batch samplers put the key into every
index they yield, so DataLoader workers (persistent or not) never need to be told the epoch,
and a run resumed at epoch ``e`` sees exactly the batches of an uninterrupted run. Plain
integer indices also work and use the epoch set by ``set_epoch``.

Unreadable images never crash a run: training items fall back to the next index and report
``(path, reason)`` in ``skipped``; validation items become a blank canvas (see
``LabeledDataset``) so image ids stay aligned with the COCO ground truth.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssod.training.data.batch import Batch
from ssod.training.data.views import (
    PAD_VALUE,
    LabeledAug,
    Rect,
    StrongAug,
    WeakAug,
    augment_hsv,
    filter_boxes,
    letterbox_matrix,
    make_weak_strong,
    mixup,
    mosaic4,
    mosaic_view,
    random_affine_matrix,
    shrink,
    source_matrix,
    strong_photometric,
    warp,
)
from ssod_deploy.images import ImageReadError, read_image_with_size

__all__ = [
    "LabeledDataset", "UnlabeledDataset", "collate_labeled", "collate_unlabeled",
    "PairedLoader", "build_val_loader",
]

MAX_READ_ATTEMPTS = 50  # consecutive unreadable files tolerated before giving up


def _worker_init(_: int) -> None:
    # Two loaders x workers already saturate the cores; OpenCV's own pool would oversubscribe.
    cv2.setNumThreads(0)


class _ImageSource:
    """Read + shrink with fallback to the next index; shared by both datasets."""

    paths: list[str]
    imgsz: int

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer keys (the loaders pass ``(pass, index)`` instead)."""
        self.epoch = int(epoch)

    def _key(self, key: Any) -> tuple[int, int]:
        if isinstance(key, (tuple, list)):
            return int(key[0]), int(key[1])
        return getattr(self, "epoch", 0), int(key)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def load_size(self) -> int:
        """Long side images are shrunk to on reading: the largest view drawn from them."""
        return self.imgsz

    def _load(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """(image shrunk to long side <= load_size, original (h, w)); raises ImageReadError."""
        img, hw = read_image_with_size(self.paths[i], target_size=self.load_size)
        return shrink(img, self.load_size), (int(hw[0]), int(hw[1]))

    def _load_fallback(
        self, i: int, skipped: list[tuple[str, str]]
    ) -> tuple[int, np.ndarray, tuple[int, int]]:
        """Load ``i`` or, if unreadable, the next readable index (recording every skip)."""
        n = len(self.paths)
        for k in range(min(n, MAX_READ_ATTEMPTS)):
            j = (i + k) % n
            try:
                img, hw = self._load(j)
                return j, img, hw
            except ImageReadError as e:
                skipped.append((e.path, e.reason))
        raise RuntimeError(
            f"{min(n, MAX_READ_ATTEMPTS)} consecutive images starting at {self.paths[i]} are "
            f"unreadable (last: {skipped[-1][0]}: {skipped[-1][1]}); check the dataset"
        )


def _boxes_px(sample: Any, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised xyxy of the original -> original pixels."""
    h, w = hw
    boxes = np.asarray(sample.boxes, dtype=np.float32).reshape(-1, 4)
    cls = np.asarray(sample.cls, dtype=np.int64).reshape(-1)
    return boxes * np.array([w, h, w, h], dtype=np.float32), cls


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class LabeledDataset(_ImageSource, Dataset):
    """Labeled images as single views: ``aug`` when ``train``, plain letterbox otherwise.

    Item: ``img`` uint8 (3,S,S), ``boxes`` float32 (n,4) view pixels, ``cls`` int64 (n,),
    ``M`` float32 (3,3) original -> view, ``orig_size`` int64 (2,) (h, w), ``path``,
    ``skipped`` list of (path, reason).

    ``M`` is informational for labeled images (the supervised loss only needs ``boxes``): it
    is the true matrix for ordinary samples and the identity for mosaic samples, which have
    no single original.

    Unreadable files: in training the item is taken from the next readable index. In
    validation (``train=False``) an item is always produced for index ``i`` — a blank gray
    canvas without boxes, ``M`` the letterbox of the recorded size (identity if unknown) —
    because evaluation pairs the i-th prediction with the i-th COCO image id.
    """

    def __init__(
        self,
        samples: Sequence[Any],
        imgsz: int,
        aug: LabeledAug | None = None,
        train: bool = True,
        seed: int = 0,
    ):
        if len(samples) == 0:
            raise ValueError("LabeledDataset: no samples (is the split empty?)")
        self.samples = list(samples)
        self.paths = [str(s.path) for s in self.samples]
        self.imgsz = int(imgsz)
        self.aug = aug
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0

    def __getitem__(self, key: Any) -> dict[str, Any]:
        epoch, i = self._key(key)
        skipped: list[tuple[str, str]] = []
        if not self.train:
            return self._val_item(i, skipped)
        rng = np.random.default_rng([self.seed, epoch, i])
        i, img, hw = self._load_fallback(i, skipped)
        aug, S = self.aug, self.imgsz
        if aug is None:
            M = letterbox_matrix(*hw, S)
            view = warp(img, M @ source_matrix(img, hw), S)
            boxes, cls = filter_boxes(*_boxes_px(self.samples[i], hw), M, S)
        else:
            if aug.mosaic_p > 0 and epoch < aug.mosaic_until_epoch and rng.random() < aug.mosaic_p:
                view, boxes, cls = self._mosaic(i, img, hw, rng, skipped)
                M = np.eye(3)
            else:
                view, boxes, cls, M = self._affine(i, img, hw, rng)
            if aug.mixup_p > 0 and rng.random() < aug.mixup_p:
                j, img2, hw2 = self._load_fallback(int(rng.integers(len(self))), skipped)
                view2, boxes2, cls2, _ = self._affine(j, img2, hw2, rng)
                view, boxes, cls = mixup(view, boxes, cls, view2, boxes2, cls2, rng, aug.mixup_alpha)
            view = augment_hsv(view, aug.hsv_h, aug.hsv_s, aug.hsv_v, rng)
            if aug.strong is not None and epoch >= aug.strong_from_epoch and rng.random() < aug.strong_p:
                view = strong_photometric(view, aug.strong, rng)
        return _labeled_item(view, boxes, cls, M, hw, self.paths[i], skipped)

    def _affine(self, i, img, hw, rng):
        a, S = self.aug, self.imgsz
        M = random_affine_matrix(*hw, S, rng, a.flip_p, a.scale, a.translate, a.degrees, a.shear)
        view = warp(img, M @ source_matrix(img, hw), S)
        boxes, cls = filter_boxes(*_boxes_px(self.samples[i], hw), M, S)
        return view, boxes, cls, M

    def _mosaic(self, i, img, hw, rng, skipped):
        """Mosaic of ``i`` and 3 random others, seen through the usual random affine."""
        a, S = self.aug, self.imgsz
        imgs, bxs, cls = [img], [], []
        idx = [i]
        for j in rng.integers(len(self), size=3):
            j, im, _ = self._load_fallback(int(j), skipped)
            imgs.append(im)
            idx.append(j)
        for j, im in zip(idx, imgs):  # labels in pixels of the (shrunk) arrays mosaic4 gets
            b, c = _boxes_px(self.samples[j], im.shape[:2])
            bxs.append(b)
            cls.append(c)
        affine = random_affine_matrix(S, S, S, rng, a.flip_p, a.scale, a.translate, a.degrees, a.shear)
        return mosaic4(imgs, bxs, cls, S, rng, view=mosaic_view(S, affine))

    def _val_item(self, i: int, skipped: list[tuple[str, str]]) -> dict[str, Any]:
        S = self.imgsz
        try:
            img, hw = self._load(i)
        except ImageReadError as e:
            skipped.append((e.path, e.reason))
            hw = _recorded_hw(self.samples[i])
            M = letterbox_matrix(*hw, S) if hw else np.eye(3)
            blank = np.full((S, S, 3), PAD_VALUE, dtype=np.uint8)
            return _labeled_item(
                blank, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), M,
                hw or (S, S), self.paths[i], skipped,
            )
        M = letterbox_matrix(*hw, S)
        view = warp(img, M @ source_matrix(img, hw), S)
        # Keep every gt box (no min-size filter): letterboxing never pushes boxes out.
        boxes, cls = filter_boxes(*_boxes_px(self.samples[i], hw), M, S, min_size=0.0, min_visible=0.0)
        return _labeled_item(view, boxes, cls, M, hw, self.paths[i], skipped)


def _recorded_hw(sample: Any) -> tuple[int, int] | None:
    """The (h, w) a sample's metadata records, when it records one."""
    size = getattr(sample, "size", None)
    if size is None or len(size) != 2 or min(size) <= 0:
        return None
    return int(size[0]), int(size[1])


def _labeled_item(view, boxes, cls, M, hw, path, skipped) -> dict[str, Any]:
    return {
        "img": _chw(view),
        "boxes": torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)),
        "cls": torch.from_numpy(np.asarray(cls, np.int64).reshape(-1)),
        "M": torch.from_numpy(np.asarray(M, np.float32)),
        "orig_size": torch.tensor(hw, dtype=torch.int64),
        "path": path,
        "skipped": skipped,
    }


class UnlabeledDataset(_ImageSource, Dataset):
    """Unlabeled images as (weak, strong) view pairs with their matrices.

    ``hidden``: labels the method must not train on but that let us measure pseudo-label
    quality (demo data has them); matched by path, mapped into the weak view.

    ``weak_size`` (default ``imgsz``): the weak view's side. A method whose teacher looks at the
    image enlarged (``Method.teacher_view_size``) gets its view drawn from the file at that size,
    with the detail the file has, instead of upsampling an ``imgsz`` view; the strong view stays
    ``imgsz``, drawn from the same read (shrunk once more when the file is larger than ``imgsz``).
    """

    def __init__(
        self,
        paths: Sequence[str],
        imgsz: int,
        weak: WeakAug | None = None,
        strong: StrongAug | None = None,
        seed: int = 0,
        hidden: Sequence[Any] | None = None,
        weak_size: int | None = None,
    ):
        if len(paths) == 0:
            raise ValueError("UnlabeledDataset: no unlabeled images")
        self.paths = [str(p) for p in paths]
        self.imgsz = int(imgsz)
        self.weak_size = int(weak_size or imgsz)
        if self.weak_size < self.imgsz:
            raise ValueError(f"UnlabeledDataset: weak_size {self.weak_size} is below imgsz {self.imgsz}")
        self.weak = weak or WeakAug()
        self.strong = strong or StrongAug()
        self.seed = int(seed)
        self.epoch = 0
        self.hidden = {str(s.path): s for s in hidden} if hidden else {}

    @property
    def load_size(self) -> int:
        return self.weak_size

    def __getitem__(self, key: Any) -> dict[str, Any]:
        epoch, i = self._key(key)
        rng = np.random.default_rng([self.seed, epoch, i])
        skipped: list[tuple[str, str]] = []
        i, img, hw = self._load_fallback(i, skipped)
        S, SW = self.imgsz, self.weak_size
        erased: list[Rect] = []
        weak, M_w, strong, M_s = make_weak_strong(
            shrink(img, S), S, self.weak, self.strong, rng, orig_hw=hw, erased=erased, weak_size=SW, weak_src=img,
        )
        rects = np.zeros((len(self.strong.cutouts), 5), np.float32)  # fixed K: zero rows erase nothing
        rects[: len(erased)] = np.asarray(erased, np.float32).reshape(-1, 5)
        deferred = self.strong.cutouts_deferred  # drawn, not painted: the trainer paints them (pseudo.py)
        sample = self.hidden.get(self.paths[i])
        if sample is not None:
            gt_boxes, gt_cls = filter_boxes(*_boxes_px(sample, hw), M_w, SW)
        else:
            gt_boxes, gt_cls = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        return {
            "weak": _chw(weak),
            "strong": _chw(strong),
            "M_weak": torch.from_numpy(M_w.astype(np.float32)),
            "M_strong": torch.from_numpy(M_s.astype(np.float32)),
            "erased": torch.from_numpy(np.zeros_like(rects[:, :4]) if deferred else rects[:, :4].copy()),
            **({"cutouts_pending": torch.from_numpy(rects)} if deferred else {}),
            "orig_size": torch.tensor(hw, dtype=torch.int64),
            "path": self.paths[i],
            "skipped": skipped,
            "gt_boxes": torch.from_numpy(gt_boxes.astype(np.float32).reshape(-1, 4)),
            "gt_cls": torch.from_numpy(gt_cls.astype(np.int64)),
        }


# ---------------------------------------------------------------------------------------------
# Collation (exactly the contract of batch.py)
# ---------------------------------------------------------------------------------------------
def _images(items: list[dict], key: str) -> torch.Tensor:
    return torch.stack([it[key] for it in items]).float().div_(255.0)


def _flat(items: list[dict], boxes_key: str, cls_key: str):
    boxes = torch.cat([it[boxes_key] for it in items]).reshape(-1, 4).float()
    cls = torch.cat([it[cls_key] for it in items]).long()
    idx = torch.cat([torch.full((len(it[cls_key]),), b, dtype=torch.int64) for b, it in enumerate(items)])
    return boxes, cls, idx


def _skipped(items: list[dict]) -> list[tuple[str, str]]:
    return [tuple(s) for it in items for s in it["skipped"]]


def collate_labeled(items: list[dict[str, Any]]) -> Batch:
    boxes, cls, idx = _flat(items, "boxes", "cls")
    return {
        "img": _images(items, "img"),
        "boxes": boxes,
        "cls": cls,
        "batch_idx": idx,
        "M": torch.stack([it["M"] for it in items]).float(),
        "orig_size": torch.stack([it["orig_size"] for it in items]).long(),
        "paths": [it["path"] for it in items],
        "skipped": _skipped(items),
    }


def collate_unlabeled(items: list[dict[str, Any]]) -> Batch:
    boxes, cls, idx = _flat(items, "gt_boxes", "gt_cls")
    return {
        "weak": _images(items, "weak"),
        "strong": _images(items, "strong"),
        "M_weak": torch.stack([it["M_weak"] for it in items]).float(),
        "M_strong": torch.stack([it["M_strong"] for it in items]).float(),
        "erased": torch.stack([it["erased"] for it in items]).float(),
        **({"cutouts_pending": torch.stack([it["cutouts_pending"] for it in items])} if "cutouts_pending" in items[0] else {}),
        "orig_size": torch.stack([it["orig_size"] for it in items]).long(),
        "paths": [it["path"] for it in items],
        "skipped": _skipped(items),
        "gt_boxes": boxes,
        "gt_cls": cls,
        "gt_batch_idx": idx,
    }


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
class _Stream:
    """An endless sequence of (pass, index) keys: pass ``p`` is a permutation seeded by
    ``(seed, tag, p)``, so any position of the stream can be computed directly."""

    def __init__(self, n: int, seed: int, tag: int):
        self.n, self.seed, self.tag = n, seed, tag
        self._cache: dict[int, np.ndarray] = {}

    def perm(self, p: int) -> np.ndarray:
        if p not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[p] = np.random.default_rng([self.seed, self.tag, p]).permutation(self.n)
        return self._cache[p]

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        k = start
        while len(out) < count:
            p, off = divmod(k, self.n)
            m = min(count - len(out), self.n - off)
            out.extend((p, int(j)) for j in self.perm(p)[off:off + m])
            k += m
        return out


class _EpochBatchSampler:
    """Batches of keys for ``self.epoch``: ``steps`` batches from stream position
    ``epoch * stride``. Mutable epoch so one (persistent) DataLoader serves every epoch."""

    def __init__(self, stream: _Stream, batch_size: int, steps: int, stride: int):
        self.stream, self.batch_size, self.steps, self.stride = stream, batch_size, steps, stride
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keys = self.stream.take(self.epoch * self.stride, self.steps * self.batch_size)
        for s in range(self.steps):
            yield keys[s * self.batch_size:(s + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.steps


def _loader(ds: Dataset, sampler: Any, collate, workers: int) -> DataLoader:
    return DataLoader(
        ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        persistent_workers=workers > 0, worker_init_fn=_worker_init if workers > 0 else None,
    )


class PairedLoader:
    """One (labeled, unlabeled) batch pair per step; ``epoch(e)`` is fully determined by
    (seed, e).

    With unlabeled data an epoch has as many steps as one 1:1 pass over the unlabeled set
    (``N_u // batch_size``) and walks that set r times at ``unlabeled_ratio`` r (each epoch from a
    fresh pass, drop last), while labeled batches continue an endless stream of reshuffled passes
    (position ``e * steps * batch_size``). So the ratio sets the unlabeled images per step and
    never the schedule: steps, LR schedule and burn-in are the same at any ratio, as in the
    iteration-based SSOD codebases (Soft Teacher's 1:4 sampling does not shorten its schedule
    either). Without unlabeled data (supervised) an epoch walks the labeled set once.
    ``steps_per_epoch`` overrides the length; the driving set then becomes an endless stream too.
    Only one ``epoch()`` iterator may be live at a time (workers are persistent).
    """

    def __init__(
        self,
        labeled_ds: LabeledDataset,
        unlabeled_ds: UnlabeledDataset | None,
        batch_size: int,
        unlabeled_ratio: int = 1,
        workers: int = 2,
        seed: int = 0,
        steps_per_epoch: int | None = None,
    ):
        if batch_size < 1 or unlabeled_ratio < 1:
            raise ValueError(f"batch_size and unlabeled_ratio must be >= 1, got {batch_size}, {unlabeled_ratio}")
        self.batch_size = int(batch_size)
        self.unlabeled_batch_size = int(batch_size * unlabeled_ratio)
        self.labeled_batch_size = self.batch_size
        self.has_unlabeled = unlabeled_ds is not None
        nl = len(labeled_ds)
        lab_stream = _Stream(nl, seed, tag=0)
        if unlabeled_ds is not None:
            nu, bu = len(unlabeled_ds), self.unlabeled_batch_size
            if steps_per_epoch is None and nu < bu:
                raise ValueError(
                    f"{nu} unlabeled images are fewer than one unlabeled batch "
                    f"({batch_size} x ratio {unlabeled_ratio} = {bu}); lower the batch size or the ratio"
                )
            self.steps = int(steps_per_epoch or nu // self.batch_size)
            # natural epochs start on a fresh pass: r passes at an integer ratio r, as many as needed otherwise
            unl_stride = -(-self.steps * bu // nu) * nu if steps_per_epoch is None else self.steps * bu
            self._unl_sampler = _EpochBatchSampler(_Stream(nu, seed, tag=1), bu, self.steps, unl_stride)
            self._lab_sampler = _EpochBatchSampler(
                lab_stream, self.batch_size, self.steps, self.steps * self.batch_size
            )
            w_unl = 0 if workers == 0 else max(1, round(workers * 2 * unlabeled_ratio / (1 + 2 * unlabeled_ratio)))
            w_unl = min(w_unl, workers - 1) if workers >= 2 else w_unl
            w_lab = workers - w_unl
            self._unl_loader = _loader(unlabeled_ds, self._unl_sampler, collate_unlabeled, w_unl)
        else:
            if steps_per_epoch is None:
                bl = self.labeled_batch_size = min(self.batch_size, nl)  # a set smaller than a batch: one step
                self.steps = nl // bl
                self._lab_sampler = _EpochBatchSampler(lab_stream, bl, self.steps, nl)
            else:
                self.steps = int(steps_per_epoch)
                self._lab_sampler = _EpochBatchSampler(
                    lab_stream, self.batch_size, self.steps, self.steps * self.batch_size
                )
            w_lab = workers
            self._unl_loader = None
        self._lab_loader = _loader(labeled_ds, self._lab_sampler, collate_labeled, w_lab)
        self.workers = (w_lab, workers - w_lab)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, e: int, with_unlabeled: bool = True) -> Iterator[tuple[Batch, Batch | None]]:
        """Batches of epoch ``e``. ``with_unlabeled=False`` (burn-in) skips decoding the
        unlabeled images but keeps the same labeled batches and number of steps."""
        self._lab_sampler.epoch = int(e)
        lab_it = iter(self._lab_loader)
        unl_it = None
        if self._unl_loader is not None and with_unlabeled:
            self._unl_sampler.epoch = int(e)
            unl_it = iter(self._unl_loader)
        for _ in range(self.steps):
            yield next(lab_it), (next(unl_it) if unl_it is not None else None)


def build_val_loader(samples: Sequence[Any], imgsz: int, batch: int, workers: int = 0) -> DataLoader:
    """Letterboxed validation batches in dataset order (item ``i`` is always sample ``i``)."""
    ds = LabeledDataset(samples, imgsz, aug=None, train=False)
    return DataLoader(
        ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate_labeled,
        worker_init_fn=_worker_init if workers > 0 else None,
    )
