"""Teacher pseudo labels: view mapping, filtering, and precision/recall against hidden labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssod.training.pseudo import (
    QualityMeter,
    concat_detections,
    pseudo_batch,
    match_hidden,
    pseudo_label_quality,
    true_pseudo_labels,
    teacher_pseudo_labels,
    weak_to_strong,
)

S = 64


def _flip() -> torch.Tensor:
    return torch.tensor([[-1.0, 0, S], [0, 1, 0], [0, 0, 1]])


def _scale_shift(s: float, tx: float, ty: float) -> torch.Tensor:
    return torch.tensor([[s, 0, tx], [0, s, ty], [0, 0, 1.0]])


def _unlabeled(M_weak: torch.Tensor, M_strong: torch.Tensor) -> dict:
    b = M_weak.shape[0]
    return {
        "weak": torch.rand(b, 3, S, S), "strong": torch.rand(b, 3, S, S),
        "M_weak": M_weak, "M_strong": M_strong, "orig_size": torch.full((b, 2), S), "paths": [""] * b,
        "gt_boxes": torch.zeros(0, 4), "gt_cls": torch.zeros(0, dtype=torch.long),
        "gt_batch_idx": torch.zeros(0, dtype=torch.long),
    }


class _StubTeacher(nn.Module):
    """Returns fixed weak-view detections; records the mode it was called in."""

    def __init__(self, dets):
        super().__init__()
        self.dets = dets
        self.lin = nn.Linear(1, 1)
        self.modes: list[bool] = []

    def predict(self, img, conf=0.001, iou=0.7, max_det=300):
        self.modes.append(self.training)
        return [dict(d) for d in self.dets]


def test_flip_and_scale_mapping_lands_boxes_in_the_strong_view():
    # weak = horizontal flip of the original; strong = original scaled by 0.5 and shifted (+10, +4)
    M_weak = torch.stack([_flip(), torch.eye(3)])
    M_strong = torch.stack([_scale_shift(0.5, 10, 4), _scale_shift(2.0, -16, -16)])
    dets = [
        {"boxes": torch.tensor([[40.0, 8, 60, 28]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10, 30, 20], [0.0, 0, 9, 9]]), "scores": torch.tensor([0.8, 0.7]),
         "labels": torch.tensor([0, 2])},
    ]
    teacher = _StubTeacher(dets).train()
    out = teacher_pseudo_labels(teacher, _unlabeled(M_weak, M_strong), conf=0.1, iou=0.6, max_det=10)
    assert teacher.modes == [False] and teacher.training  # predicted in eval mode, mode restored
    # image 0: weak x in [40,60] -> original x in [4,24] -> strong x in [12,22], y [8,28] -> [8,18]
    # image 1: original [10,10,30,20] -> x2 - 16 -> [4,4,44,24]; [0,0,9,9] -> [-16,-16,2,2] mostly outside: dropped
    expected = torch.tensor([[12.0, 8, 22, 18], [4, 4, 44, 24]])
    assert torch.allclose(out["boxes"], expected, atol=1e-4)
    assert out["batch_idx"].tolist() == [0, 1]
    assert out["labels"].tolist() == [1, 0]
    assert torch.allclose(out["scores"], torch.tensor([0.9, 0.8]))


def test_weak_to_strong_clips_partial_boxes_and_filters_extra_keys():
    M_weak = torch.eye(3)[None]
    M_strong = _scale_shift(1.0, 20, 0)[None]  # shift right by 20 px: boxes near the right edge leave
    pseudo = {
        "boxes": torch.tensor([[10.0, 10, 30, 30], [30.0, 10, 50, 30], [50.0, 0, 64, 10], [5.0, 5, 6, 40]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([0, 1, 2, 3]),
        "batch_idx": torch.zeros(4, dtype=torch.long),
        "reliable": torch.tensor([True, False, True, False]),
    }
    out = weak_to_strong(pseudo, _unlabeled(M_weak, M_strong), min_size=2.0, min_visible=0.25)
    # [30,50] -> [50,70]: 14/20 visible, clipped to 64; [50,64] -> [70,84] fully outside; [5,6] is 1 px wide
    assert torch.allclose(out["boxes"], torch.tensor([[30.0, 10, 50, 30], [50.0, 10, 64, 30]]))
    assert out["labels"].tolist() == [0, 1]
    assert out["reliable"].tolist() == [True, False]


def test_weak_to_strong_with_no_boxes():
    empty = concat_detections([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}])
    out = weak_to_strong(empty, _unlabeled(torch.eye(3)[None], torch.eye(3)[None]))
    assert out["boxes"].shape == (0, 4) and out["batch_idx"].numel() == 0


def test_quality_is_class_and_image_aware_and_one_to_one():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30], [0.0, 0, 10, 10]])
    gt_cls = torch.tensor([0, 1, 0])
    gt_bidx = torch.tensor([0, 0, 1])
    pseudo = {
        "boxes": torch.tensor([
            [0.0, 0, 10, 10],    # img0 c0: matches gt0
            [0.5, 0, 10, 10],    # duplicate of gt0, lower score: false positive
            [20.0, 20, 30, 30],  # img0 but wrong class 0: false positive
            [0.0, 0, 10, 10],    # img1 c0: matches gt2
            [40.0, 40, 50, 50],  # nothing there
        ]),
        "scores": torch.tensor([0.9, 0.95, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([0, 0, 0, 0, 1]),
        "batch_idx": torch.tensor([0, 0, 0, 1, 0]),
    }
    tp, n_pred, n_gt = pseudo_label_quality(pseudo, gt_boxes, gt_cls, gt_bidx, iou=0.5)
    assert (tp, n_pred, n_gt) == (2, 5, 3)


def test_true_pseudo_labels_keep_exactly_the_matched_boxes():
    """The ``teacher_true`` diagnostic keeps the true positives of the quality matching, nothing else:
    the higher-scoring duplicate takes the hidden box, the wrong class and the empty spot go."""
    gt = {"gt_boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30], [0.0, 0, 10, 10]]),
          "gt_cls": torch.tensor([0, 1, 0]), "gt_batch_idx": torch.tensor([0, 0, 1])}
    pseudo = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [20.0, 20, 30, 30], [0.0, 0, 10, 10],
                               [40.0, 40, 50, 50]]),
        "scores": torch.tensor([0.9, 0.95, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([0, 0, 0, 0, 1]),
        "batch_idx": torch.tensor([0, 0, 0, 1, 0]),
    }
    matched = match_hidden(pseudo, gt["gt_boxes"], gt["gt_cls"], gt["gt_batch_idx"], iou=0.5)
    assert matched.tolist() == [False, True, False, True, False]
    kept = true_pseudo_labels(pseudo, gt, iou=0.5)
    assert kept["scores"].tolist() == pytest.approx([0.95, 0.7]) and kept["batch_idx"].tolist() == [0, 1]
    none = true_pseudo_labels(pseudo, {**gt, "gt_cls": torch.tensor([2, 2, 2])})
    assert len(none["boxes"]) == 0


def test_quality_higher_score_wins_and_loser_takes_its_next_choice():
    # two gts side by side; both boxes prefer gt0, only the 0.5 box also overlaps gt1 enough
    gt = torch.tensor([[0.0, 0, 10, 10], [4.0, 0, 14, 10]])
    pseudo = {
        "boxes": torch.tensor([[1.0, 0, 11, 10], [0.0, 0, 10, 10]]),
        "scores": torch.tensor([0.5, 0.9]),
        "labels": torch.tensor([0, 0]),
        "batch_idx": torch.tensor([0, 0]),
    }
    tp, _, _ = pseudo_label_quality(pseudo, gt, torch.tensor([0, 0]), torch.tensor([0, 0]), iou=0.5)
    assert tp == 2  # the 0.9 box takes gt0, the 0.5 box falls back to gt1 (IoU 0.54)


def test_quality_meter_reports_precision_recall_and_per_image_counts():
    m = QualityMeter()
    un = _unlabeled(torch.eye(3)[None], torch.eye(3)[None])
    un.update(gt_boxes=torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]), gt_cls=torch.tensor([0, 0]),
              gt_batch_idx=torch.tensor([0, 0]))
    p = {"boxes": torch.tensor([[0.0, 0, 10, 10], [40.0, 40, 50, 50], [41.0, 40, 50, 50]]),
         "scores": torch.tensor([0.9, 0.5, 0.4]), "labels": torch.tensor([0, 0, 0]),
         "batch_idx": torch.tensor([0, 0, 0])}
    m.add_images(2)
    m.add_count("pl", 3)
    m.add_quality("pl", p, un)
    v = m.values()
    assert v["pl_per_img"] == 1.5
    assert abs(v["pl_precision"] - 1 / 3) < 1e-9 and v["pl_recall"] == 0.5
    m.reset()
    m.add_quality("pl", p, _unlabeled(torch.eye(3)[None], torch.eye(3)[None]))  # no hidden labels: nothing logged
    assert m.values() == {}


def test_pseudo_batch_is_a_labeled_batch_on_the_strong_view():
    un = _unlabeled(torch.eye(3)[None].repeat(2, 1, 1), torch.eye(3)[None].repeat(2, 1, 1))
    p = {"boxes": torch.tensor([[1.0, 2, 3, 4]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([2]),
         "batch_idx": torch.tensor([1])}
    b = pseudo_batch(p, un)
    assert b["img"] is un["strong"] and b["M"] is un["M_strong"]
    assert b["cls"].tolist() == [2] and b["batch_idx"].tolist() == [1] and b["boxes"].shape == (1, 4)


def test_resample_maps_reads_the_weak_map_at_each_strong_cell():
    """Identity reads the map back cell for cell; a flip mirrors it; a 2x zoom (strong = 2x the
    weak view, shifted) reads the weak map at half the coordinates; cells mapping outside read 0."""
    from ssod.training.pseudo_geometry import resample_maps

    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 8, 8), torch.rand(2, 3, 4, 4)]  # strides 8 and 16 on a 64-px canvas
    flat = torch.cat([m.flatten(2) for m in maps], 2).transpose(1, 2)
    eye = torch.eye(3).repeat(2, 1, 1)
    assert torch.allclose(resample_maps(maps, eye, eye, S), flat, atol=1e-6)

    flipped = resample_maps(maps, eye, torch.stack([_flip(), _flip()]), S)
    expect = torch.cat([m.flip(-1).flatten(2) for m in maps], 2).transpose(1, 2)
    assert torch.allclose(flipped, expect, atol=1e-6)

    # strong = weak shrunk by 2: strong cell (i, j) centre (8j+4, 8i+4) -> weak pixel (16j+8, 16i+8),
    # the corner shared by weak cells 2i..2i+1 x 2j..2j+1 -> their mean; cells past the weak view read 0
    half = _scale_shift(0.5, 0, 0).repeat(2, 1, 1)
    out = resample_maps(maps[:1], eye, half, S).transpose(1, 2).reshape(2, 3, 8, 8)
    assert torch.allclose(out[..., :4, :4], torch.nn.functional.avg_pool2d(maps[0], 2), atol=1e-6)
    assert (out[..., 4:, :] == 0).all() and (out[..., :, 4:] == 0).all()
    shifted = _scale_shift(1.0, 32, 0).repeat(2, 1, 1)  # strong = weak moved right by half the canvas
    out = resample_maps(maps, eye, shifted, S)[:, :64].transpose(1, 2).reshape(2, 3, 8, 8)
    assert torch.allclose(out[..., 4:], maps[0][..., :4], atol=1e-6)
    assert (out[..., :4] == 0).all()  # the strong view's left half comes from outside the weak view


def test_boxes_hidden_by_the_strong_views_cutouts_are_dropped():
    """Visible = inside the view and not under a cutout; < min_visible (0.25) of the area: dropped."""
    eye = torch.eye(3)[None]
    u = _unlabeled(eye, eye)
    boxes = torch.tensor([[0.0, 0, 20, 20], [30, 0, 50, 20], [0, 30, 20, 50], [40, 40, 60, 60]])
    dets = {"boxes": boxes, "scores": torch.ones(4), "labels": torch.zeros(4, dtype=torch.long),
            "batch_idx": torch.zeros(4, dtype=torch.long)}
    # rect 1 hides box 0 entirely; rect 2 half of box 1; rect 3 85% of box 2; box 3 untouched
    u["erased"] = torch.tensor([[[0.0, 0, 20, 20], [30, 0, 40, 20], [0, 30, 20, 47]]])
    out = weak_to_strong(dets, u, min_visible=0.25)
    assert out["boxes"].tolist() == [[30.0, 0, 50, 20], [40, 40, 60, 60]]
    u["erased"] = torch.zeros(1, 3, 4)  # no cutouts: all kept
    assert len(weak_to_strong(dets, u, min_visible=0.25)["boxes"]) == 4
