"""Preview pictures: the first labeled batch and the pseudo-labeled strong views, as drawn boxes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ssod.training.engine.previews import batch_grid
from ssod.training.engine.trainer import Trainer
from ssod.training.methods.mean_teacher import MeanTeacher
from ssod_deploy.label.vis import PALETTE


def test_batch_grid_draws_solid_and_dashed_boxes_in_their_images(tmp_path):
    images = torch.zeros(2, 3, 32, 32)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 28.0], [4.0, 4.0, 20.0, 28.0]])
    out = batch_grid(images, boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.4]), torch.tensor([0, 1]),
                     torch.tensor([False, True]), ["a", "b", "c"], tmp_path / "g.jpg")
    grid = np.asarray(Image.open(out)).astype(int)
    assert grid.shape == (320, 640, 3)  # two 32 px images enlarged 10x, side by side
    # the box's left side (x1 = 4 -> 40), below its caption: per row, is the class colour there?
    solid, dashed = grid[80:270, 38:43], grid[80:270, 320 + 38:320 + 43]

    def rows_in(px, colour):
        return (np.abs(px - np.array(colour)).sum(-1) < 90).any(1).mean()  # JPEG: near, not equal

    assert rows_in(solid, PALETTE[1]) > 0.95
    assert 0.2 < rows_in(dashed, PALETTE[2]) < 0.8  # dashes and gaps
    assert (grid[150:200, 250:300] < 40).all()  # nothing drawn outside the boxes


def test_record_targets_keeps_a_step_only_when_asked():
    m = MeanTeacher({})
    t = {"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.long), "scores": torch.ones(1),
         "batch_idx": torch.zeros(1, dtype=torch.long)}
    m.record_targets(torch.zeros(1, 3, 8, 8), t)
    assert m.captured_targets is None
    m.capture_targets = True
    m.record_targets(torch.zeros(1, 3, 8, 8), t)
    assert m.captured_targets is not None and set(m.captured_targets[1]) == set(t)


def test_ssod_run_writes_the_labeled_and_pseudo_label_pictures(tiny_cfg):
    trainer = Trainer(tiny_cfg(method="efficient_teacher", epochs=3, burn_in_epochs=1, steps_per_epoch=2, plots=True))
    trainer.train()
    written = sorted(p.name for p in trainer.run_dir.glob("*.jpg"))
    # the first SSOD epoch (2) and the last (3), 1-based like the log
    assert written == ["pseudo_batch_epoch2.jpg", "pseudo_batch_epoch3.jpg", "train_batch0.jpg"]
    assert trainer.method.captured_targets is None and not trainer.method.capture_targets
    supervised = Trainer(tiny_cfg(method="supervised", epochs=1, steps_per_epoch=2, plots=True, name="sup"))
    supervised.train()
    assert sorted(p.name for p in supervised.run_dir.glob("*.jpg")) == ["train_batch0.jpg"]
