"""INT8 calibration images: a folder (default: the SSOD unlabeled pool) through the runtime's pre-processing.

Calibration must see exactly what the deployed model sees, so images go through
``ssod_deploy.detector.preprocess_images`` (same letterbox, same normalisation, same reader as
``ssod label``). Unreadable files are skipped and reported, never fatal. All images are decoded
once, up front, into uint8 letterboxed canvases (1.2 MB each at 640 px): the reader can then
report how many are usable before calibration starts, and the quantizer may walk it in any
sub-range (``set_range``) without decoding twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssod_deploy.detector import normalise, pad_value
from ssod_deploy.boxes import letterbox
from ssod_deploy.images import ImageReadError, SkipReport, discover_images, read_image
from ssod_deploy.metadata import ModelMetadata

log = logging.getLogger("ssod")

try:  # onnxruntime's base class when available (it only defines the interface)
    from onnxruntime.quantization import CalibrationDataReader as _Base
except ImportError:  # pragma: no cover
    _Base = object  # type: ignore[assignment,misc]


def select_calibration_images(paths: Sequence[str | Path], size: int, seed: int = 0) -> list[Path]:
    """``size`` paths spread over the whole list (seeded sample, then sorted for reproducible order)."""
    return calibration_order(paths, size, seed)[:size]


def calibration_order(paths: Sequence[str | Path], size: int, seed: int = 0) -> list[Path]:
    """Every path: first ``size`` spread over the list (seeded sample, sorted), then the others in a seeded
    order, as spares for chosen images that turn out unreadable."""
    paths = [Path(p) for p in paths]
    if size <= 0:
        raise ValueError(f"calib-size must be >= 1, got {size}")
    order = np.random.default_rng(seed).permutation(len(paths))
    return [paths[i] for i in (*np.sort(order[:size]), *order[size:])]


class CalibrationReader(_Base):
    """onnxruntime ``CalibrationDataReader`` yielding ``{input_name: (b, 3, S, S) float32}`` batches.

    ``fixed_batch``: the model's batch is static, so every batch has exactly that many images
    (the remainder is dropped; with fewer images than one batch, images repeat). ``limit``: stop
    reading once that many images decoded (later ``images`` stand in for unreadable earlier ones).
    """

    def __init__(
        self,
        images: Sequence[str | Path],
        meta: ModelMetadata,
        input_name: str = "images",
        batch: int = 8,
        fixed_batch: bool = False,
        skipped: SkipReport | None = None,
        limit: int | None = None,
    ):
        self.meta = meta
        self.input_name = input_name
        self.skipped = skipped if skipped is not None else SkipReport()
        pad = pad_value(meta)
        canvases = []
        for p in images:
            if limit is not None and len(canvases) >= limit:
                break
            try:
                canvases.append(letterbox(read_image(p), meta.imgsz, pad)[0])
            except ImageReadError as e:
                self.skipped.add_error(e)
        if not canvases:
            raise ValueError(
                f"no readable calibration images among {len(images)} files"
                + (f" (first problem: {self.skipped.items[0][0]}: {self.skipped.items[0][1]})" if len(self.skipped) else "")
            )
        self.canvases = np.stack(canvases)  # (N, S, S, 3) uint8
        n = len(self.canvases)
        if fixed_batch:
            if n < batch:
                self.canvases = self.canvases[np.arange(batch) % n]
            else:
                self.canvases = self.canvases[: n - n % batch]
        self.batch = int(batch)
        starts = list(range(0, len(self.canvases), self.batch))
        self._batches = [(s, min(s + self.batch, len(self.canvases))) for s in starts]
        self._range = (0, len(self._batches))
        self._pos = 0

    @classmethod
    def from_folder(
        cls, folder: str | Path | Sequence[str | Path], meta: ModelMetadata, size: int = 256, **kw
    ) -> "CalibrationReader":
        """Images found under ``folder`` (or a list of paths), ``size`` readable ones spread over the set
        (an unreadable one is replaced by another, so a few bad files do not shrink the calibration set)."""
        paths = list(folder) if isinstance(folder, (list, tuple)) else discover_images(Path(folder))
        if not paths:
            raise ValueError(f"{folder}: no images for INT8 calibration")
        return cls(calibration_order(paths, size), meta, limit=size, **kw)

    @property
    def num_images(self) -> int:
        return int(len(self.canvases))

    def __len__(self) -> int:
        """Number of batches (the quantizer's strided calibration walks batches)."""
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict iteration to batches ``start_index .. end_index - 1`` and rewind."""
        self._range = (max(0, start_index), min(len(self._batches), end_index))
        self._pos = self._range[0]

    def rewind(self) -> None:
        self._pos = self._range[0]

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._range[1]:
            return None
        s, e = self._batches[self._pos]
        self._pos += 1
        return {self.input_name: normalise(self.canvases[s:e], self.meta)}

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item
