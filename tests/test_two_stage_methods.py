"""Two-stage SSOD methods (Soft Teacher, DTG, two-stage Efficient Teacher) on a real tiny Faster R-CNN."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ssod.training.methods.base import build_method

frcnn = pytest.importorskip("ssod.training.models.frcnn", reason="Faster R-CNN adapter not built")

S = 64
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def models():
    from ssod.training.models.base import build_model

    torch.manual_seed(0)
    student = build_model({"model": "fasterrcnn_mobilenet_v3", "names": NAMES, "imgsz": S})
    return student, copy.deepcopy(student)


def _batches(b: int = 2, flip: bool = True):
    g = torch.Generator().manual_seed(1)
    labeled = {
        "img": torch.rand(b, 3, S, S, generator=g),
        "boxes": torch.tensor([[8.0, 8, 40, 50], [20, 10, 60, 44]])[:b],
        "cls": torch.tensor([0, 2])[:b],
        "batch_idx": torch.arange(b),
        "M": torch.eye(3).repeat(b, 1, 1),
    }
    weak = torch.rand(b, 3, S, S, generator=g)
    m_strong = torch.eye(3).repeat(b, 1, 1)
    strong = weak.clone()
    if flip:  # strong view = horizontal flip of the weak view, recorded in its matrix
        m_strong[:, 0, 0], m_strong[:, 0, 2] = -1.0, float(S)
        strong = weak.flip(-1)
    unlabeled = {
        "weak": weak, "strong": strong, "M_weak": torch.eye(3).repeat(b, 1, 1), "M_strong": m_strong,
        "gt_boxes": torch.tensor([[10.0, 10, 30, 30]]), "gt_cls": torch.tensor([1]), "gt_batch_idx": torch.tensor([0]),
    }
    return labeled, unlabeled


# every pseudo box accepted ("many") vs the paper's thresholds on an untrained teacher ("none")
MANY = {
    "soft_teacher": {"cls_threshold": 0.0, "reg_score_threshold": 0.0, "reg_variance_threshold": 100.0, "n_jitter": 3},
    "dtg": {"rcnn_score_thr": 0.0, "rpn_score_thr": 0.0, "rcnn_samples": 64, "rpn_samples": 64},
    "efficient_teacher": {"tau1": 0.0, "tau2": 0.0, "adaptive_thresholds": False, "max_det": 30},
}
NONE = {
    "soft_teacher": {"cls_threshold": 1.0, "reg_score_threshold": 1.0},
    "dtg": {"rcnn_score_thr": 1.0, "rpn_score_thr": 1.0, "rcnn_samples": 64, "rpn_samples": 64},
    "efficient_teacher": {"tau1": 1.0, "tau2": 1.0, "adaptive_thresholds": False},
}
EXPECTED = {
    "soft_teacher": {"sup", "unsup_rpn_cls", "unsup_rpn_box", "unsup_rcnn_cls", "unsup_rcnn_box"},
    "dtg": {"sup", "unsup_rpn_cls", "unsup_rpn_box", "unsup_rcnn_cls", "unsup_rcnn_box", "unsup_rm"},
    "efficient_teacher": {"sup", "unsup_cls", "unsup_box", "da"},
}


def _method(name, cfg, student):
    m = build_method(name, cfg)
    m.burn_in = False
    if name == "efficient_teacher":
        m.set_label_statistics([1, 1, 1], 2, names=NAMES)
        m.extra_modules(student)
    return m


@pytest.mark.parametrize("name", ["soft_teacher", "dtg", "efficient_teacher"])
@pytest.mark.parametrize("regime", ["many", "none"])
def test_losses_finite_with_many_and_zero_pseudo_boxes(models, name, regime):
    student, teacher = models
    student.train()
    labeled, unlabeled = _batches()
    m = _method(name, (MANY if regime == "many" else NONE)[name], student)
    out = m.losses(labeled, unlabeled, student, teacher)
    assert set(out) == EXPECTED[name]
    for k, v in out.items():
        assert v.dim() == 0 and math.isfinite(float(v.detach())), (k, v)
    total = sum(out.values())
    student.zero_grad()
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the unsupervised part is never empty: background is always learned ...
    unsup_cls = {"soft_teacher": "unsup_rcnn_cls", "dtg": "unsup_rcnn_cls", "efficient_teacher": "unsup_cls"}[name]
    assert float(out[unsup_cls].detach()) > 0
    # ... and box terms exist only with pseudo boxes
    box = {"soft_teacher": "unsup_rcnn_box", "dtg": "unsup_rcnn_box", "efficient_teacher": "unsup_box"}[name]
    assert (float(out[box].detach()) > 0) == (regime == "many")
    student.zero_grad()


@pytest.mark.parametrize("name", ["soft_teacher", "dtg", "efficient_teacher"])
def test_burn_in_is_supervised_only(models, name):
    student, teacher = models
    labeled, unlabeled = _batches()
    m = build_method(name, {})
    m.burn_in = True
    out = m.losses(labeled, unlabeled, student, teacher)
    assert set(out) == {"sup"}


def test_dtg_one_to_one_correspondence_gives_zero_rank_matching(models):
    """Teacher == student, identical views, eval mode: the student's R-CNN sees the teacher's
    proposals row for row, so its logits equal the teacher's and Rank Matching is exactly 0;
    the flipped strong view (a real mapping) still gives a finite loss."""
    student, _ = models
    teacher = copy.deepcopy(student)
    labeled, unlabeled = _batches(flip=False)
    m = _method("dtg", {"rcnn_score_thr": 0.0, "rpn_score_thr": 0.0, "rm_rpn": False}, student)
    student.eval()
    try:
        out = m.losses(labeled, unlabeled, student, teacher)
        assert m.log_values()["clusters_per_img"] > 0
        assert abs(float(out["unsup_rm"].detach())) < 1e-6
        # a different student (perturbed head) -> positive Rank Matching
        other = copy.deepcopy(student)
        with torch.no_grad():
            other.roi_heads.box_predictor.cls_score.weight.add_(torch.randn_like(other.roi_heads.box_predictor.cls_score.weight))
        assert float(m.losses(labeled, unlabeled, other, teacher)["unsup_rm"].detach()) > 1e-4
    finally:
        student.train()


def test_soft_teacher_jitter_variance_zero_for_a_perfect_refiner(models):
    """A teacher whose R-CNN regresses every jittered box back to the same box has variance 0."""
    from ssod.training.methods.two_stage.soft_teacher import jitter_variance

    student, _ = models

    class Perfect:
        def roi_forward(self, feats, props, sizes):
            n = sum(len(p) for p in props)
            return torch.zeros(n, 4), torch.zeros(n, 16)

        def decode_roi(self, breg, props):
            return torch.tensor([[5.0, 6, 30, 40]]).expand(breg.shape[0], 4, 4).clone()

    pseudo = {"boxes": torch.tensor([[5.0, 6, 30, 40], [1.0, 1, 9, 9]]), "labels": torch.tensor([0, 2]),
              "batch_idx": torch.tensor([1, 0]), "scores": torch.tensor([0.9, 0.8])}
    var = jitter_variance(Perfect(), None, [(S, S), (S, S)], pseudo, 10, 0.06, torch.Generator().manual_seed(0), S)
    assert var.shape == (2,) and torch.allclose(var, torch.zeros(2))

    class Identity(Perfect):  # "refines" each jittered box to itself: variance = that of the jitter
        def decode_roi(self, breg, props):
            return torch.cat(props)[:, None, :].expand(-1, 4, 4).clone()

    # boxes listed image 1 first: the per-image proposal lists reorder rows, the result must not
    from ssod.training.methods.two_stage.soft_teacher_ops import jitter_boxes, regression_variance

    var = jitter_variance(Identity(), None, [(S, S), (S, S)], pseudo, 10, 0.06, torch.Generator().manual_seed(0), S)
    jit = jitter_boxes(pseudo["boxes"], 10, 0.06, torch.Generator().manual_seed(0)).clamp(0, S)
    assert torch.allclose(var, regression_variance(jit, pseudo["boxes"]))
    assert var[0] != var[1]


def test_efficient_teacher_two_stage_equals_model_loss_without_uncertain(models):
    """frcnn_losses (the two-stage PLA's engine) with no uncertain box is the model's own supervised loss."""
    from ssod.training.methods.efficient_teacher.two_stage import frcnn_losses, labeled_pseudo
    from ssod.training.methods.two_stage.common import pseudo_targets

    student, _ = models
    labeled, _ = _batches()
    student.eval()  # deterministic BN; the samplers are seeded
    try:
        torch.manual_seed(5)
        _, ref = student.loss(labeled)
        torch.manual_seed(5)
        images = student.prepare(labeled["img"])
        got = frcnn_losses(student, images, student.backbone_features(images), pseudo_targets(labeled_pseudo(labeled), 2))
        for k in ("rpn_cls", "rpn_box", "roi_cls", "roi_box"):
            assert torch.isclose(got[k].detach(), ref[k], atol=1e-6), k
        # an uncertain box over the whole image: every background row/anchor near it is ignored
        unc = {"boxes": torch.tensor([[0.0, 0, S, S], [0.0, 0, S, S]]), "batch_idx": torch.tensor([0, 1]),
               "labels": torch.tensor([0, 0]), "scores": torch.tensor([0.3, 0.3])}
        torch.manual_seed(5)
        ign = frcnn_losses(student, images, student.backbone_features(images), pseudo_targets(labeled_pseudo(labeled), 2), unc, 0.0, 0.0)
        assert not torch.isclose(ign["roi_cls"], got["roi_cls"])
    finally:
        student.train()


def test_methods_reject_dense_models(models):
    from ssod.training.methods.two_stage.common import require_two_stage

    class Dense(torch.nn.Module):
        family = "yolo"

    with pytest.raises(ValueError, match="two-stage"):
        require_two_stage(Dense(), "soft_teacher")
    labeled, unlabeled = _batches()
    student, teacher = models
    for name in ("soft_teacher", "dtg"):
        m = build_method(name, {})
        m.burn_in = False
        with pytest.raises(ValueError, match="two-stage"):
            m.losses(labeled, unlabeled, student, Dense())
        with pytest.raises(ValueError, match="unknown method_cfg"):
            build_method(name, {"no_such_key": 1})


@pytest.mark.parametrize("method", ["soft_teacher", "dtg", "efficient_teacher"])
def test_trainer_runs_two_stage_method(tiny_cfg, method):
    from ssod.training.engine.trainer import Trainer

    cfg = tiny_cfg(model="fasterrcnn_mobilenet_v3", width=None, depth=None, method=method, epochs=1,
                   burn_in_epochs=0, batch=2, steps_per_epoch=2, imgsz=64)
    result = Trainer(cfg).train()
    assert math.isfinite(result["metrics"]["mAP50-95"])
    ckpt = torch.load(f"{result['run_dir']}/weights/last.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == method
    state = ckpt["method_state"]
    if method == "efficient_teacher":
        assert len(state["tau1"]) == len(state["tau2"]) > 0
    else:
        assert state["steps"] == 2  # both steps ran the unsupervised path (no burn-in)


def _flip(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack((S - boxes[:, 2], boxes[:, 1], S - boxes[:, 0], boxes[:, 3]), 1)


def _recording(model, calls):
    orig = model.roi_forward

    def rec(feats, props, sizes):
        calls.append([p.detach().clone() for p in props])
        return orig(feats, props, sizes)

    return rec


def test_soft_teacher_bgt_scores_student_proposals_in_the_weak_view(models, monkeypatch):
    """BG-T: the teacher scores exactly the student's sampled proposals, mapped strong -> weak."""
    student, teacher = models
    labeled, unlabeled = _batches(flip=True)
    t_calls, s_calls = [], []
    monkeypatch.setattr(teacher, "roi_forward", _recording(teacher, t_calls))
    monkeypatch.setattr(student, "roi_forward", _recording(student, s_calls))
    m = _method("soft_teacher", NONE["soft_teacher"], student)  # no pseudo boxes: one R-CNN call each
    m.losses(labeled, unlabeled, student, teacher)
    # teacher: its own detection pass, then BG-T; student: supervised, then unlabeled classification
    assert len(t_calls) == 2 and len(s_calls) == 2
    for t_props, s_props in zip(t_calls[1], s_calls[1]):
        assert len(t_props) == len(s_props) > 0
        assert torch.allclose(t_props, _flip(s_props).clamp(0, S), atol=1e-3)


def test_dtg_student_rcnn_sees_teacher_proposals_in_the_strong_view(models, monkeypatch):
    """DTG's one-to-one correspondence: every student R-CNN row is a teacher proposal, mapped weak -> strong."""
    student, teacher = models
    labeled, unlabeled = _batches(flip=True)
    t_calls, s_calls = [], []
    monkeypatch.setattr(teacher, "roi_forward", _recording(teacher, t_calls))
    monkeypatch.setattr(student, "roi_forward", _recording(student, s_calls))
    m = _method("dtg", {"rcnn_score_thr": 0.0, "rcnn_samples": 64}, student)
    m.losses(labeled, unlabeled, student, teacher)
    assert len(t_calls) == 1 and len(s_calls) == 2
    for t_props, s_props in zip(t_calls[0], s_calls[1]):
        assert 0 < len(s_props) <= 64
        d = torch.cdist(_flip(s_props), t_props)  # each student row is some teacher proposal, flipped
        assert d.min(1).values.max() < 1e-3


def test_efficient_teacher_two_stage_ramp_and_scales(models, monkeypatch):
    """The lambda ramp reaches the two-stage path; one teacher scale works there, the fused multi-scale
    teacher (dense only) is refused."""
    student, teacher = models
    student.train()
    labeled, unlabeled = _batches()
    out = {}
    for warm in (0.0, 2.0):
        m = _method("efficient_teacher", {**MANY["efficient_teacher"], "unsup_warmup_epochs": warm}, student)
        m.ssod_epochs = 0.5
        torch.manual_seed(0)  # the same RPN / R-CNN samples in both calls
        out[warm] = {k: float(v.detach()) for k, v in m.losses(labeled, unlabeled, student, teacher).items()}
    ramp = math.exp(-5 * 0.75**2)
    for k in ("unsup_cls", "unsup_box"):
        assert out[0.0][k] > 0 and out[2.0][k] == pytest.approx(out[0.0][k] * ramp, rel=1e-4)
    for key, value in (("teacher_scales", [1.0, 1.6]), ("nms_agnostic", True)):  # dense-YOLO-only options
        m = _method("efficient_teacher", {**MANY["efficient_teacher"], key: value}, student)
        with pytest.raises(ValueError, match=key):
            m.losses(labeled, unlabeled, student, teacher)
    # one scale: the teacher sees the weak view enlarged (to a multiple of 32), its boxes come back in 1x pixels
    seen, kept = [], []
    predict = teacher.predict

    def recording_predict(img, **kw):
        seen.append(tuple(img.shape[-2:]))
        out = predict(img, **kw)
        kept.append(out)
        return out

    monkeypatch.setattr(teacher, "predict", recording_predict)
    m = _method("efficient_teacher", {**MANY["efficient_teacher"], "teacher_scales": [1.5]}, student)
    m.losses(labeled, unlabeled, student, teacher)
    h, w = unlabeled["weak"].shape[-2:]
    assert seen == [(round(h * 1.5 / 32) * 32, round(w * 1.5 / 32) * 32)] and (h, w) != seen[0]
    assert sum(len(d["boxes"]) for d in kept[0]) > 0
