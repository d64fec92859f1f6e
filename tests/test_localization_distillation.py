"""Localization Distillation across views: edge distributions mapped, re-binned, distilled."""

from __future__ import annotations

import pytest
import torch

from ssod.training.methods.efficient_teacher.assigner import PseudoLabelAssigner, dense_teacher_detections
from ssod.training.methods.efficient_teacher.localization_distillation import edge_support, edge_targets, ld_loss
from ssod.training.pseudo_geometry import map_edge_support

R = 16


def _mean(q: torch.Tensor) -> torch.Tensor:
    return (q * torch.arange(q.shape[-1], dtype=q.dtype)).sum(-1)


def _affine(sx: float, tx: float, sy: float, ty: float) -> torch.Tensor:
    return torch.tensor([[[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]]])


def test_same_view_keeps_the_teachers_expected_distance_and_sharpness():
    torch.manual_seed(0)
    anchors = torch.tensor([[500.0, 420.0], [612.0, 300.0]])
    strides = torch.tensor([8.0, 16.0])
    logits = torch.randn(2, 4, R) * 3
    logits[..., [0, -1]] = -float("inf")  # the end bins' outer halves would fold back (tested below)
    dist = logits.softmax(-1)
    support = edge_support(anchors, strides, R)
    q = edge_targets(support, dist, anchors, strides, (2000.0, 2000.0), R)
    assert torch.allclose(q.sum(-1), torch.ones(2, 4), atol=1e-6)
    j = torch.arange(R, dtype=torch.float32)
    inner = (dist * j).sum(-1)
    assert torch.allclose(_mean(q), inner, atol=1e-4)  # DFL's decoded distance is unchanged
    sharp = torch.zeros(1, 4, R)
    sharp[..., 5] = 1.0
    qs = edge_targets(edge_support(anchors[:1], strides[:1], R), sharp, anchors[:1], strides[:1], (2000.0, 2000.0), R)
    assert torch.allclose(qs[0, :, 5], torch.full((4,), 0.75))  # a sure bin stays the target's mode
    assert torch.allclose(qs[0, :, 4] + qs[0, :, 6], torch.full((4,), 0.25))


@pytest.mark.parametrize("flip", [False, True])
def test_mapped_distribution_is_the_edge_location_in_the_student_view(flip):
    """Teacher at stride 16 on a view 1.2x larger, student at stride 8 on a 0.9x view, maybe mirrored:
    the target's expected distance is where the teacher expects the (mapped) edge, seen from the
    student's anchor, and the left edge comes from the teacher's right edge under a flip."""
    torch.manual_seed(1)
    a_t, s_t = torch.tensor([[300.0, 260.0]]), torch.tensor([16.0])
    logits = torch.randn(1, 4, R) * 2
    logits[..., :2] = logits[..., 8:] = -float("inf")  # 2-7 teacher bins: inside the student's range
    dist = logits.softmax(-1)
    support = edge_support(a_t, s_t, R)
    box = torch.tensor([[200.0, 180.0, 380.0, 330.0]])
    w_view = 640.0
    M_weak = _affine(1.2, 0.0, 1.2, 0.0)
    M_strong = _affine(-0.9, w_view, 0.9, 5.0) if flip else _affine(0.9, 3.0, 0.9, 5.0)
    mapped, mdist = map_edge_support(support, dist, box, torch.zeros(1, dtype=torch.long), M_weak, M_strong)

    # the expected edge coordinates, moved as points
    exp = (dist * support).sum(-1)[0]  # (4,) left, top, right, bottom in the weak view
    k = 0.9 / 1.2
    ex = lambda x: (w_view - k * x) if flip else (k * x + 3.0)  # noqa: E731
    left, right = (ex(exp[2]), ex(exp[0])) if flip else (ex(exp[0]), ex(exp[2]))
    top, bottom = k * exp[1] + 5.0, k * exp[3] + 5.0
    assert torch.allclose((mdist * mapped).sum(-1)[0], torch.stack((left, top, right, bottom)), atol=1e-3)
    if flip:
        assert torch.allclose(mdist[0, 0], dist[0, 2]) and torch.allclose(mdist[0, 2], dist[0, 0])

    a_s, s_s = torch.tensor([[(left + right) / 2, (top + bottom) / 2]]), torch.tensor([8.0])
    q = edge_targets(mapped, mdist, a_s, s_s, (w_view, w_view), R)
    want = torch.stack((a_s[0, 0] - left, a_s[0, 1] - top, right - a_s[0, 0], bottom - a_s[0, 1])) / 8.0
    assert (want > 0.5).all() and (want < R - 1.5).all()
    assert torch.allclose(_mean(q)[0], want, atol=2e-3)
    assert torch.allclose(q.sum(-1), torch.ones(1, 4), atol=1e-6)
    assert (q >= 0).all()


