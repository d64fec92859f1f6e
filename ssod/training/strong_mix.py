"""Instant-Teaching's batch mixing for the student's pseudo-labeled half (mosaic or mixup).

Instant-Teaching (Zhou et al., CVPR 2021) applies mosaic and mixup to labeled images and to
unlabeled images carrying the teacher's instant pseudo labels, after the labels are made: the
teacher always sees plain weak views, the student sees composites. Here each of the ``B``
strong (pseudo-labeled) images is replaced, with probability ``p``, by a composite drawn from a
pool of the batch's strong images and its labeled images (their ground truth enters as reliable
score-1 targets, as in the paper's mix of the two); the other outputs are the strong image
unchanged. The labeled half keeps its own supervised loss as well, also as in the paper.

Choices the paper leaves open (made here, and why):

* **Mosaic without downscaling.** The four tiles sit at full size on a 2S x 2S canvas and an
  S x S window is cut at a uniform offset in [S/4, 3S/4] per axis (the tiles' meeting point in the
  window's middle half), so every composite shows at least a quarter of each tile's width and
  height, and object sizes stay those of the strong view: at 160-320 px a half-size mosaic would
  push small objects below the finest stride. The output's own strong image is one of its four
  tiles; the other three are drawn from the pool.
* Measured on the demo and shapes data (docs/benchmarks.md Run 24): neither beat the plain strong
  view on both datasets, so ``strong_mix`` is off by default.
* **Mixup at ultralytics' Beta(32, 32)** (a blend close to half and half), both images'
  targets kept at full weight (ultralytics, YOLOv4's bag of freebies).
* Boxes cut by the window are clipped and follow the strong view's visibility rule
  (``min_size``, ``min_visible``), the rule every pseudo box already passed.

Vectorised: one advanced-indexing gather builds every mosaic, boxes are routed to outputs by
one comparison of their source index with the tile table; no loop over images or boxes.
"""

from __future__ import annotations

import torch

from ssod.training.pseudo import PseudoLabels, select
from ssod.training.pseudo_geometry import clip_and_filter

__all__ = ["MIX_MODES", "with_labeled_pool", "mosaic", "mixup", "mix_strong"]

MIX_MODES = ("none", "mosaic", "mixup")


def with_labeled_pool(strong: PseudoLabels, labeled: PseudoLabels, n_strong: int) -> PseudoLabels:
    """Pseudo labels of the pool ``cat(strong images, labeled images)``: the labeled boxes get
    indices after the strong ones and every per-box field the strong set has, as a perfect
    target would (score 1, reliable, box loss on, sharp localisation, one-hot class row)."""
    n = len(labeled["labels"])
    dev = strong["boxes"].device
    lab = {
        "boxes": labeled["boxes"].to(dev, strong["boxes"].dtype),
        "labels": labeled["labels"].to(dev, strong["labels"].dtype),
        "batch_idx": labeled["batch_idx"].to(dev, strong["batch_idx"].dtype) + n_strong,
    }
    for k, v in strong.items():
        if k in lab:
            continue
        if k in labeled:  # labeled_targets' own fields (score 1, reliable, box loss on)
            lab[k] = labeled[k].to(dev, v.dtype)
        elif k == "class_scores":
            lab[k] = torch.nn.functional.one_hot(lab["labels"], v.shape[1]).to(v.dtype)
        else:  # e.g. loc_quality: a perfect box is perfectly sharp
            lab[k] = torch.ones(n, dtype=v.dtype, device=dev)
    return {k: torch.cat((v, lab[k]), 0) for k, v in strong.items()}


def _route(targets: PseudoLabels, src: torch.Tensor) -> tuple[PseudoLabels, torch.Tensor]:
    """For a tile table ``src`` (B, T) of pool indices: a copy of every box for each tile its
    pool image fills (a pool image may fill several tiles, or none), ``batch_idx`` = the output
    image, and the tile (0..T-1) of each copy."""
    hit = targets["batch_idx"].reshape(-1, 1) == src.reshape(1, -1)  # (N, B*T)
    box, flat = hit.nonzero(as_tuple=True)
    t = src.shape[1]
    routed = select(targets, box)
    routed["batch_idx"] = torch.div(flat, t, rounding_mode="floor").to(targets["batch_idx"].dtype)
    return routed, flat % t


