"""Efficient Teacher on anchor-free YOLO: PLA split, Epoch Adaptor thresholds, GRL, both SSOD methods."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssod.training.methods.base import build_method, sigmoid_rampup
from ssod.training.methods.efficient_teacher import EfficientTeacher
from ssod.training.methods.efficient_teacher.adaptor import (
    DomainDiscriminator,
    EpochAdaptor,
    shrunk_class_counts,
    threshold_for_count,
)
from ssod.training.methods.efficient_teacher.assigner import (
    PseudoLabelAssigner,
    dense_teacher_detections,
    inside_any,
    labeled_targets,
    localization_quality,
    multiscale_teacher_detections,
    side_of,
)
from ssod.training.methods.grl import grad_reverse

S = 64
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def student():
    from ssod.training.models.base import build_model

    torch.manual_seed(0)
    return build_model({"model": "yolov8n", "names": NAMES, "width": 0.125, "depth": 0.33}).train()


def _anchor_centers(student) -> torch.Tensor:
    """(A, 2) anchor centres in pixels, in the order of the flattened raw outputs."""
    from ultralytics.utils.tal import make_anchors

    raw = student.forward_raw(torch.zeros(1, 3, S, S))
    pts, strides = make_anchors(raw, student.stride, 0.5)
    return pts * strides


def _targets(boxes, labels, scores, reliable, box_ok, batch_idx=None) -> dict:
    n = len(labels)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "reliable": torch.tensor(reliable, dtype=torch.bool),
        "box_ok": torch.tensor(box_ok, dtype=torch.bool),
        "batch_idx": torch.zeros(n, dtype=torch.long) if batch_idx is None else torch.tensor(batch_idx),
    }


def _inside(centers: torch.Tensor, box) -> torch.Tensor:
    x1, y1, x2, y2 = box
    return (centers[:, 0] > x1) & (centers[:, 0] < x2) & (centers[:, 1] > y1) & (centers[:, 1] < y2)


def _spy_assigner(monkeypatch) -> list[dict]:
    """Record every ``PseudoLabelAssigner`` call (the labeled half first, then the unlabeled one):
    its targets, ignore regions, normaliser floor, background and output."""
    calls: list[dict] = []
    original = PseudoLabelAssigner.__call__

    def spy(self, raw, targets, ignore=None, min_norm=None, background=None, assignment=None):
        out = original(self, raw, targets, ignore, min_norm, background, assignment)
        calls.append({"targets": targets, "ignore": ignore, "min_norm": min_norm, "background": background,
                      "assignment": assignment, "out": out})
        return out

    monkeypatch.setattr(PseudoLabelAssigner, "__call__", spy)
    return calls


# ------------------------------------------------------------------------------------------- PLA
def test_pla_split_reliable_uncertain_background(student):
    """Three far-apart teacher boxes: reliable (0.9), uncertain (0.3), uncertain with sharp edges (0.4)."""
    torch.manual_seed(1)
    raw = [r.detach() for r in student.forward_raw(torch.rand(1, 3, S, S))]
    boxes = [[0, 0, 24, 24], [40, 0, 64, 24], [0, 40, 24, 64]]
    t = _targets(boxes, [0, 1, 2], [0.9, 0.3, 0.4], [True, False, False], [True, False, True])
    out = PseudoLabelAssigner(student.criterion())(raw, t)
    tgt, box_mask = out["cls_target"][0], out["box_mask"][0]  # (A, nc), (A,)
    centers = _anchor_centers(student)
    fg = tgt.sum(1) > 0
    in_box = [_inside(centers, b) for b in boxes]
    for k in range(3):
        assert (fg & in_box[k]).any(), f"box {k} got no position"
    assert not (fg & ~(in_box[0] | in_box[1] | in_box[2])).any()  # everything else is background (target 0)

    # reliable: the supervised task-aligned target (as if it were the only, labeled box)
    alone = PseudoLabelAssigner(student.criterion())(raw, _targets(boxes[:1], [0], [1.0], [True], [True]))
    assert torch.allclose(tgt[in_box[0]], alone["cls_target"][0][in_box[0]])
    assert (tgt[fg & in_box[0]][:, 1:] == 0).all()
    # uncertain: exactly the teacher score in its class, zero in the others
    for k, (c, s) in enumerate([(1, 0.3), (2, 0.4)], start=1):
        pos = fg & in_box[k]
        assert torch.allclose(tgt[pos][:, c], torch.full((int(pos.sum()),), s))
        assert (tgt[pos][:, [j for j in range(3) if j != c]] == 0).all()
    # box/DFL loss: reliable and confident-uncertain positions only
    assert torch.equal(box_mask, fg & (in_box[0] | in_box[2]))
    assert int(out["pos_reliable"]) == int((fg & in_box[0]).sum())
    assert int(out["pos_uncertain"]) == int((fg & (in_box[1] | in_box[2])).sum())


def test_pla_class_vector_targets_for_uncertain_boxes(student):
    """With ``class_scores`` an uncertain box's positions learn the teacher's whole class vector
    (a b-or-c box teaches c at its score too, not as background); reliable boxes keep the
    task-aligned one-hot target, exactly as without the vectors."""
    torch.manual_seed(1)
    raw = [r.detach() for r in student.forward_raw(torch.rand(1, 3, S, S))]
    boxes = [[0, 0, 24, 24], [40, 0, 64, 24]]
    plain = _targets(boxes, [0, 1], [0.9, 0.5], [True, False], [True, False])
    vec = dict(plain, class_scores=torch.tensor([[0.9, 0.3, 0.1], [0.05, 0.5, 0.4]]))
    a = PseudoLabelAssigner(student.criterion())(raw, plain)["cls_target"][0]
    b = PseudoLabelAssigner(student.criterion())(raw, vec)["cls_target"][0]
    centers = _anchor_centers(student)
    fg = a.sum(1) > 0
    rel, unc = fg & _inside(centers, boxes[0]), fg & _inside(centers, boxes[1])
    assert rel.any() and unc.any() and torch.equal(fg, b.sum(1) > 0)  # same positions assigned
    assert torch.equal(a[rel], b[rel])  # reliable: unchanged
    assert torch.allclose(a[unc], torch.tensor([0.0, 0.5, 0.0]).expand(int(unc.sum()), 3))
    assert torch.allclose(b[unc], torch.tensor([0.05, 0.5, 0.4]).expand(int(unc.sum()), 3))
    assert torch.equal(a[~fg], b[~fg]) and (b[~fg] == 0).all()


def test_uncertain_only_targets_give_no_box_loss(student):
    raw = [r.detach().requires_grad_(True) for r in student.forward_raw(torch.rand(1, 3, S, S))]
    pla = PseudoLabelAssigner(student.criterion())
    out = pla(raw, _targets([[8, 8, 40, 40]], [1], [0.3], [False], [False]))
    assert float(out["box"].detach()) == 0 and float(out["dfl"].detach()) == 0 and float(out["cls"].detach()) > 0
    out = pla(raw, _targets([[8, 8, 40, 40]], [1], [0.3], [False], [True]))
    assert float(out["box"].detach()) > 0 and float(out["dfl"].detach()) > 0


def test_all_reliable_pla_equals_the_supervised_yolo_loss(student):
    torch.manual_seed(2)
    batch = {"img": torch.rand(2, 3, S, S), "boxes": torch.tensor([[5.0, 5, 30, 40], [20, 10, 60, 50], [0, 0, 64, 64]]),
             "cls": torch.tensor([0, 2, 1]), "batch_idx": torch.tensor([0, 0, 1])}
    total, _ = student.loss(batch)
    out = PseudoLabelAssigner(student.criterion())(student.forward_raw(batch["img"]), labeled_targets(batch))
    assert torch.allclose((out["box"] + out["cls"] + out["dfl"]) * 2, total, rtol=1e-5)


@pytest.mark.parametrize("per_image", [0, 300])
def test_pla_loss_finite_with_no_or_many_pseudo_boxes(student, per_image):
    torch.manual_seed(3)
    raw = [r.detach().requires_grad_(True) for r in student.forward_raw(torch.rand(2, 3, S, S))]
    n = 2 * per_image
    xy = torch.rand(n, 2) * 48
    wh = 4 + torch.rand(n, 2) * 16
    t = {
        "boxes": torch.cat((xy, (xy + wh).clamp(max=S)), 1), "labels": torch.randint(0, 3, (n,)),
        "scores": 0.1 + 0.9 * torch.rand(n), "reliable": torch.rand(n) > 0.5, "box_ok": torch.rand(n) > 0.3,
        "batch_idx": torch.arange(2).repeat_interleave(per_image),
    }
    out = PseudoLabelAssigner(student.criterion())(raw, t)
    total = out["cls"] + out["box"] + out["dfl"]
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(r.grad).all() for r in raw)
    if per_image == 0:
        assert float(out["box"].detach()) == 0 and float(out["cls"].detach()) > 0  # all background
    else:
        assert float(out["box"].detach()) > 0


def test_ignore_regions_drop_the_background_loss_only_inside_them(student):
    """ignore_low_score: unassigned positions inside low-score teacher boxes get no class loss."""
    torch.manual_seed(4)
    raw = [r.detach().requires_grad_(True) for r in student.forward_raw(torch.rand(1, 3, S, S))]
    pla = PseudoLabelAssigner(student.criterion())
    t = _targets([[0, 0, 24, 24]], [0], [0.9], [True], [True])
    regions = [[32.0, 32, 64, 64], [8, 8, 20, 20]]  # the second overlaps the reliable box
    base = pla(raw, t)
    out = pla(raw, t, {"boxes": torch.tensor(regions), "batch_idx": torch.tensor([0, 0])})
    centers = _anchor_centers(student)
    fg = base["cls_target"][0].sum(1) > 0
    expect = (_inside(centers, regions[0]) | _inside(centers, regions[1])) & ~fg
    assert int(out["ignored"]) == int(expect.sum()) > 0
    assert float(out["cls"].detach()) < float(base["cls"].detach()) and torch.equal(out["box"], base["box"])
    out["cls"].backward()
    nc = len(NAMES)
    g = torch.cat([r.grad.flatten(2) for r in raw], 2)[0, -nc:].abs().sum(0)  # (A,) class-logit gradient
    assert (g[expect] == 0).all() and (g[~expect] > 0).all()


def test_localization_quality_measures_edge_sharpness():
    r = 16
    uniform = torch.zeros(4, r)
    sharp = torch.full((4, r), -20.0)
    sharp[:, 5] = 20.0
    split = torch.full((4, r), -20.0)
    split[:, 7:9] = 5.0  # half on bin 7, half on bin 8: a perfect DFL target for distance 7.5
    q = localization_quality(torch.stack([uniform, sharp, split]))
    assert torch.allclose(q, torch.tensor([2 / r, 1.0, 1.0]), atol=1e-4)


def test_dense_teacher_detections_match_predict(student):
    teacher = copy.deepcopy(student).eval()
    img = torch.rand(2, 3, S, S)
    dets = dense_teacher_detections(teacher, img, conf=0.0, iou=0.65, max_det=5)
    ref = teacher.predict(img, conf=0.0, iou=0.65, max_det=5)
    for i, r in enumerate(ref):
        mine = dets["batch_idx"] == i
        assert torch.allclose(dets["boxes"][mine], r["boxes"], atol=1e-4)
        assert torch.allclose(dets["scores"][mine], r["scores"])
        assert torch.equal(dets["labels"][mine], r["labels"])
    assert dets["loc_quality"].shape == dets["scores"].shape


def _level_class_teacher(student, edge_cells: list[int]):
    """A teacher whose level i scores class i at 0.88 everywhere (input ignored), every box edge
    ``edge_cells[i]`` cells of that level from the position."""
    teacher = copy.deepcopy(student).eval()
    with torch.no_grad():
        for i, cells in enumerate(edge_cells):
            cls, box = teacher.head.cv3[i][-1], teacher.head.cv2[i][-1]
            cls.weight.zero_()
            cls.bias.fill_(-10.0)
            cls.bias[i] = 2.0
            box.weight.zero_()
            box.bias.fill_(-10.0)
            box.bias.view(4, -1)[:, cells] = 10.0
    return teacher


def test_multiscale_teacher_keeps_each_scale_in_its_size_range(student):
    """[1.0] is the plain pass; [1.0, 1.5] keeps 1x boxes >= 2 finest-stride cells and the enlarged
    pass's boxes (mapped back) < 4 cells, merged by one class-aware NMS with max_det per image."""
    from torchvision.ops import box_iou

    teacher = _level_class_teacher(student, [1, 1, 1])  # boxes 2 cells wide
    torch.manual_seed(1)
    img = torch.rand(2, 3, S, S)
    one = dense_teacher_detections(teacher, img, conf=0.0, iou=0.65, max_det=300)
    same = multiscale_teacher_detections(teacher, img, 0.0, 0.65, 300, [1.0])
    assert all(torch.equal(one[k], same[k]) for k in one)
    cell = float(min(teacher.stride))
    big = dense_teacher_detections(teacher, torch.nn.functional.interpolate(img, size=(96, 96), mode="bilinear"),
                                   conf=0.0, iou=0.65, max_det=300)
    big_boxes = big["boxes"] * S / 96
    fused = multiscale_teacher_detections(teacher, img, 0.0, 0.65, 300, [1.0, 1.5])
    assert len(fused["scores"]) > 0 and set(fused) == set(one)
    side = side_of(fused["boxes"])
    for i in range(len(fused["scores"])):
        b, bi = fused["boxes"][i], fused["batch_idx"][i]
        from_one = ((one["boxes"] - b).abs().amax(1) < 1e-4) & (one["batch_idx"] == bi)
        from_big = ((big_boxes - b).abs().amax(1) < 1e-4) & (big["batch_idx"] == bi)
        assert (from_one.any() and side[i] >= 2 * cell) or (from_big.any() and side[i] < 4 * cell)
    assert (side < 2 * cell).any() and (side >= 4 * cell).any()  # both passes contribute
    for i in range(2):  # NMS held across the passes
        m = fused["batch_idx"] == i
        iou = box_iou(fused["boxes"][m], fused["boxes"][m]).fill_diagonal_(0)
        same_cls = fused["labels"][m][:, None] == fused["labels"][m][None]
        assert not ((iou > 0.65) & same_cls).any()
    capped = multiscale_teacher_detections(teacher, img, 0.0, 0.65, 3, [1.0, 1.5])
    assert torch.bincount(capped["batch_idx"], minlength=2).tolist() == [3, 3]
    assert torch.equal(capped["batch_idx"], capped["batch_idx"].sort().values)
    # one scale alone: that pass only, every size kept, boxes in img pixels
    only = multiscale_teacher_detections(teacher, img, 0.0, 0.65, 300, [1.5])
    assert len(only["scores"]) == len(big["scores"]) and torch.allclose(only["boxes"], big_boxes)
    with pytest.raises(ValueError, match="1.0"):
        multiscale_teacher_detections(teacher, img, 0.0, 0.65, 300, [1.5, 2.0])


