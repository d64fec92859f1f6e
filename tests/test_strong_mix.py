"""Instant-Teaching mixing of the pseudo-labeled strong images: pixels and boxes move together."""

from __future__ import annotations

import pytest
import torch

from ssod.training.strong_mix import mix_strong, mixup, mosaic, with_labeled_pool

S = 32


def _pool(n: int) -> torch.Tensor:
    """Pool image k is the constant k + 1 (so every output pixel says which image it came from)."""
    return (torch.arange(n, dtype=torch.float32) + 1).reshape(n, 1, 1, 1).expand(n, 3, S, S).clone()


def _targets(n: int) -> dict:
    """Two boxes per pool image: a 10 px square near the top-left and one near the bottom-right."""
    boxes = torch.tensor([[2.0, 2, 12, 12], [18, 20, 28, 30]]).repeat(n, 1)
    k = len(boxes)
    return {"boxes": boxes, "labels": torch.arange(k) % 3, "batch_idx": torch.arange(n).repeat_interleave(2),
            "scores": torch.linspace(0.2, 0.9, k), "reliable": torch.arange(k) % 2 == 0}


def test_mosaic_at_p0_is_the_identity():
    pool, t = _pool(5), _targets(5)
    img, (out, none) = mosaic(pool, [t, None], 3, p=0.0)
    assert none is None
    assert torch.equal(img, pool[:3])
    keep = t["batch_idx"] < 3
    order = torch.argsort(out["batch_idx"] * 1000 + out["boxes"][:, 0])
    assert torch.equal(out["boxes"][order], t["boxes"][keep])
    assert torch.equal(out["scores"][order], t["scores"][keep])
    assert torch.equal(out["reliable"][order], t["reliable"][keep])


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_boxes_land_on_the_pixels_of_their_own_image(seed):
    """Each output box covers pixels of the pool image it was labeled on; the output's own
    image is one of its tiles; boxes the window cuts are clipped, those it hides are dropped."""
    torch.manual_seed(seed)
    n_out, pool = 4, _pool(7)
    t = _targets(7)
    img, (out,) = mosaic(pool, [t], n_out, p=1.0, min_size=2.0, min_visible=0.25)
    assert img.shape == (n_out, 3, S, S)
    for i in range(n_out):
        assert (img[i] == i + 1).any()  # its own strong image is a tile
    b = out["boxes"]
    assert len(b) > 0 and (b >= 0).all() and (b <= S).all()
    assert ((b[:, 2] - b[:, 0]) >= 2).all() and ((b[:, 3] - b[:, 1]) >= 2).all()
    cx = ((b[:, 0] + b[:, 2]) / 2).long().clamp(max=S - 1)
    cy = ((b[:, 1] + b[:, 3]) / 2).long().clamp(max=S - 1)
    # the source pool image of every routed box, read from the box's score (unique per pool box)
    src = torch.stack([t["batch_idx"][(t["scores"] == s).nonzero()[0, 0]] for s in out["scores"]])
    assert torch.equal(img[out["batch_idx"], 0, cy, cx], (src + 1).float())
    # each pool box appears at most once per output, with its label and flags
    for s, lab, rel in zip(out["scores"], out["labels"], out["reliable"]):
        j = (t["scores"] == s).nonzero()[0, 0]
        assert lab == t["labels"][j] and rel == t["reliable"][j]


def test_mosaic_clips_cut_boxes_and_drops_mostly_hidden_ones():
    """Over many windows: every kept box shows at least min_visible of its area, and some are cut."""
    torch.manual_seed(0)
    pool = _pool(2)
    t = {"boxes": torch.tensor([[0.0, 0, 8, 8], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1]),
         "batch_idx": torch.tensor([1, 1]), "scores": torch.tensor([0.5, 0.7])}
    full = {0.5: 64.0, 0.7: 100.0}
    clipped = 0
    for _ in range(30):
        _, (out,) = mosaic(pool, [t], 2, p=1.0, min_visible=0.25)
        area = (out["boxes"][:, 2] - out["boxes"][:, 0]) * (out["boxes"][:, 3] - out["boxes"][:, 1])
        whole = torch.tensor([full[round(float(s), 1)] for s in out["scores"]])
        assert (area >= 0.25 * whole - 1e-4).all() and (area <= whole + 1e-4).all()
        clipped += int((area < whole - 1e-4).sum())
    assert clipped > 0