def test_mass_beyond_the_range_or_the_canvas_goes_to_the_end():
    anchors, strides = torch.tensor([[20.0, 20.0]]), torch.tensor([8.0])
    dist = torch.zeros(1, 4, R)
    dist[..., 12] = 1.0  # 96 px from an anchor 20 px from the canvas edge: left/top beyond the canvas
    q = edge_targets(edge_support(anchors, strides, R), dist, anchors, strides, (64.0, 64.0), R)
    # left/top: clipped at pixel 0, a distance of 2.5 bins; right/bottom: clipped at 64, 5.5 bins
    assert torch.allclose(_mean(q)[0], torch.tensor([2.5, 2.5, 5.5, 5.5]), atol=1e-4)
    far = edge_targets(edge_support(anchors, strides * 3, R), dist, anchors, strides, (4000.0, 4000.0), R)
    assert torch.allclose(far[0, 2:, -1], torch.ones(2))  # 36 student bins away: all on the last one


def test_ld_loss_is_zero_at_the_teacher_and_pulls_toward_it():
    torch.manual_seed(2)
    t_logits = torch.randn(3, 4, R)
    target = t_logits.softmax(-1)
    w = torch.tensor([1.0, 0.5, 0.2])
    assert float(ld_loss(t_logits, target, w, 10.0)) == pytest.approx(0.0, abs=1e-5)
    s = torch.randn(3, 4, R, requires_grad=True)
    loss = ld_loss(s, target, w, 10.0)
    assert float(loss.detach()) > 0
    loss.backward()
    with torch.no_grad():
        moved = s - 50.0 * s.grad
    assert float(ld_loss(moved, target, w, 10.0)) < float(loss.detach())


@pytest.fixture(scope="module")
def student():
    from ssod.training.models.base import build_model

    torch.manual_seed(0)
    return build_model({"model": "yolov8n", "names": ["a", "b"], "width": 0.125, "depth": 0.33}).train()


def test_pla_adds_ld_only_when_asked_and_when_targets_carry_edges(student):
    """Teacher = student on the same view: the teacher's detections as targets. LD is finite, has a
    gradient, vanishes without edge distributions or weight, and leaves the other terms alone."""
    torch.manual_seed(3)
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        student.eval()
        det = dense_teacher_detections(student, img, conf=0.0, iou=0.65, max_det=5)
        student.train()
    assert det["edge_support"].shape == (len(det["boxes"]), 4, R) and len(det["boxes"]) > 0
    det["reliable"] = torch.ones(len(det["boxes"]), dtype=torch.bool)
    det["box_ok"] = det["reliable"]
    raw = student.forward_raw(img)
    crit = student.criterion()
    on = PseudoLabelAssigner(crit, ld_weight=1.0)(raw, det)
    off = PseudoLabelAssigner(crit)(raw, det)
    plain = PseudoLabelAssigner(crit, ld_weight=1.0)(raw, {k: v for k, v in det.items() if not k.startswith("edge")})
    assert float(on["ld"].detach()) > 0 and torch.isfinite(on["ld"])
    assert float(off["ld"]) == 0.0 and float(plain["ld"]) == 0.0
    for k in ("cls", "box", "dfl"):
        assert torch.equal(on[k], off[k])
    on["ld"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    empty = {k: v[:0] for k, v in det.items()}
    none = PseudoLabelAssigner(crit, ld_weight=1.0)([r.detach() for r in raw], empty)
    assert float(none["ld"]) == 0.0
