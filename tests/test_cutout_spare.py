"""``aug.strong_cutout: spare_objects``: cutouts drawn in the loader, painted once the teacher's
boxes are known, skipping those that would hide a pseudo-labeled object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssod.training.data.views import StrongAug, strong_aug, strong_photometric
from ssod.training.pseudo import weak_to_strong
from ssod.training.pseudo_geometry import paint_rects, spare_objects

S = 64


def _pseudo(boxes: list[list[float]], batch_idx: list[int]) -> dict[str, torch.Tensor]:
    n = len(boxes)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4), "scores": torch.ones(n),
            "labels": torch.zeros(n, dtype=torch.long), "batch_idx": torch.tensor(batch_idx, dtype=torch.long)}


def test_a_cutout_that_would_hide_a_pseudo_box_is_skipped():
    boxes = torch.tensor([[0.0, 0, 20, 20], [40, 40, 60, 60], [-50, 0, 10, 20]])
    rects = torch.tensor([[
        [0.0, 0, 20, 20, 9],     # hides box 0 whole: skipped
        [40, 40, 50, 60, 9],     # half of box 1 (visible 0.5 >= 0.25): applied
        [20, 20, 40, 40, 9],     # background: applied
    ], [
        [40, 40, 60, 56, 9],     # 80% of box 1, but box 1 is in image 0: applied in image 1
        [0, 0, 0, 0, 0],         # an empty row: nothing drawn
        [0, 0, 10, 20, 9],       # covers what is left of box 2, which the canvas drops anyway (1/6 visible)
    ]])
    apply = spare_objects(rects, boxes, torch.tensor([0, 0, 1]), S, min_visible=0.25)
    assert apply.tolist() == [[False, True, True], [True, False, True]]
    # the same rect over box 1 in its own image: 80% hidden -> skipped
    apply = spare_objects(rects[1:], boxes[1:2], torch.tensor([0]), S, min_visible=0.25)
    assert apply.tolist() == [[False, False, True]]
    # no pseudo boxes: every drawn cutout applies
    assert spare_objects(rects, boxes[:0], torch.zeros(0, dtype=torch.long), S).tolist() == [[True] * 3, [True, False, True]]


def test_paint_rects_fills_applied_rectangles_in_pass_order():
    img = torch.rand(2, 3, 8, 8)
    rects = torch.tensor([[[0.0, 0, 4, 4, 51], [2, 2, 6, 6, 102]], [[0, 0, 8, 8, 255], [0, 0, 0, 0, 0]]])
    out = paint_rects(img, rects, torch.tensor([[True, True], [False, False]]))
    assert torch.equal(out[1], img[1])
    assert torch.all(out[0, :, 2:6, 2:6] == 102 / 255)  # the later pass wins where they overlap
    assert torch.all(out[0, :, :2, :4] == 51 / 255) and torch.all(out[0, :, 2:4, :2] == 51 / 255)
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[:4, :4] = untouched[2:6, 2:6] = False
    assert torch.equal(out[0][:, untouched], img[0][:, untouched])


def test_deferred_cutouts_draw_what_the_loader_would_paint():
    """Same random draws; painting the recorded rectangles reproduces the loader-painted view exactly."""
    img = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    kw = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    painted_aug = StrongAug(**kw)
    deferred_aug = StrongAug(**kw, cutouts_deferred=True)
    for seed in range(6):
        painted, deferred = [], []
        out_p = strong_photometric(img, painted_aug, np.random.default_rng(seed), painted)
        out_d = strong_photometric(img, deferred_aug, np.random.default_rng(seed), deferred)
        assert painted == deferred and np.array_equal(out_d, img)
        rects = torch.zeros(1, 3, 5)
        if deferred:
            rects[0, :len(deferred)] = torch.tensor(deferred)
        t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        again = paint_rects(t, rects, torch.ones(1, 3, dtype=torch.bool))
        assert torch.equal(again, torch.from_numpy(out_p).permute(2, 0, 1)[None].float() / 255)


def test_weak_to_strong_settles_pending_cutouts_once():
    eye = torch.eye(3)[None]
    strong = torch.rand(1, 3, S, S)
    u = {"weak": strong.clone(), "strong": strong.clone(), "M_weak": eye, "M_strong": eye.clone(),
         "erased": torch.zeros(1, 2, 4),
         "cutouts_pending": torch.tensor([[[0.0, 0, 20, 20, 0], [30, 30, 40, 40, 255]]])}
    out = weak_to_strong(_pseudo([[0, 0, 20, 20]], [0]), u, min_visible=0.25)
    assert out["boxes"].tolist() == [[0, 0, 20, 20]]  # kept: the cutout over it was skipped
    assert "cutouts_pending" not in u
    assert u["erased"].tolist() == [[[0, 0, 0, 0], [30, 30, 40, 40]]]
    assert torch.all(u["strong"][0, :, 30:40, 30:40] == 1.0)
    assert torch.equal(u["strong"][0, :, :20, :20], strong[0, :, :20, :20])
    # a second call of the step (e.g. ignore regions) sees the painted view and drops what it hides
    again = weak_to_strong(_pseudo([[31, 31, 39, 39], [0, 0, 20, 20]], [0, 0]), u, min_visible=0.25)
    assert again["boxes"].tolist() == [[0, 0, 20, 20]]


def test_strong_cutout_modes():
    geo = {}
    assert strong_aug({"strong_cutout": True}, geo).cutouts and not strong_aug({}, geo).cutouts_deferred
    assert strong_aug({"strong_cutout": False}, geo).cutouts == ()
    spare = strong_aug({"strong_cutout": "spare_objects"}, geo)
    assert spare.cutouts == StrongAug.cutouts and spare.cutouts_deferred
    with pytest.raises(ValueError, match="strong_cutout"):
        strong_aug({"strong_cutout": "sometimes"}, geo)


@pytest.mark.slow
def test_spare_objects_runs_through_the_trainer(tiny_cfg, monkeypatch):
    """A 2-epoch mean_teacher run paints its deferred cutouts; a method that never calls
    weak_to_strong is stopped with a one-line error instead of silently losing them."""
    from ssod.training.engine.trainer import Trainer
    from ssod.training.methods.mean_teacher import MeanTeacher

    cfg = tiny_cfg(method="mean_teacher", burn_in_epochs=1, aug={"strong_cutout": "spare_objects"})
    assert cfg["aug"]["strong_cutout"] == "spare_objects" and cfg["aug"]["flip_p"] == 0.5  # merged, not replaced
    Trainer(cfg).train()

    def skip_pseudo_labels(self, labeled, unlabeled, student, teacher):
        return {"sup": student.loss(labeled)[0]}

    monkeypatch.setattr(MeanTeacher, "losses", skip_pseudo_labels)
    cfg = tiny_cfg(method="mean_teacher", burn_in_epochs=1, aug={"strong_cutout": "spare_objects"}, name="no-settle")
    with pytest.raises(ValueError, match="spare_objects needs a method that places its pseudo boxes"):
        Trainer(cfg).train()
