"""DTG's dense teacher guidance on the YOLO path: position correspondence, clusters, PLA targets, the step."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import box_iou

from ssod.training.methods.base import build_method
from ssod.training.methods.efficient_teacher.assigner import PseudoLabelAssigner
from ssod.training.methods.efficient_teacher.dense_guidance import DenseAssignment, teacher_clusters
from ssod.training.pseudo_geometry import pull_positions
from test_efficient_teacher import NAMES, S, _batches, _confident_teacher, _spy_assigner, _targets

GRID = [(8, 8), (4, 4), (2, 2)]
STRIDES = [8.0, 16.0, 32.0]


def _m(sx: float, tx: float = 0.0, sy: float | None = None, ty: float = 0.0) -> torch.Tensor:
    sy = sx if sy is None else sy
    return torch.tensor([[[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]]])


def test_same_view_reads_every_position_itself():
    idx = pull_positions(_m(1.0), _m(1.0), GRID, STRIDES, GRID, STRIDES)
    assert torch.equal(idx[0], torch.arange(64 + 16 + 4))


def test_a_mirrored_teacher_view_is_read_at_the_mirrored_cell():
    idx = pull_positions(_m(-1.0, 64.0, 1.0), _m(1.0), GRID, STRIDES, GRID, STRIDES)[0]
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(idx[:64], (i * 8 + (7 - j)).flatten())
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(idx[64:80], 64 + (i * 4 + (3 - j)).flatten())


def test_a_teacher_view_twice_as_large_is_read_one_level_coarser():
    """Teacher on a 2x view (grids 16/8/4): a stride-8 student cell covers 16 teacher pixels, so it
    reads the teacher's stride-16 cell at the same (i, j); stride-32 student cells have no
    stride-64 teacher level and read the nearest, stride 32, at the cell holding their centre."""
    t_grid = [(16, 16), (8, 8), (4, 4)]
    idx = pull_positions(_m(2.0), _m(1.0), t_grid, STRIDES, GRID, STRIDES)[0]
    assert torch.equal(idx[:64], 256 + torch.arange(64))  # student level 8 -> teacher level 16, same cell
    assert torch.equal(idx[64:80], 256 + 64 + torch.arange(16))  # 16 -> 32
    # student stride-32 cell (0, 0): centre (16, 16) -> teacher pixel (32, 32) -> stride-32 cell (1, 1)
    assert int(idx[80]) == 256 + 64 + 1 * 4 + 1


def test_positions_outside_the_teacher_view_read_nothing():
    idx = pull_positions(_m(1.0), _m(1.0, 32.0, 1.0, 0.0), GRID, STRIDES, GRID, STRIDES)[0]  # strong shifted right
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    left = (j < 4).flatten()  # student x < 32 -> teacher x < 0
    assert bool((idx[:64][left] == -1).all()) and bool((idx[:64][~left] >= 0).all())
    assert torch.equal(idx[:64][~left], (i * 8 + j - 4).flatten()[~left])


def _fake_teacher(boxes: list[list[float]], labels: list[int], scores: list[float], batch: list[int], a: int = 6):
    """A teacher whose decoded output is given position by position (reg_max 1, 3 classes, one 1 x a level)."""
    b = max(batch) + 1
    logits = torch.full((b, 3, a), -12.0)
    xywh = torch.zeros(b, 4, a)
    slot = [0] * b
    where = []
    for box, lab, s, bi in zip(boxes, labels, scores, batch):
        k = slot[bi]
        slot[bi] += 1
        logits[bi, lab, k] = torch.logit(torch.tensor(s))
        x1, y1, x2, y2 = box
        xywh[bi, :, k] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        where.append((bi, k))
    raw = [torch.cat((torch.zeros(b, 4, a), logits), 1)[:, :, None, :]]  # (B, 4 + nc, 1, A)
    teacher = SimpleNamespace(reg_max=1, decode=lambda r: torch.cat((xywh, r[0][:, 4:, 0].sigmoid()), 1))
    return teacher, raw, where


def test_teacher_clusters_follow_the_greedy_nms_per_image_and_class():
    boxes = [[10, 10, 40, 40], [11, 10, 41, 40], [12, 12, 40, 42], [10, 10, 40, 40], [50, 50, 60, 60],
             [10, 10, 40, 40], [10, 10, 40, 40]]
    labels = [0, 0, 0, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.3, 0.7, 0.6, 0.05, 0.5]
    batch = [0, 0, 0, 0, 0, 0, 1]
    teacher, raw, where = _fake_teacher(boxes, labels, scores, batch)
    tau1 = torch.tensor([0.1, 0.75, 0.1])  # class 1's 0.7 is below its tau1: not a candidate
    c = teacher_clusters(teacher, raw, (64, 64), tau1, iou=0.65)
    heads = c.heads
    assert heads["scores"].tolist() == pytest.approx([0.9, 0.6, 0.5], abs=1e-4)
    assert heads["batch_idx"].tolist() == [0, 0, 1] and heads["labels"].tolist() == [0, 0, 0]
    head_of = {w: int(c.head[w]) for w in where}
    assert [head_of[w] for w in where] == [0, 0, 0, -1, 1, -1, 2]  # the 0.3 box joins the 0.9 one; 0.05 is background
    b = torch.tensor(boxes, dtype=torch.float32)
    assert float(c.quality[where[2]]) == pytest.approx(float(box_iou(b[2:3], b[0:1])), abs=1e-5)
    assert float(c.quality[where[0]]) == pytest.approx(1.0)
    assert float(c.score[where[1]]) == pytest.approx(0.8, abs=1e-4)
    assert float(c.logit[where[1]]) == pytest.approx(float(torch.logit(torch.tensor(0.8))), abs=1e-3)
    assert int((c.head >= 0).sum()) == 5  # the other positions are background
    # task-aligned targets: score^0.5 IoU^6 over the kept box's (1 there), the same clusters
    a = teacher_clusters(teacher, raw, (64, 64), tau1, iou=0.65, aligned=(0.5, 6.0))
    assert torch.equal(a.head, c.head)
    iou2 = float(box_iou(b[2:3], b[0:1]))
    assert float(a.quality[where[2]]) == pytest.approx((0.3 ** 0.5 * iou2 ** 6) / 0.9 ** 0.5, abs=1e-4)
    assert float(a.quality[where[0]]) == pytest.approx(1.0) and float(a.quality[where[6]]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def student():
    from ssod.training.models.base import build_model

    torch.manual_seed(0)
    return build_model({"model": "yolov8n", "names": NAMES, "width": 0.125, "depth": 0.33}).train()


def test_the_assignment_replaces_task_aligned_targets(student):
    """Rows of two images given out of order: each position learns its own row's class, reliable
    members their IoU with the kept box (and get box loss), uncertain members the teacher's score."""
    raw = [r.detach().requires_grad_() for r in student.forward_raw(torch.rand(2, 3, S, S))]
    a = sum(r.shape[-1] * r.shape[-2] for r in raw)
    t = _targets([[4, 4, 30, 30], [8, 8, 40, 40], [30, 30, 60, 60]], [2, 0, 1], [0.9, 0.8, 0.4],
                 [True, True, False], [True, True, False], batch_idx=[1, 0, 1])
    index = torch.full((2, a), -1)
    quality, score = torch.zeros(2, a), torch.zeros(2, a)
    index[0, 5:9], quality[0, 5:9] = 1, 0.8  # image 0: row 1 (class 0, reliable)
    index[1, 20:23], quality[1, 20:23] = 0, 0.9  # image 1: row 0 (class 2, reliable)
    index[1, 40:42], score[1, 40:42] = 2, 0.35  # image 1: row 2 (class 1, uncertain)
    logit = torch.randn(2, a)
    out = PseudoLabelAssigner(student.criterion())(raw, t, assignment=DenseAssignment(index, quality, score, logit))
    want = torch.zeros(2, a, 3)
    want[0, 5:9, 0], want[1, 20:23, 2], want[1, 40:42, 1] = 0.8, 0.9, 0.35
    assert torch.allclose(out["cls_target"], want)
    mask = torch.zeros(2, a, dtype=torch.bool)
    mask[0, 5:9] = mask[1, 20:23] = True
    assert torch.equal(out["box_mask"], mask)
    assert float(out["rm"].detach()) > 0 and torch.isfinite(out["box"].detach())
    (out["cls"] + out["box"] + out["dfl"] + out["rm"]).backward()
    assert raw[0].grad is not None and torch.isfinite(raw[0].grad).all()