def mosaic(
    pool: torch.Tensor, targets: list[PseudoLabels | None], n_out: int, p: float,
    min_size: float = 2.0, min_visible: float = 0.25,
) -> tuple[torch.Tensor, list[PseudoLabels | None]]:
    """``n_out`` images from ``pool`` (P, C, S, S), output ``i`` a mosaic with probability ``p``
    (tile table: pool image ``i`` in a random quadrant, three random pool images in the others)
    and pool image ``i`` itself otherwise. ``targets``: box sets over the pool (``batch_idx`` =
    pool index; None passes through), returned over the outputs."""
    P, _, H, W = pool.shape
    if H != W:
        raise ValueError(f"mosaic: square views expected, got {H}x{W}")
    dev = pool.device
    own = torch.arange(n_out, device=dev)
    use = torch.rand(n_out, device=dev) < p
    src = torch.randint(0, P, (n_out, 4), device=dev)
    src.scatter_(1, torch.randint(0, 4, (n_out, 1), device=dev), own[:, None])
    src = torch.where(use[:, None], src, own[:, None])  # a plain output: its own image in every tile
    ox = torch.where(use, torch.randint(W // 4, 3 * W // 4 + 1, (n_out,), device=dev), 0)
    oy = torch.where(use, torch.randint(H // 4, 3 * H // 4 + 1, (n_out,), device=dev), 0)
    # canvas coordinates of every output pixel -> (tile, pixel inside the tile)
    ys = oy[:, None] + torch.arange(H, device=dev)  # (B, H) in [0, 2H)
    xs = ox[:, None] + torch.arange(W, device=dev)
    ty, tx = (ys >= H).long(), (xs >= W).long()
    tile = 2 * ty[:, :, None] + tx[:, None, :]  # (B, H, W): quadrant index 0..3 (row-major)
    s = src.gather(1, tile.reshape(n_out, -1)).reshape(n_out, H, W)
    img = pool[s, :, (ys - ty * H)[:, :, None], (xs - tx * W)[:, None, :]]  # (B, H, W, C)
    img = img.permute(0, 3, 1, 2).contiguous()

    def move(t: PseudoLabels) -> PseudoLabels:
        m, q = _route(t, src)
        i = m["batch_idx"]
        dx = (q % 2) * W - ox[i]
        dy = torch.div(q, 2, rounding_mode="floor") * H - oy[i]
        clipped, keep = clip_and_filter(m["boxes"] + torch.stack((dx, dy, dx, dy), 1).to(m["boxes"].dtype), W,
                                        min_size=min_size, min_visible=min_visible)
        m["boxes"] = clipped
        return select(m, keep)

    return img, [None if t is None else move(t) for t in targets]


def mixup(
    pool: torch.Tensor, targets: list[PseudoLabels | None], n_out: int, p: float, alpha: float = 32.0,
) -> tuple[torch.Tensor, list[PseudoLabels | None]]:
    """``n_out`` images from ``pool`` (P, C, H, W) (a float tensor), output ``i`` with probability
    ``p`` the blend ``lam * pool[i] + (1 - lam) * pool[j]`` of a random other pool image (lam ~
    Beta(alpha, alpha)), both images' boxes kept; pool image ``i`` itself otherwise."""
    P = pool.shape[0]
    dev = pool.device
    own = torch.arange(n_out, device=dev)
    use = torch.rand(n_out, device=dev) < p
    partner = (own + torch.randint(1, max(P, 2), (n_out,), device=dev)) % P  # never the image itself (P > 1)
    use &= partner != own
    lam = torch.distributions.Beta(alpha, alpha).sample((n_out,)).to(dev)
    lam = torch.where(use, lam, torch.ones_like(lam)).to(pool.dtype)[:, None, None, None]
    img = lam * pool[:n_out] + (1 - lam) * pool[partner]
    src = torch.stack((own, torch.where(use, partner, -1)), 1)  # (B, 2): -1 matches no box
    return img, [None if t is None else _route(t, src)[0] for t in targets]


def mix_strong(
    mode: str, strong_img: torch.Tensor, strong: PseudoLabels, ignore: PseudoLabels | None,
    labeled_img: torch.Tensor, labeled: PseudoLabels, p: float,
    min_size: float = 2.0, min_visible: float = 0.25, mixup_alpha: float = 32.0,
) -> tuple[torch.Tensor, PseudoLabels, PseudoLabels | None]:
    """The student's pseudo-labeled half after Instant-Teaching mixing (``mode`` in MIX_MODES):
    (images, pseudo labels, ignore regions), as many images as ``strong_img`` has."""
    if mode not in MIX_MODES:
        raise ValueError(f"strong_mix {mode!r}: choose from {', '.join(MIX_MODES)}")
    if mode == "none" or p <= 0:
        return strong_img, strong, ignore
    n = int(strong_img.shape[0])
    pool = torch.cat((strong_img, labeled_img.to(strong_img.dtype)), 0)
    targets = [with_labeled_pool(strong, labeled, n), ignore]
    if mode == "mosaic":
        img, (t, ig) = mosaic(pool, targets, n, p, min_size, min_visible)
    else:
        img, (t, ig) = mixup(pool, targets, n, p, mixup_alpha)
    return img, t, ig