# ----------------------------------------------------------------------------------- Epoch Adaptor
@pytest.mark.parametrize("scales", [[1.0], [1.5], [1.0, 1.5]])
def test_agnostic_teacher_nms_leaves_no_overlap_between_classes(student, scales):
    """nms_agnostic: no kept box overlaps a kept box of another class by more than the NMS IoU; the
    class-aware default keeps such pairs (the runner-up class of a neighbouring position)."""
    from torchvision.ops import box_iou

    # every box 64 px wide on every level -> the levels' boxes overlap across classes
    teacher = _level_class_teacher(student, [int(32 // st) for st in student.stride.tolist()])
    torch.manual_seed(2)
    img = torch.rand(2, 3, S, S)

    def cross_class_overlaps(d) -> int:
        n = 0
        for i in range(2):
            m = d["batch_idx"] == i
            iou = box_iou(d["boxes"][m], d["boxes"][m]).fill_diagonal_(0)
            n += int(((iou > 0.65) & (d["labels"][m][:, None] != d["labels"][m][None])).sum())
        return n

    aware = multiscale_teacher_detections(teacher, img, 0.0, 0.65, 300, scales)
    agnostic = multiscale_teacher_detections(teacher, img, 0.0, 0.65, 300, scales, agnostic=True)
    assert cross_class_overlaps(aware) > 0
    assert cross_class_overlaps(agnostic) == 0 and 0 < len(agnostic["scores"]) < len(aware["scores"])


def test_threshold_for_count_is_the_right_quantile_of_uniform_scores():
    n, bins = 10000, 1000
    scores = (torch.arange(n) + 0.5) / n  # uniform on [0, 1]
    hist = torch.histc(scores, bins=bins, min=0, max=1)[None].repeat(4, 1)
    target = torch.tensor([1000.0, 2500.0, 20000.0, 0.0])  # last two: more than seen, none wanted
    tau = threshold_for_count(hist, target)
    assert torch.allclose(tau[:2].float(), torch.tensor([0.9, 0.75]), atol=1e-6)
    assert tau[2] == 0 and tau[3] == 1
    for t, k in zip(tau[:2], target[:2]):
        assert abs(int((scores >= t).sum()) - k) <= 1


def test_epoch_adaptor_per_class_thresholds_bounds_and_defaults():
    a = EpochAdaptor(4, tau1=0.1, tau2=0.6, alpha=0.6)
    # 10 labeled images: class 0 has 120 boxes (12/img), class 1 12, class 2 none, class 3 500
    a.set_label_statistics([120, 12, 0, 500], 10)
    n_u = 50
    u = (torch.arange(1000) + 0.5) / 1000
    scores = torch.cat((u, u[u > 0.3], u))  # class 0: uniform; class 2: uniform; class 3: scores > 0.3
    labels = torch.cat((torch.zeros(1000), torch.full((700,), 3), torch.full((1000,), 2))).long()
    for chunk_s, chunk_l in zip(scores.split(100), labels.split(100)):  # several steps
        a.observe(chunk_s, chunk_l, n_images=0)
    a.images = n_u
    assert a.update()
    t1, t2 = a.tau1.tolist(), a.tau2.tolist()
    # class 0: target 120/10*50 = 600 boxes -> tau1 = 0.4; 60% of it = 360 -> tau2 = 0.64
    assert t1[0] == pytest.approx(0.4, abs=1e-4) and t2[0] == pytest.approx(0.64, abs=1e-4)
    # class 1: no teacher scores -> the configured defaults
    assert t1[1] == pytest.approx(0.1) and t2[1] == pytest.approx(0.6)
    # class 2: never labeled -> expect no boxes -> ceilings
    assert t1[2] == pytest.approx(0.5) and t2[2] == pytest.approx(0.9)
    # class 3: target 2500 > 700 boxes seen -> tau1 at its floor; tau2 (1500 > 700) floored at 0.2
    assert t1[3] == pytest.approx(0.05) and t2[3] == pytest.approx(0.2)
    assert a.hist.sum() == 0 and a.images == 0  # the histogram is per epoch
    state = a.state_dict()
    assert all(isinstance(x, float) for x in state["tau1"] + state["tau2"])
    b = EpochAdaptor(4)
    b.load_state_dict(state)
    assert torch.allclose(b.tau1, a.tau1) and torch.allclose(b.tau2, a.tau2)


def test_epoch_adaptor_beta_scales_the_tau1_count_only():
    """beta 1.5: tau1 keeps 1.5x the expected count (900 of class 0's uniform scores -> 0.1);
    tau2 still keeps alpha of the expected count (360 -> 0.64)."""
    u = (torch.arange(1000) + 0.5) / 1000
    out = {}
    for beta in (1.0, 1.5):
        a = EpochAdaptor(1, alpha=0.6, beta=beta)
        a.set_label_statistics([120], 10)
        a.observe(u, torch.zeros(1000, dtype=torch.long), n_images=50)  # target 600 boxes
        assert a.update()
        out[beta] = (float(a.tau1[0]), float(a.tau2[0]))
    assert out[1.0][0] == pytest.approx(0.4, abs=1e-4) and out[1.5][0] == pytest.approx(0.1, abs=1e-4)
    assert out[1.0][1] == out[1.5][1] == pytest.approx(0.64, abs=1e-4)
    with pytest.raises(ValueError, match="beta"):
        EpochAdaptor(1, beta=0.0)


def test_epoch_adaptor_memory_is_bounded():
    a = EpochAdaptor(3, bins=100)
    a.set_label_statistics([1, 1, 1], 1)
    for _ in range(5):
        a.observe(torch.rand(10000), torch.randint(0, 3, (10000,)), n_images=8)
    assert a.hist.shape == (3, 100) and int(a.hist.sum()) == 50000


def _per_image_counts(shares, n_images: int, per_image: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cls = torch.multinomial(torch.tensor(shares), n_images * per_image, replacement=True, generator=g)
    return torch.nn.functional.one_hot(cls, len(shares)).view(n_images, per_image, -1).sum(1)


def test_shrunk_prior_pulls_a_noisy_balanced_sample_toward_uniform():
    """A balanced class mix seen through 100 labeled images: the labeled counts scatter by sampling
    noise alone, the shrunk ones sit closer to the truth (uniform); the total is kept."""
    closer = 0
    for seed in range(10):
        m = _per_image_counts([0.25] * 4, 100, 2, seed)
        raw, shrunk = m.sum(0).double(), shrunk_class_counts(m)
        assert shrunk.sum() == pytest.approx(float(raw.sum()))
        truth = raw.sum() / 4
        closer += int((shrunk - truth).abs().max() < (raw - truth).abs().max())
    assert closer >= 9


def test_shrunk_prior_keeps_a_real_imbalance_and_absent_classes():
    """A long-tailed mix (differences far beyond the noise) keeps its shares within 2 points; a
    class with no labeled instance stays at 0; too little data gives the plain counts."""
    m = _per_image_counts([0.7, 0.2, 0.1, 0.0], 400, 3, 0)
    raw, shrunk = m.sum(0).double(), shrunk_class_counts(m)
    assert raw[3] == 0 and shrunk[3] == 0
    assert torch.allclose(shrunk / shrunk.sum(), raw / raw.sum(), atol=0.02)
    assert (shrunk / shrunk.sum())[0] < (raw / raw.sum())[0]  # still moved toward uniform, a little
    one = torch.tensor([[3, 1, 0]])
    assert torch.equal(shrunk_class_counts(one), one[0].double())


def test_class_prior_shrunk_sets_the_adaptor_targets():
    per_image = [[0, 0], [0, 1], [2], [1, 2, 0], [0]]
    spec = SimpleNamespace(names=NAMES, train=[SimpleNamespace(cls=np.array(c)) for c in per_image])
    plain = build_method("efficient_teacher", {"domain_adaptation": False})
    plain.set_dataset(spec)
    assert plain.adaptor.class_counts.tolist() == [5, 2, 2]
    shrunk = build_method("efficient_teacher", {"domain_adaptation": False, "class_prior": "shrunk"})
    shrunk.set_dataset(spec)
    expected = shrunk_class_counts(torch.tensor([[2, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1], [1, 0, 0]]))
    assert torch.allclose(shrunk.adaptor.class_counts, expected)
    assert not torch.allclose(expected, torch.tensor([5.0, 2, 2], dtype=torch.float64))
    with pytest.raises(ValueError, match="class_prior"):
        build_method("efficient_teacher", {"class_prior": "uniform"})


def test_first_threshold_update_comes_early_then_once_per_epoch():
    """The first thresholds come after ``first_update_images`` images, not after a whole epoch at
    the defaults; then only epoch ends update them, and a resumed run does not update early again."""
    m = build_method("efficient_teacher", {"first_update_images": 8, "domain_adaptation": False})
    m.set_label_statistics([2, 1, 0], 1, names=NAMES)  # 2 a + 1 b boxes per labeled image
    a = m.adaptor
    step = (torch.tensor([0.45, 0.4, 0.2, 0.3]), torch.tensor([0, 0, 0, 1]))  # one image's teacher boxes
    m.start_epoch()
    for _ in range(7):
        m.observe_teacher(a, *step, n_images=1)
    assert a.tau1.tolist() == pytest.approx([0.1] * 3) and m.adaptor_updates == 0  # 7 < 8 images: defaults
    m.observe_teacher(a, *step, n_images=1)
    # 8 images: class a wants 16 of its 24 boxes -> tau1 = the 16th best score (0.4); b: all 8 (0.3)
    assert m.adaptor_updates == 1 and a.tau1[0] == pytest.approx(0.4, abs=2e-3)
    assert a.tau1[1] == pytest.approx(0.3, abs=2e-3) and a.tau1[2] == pytest.approx(0.1)  # c: no scores -> default
    assert m.log_values()["tau1_a"] == pytest.approx(0.4, abs=2e-3)  # the log shows what the epoch ran with
    early = a.tau1.clone()
    for _ in range(20):
        m.observe_teacher(a, torch.tensor([0.99] * 4), torch.zeros(4, dtype=torch.long), n_images=1)
    assert torch.equal(a.tau1, early)  # no second early update
    assert m.end_epoch() and m.adaptor_updates == 2 and not torch.equal(a.tau1, early)

    resumed = build_method("efficient_teacher", {"first_update_images": 8, "domain_adaptation": False})
    resumed.load_state_dict(m.state_dict())
    resumed.set_label_statistics([2, 1, 0], 1, names=NAMES)
    for _ in range(10):
        resumed.observe_teacher(resumed.adaptor, *step, n_images=1)
    assert resumed.adaptor_updates == 2 and torch.equal(resumed.adaptor.tau1, a.tau1)

    paper = build_method("efficient_teacher", {"first_update_images": 0, "domain_adaptation": False})
    paper.set_label_statistics([2, 1, 0], 1, names=NAMES)
    for _ in range(50):
        paper.observe_teacher(paper.adaptor, *step, n_images=1)
    assert paper.adaptor_updates == 0 and paper.adaptor.tau1.tolist() == pytest.approx([0.1] * 3)


# ------------------------------------------------------------------------------- gradient reversal
def test_gradient_reversal_flips_the_sign_with_coefficient():
    x = torch.randn(5, requires_grad=True)
    w = torch.randn(5)
    (grad_reverse(x, 0.3) * w).sum().backward()
    assert torch.allclose(x.grad, -0.3 * w)
    y = torch.randn(5, requires_grad=True)
    assert torch.equal(grad_reverse(y, 2.0), y)


def test_discriminator_learns_while_features_get_the_reversed_gradient():
    torch.manual_seed(0)
    disc = DomainDiscriminator([4, 8], hidden=8)
    feats = [torch.randn(6, 4, 4, 4, requires_grad=True), torch.randn(6, 8, 2, 2, requires_grad=True)]
    domain = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, _ = disc.loss(feats, domain, coeff=1.0)
    loss.backward()
    g_rev = [f.grad.clone() for f in feats]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())
    for f in feats:
        f.grad = None
    disc.zero_grad()
    logits = torch.cat([h(f) for h, f in zip(disc.heads, feats)], 1)  # same heads without reversal
    torch.nn.functional.binary_cross_entropy_with_logits(logits, domain.float()[:, None].expand_as(logits)).backward()
    for gr, f in zip(g_rev, feats):
        assert torch.allclose(gr, -f.grad, atol=1e-6)


# -------------------------------------------------------------------------------------- methods
def _confident_teacher(student):
    """A teacher whose scores are set by hand: stride-8 positions say class 0 at 0.95 (reliable),
    stride-16 positions class 1 at 0.5 (uncertain) with sharp DFL edges, stride-32 nothing."""
    teacher = copy.deepcopy(student).eval()
    bias = [[3.0, -10, -10], [-10, 0.0, -10], [-10, -10, -10]]
    with torch.no_grad():
        for i, b in enumerate(bias):
            last = teacher.head.cv3[i][-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor(b))
        box = teacher.head.cv2[1][-1]
        box.weight.zero_()
        box.bias.fill_(-10.0)
        box.bias.view(4, -1)[:, 1] = 10.0  # every edge 1 grid cell (16 px): sharp
    return teacher


def _batches(b: int = 2):
    torch.manual_seed(4)
    flip = torch.tensor([[-1.0, 0, S], [0, 1, 0], [0, 0, 1]])
    labeled = {"img": torch.rand(b, 3, S, S), "boxes": torch.tensor([[4.0, 4, 30, 30], [30, 20, 60, 60]]),
               "cls": torch.tensor([0, 1]), "batch_idx": torch.tensor([0, b - 1]), "M": torch.eye(3).repeat(b, 1, 1),
               "orig_size": torch.full((b, 2), S), "paths": [""] * b, "skipped": []}
    unlabeled = {"weak": torch.rand(b, 3, S, S), "strong": torch.rand(b, 3, S, S),
                 "M_weak": flip.repeat(b, 1, 1), "M_strong": torch.eye(3).repeat(b, 1, 1),
                 "orig_size": torch.full((b, 2), S), "paths": [""] * b, "skipped": [],
                 "gt_boxes": torch.tensor([[8.0, 8, 24, 24]]), "gt_cls": torch.tensor([0]),
                 "gt_batch_idx": torch.tensor([0])}
    return labeled, unlabeled


def test_min_norm_floors_the_normaliser_and_scales_every_term(student):
    """``unsup_norm: labeled``: one sparse uncertain box gives a tiny target mass; flooring the
    normaliser divides every term by the floor instead (same targets, same assignment)."""
    raw = [r.detach() for r in student.forward_raw(torch.rand(1, 3, S, S))]
    pla = PseudoLabelAssigner(student.criterion())
    t = _targets([[8, 8, 40, 40]], [1], [0.3], [False], [True])
    plain = pla(raw, t)
    mass = float(plain["cls_target"].sum())  # (assigned positions) x 0.3
    assert float(plain["norm"]) == pytest.approx(max(mass, 1.0)) and mass < 20
    floored = pla(raw, t, min_norm=20.0)
    assert float(floored["norm"]) == 20.0
    for k in ("cls", "box", "dfl"):
        assert float(floored[k]) == pytest.approx(float(plain[k]) * float(plain["norm"]) / 20.0, rel=1e-5)
    assert torch.equal(floored["cls_target"], plain["cls_target"])
    assert float(pla(raw, t, min_norm=0.5)["norm"]) == float(plain["norm"])  # a floor below the mass changes nothing


def test_efficient_teacher_labeled_norm_passes_the_labeled_mass_as_floor(student, monkeypatch):
    """``unsup_norm: labeled`` floors the unlabeled call's normaliser at the labeled call's target
    mass per image (x B_u / B_l); ``pseudo`` passes no floor."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    calls: list[tuple[float | None, float]] = []
    original = PseudoLabelAssigner.__call__

    def spy(self, raw, targets, ignore=None, min_norm=None, background=None, **kw):
        out = original(self, raw, targets, ignore, min_norm, background, **kw)
        calls.append((None if min_norm is None else float(min_norm), float(out["norm"])))
        return out

    monkeypatch.setattr(PseudoLabelAssigner, "__call__", spy)
    for norm in ("pseudo", "labeled"):
        calls.clear()
        m = build_method("efficient_teacher", {"burn_in_epochs": 1, "unsup_norm": norm, "domain_adaptation": False})
        m.burn_in = False
        m.extra_modules(student)
        m.losses(labeled, unlabeled, student, teacher)
        (sup_floor, sup_norm), (uns_floor, uns_norm) = calls  # labeled call first, then the unlabeled one
        assert sup_floor is None
        if norm == "pseudo":
            assert uns_floor is None
        else:
            assert uns_floor == pytest.approx(sup_norm * 2 / 2) and uns_norm >= uns_floor
    with pytest.raises(ValueError, match="unsup_norm"):
        build_method("efficient_teacher", {"unsup_norm": "mean"})


def _repeated(unlabeled: dict) -> dict:
    """The unlabeled batch twice over (a 1:2 labeled:unlabeled step made of the same images)."""
    b = unlabeled["weak"].shape[0]
    out = {k: torch.cat((v, v)) if k in ("weak", "strong", "M_weak", "M_strong", "orig_size", "gt_boxes", "gt_cls")
           else v for k, v in unlabeled.items()}
    return {**out, "gt_batch_idx": torch.cat((unlabeled["gt_batch_idx"], unlabeled["gt_batch_idx"] + b)),
            "paths": unlabeled["paths"] * 2}


@pytest.mark.parametrize("method", ["efficient_teacher", "mean_teacher"])
def test_lambda_weighs_the_same_at_any_unlabeled_ratio(student, method):
    """L = L_s + lambda * L_u with each part per image of its own batch (the papers' form): the same
    unlabeled images twice over (ratio 1:2) give the same unsupervised terms as once (1:1)."""
    student = copy.deepcopy(student).eval()  # BatchNorm running statistics: duplicates change nothing
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    out = []
    for ul in (unlabeled, _repeated(unlabeled)):
        m = build_method(method, {"burn_in_epochs": 1, "domain_adaptation": False} if method == "efficient_teacher"
                         else {"burn_in_epochs": 1, "threshold": 0.4})
        if method == "efficient_teacher":
            m.extra_modules(student)
            m._ensure(NAMES)
        m.burn_in = False
        out.append({k: float(v.detach()) for k, v in m.losses(labeled, ul, student, teacher).items()})
    assert set(out[0]) == set(out[1]) and len(out[0]) > 1
    for k in out[0]:
        assert out[1][k] == pytest.approx(out[0][k], rel=1e-4), k
    assert any(v > 0 for k, v in out[0].items() if k.startswith("unsup"))


def test_plain_pla_default_gives_uncertain_boxes_no_box_loss(student):
    """The shipped default (uncertain_box_loc 1.0) is the paper's plain PLA, even for a perfectly sharp teacher."""
    assert build_method("efficient_teacher", {}).cfg["uncertain_box_loc"] >= 1.0
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    m = build_method("efficient_teacher", {"burn_in_epochs": 1, "domain_adaptation": False})
    spec = SimpleNamespace(names=NAMES, train=[SimpleNamespace(cls=np.array([0, 0, 1]))] * 4, unlabeled=["x"] * 8)
    m.hooks()[0].before_train(SimpleNamespace(spec=spec))
    m.burn_in = False
    labeled, unlabeled = _batches()
    losses = m.losses(labeled, unlabeled, student, teacher)
    assert torch.isfinite(sum(losses.values()))
    logs = m.log_values()
    assert logs["pl_uncertain_per_img"] > 0 and logs["pl_uncertain_box_per_img"] == 0


def test_efficient_teacher_losses_end_to_end(student):
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    m = build_method("efficient_teacher", {"burn_in_epochs": 1, "uncertain_box_loc": 0.85})
    assert isinstance(m, EfficientTeacher) and m.uses_unlabeled
    disc = m.extra_modules(student)
    assert isinstance(disc, DomainDiscriminator) and len(disc.heads) == 3
    spec = SimpleNamespace(names=NAMES, train=[SimpleNamespace(cls=np.array([0, 0, 1]))] * 4, unlabeled=["x"] * 8)
    hook = m.hooks()[0]
    hook.before_train(SimpleNamespace(spec=spec))
    labeled, unlabeled = _batches()

    m.burn_in = True  # burn-in: only the supervised loss
    assert set(m.losses(labeled, unlabeled, student, teacher)) == {"sup"}
    m.burn_in = False
    hook.before_epoch(None)
    losses = m.losses(labeled, unlabeled, student, teacher)
    assert set(losses) == {"sup", "unsup_cls", "unsup_box", "unsup_dfl", "da"}
    total = sum(losses.values())
    assert torch.isfinite(total) and float(losses["unsup_box"].detach()) > 0
    total.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())

    logs = m.log_values()
    assert logs["pl_reliable_per_img"] > 0 and logs["pl_uncertain_per_img"] > 0
    assert logs["pl_uncertain_box_per_img"] == logs["pl_uncertain_per_img"]  # the sharp level passes the gate
    assert 0 <= logs["pl_precision"] <= 1 and 0 <= logs["pl_recall"] <= 1
    assert logs["tau1_a"] == pytest.approx(0.1) and logs["tau2_c"] == pytest.approx(0.6)
    assert 0 <= logs["da_acc"] <= 1

    hook.after_epoch(None)  # Epoch Adaptor from this epoch's 2 images (labeled: 2 a + 1 b per image)
    state = m.state_dict()
    # a: 4 boxes wanted, 2 seen -> floor; b: 2 wanted of 32 at 0.5 -> 0.5 (tau2 = tau1 + gap); c: no scores -> defaults
    assert state["tau1"] == pytest.approx([0.05, 0.5, 0.1], abs=2e-3)
    assert state["tau2"] == pytest.approx([0.2, 0.55, 0.6], abs=2e-3)
    assert all(isinstance(x, float) for x in state["tau1"] + state["tau2"])
    assert m.export_metadata()["tau2"] == state["tau2"]
    fresh = build_method("efficient_teacher", {})
    fresh.load_state_dict(state)
    assert fresh.state_dict()["tau1"] == state["tau1"]


def test_teacher_view_comes_from_the_loader_at_the_teacher_scale(student, monkeypatch):
    """One teacher scale s != 1: the method asks the loader for an s-times weak view (stride-rounded)
    and runs its teacher once on it as it is; several scales or the teacher-background option keep
    the imgsz view (and enlarge it themselves)."""
    m = build_method("efficient_teacher", {"teacher_scales": [1.2]})
    assert m.teacher_view_size(96, student) == 128  # 115.2 -> the nearest multiple of stride 32
    assert m.teacher_view_size(160, student) == 192 and m.teacher_view_size(640, student) == 768
    for cfg in ({"teacher_scales": [1.0]}, {"teacher_scales": [1.0, 1.6]},
                {"teacher_scales": [1.2], "unsup_background": "teacher"}):
        assert build_method("efficient_teacher", cfg).teacher_view_size(96, student) == 96
    assert build_method("efficient_teacher", {"teacher_scales": [1.0]}).teacher_view_size(100, student) == 100
    assert build_method("efficient_teacher", {"teacher_scales": [1.05]}).teacher_view_size(100, student) == 100
    assert build_method("mean_teacher", {}).teacher_view_size(96, student) == 96

    labeled, unlabeled = _batches()
    assert m.pass_scales(unlabeled) == [1.2]  # an imgsz weak view: the method enlarges it
    big = {**unlabeled, "weak": torch.rand(2, 3, 2 * S, 2 * S), "M_weak": unlabeled["M_weak"] * 0 + torch.diag(
        torch.tensor([2.0, 2.0, 1.0]))}
    assert m.pass_scales(big) == [1.0]

    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    seen = []
    forward = teacher.forward_raw
    monkeypatch.setattr(teacher, "forward_raw", lambda x: seen.append(tuple(x.shape)) or forward(x))
    m.extra_modules(student)
    m._ensure(NAMES)
    losses = m.losses(labeled, big, student, teacher)
    assert torch.isfinite(sum(losses.values()))
    assert seen == [(2, 3, 2 * S, 2 * S)]  # one pass, on the loader's view as it is
    assert m.log_values()["pl_reliable_per_img"] > 0  # its boxes reached the strong view


def test_sigmoid_rampup_shape():
    assert sigmoid_rampup(0.0, 3.0) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(1.5, 3.0) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(3.0, 3.0) == sigmoid_rampup(9.0, 3.0) == 1.0
    assert sigmoid_rampup(-1.0, 3.0) == pytest.approx(math.exp(-5))  # before the switch: clipped
    assert sigmoid_rampup(0.0, 0.0) == 1.0  # no ramp
    xs = [sigmoid_rampup(x / 10, 3.0) for x in range(31)]
    assert all(a < b for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("method", ["efficient_teacher", "mean_teacher"])
def test_unsup_warmup_scales_only_the_unsupervised_terms(student, method):
    """``unsup_warmup_epochs``: lambda_u * ramp(epochs since the switch) on the unsupervised terms;
    the supervised term and the pseudo labels are untouched."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    out = {}
    for warm, epochs in ((0.0, 0.0), (2.0, 0.5), (2.0, 2.5)):
        m = build_method(method, {"unsup_warmup_epochs": warm, "domain_adaptation": False}
                         if method == "efficient_teacher" else {"unsup_warmup_epochs": warm})
        m.burn_in, m.ssod_epochs = False, epochs
        out[(warm, epochs)] = {k: float(v.detach()) for k, v in m.losses(labeled, unlabeled, student, teacher).items()}
        assert m.step_log["lambda_u"] == pytest.approx(m.cfg["lambda_u"] * sigmoid_rampup(epochs, warm))
    full, early, done = out[(0.0, 0.0)], out[(2.0, 0.5)], out[(2.0, 2.5)]
    unsup = [k for k in full if k.startswith("unsup")]
    assert unsup and all(full[k] > 0 for k in unsup)
    for k in unsup:
        assert early[k] == pytest.approx(full[k] * math.exp(-5 * 0.75**2), rel=1e-5)
        assert done[k] == pytest.approx(full[k], rel=1e-5)
    assert early["sup"] == pytest.approx(full["sup"], rel=1e-6)


def test_hidden_labels_pseudo_source_replaces_the_teacher_boxes(student, monkeypatch):
    """The diagnostic ``pseudo_source: hidden_labels``: the unlabeled loss gets exactly the hidden
    box (weak view, mapped into the strong one) as a reliable target, whatever the teacher says;
    without hidden labels in the data it refuses to start."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)  # would give many boxes of classes 0 and 1
    labeled, unlabeled = _batches()
    calls = _spy_assigner(monkeypatch)
    m = build_method("efficient_teacher", {"domain_adaptation": False, "pseudo_source": "hidden_labels"})
    m.set_label_statistics([2, 1, 0], 4, names=NAMES)
    m.start_epoch()
    losses = m.losses(labeled, unlabeled, student, teacher)
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["unsup_cls"].detach()) > 0
    pseudo = calls[1]["targets"]  # labeled call first, then the unlabeled one
    flipped = torch.tensor([[S - 24.0, 8, S - 8, 24]])  # M_weak is a horizontal flip, M_strong the identity
    assert torch.allclose(pseudo["boxes"], flipped) and pseudo["labels"].tolist() == [0]
    assert pseudo["reliable"].tolist() == [True] and pseudo["batch_idx"].tolist() == [0]
    assert m.log_values()["pl_precision"] == 1.0
    with pytest.raises(ValueError, match="pseudo_source"):
        build_method("efficient_teacher", {"pseudo_source": "oracle"})
    spec = type("Spec", (), {"names": NAMES, "train": [], "unlabeled_hidden": None})()
    with pytest.raises(ValueError, match="hidden_labels"):
        m.set_dataset(spec)


def test_teacher_true_pseudo_source_filters_the_teacher_boxes(student, monkeypatch):
    """``pseudo_source: teacher_true`` hands the teacher's boxes (not the hidden labels) to the
    hidden-label filter and trains on what it returns."""
    import ssod.training.methods.efficient_teacher as et

    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    given: list[dict] = []

    def fake_filter(weak, un, iou):
        given.append(weak)
        return et.select(weak, torch.arange(len(weak["scores"])) == 0)  # keep the top box only

    monkeypatch.setattr(et, "true_pseudo_labels", fake_filter)
    calls = _spy_assigner(monkeypatch)
    m = build_method("efficient_teacher", {"domain_adaptation": False, "pseudo_source": "teacher_true",
                                           "tau1": 0.05, "tau2": 0.06})
    m.set_label_statistics([2, 1, 0], 4, names=NAMES)
    m.start_epoch()
    m.losses(labeled, unlabeled, student, teacher)
    assert len(given) == 1 and len(given[0]["scores"]) > 1  # the teacher's boxes, several of them
    assert len(calls[1]["targets"]["scores"]) <= 1  # the unlabeled assigner got the filtered set


def test_ignore_low_score_turns_sub_tau1_boxes_into_ignore_regions(student):
    """tau1 above the teacher's 0.5 class-b boxes: off -> they are background, on -> ignored."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    cls_loss = {}
    for on in (False, True):
        m = build_method("efficient_teacher", {"domain_adaptation": False, "tau1": 0.6, "tau2": 0.9,
                                               "ignore_low_score": on})
        m.set_label_statistics([2, 1, 0], 4, names=NAMES)
        m.start_epoch()
        losses = m.losses(labeled, unlabeled, student, teacher)
        assert all(torch.isfinite(v) for v in losses.values())
        cls_loss[on] = float(losses["unsup_cls"].detach())
        assert (m.log_values().get("pl_ignore_regions_per_img", 0) > 0) == on
    assert cls_loss[True] < cls_loss[False]


def test_uncertain_targets_ignore_turns_uncertain_boxes_into_ignore_regions(student, monkeypatch):
    """``uncertain_targets``: soft (the paper) -> the 0.5 class-b boxes between tau1 0.3 and tau2 0.9
    reach the assigner as soft targets; ignore -> only the 0.95 reliable boxes do, and the uncertain
    ones arrive as ignore regions (with ``ignore_low_score`` the sub-tau1 boxes join them)."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    calls = _spy_assigner(monkeypatch)
    got = {}
    for mode, low in (("soft", False), ("ignore", False), ("ignore", True)):
        calls.clear()
        m = build_method("efficient_teacher", {"domain_adaptation": False, "tau1": 0.3, "tau2": 0.9,
                                               "uncertain_targets": mode, "ignore_low_score": low})
        m.set_label_statistics([2, 1, 0], 4, names=NAMES)
        m.start_epoch()
        assert all(torch.isfinite(v) for v in m.losses(labeled, unlabeled, student, teacher).values())
        targets, ignore = calls[1]["targets"], calls[1]["ignore"]  # [0] is the labeled half
        got[mode, low] = (targets["scores"], targets["labels"], ignore)
    scores, labels, ignore = got["soft", False]
    assert ignore is None and (labels == 1).any() and (labels == 0).any()  # uncertain b and reliable a
    scores, labels, ignore = got["ignore", False]
    n_unc = int((got["soft", False][1] == 1).sum())
    assert (labels == 0).all() and (scores >= 0.9).all() and len(labels) > 0
    assert len(ignore["scores"]) == n_unc and (ignore["labels"] == 1).all()
    assert len(got["ignore", True][2]["scores"]) >= n_unc
    with pytest.raises(ValueError, match="uncertain_targets"):
        build_method("efficient_teacher", {"uncertain_targets": "drop"})


def test_uncertain_targets_vector_hands_the_teacher_class_scores_to_the_assigner(student, monkeypatch):
    """vector: the unlabeled targets carry each box's full class-score row (its top entry is the
    box's score); soft: they do not, so the assigner keeps the paper's one-hot soft target."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    calls = _spy_assigner(monkeypatch)
    for mode in ("soft", "vector"):
        calls.clear()
        m = build_method("efficient_teacher", {"domain_adaptation": False, "tau1": 0.3, "tau2": 0.9,
                                               "uncertain_targets": mode})
        m.set_label_statistics([2, 1, 0], 4, names=NAMES)
        m.start_epoch()
        assert all(torch.isfinite(v) for v in m.losses(labeled, unlabeled, student, teacher).values())
        t = calls[1]["targets"]
        if mode == "soft":
            assert "class_scores" not in t
        else:
            v = t["class_scores"]
            assert v.shape == (len(t["scores"]), len(NAMES)) and len(v) > 0
            assert torch.allclose(v.max(1).values, t["scores"]) and torch.equal(v.argmax(1), t["labels"])


@pytest.mark.parametrize("mode", ["mosaic", "mixup"])
def test_strong_mix_feeds_the_student_composites_with_labeled_boxes_among_the_targets(student, monkeypatch, mode):
    """strong_mix at p=1: the student's unlabeled half is a composite (not the strong images), its
    targets include labeled boxes as score-1 reliable targets, and the losses stay finite."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches(4)
    labeled["boxes"], labeled["cls"] = labeled["boxes"].repeat(2, 1), labeled["cls"].repeat(2)
    labeled["batch_idx"] = torch.arange(4)  # a box in every labeled image
    calls = _spy_assigner(monkeypatch)
    seen: list[torch.Tensor] = []
    forward = type(student).forward_raw
    monkeypatch.setattr(type(student), "forward_raw", lambda self, x: seen.append(x) or forward(self, x))
    m = build_method("efficient_teacher", {"domain_adaptation": False, "strong_mix": mode, "strong_mix_p": 1.0})
    m.set_label_statistics([2, 1, 0], 4, names=NAMES)
    m.start_epoch()
    torch.manual_seed(3)
    losses = m.losses(labeled, unlabeled, student, teacher)
    assert all(torch.isfinite(v) for v in losses.values())
    student_unlabeled = seen[-1][4:]
    assert student_unlabeled.shape == unlabeled["strong"].shape
    assert not torch.equal(student_unlabeled, unlabeled["strong"])
    t = calls[1]["targets"]
    assert (t["batch_idx"] < 4).all()
    from_labeled = (t["scores"] == 1) & t["reliable"]
    assert from_labeled.any()


def test_teacher_background_gives_unassigned_positions_the_teacher_scores(student, monkeypatch):
    """``unsup_background: teacher``: positions no pseudo box is assigned to learn the teacher's
    scores read through the view matrices (here a flip of constant maps: level 0 says a at 0.95,
    level 1 b at 0.5 — below tau1, so those boxes are dropped but their scores stay targets);
    assigned positions and the normaliser are those of the paper's zero background."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    labeled, unlabeled = _batches()
    seen: dict[str, tuple[dict, torch.Tensor | None, dict]] = {}
    original = PseudoLabelAssigner.__call__
    mode = ""

    def spy(self, raw, targets, ignore=None, min_norm=None, background=None, **kw):
        out = original(self, raw, targets, ignore, min_norm, background, **kw)
        seen[mode] = (out, background, targets)
        return out

    monkeypatch.setattr(PseudoLabelAssigner, "__call__", spy)
    for mode in ("zero", "teacher"):
        m = build_method("efficient_teacher", {"domain_adaptation": False, "tau1": 0.6, "tau2": 0.9,
                                               "unsup_background": mode})
        m.set_label_statistics([2, 1, 0], 4, names=NAMES)
        m.start_epoch()
        assert all(torch.isfinite(v) for v in m.losses(labeled, unlabeled, student, teacher).values())
    (zero, bg0, _), (soft, bg, targets) = seen["zero"], seen["teacher"]
    assert bg0 is None and bg.shape == zero["cls_target"].shape == (2, 84, 3)
    lvl0, lvl1 = bg[:, :64], bg[:, 64:80]
    assert torch.allclose(lvl0[..., 0], torch.sigmoid(torch.tensor(3.0)), atol=1e-5)
    assert torch.allclose(lvl1[..., 1], torch.tensor(0.5), atol=1e-5) and float(bg[:, 80:].max()) < 1e-4
    fg = zero["cls_target"].sum(-1) > 0
    assert fg.any() and (~fg[:, 64:80]).all()  # the 0.5 boxes are under tau1: nothing assigned to them
    # positions inside a kept pseudo box keep the zero target, the others get the teacher's
    near = fg | inside_any(_anchor_centers(student), targets["boxes"], targets["batch_idx"], 2)
    assert torch.equal(soft["cls_target"], torch.where(near[..., None], zero["cls_target"], bg))
    assert float(soft["norm"]) == float(zero["norm"])
    with pytest.raises(ValueError, match="unsup_background"):
        build_method("efficient_teacher", {"unsup_background": "ignore"})


def test_background_targets_apply_only_away_from_target_boxes(student):
    """PLA ``background``: positions outside every target box learn it; assigned positions keep
    their targets and unassigned ones inside a box keep 0; the normaliser ignores it."""
    raw = [r.detach() for r in student.forward_raw(torch.rand(1, 3, S, S))]
    pla = PseudoLabelAssigner(student.criterion())
    box = [0.0, 0, 24, 24]
    t = _targets([box], [0], [0.9], [True], [True])
    bg = torch.full((1, 84, 3), 0.3)
    plain, soft = pla(raw, t), pla(raw, t, background=bg)
    fg = plain["cls_target"][0].sum(1) > 0
    inside = _inside(_anchor_centers(student), box)
    assert fg.any() and (inside & ~fg).any() and (~inside).any()
    target = soft["cls_target"][0]
    assert torch.equal(target[fg], plain["cls_target"][0][fg])
    assert (target[inside & ~fg] == 0).all() and torch.allclose(target[~inside & ~fg], torch.tensor(0.3))
    assert float(soft["norm"]) == float(plain["norm"]) and float(soft["cls"]) > float(plain["cls"])


def test_efficient_teacher_without_adaptation_or_pseudo_boxes(student):
    student = copy.deepcopy(student).train()
    teacher = copy.deepcopy(student).eval()  # untrained: scores ~0.004, no pseudo boxes at all
    m = build_method("efficient_teacher", {"domain_adaptation": False, "adaptive_thresholds": False})
    assert m.extra_modules(student) is None
    labeled, unlabeled = _batches()
    losses = m.losses(labeled, unlabeled, student, teacher)
    assert "da" not in losses and all(torch.isfinite(v) for v in losses.values())
    assert float(losses["unsup_box"].detach()) == 0 and float(losses["unsup_cls"].detach()) > 0  # all background
    sum(losses.values()).backward()


def test_mean_teacher_losses_end_to_end(student):
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    m = build_method("mean_teacher", {})
    assert m.cfg["threshold"] == 0.5 and m.uses_unlabeled
    labeled, unlabeled = _batches()
    m.hooks()[0].before_epoch(None)
    losses = m.losses(labeled, unlabeled, student, teacher)
    assert set(losses) == {"sup", "unsup"} and torch.isfinite(losses["unsup"]) and float(losses["unsup"].detach()) > 0
    sum(losses.values()).backward()
    logs = m.log_values()
    assert logs["pl_boxes_per_img"] > 0 and "pl_precision" in logs
    m.burn_in = True
    assert set(m.losses(labeled, unlabeled, student, teacher)) == {"sup"}


def test_method_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown method_cfg keys \\['tua2'\\]"):
        build_method("efficient_teacher", {"tua2": 0.5})
    with pytest.raises(ValueError, match="'lambda_u' must be a number"):
        build_method("mean_teacher", {"lambda_u": "three"})
    with pytest.raises(ValueError, match="tau1 <= tau2"):
        build_method("efficient_teacher", {"tau1": 0.7, "tau2": 0.6})
    with pytest.raises(ValueError, match=r"several teacher_scales must include 1.0"):
        build_method("efficient_teacher", {"teacher_scales": [1.4, 2.0]})
    with pytest.raises(ValueError, match=r"teacher_scales must lie in \[1, 4\]"):
        build_method("efficient_teacher", {"teacher_scales": [0.5]})
    with pytest.raises(ValueError, match=r"method 'mean_teacher': threshold must be in \[0, 1\], got 1.5"):
        build_method("mean_teacher", {"threshold": 1.5})
    with pytest.raises(ValueError, match=r"method 'soft_teacher': cls_threshold must be in \[0, 1\], got -0.1"):
        build_method("soft_teacher", {"cls_threshold": -0.1})
    with pytest.raises(ValueError, match="'supervised' has no hyperparameters; got method_cfg keys \\['lambda_u'\\]"):
        build_method("supervised", {"lambda_u": 1.0})
    with pytest.raises(ValueError, match="unsup_norm must be pseudo or labeled, not 'images'"):
        build_method("efficient_teacher", {"unsup_norm": "images"})
    with pytest.raises(ValueError, match="strong_mix needs unsup_background: zero"):
        build_method("efficient_teacher", {"strong_mix": "mosaic", "unsup_background": "teacher"})
    with pytest.raises(ValueError, match=r"strong_mix_p must lie in \[0, 1\]"):
        build_method("efficient_teacher", {"strong_mix": "mixup", "strong_mix_p": 2.0})
    m = build_method("efficient_teacher", {})
    with pytest.raises(ValueError, match="needs the student"):
        m.extra_modules()


def test_shipped_method_yamls_load_and_match_the_defaults():
    from ssod.config import method_defaults

    for name in ("efficient_teacher", "mean_teacher"):
        cfg = method_defaults(name)
        m = build_method(name, cfg)  # every key known and well typed
        assert set(cfg) == set(type(m).DEFAULTS)
    et = method_defaults("efficient_teacher")
    assert (et["tau1"], et["tau2"], et["alpha"], et["lambda_u"], et["da_weight"]) == (0.1, 0.6, 0.6, 1.0, 0.1)
    assert (et["nms_iou"], et["max_det"]) == (0.65, 100)


@pytest.mark.slow
def test_two_epoch_run_saves_thresholds_in_checkpoint(tiny_cfg):
    """Needs the trainer to call ``method.extra_modules(student)`` (the discriminator is sized from it)."""
    import csv

    from ssod.training.engine.checkpoint import load_checkpoint
    from ssod.training.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg(method="efficient_teacher", burn_in_epochs=1, method_cfg={"unsup_warmup_epochs": 2.0}))
    assert trainer.extra is not None  # the domain discriminator is trained with the student
    run = trainer.train()["run_dir"]
    ckpt = load_checkpoint(f"{run}/weights/last.pt")
    nc = len(ckpt["names"])
    state = ckpt["method_state"]
    assert len(state["tau1"]) == nc and len(state["tau2"]) == nc
    assert all(0.05 <= a < b <= 0.9 for a, b in zip(state["tau1"], state["tau2"]))
    assert ckpt["export_metadata"]["tau2"] == state["tau2"] and ckpt["extra"]
    row = list(csv.DictReader(open(f"{run}/results.csv")))[-1]
    assert {"method/tau1_0", "method/tau2_0", "method/pl_reliable_per_img", "method/pl_uncertain_per_img"} <= set(row)
    # the trainer tells the method how far past the switch each step is: the ramp's first half
    lam = trainer.method.cfg["lambda_u"]
    assert sigmoid_rampup(0.0, 2.0) * lam < float(row["train/lambda_u"]) < sigmoid_rampup(1.0, 2.0) * lam


def test_gmm_thresholds_find_the_two_score_populations() -> None:
    """Consistent-Teacher's rule on a known mixture: many low-scored background boxes and fewer
    objects scored high. tau2 must land on the object mean, tau1 where the posterior of the
    objects crosses 1/2 (solved here from the true parameters); a class with too few scores
    keeps its thresholds; a unimodal class must not crash."""
    import math

    from ssod.training.methods.efficient_teacher.adaptor import GMM_MIN_BOXES, gmm_thresholds

    g = torch.Generator().manual_seed(0)
    bins = 1000
    (mn, sn, nn), (mp, sp, npos) = (0.15, 0.05, 30000), (0.75, 0.08, 8000)
    scores = torch.cat((mn + sn * torch.randn(nn, generator=g), mp + sp * torch.randn(npos, generator=g))).clamp(0.05, 1)
    a = EpochAdaptor(3, tau1=0.1, tau2=0.6, bins=bins, rule="gmm", tau2_bounds=(0.2, 0.95))
    labels = torch.zeros_like(scores, dtype=torch.long)
    few = torch.full((GMM_MIN_BOXES - 1,), 0.9)
    uni = (0.5 + 0.05 * torch.randn(5000, generator=g)).clamp(0, 1)
    a.observe(torch.cat((scores, few, uni)), torch.cat((labels, torch.ones(len(few), dtype=torch.long),
                                                       torch.full((len(uni),), 2, dtype=torch.long))), 1000)
    assert a.update()  # no class counts needed by this rule
    # P(pos | s) = 1/2 where the two weighted normal densities are equal (the root between the means)
    def diff(s: float) -> float:
        return (math.log(npos / sp) - 0.5 * ((s - mp) / sp) ** 2) - (math.log(nn / sn) - 0.5 * ((s - mn) / sn) ** 2)
    lo, hi = mn, mp
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if diff(mid) < 0 else (lo, mid)
    assert abs(float(a.tau2[0]) - mp) < 0.01
    assert abs(float(a.tau1[0]) - lo) < 0.01
    assert (float(a.tau1[1]), float(a.tau2[1])) == (0.1, 0.6)  # too few boxes: unchanged
    assert 0.05 <= float(a.tau1[2]) < float(a.tau2[2]) <= 0.95 and math.isfinite(float(a.tau2[2]))
    b, m = gmm_thresholds(torch.zeros(2, bins))
    assert b.tolist() == [0.0, 0.0] and m.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="threshold rule"):
        EpochAdaptor(1, rule="otsu")


def test_ld_weight_adds_a_distillation_term_with_the_teachers_edges(student, monkeypatch):
    """``ld_weight`` > 0: the unlabeled targets carry the teacher's edge distributions (mapped into
    the strong view) and the step gains a finite ``unsup_ld``; off (the default), neither. LD with
    strong_mix is a config error (a composite does not carry the distributions)."""
    student = copy.deepcopy(student).train()
    teacher = _confident_teacher(student)
    for weight in (0.0, 1.0):
        labeled, unlabeled = _batches()
        calls = _spy_assigner(monkeypatch)
        m = build_method("efficient_teacher", {"domain_adaptation": False, "ld_weight": weight})
        m.set_label_statistics([2, 1, 0], 2, names=NAMES)
        m.start_epoch()
        losses = m.losses(labeled, unlabeled, student, teacher)
        t = calls[1]["targets"]
        assert len(t["boxes"]) > 0
        if weight:
            assert t["edge_support"].shape == (len(t["boxes"]), 4, int(student.reg_max))
            assert torch.isfinite(losses["unsup_ld"]) and float(losses["unsup_ld"].detach()) > 0
        else:
            assert "edge_support" not in t and "unsup_ld" not in losses
    with pytest.raises(ValueError, match="ld_weight"):
        build_method("efficient_teacher", {"ld_weight": 1.0, "strong_mix": "mixup"})