def test_mixup_blends_two_images_and_keeps_both_box_sets():
    torch.manual_seed(0)
    pool, t = _pool(6), _targets(6)
    img, (out,) = mixup(pool, [t], 3, p=1.0, alpha=32.0)
    for i in range(3):
        v = img[i].flatten().unique()
        assert len(v) == 1  # a constant blend of two constants
        srcs = set(t["batch_idx"][torch.isin(t["scores"], out["scores"][out["batch_idx"] == i])].tolist())
        assert i in srcs and len(srcs) == 2
        j = (srcs - {i}).pop()
        lam = (float(v) - (j + 1)) / ((i + 1) - (j + 1))
        assert 0.2 < lam < 0.8  # Beta(32, 32) stays near a half


def test_labeled_pool_gets_perfect_target_fields():
    strong = {"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([2]), "batch_idx": torch.tensor([0]),
              "scores": torch.tensor([0.4]), "reliable": torch.tensor([False]), "box_ok": torch.tensor([False]),
              "loc_quality": torch.tensor([0.3]), "class_scores": torch.tensor([[0.1, 0.2, 0.4]])}
    labeled = {"boxes": torch.tensor([[2.0, 2, 9, 9], [3, 3, 6, 6]]), "labels": torch.tensor([0, 1]),
               "batch_idx": torch.tensor([0, 1])}
    pool = with_labeled_pool(strong, labeled, n_strong=3)
    assert pool["batch_idx"].tolist() == [0, 3, 4]
    assert pool["scores"].tolist() == [pytest.approx(0.4), 1.0, 1.0]
    assert pool["reliable"].tolist() == [False, True, True] and pool["box_ok"].tolist() == [False, True, True]
    assert torch.equal(pool["class_scores"][1:], torch.tensor([[1.0, 0, 0], [0, 1, 0]]))


def test_mix_strong_none_passes_through_and_rejects_unknown_modes():
    img, t = _pool(2), _targets(2)
    lab = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
           "batch_idx": torch.zeros(0, dtype=torch.long)}
    out_img, out_t, ig = mix_strong("none", img, t, None, img, lab, p=1.0)
    assert out_img is img and out_t is t and ig is None
    with pytest.raises(ValueError, match="strong_mix 'cutmix'"):
        mix_strong("cutmix", img, t, None, img, lab, p=1.0)
    out_img, out_t, _ = mix_strong("mosaic", img, t, None, _pool(3)[1:], lab, p=1.0)
    assert out_img.shape == img.shape and (out_t["batch_idx"] < 2).all()


@pytest.mark.parametrize("mode", ["mosaic", "mixup"])
def test_mix_strong_with_no_pseudo_boxes_routes_only_labeled_ones(mode):
    torch.manual_seed(1)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "batch_idx": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
             "reliable": torch.zeros(0, dtype=torch.bool)}
    lab = {"boxes": torch.tensor([[4.0, 4, 28, 28]]).repeat(3, 1), "labels": torch.tensor([0, 1, 2]),
           "batch_idx": torch.arange(3)}
    img, t, ig = mix_strong(mode, _pool(3), empty, None, _pool(3), lab, p=1.0)
    assert img.shape == (3, 3, S, S) and ig is None
    assert set(t) == set(empty) and (t["scores"] == 1).all() and t["reliable"].all()
    assert (t["batch_idx"] < 3).all()