def test_rank_matching_is_zero_when_the_student_ranks_as_the_teacher(student):
    raw = [r.detach() for r in student.forward_raw(torch.rand(1, 3, S, S))]
    flat = torch.cat([x.flatten(2) for x in raw], 2)[0, 4 * int(student.reg_max) :]  # (nc, A)
    a = flat.shape[1]
    t = _targets([[8, 8, 40, 40]], [1], [0.9], [True], [True])
    index = torch.full((1, a), -1)
    index[0, 10:16] = 0
    ones = torch.ones(1, a)
    pla = PseudoLabelAssigner(student.criterion())
    same = pla(raw, t, assignment=DenseAssignment(index, ones, ones, flat[1][None].clone()))
    assert float(same["rm"]) == pytest.approx(0.0, abs=1e-6)
    shuffled = flat[1][None].clone()
    shuffled[0, 10:16] = shuffled[0, 10:16].flip(0) + torch.arange(6.0)
    assert float(pla(raw, t, assignment=DenseAssignment(index, ones, ones, shuffled))["rm"]) > 1e-3
    none = pla(raw, t, assignment=DenseAssignment(torch.full((1, a), -1), ones, ones, ones))
    assert float(none["rm"]) == 0.0 and float(none["cls_target"].sum()) == 0.0 and torch.isfinite(none["cls"])


