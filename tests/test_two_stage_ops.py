"""The two-stage SSOD math (Soft Teacher Eq. 4-9, DTG INC / RM) on hand cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou

from ssod.training.methods.two_stage.dtg_ops import (
    inverse_nms_clustering,
    match_anchors,
    rank_matching_loss,
    segment_log_softmax,
    softmax_focal_loss,
)
from ssod.training.methods.two_stage.soft_teacher_ops import (
    bgt_weights,
    jitter_boxes,
    regression_variance,
    reliable_for_regression,
)


# ------------------------------------------------------------------ Soft Teacher: BG-T (Eq. 4-5)
def test_bgt_weights_hand_case():
    # image 0: 2 fg, 3 bg with r = 0.1, 0.3, 0.6 ; image 1: 1 fg, 1 bg with r = 0.5
    is_fg = torch.tensor([1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    r = torch.tensor([0.9, 0.9, 0.1, 0.3, 0.6, 0.2, 0.5])  # r on fg rows is ignored
    img = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    w = bgt_weights(is_fg, r, img)
    exp = torch.tensor([0.5, 0.5, 0.1, 0.3, 0.6, 1.0, 1.0])
    assert torch.allclose(w, exp)
    # Eq. 5: background weights of each image sum to 1; fg weights = 1/N_fg
    assert torch.isclose(w[2:5].sum(), torch.tensor(1.0))
    # with N_u = 2 (Eq. 11 average over images), every weight halves
    assert torch.allclose(bgt_weights(is_fg, r, img, num_images=2), exp / 2)
    # sum(w * ce) reproduces Eq. 4 literally
    ce = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0, 5.0, 7.0])
    eq4_img0 = (1.0 + 3.0) / 2 + (0.1 * 2 + 0.3 * 4 + 0.6 * 6) / 1.0
    eq4_img1 = 5.0 + 7.0
    assert torch.isclose((w * ce).sum(), torch.tensor(eq4_img0 + eq4_img1))


def test_bgt_weights_degenerate_images():
    # an image with only background and all r = 0, an image with only fg: finite, zero where nothing to normalise
    is_fg = torch.tensor([0, 0, 1, 1], dtype=torch.bool)
    r = torch.tensor([0.0, 0.0, 0.5, 0.5])
    w = bgt_weights(is_fg, r, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(w).all()
    assert torch.allclose(w, torch.tensor([0.0, 0.0, 0.5, 0.5]))
    with pytest.raises(ValueError):
        bgt_weights(is_fg, r[:3], torch.tensor([0, 0, 1, 1]))


# ------------------------------------------------------------------ Soft Teacher: jitter (Eq. 7-9)
def test_jitter_deterministic_and_scaled():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 100.0, 200.0]])
    a = jitter_boxes(boxes, 10, 0.06, torch.Generator().manual_seed(3))
    b = jitter_boxes(boxes, 10, 0.06, torch.Generator().manual_seed(3))
    c = jitter_boxes(boxes, 10, 0.06, torch.Generator().manual_seed(4))
    assert a.shape == (10, 2, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[..., 2:] >= a[..., :2]).all()
    # noise scales with the box side: x by width, y by height
    big = jitter_boxes(boxes.repeat(500, 1), 20, 0.06, torch.Generator().manual_seed(0))
    d = (big - boxes.repeat(500, 1)[None]).reshape(20, 500, 2, 4)
    std = d.std(dim=(0, 1))  # (2 boxes, 4 coords)
    sides = torch.tensor([[40.0, 20.0, 40.0, 20.0], [100.0, 200.0, 100.0, 200.0]])
    assert torch.allclose(std / sides, torch.full((2, 4), 0.06), rtol=0.1)


def test_regression_variance_known_boxes():
    box = torch.tensor([[0.0, 0.0, 20.0, 40.0]])  # w = 20, h = 40 -> 0.5 (h + w) = 30
    # refined boxes: x1 alternates 0 / 6 (std over 4 samples, unbiased), other coords constant
    refined = torch.tensor([[0.0, 0, 20, 40], [6.0, 0, 20, 40], [0.0, 0, 20, 40], [6.0, 0, 20, 40]])[:, None]
    sigma_x1 = torch.tensor([0.0, 6.0, 0.0, 6.0]).std()
    var = regression_variance(refined, box)
    assert torch.isclose(var, sigma_x1 / 30.0 / 4.0).all()
    # identical refined boxes -> zero variance; every coordinate spread equally -> same as one coordinate x4
    assert regression_variance(box.expand(5, 1, 4).clone(), box).item() == 0.0
    spread = refined.clone()
    spread[:, 0, 1] = refined[:, 0, 0]
    spread[:, 0, 2] = refined[:, 0, 0] + 20
    spread[:, 0, 3] = refined[:, 0, 0] + 40
    assert torch.isclose(regression_variance(spread, box), sigma_x1 / 30.0).all()
    with pytest.raises(ValueError):
        regression_variance(refined[:1], box)


def test_regression_selection():
    var = torch.tensor([0.01, 0.03, 0.01, 0.019999])
    scores = torch.tensor([0.6, 0.9, 0.4, 0.51])
    assert reliable_for_regression(var, scores, 0.02, 0.5).tolist() == [True, False, False, True]


# ------------------------------------------------------------------ DTG: Inverse NMS Clustering
def _greedy_reference(boxes, scores, groups, score_thr, iou_thr):
    """Step-by-step greedy NMS recording who suppresses whom (the definition INC inverts)."""
    n = len(scores)
    cluster = [-1] * n
    cand = [i for i in range(n) if scores[i] >= score_thr]
    cand.sort(key=lambda i: (-float(scores[i]), i))
    iou = box_iou(boxes, boxes)
    kept = []
    for i in cand:
        if cluster[i] != -1:
            continue
        cluster[i] = i
        kept.append(i)
        for j in cand:
            if cluster[j] == -1 and groups[j] == groups[i] and iou[i, j] > iou_thr:
                cluster[j] = i
    return torch.tensor(cluster), kept


def test_inc_hand_case():
    boxes = torch.tensor([
        [0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11],  # one object, class 0
        [0, 0, 10, 10],                                   # same place, class 1: its own cluster
        [50, 50, 60, 60], [51, 51, 61, 61],               # second object, class 0
        [2, 2, 12, 12],                                   # below threshold: background
    ], dtype=torch.float)
    scores = torch.tensor([0.8, 0.95, 0.6, 0.7, 0.5, 0.9, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 0, 0, 0])
    res = inverse_nms_clustering(boxes, scores, labels, score_thr=0.45, iou_thr=0.5)
    assert res.cluster.tolist() == [1, 1, 1, 3, 5, 5, -1]
    assert res.labels.tolist() == [0, 0, 0, 1, 0, 0, -1]
    assert torch.equal(res.targets[0], boxes[1]) and torch.equal(res.targets[4], boxes[5])
    assert res.targets[6].abs().sum() == 0
    assert sorted(res.keep.tolist()) == [1, 3, 5]


def test_inc_chain_is_greedy_not_transitive():
    # A (0.9) suppresses B (0.8); C (0.7) overlaps B but not A -> C survives as its own cluster
    boxes = torch.tensor([[0, 0, 10, 10], [3, 0, 13, 10], [7, 0, 17, 10]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7])
    res = inverse_nms_clustering(boxes, scores, torch.zeros(3, dtype=torch.long), 0.45, 0.4)
    assert res.cluster.tolist() == [0, 0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inc_equals_greedy_nms_random(seed):
    g = torch.Generator().manual_seed(seed)
    n = 300
    xy = torch.rand(n, 2, generator=g) * 80
    wh = torch.rand(n, 2, generator=g) * 30 + 5
    boxes = torch.cat((xy, xy + wh), 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    image = torch.randint(0, 2, (n,), generator=g)
    res = inverse_nms_clustering(boxes, scores, labels, 0.45, 0.5, group=image)
    groups = (image * 3 + labels).tolist()
    ref_cluster, ref_kept = _greedy_reference(boxes, scores, groups, 0.45, 0.5)
    assert torch.equal(res.cluster, ref_cluster)
    # the kept set is the teacher's batched_nms output
    cand = torch.nonzero(scores >= 0.45).flatten()
    tv_keep = cand[batched_nms(boxes[cand], scores[cand], (image * 3 + labels)[cand], 0.5)]
    assert sorted(tv_keep.tolist()) == sorted(ref_kept) == sorted(res.keep.tolist())
    fg = res.cluster >= 0
    assert torch.equal(res.labels[fg], labels[res.cluster[fg]])
    assert torch.equal(res.targets[fg], boxes[res.cluster[fg]])


def test_inc_empty():
    res = inverse_nms_clustering(torch.zeros(3, 4), torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3, dtype=torch.long), 0.9, 0.5)
    assert res.cluster.tolist() == [-1, -1, -1] and res.keep.numel() == 0


# ------------------------------------------------------------------ DTG: Rank Matching
def test_segment_log_softmax_matches_loop():
    x = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5])
    seg = torch.tensor([0, 1, 0, 1, 2])
    out = segment_log_softmax(x, seg, 3)
    exp = torch.empty(5)
    for s in range(3):
        m = seg == s
        exp[m] = F.log_softmax(x[m], 0)
    assert torch.allclose(out, exp)


def test_rank_matching_zero_when_matching_positive_otherwise():
    t = torch.tensor([2.0, 1.0, 0.0, 3.0, 3.0, 5.0])
    cl = torch.tensor([4, 4, 4, 9, 9, 11])  # three clusters (the last a singleton)
    assert rank_matching_loss(t.clone(), t, cl).abs().item() < 1e-7
    # a constant shift per cluster does not change the softmax -> still zero
    shift = torch.tensor([5.0, 5.0, 5.0, -2.0, -2.0, 7.0])
    assert rank_matching_loss(t + shift, t, cl).abs().item() < 1e-6
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 5.0], requires_grad=True)
    loss = rank_matching_loss(s, t, cl)
    # hand value: KL over cluster 4 only, averaged over 3 clusters
    dt, ds = F.softmax(t[:3], 0), F.softmax(s[:3].detach(), 0)
    assert torch.isclose(loss.detach(), (dt * (dt / ds).log()).sum() / 3)
    assert loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad[:3].abs().sum() > 0 and s.grad[3:].abs().sum() < 1e-7
    # temperature flattens both distributions
    assert rank_matching_loss(s.detach(), t, cl, temperature=5.0) < loss.detach()


def test_rank_matching_empty_and_shapes():
    z = rank_matching_loss(torch.zeros(0, requires_grad=True), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert z.item() == 0.0 and z.requires_grad
    with pytest.raises(ValueError):
        rank_matching_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2, dtype=torch.long))


def test_focal_loss_reduces_to_ce():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(softmax_focal_loss(logits, y, gamma=0.0), F.cross_entropy(logits, y, reduction="none"), atol=1e-6)
    assert (softmax_focal_loss(logits, y, gamma=1.5) < F.cross_entropy(logits, y, reduction="none")).all()


# ------------------------------------------------------------------ DTG: RPN anchor correspondence
def test_match_anchors_picks_level_by_scale_then_iou():
    # level 0: 16 px anchors, level 1: 32 px anchors, on a coarse grid
    a0 = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32]], dtype=torch.float)
    a1 = torch.tensor([[0, 0, 32, 32], [32, 0, 64, 32]], dtype=torch.float)
    anchors = torch.cat((a0, a1))
    level = torch.tensor([0, 0, 0, 1, 1])
    teacher = torch.tensor([[14, 1, 30, 17], [2, 0, 34, 30], [30, 2, 60, 30]], dtype=torch.float)
    # the second teacher anchor overlaps the 16-px anchor [16,0,32,16] too, but is 32-px: level 1
    assert match_anchors(teacher, anchors, level).tolist() == [1, 3, 4]
    # levels with identical sizes (MobileNetV3-FPN) are all searched
    level_same = torch.tensor([0, 0, 1, 1, 1])
    both = torch.cat((a0, a0[:1] + 1))
    assert match_anchors(torch.tensor([[1.0, 1, 17, 17]]), both, torch.tensor([0, 0, 0, 1])).tolist() == [3]
    assert match_anchors(torch.zeros(0, 4), anchors, level_same).numel() == 0
