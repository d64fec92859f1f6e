"""Pictures of what the student is taught, written into the run folder.

* ``train_batch0.jpg``: the first labeled batch as the student sees it (augmentation, mosaic,
  boxes), as ultralytics writes: wrong labels or a bad augmentation show at a glance.
* ``pseudo_batch_epoch<N>.jpg`` (SSOD methods that place pseudo boxes; not dtg, whose targets are
  dense): the strong views of the first step of the first SSOD epoch and of the last epoch, with
  the teacher's pseudo boxes as the loss receives them: reliable labels solid, uncertain ones
  dashed with a '?' (the same drawing as ``ssod label --save-vis``). Whether the thresholds, the
  cutouts and the teacher are sane is easier to see than to read from a CSV.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ssod.training.engine.hooks import LOG, Hook
from ssod_deploy.label.vis import draw_detections, shrink_for_vis

if TYPE_CHECKING:
    from ssod.training.engine.trainer import Trainer

__all__ = ["PreviewHook", "batch_grid"]

CELL = 320  # each image is drawn at least this large so 160 px views keep legible captions


class PreviewHook(Hook):
    """Writes ``train_batch0.jpg`` at the first step and the pseudo-label pictures (module doc)."""

    def __init__(self, run_dir: Path, names: list[str], max_images: int = 16):
        self.run_dir, self.names, self.max_images = Path(run_dir), list(names), max_images
        self._step_in_epoch = 0

    def _pseudo_epochs(self, trainer: "Trainer") -> set[int]:
        if not trainer.method.uses_unlabeled:
            return set()
        return {trainer.burn_in_epochs, trainer.epochs - 1}

    def before_epoch(self, trainer: "Trainer") -> None:
        self._step_in_epoch = 0

    def before_step(self, trainer: "Trainer") -> None:
        trainer.method.capture_targets = (self._step_in_epoch == 0 and trainer.epoch in self._pseudo_epochs(trainer)
                                          and not trainer.method.burn_in)

    def after_step(self, trainer: "Trainer") -> None:
        try:
            self._write(trainer)
        except Exception as e:  # a picture must never end a training run
            LOG.warning("could not write a preview picture: %s", e)
        trainer.method.captured_targets = None
        trainer.method.capture_targets = False
        self._step_in_epoch += 1

    def _write(self, trainer: "Trainer") -> None:
        first = self.run_dir / "train_batch0.jpg"
        if self._step_in_epoch == 0 and not first.exists() and trainer.batch is not None:
            lab = trainer.batch[0]
            n = len(lab["cls"])
            batch_grid(lab["img"], lab["boxes"], lab["cls"], None, lab["batch_idx"], torch.zeros(n, dtype=torch.bool),
                       self.names, first, self.max_images)
        captured = trainer.method.captured_targets
        if captured is not None:
            img, t = captured
            reliable = t.get("reliable", torch.ones_like(t["scores"], dtype=torch.bool))
            batch_grid(img, t["boxes"], t["labels"], t["scores"], t["batch_idx"], ~reliable.bool(), self.names,
                       self.run_dir / f"pseudo_batch_epoch{trainer.epoch + 1}.jpg", self.max_images)


def batch_grid(
    images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None,
    batch_idx: torch.Tensor, uncertain: torch.Tensor, names: list[str], out: Path, max_images: int = 16,
) -> Path:
    """Up to ``max_images`` of a (B, 3, H, W) [0, 1] batch with their boxes (``scores`` None: ground
    truth, names only), tiled 4 wide, saved atomically."""
    images = images[:max_images].detach().float().cpu()
    boxes, labels = boxes.detach().cpu().numpy(), labels.detach().cpu().numpy()
    scores = None if scores is None else scores.detach().cpu().numpy()
    batch_idx, uncertain = batch_idx.detach().cpu().numpy().astype(int), uncertain.detach().cpu().numpy().astype(bool)
    cells = []
    for i, im in enumerate(images):
        rgb = (im.permute(1, 2, 0).numpy().clip(0, 1) * 255 + 0.5).astype(np.uint8)
        big = shrink_for_vis(rgb, max_side=max(CELL, *rgb.shape[:2]), min_side=CELL)  # nearest: pixels stay pixels
        r = big.shape[1] / rgb.shape[1]
        k = batch_idx == i
        cells.append(np.asarray(draw_detections(big, boxes[k] * r, None if scores is None else scores[k], labels[k],
                                                uncertain[k], names)))
    if not cells:
        raise ValueError("batch_grid: an empty batch")
    h, w = max(c.shape[0] for c in cells), max(c.shape[1] for c in cells)
    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    grid = np.full((rows * h, cols * w, 3), 114, np.uint8)
    for i, c in enumerate(cells):
        y, x = (i // cols) * h, (i % cols) * w
        grid[y:y + c.shape[0], x:x + c.shape[1]] = c
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    Image.fromarray(grid).save(tmp, format="JPEG", quality=85)
    os.replace(tmp, out)
    return out