@pytest.mark.parametrize("rm_weight", [None, 3.0])
def test_inverse_nms_step_end_to_end(student, monkeypatch, rm_weight):
    """``assignment: inverse_nms``: the unlabeled half is assigned from the teacher's clusters (the
    spy sees the assignment), the step trains the student only and, with ``rm_weight`` > 0 (off by
    default), gains a finite ``unsup_rm``; the options it cannot combine with are config errors."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    calls = _spy_assigner(monkeypatch)
    cfg = {"domain_adaptation": False, "assignment": "inverse_nms", "teacher_scales": [1.0]}
    m = build_method("efficient_teacher", cfg if rm_weight is None else {**cfg, "rm_weight": rm_weight})
    m.set_label_statistics([2, 1, 0], 2, names=NAMES)
    m.start_epoch()
    losses = m.losses(labeled, unlabeled, student, teacher)
    rm = {"unsup_rm"} if rm_weight else set()
    assert set(losses) == {"sup", "unsup_cls", "unsup_box", "unsup_dfl"} | rm
    assignment = calls[1]["assignment"]
    assert assignment is not None and int((assignment.index >= 0).sum()) > 0
    assert int(assignment.index.max()) < len(calls[1]["targets"]["boxes"])
    assert float(calls[1]["out"]["box_mask"].sum()) > 0  # the reliable (stride-8, 0.95) cluster gets box loss
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert m.log_values()["pl_members_per_img"] > 0
    for bad in ({"strong_mix": "mosaic"}, {"teacher_scales": [1.0, 1.6]}, {"ld_weight": 1.0},
                {"unsup_background": "teacher"}):
        with pytest.raises(ValueError, match="inverse_nms"):
            build_method("efficient_teacher", {"assignment": "inverse_nms", **bad})
