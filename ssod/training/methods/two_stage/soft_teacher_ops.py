"""Soft Teacher's math (Xu et al., ICCV 2021; seed 001) as pure tensor functions.

* ``bgt_weights``: the per-proposal classification weights of Eq. 4-5 (BG-T reliability).
* ``jitter_boxes`` / ``regression_variance`` / ``reliable_for_regression``: box jittering,
  Eq. 7-9, and the variance selection of regression pseudo boxes (Eq. 10's G_reg).

Everything is vectorised over all proposals / boxes of a batch; no model is needed, so the
equations are unit-tested on hand cases (tests/test_two_stage_ops.py).
"""

from __future__ import annotations

import torch

__all__ = ["bgt_weights", "jitter_boxes", "regression_variance", "reliable_for_regression"]


def bgt_weights(
    is_fg: torch.Tensor, reliability: torch.Tensor, image_idx: torch.Tensor, num_images: int | None = None
) -> torch.Tensor:
    """Per-row weights ``w`` such that ``sum(w * ce)`` is Eq. 4 summed over the images.

    Eq. 4 (per unlabeled image)::

        L_u^cls = 1/N_fg * sum_{i in fg} l_cls(b_i)  +  sum_{j in bg} w_j * l_cls(b_j)
        w_j     = r_j / sum_{k in bg} r_k                                       (Eq. 5)

    so a foreground row weighs ``1 / N_fg`` of its image and a background row ``r_j / sum r``
    of its image (the background weights of one image sum to 1). ``reliability`` r is the
    teacher's background probability on the student's proposal (BG-T, the paper's best
    indicator, Table 7); it is only read on background rows. An image with no foreground
    (or no background, or all r = 0) contributes nothing for that part: there is nothing to
    normalise. Eq. 3/11 then average over images: divide the sum by N_u (``num_images``,
    when given, is applied here so that ``sum(w * ce)`` *is* L_u^cls).

    Note: the public SoftTeacher code instead gives background rows weight r_j, foreground
    rows 1, and divides the whole sum by the total weight; ssod implements the paper's Eq. 5.
    """
    if not (is_fg.shape == reliability.shape == image_idx.shape) or is_fg.dim() != 1:
        raise ValueError(
            f"bgt_weights: is_fg, reliability, image_idx must be equal 1-D shapes, got "
            f"{tuple(is_fg.shape)}, {tuple(reliability.shape)}, {tuple(image_idx.shape)}"
        )
    n_img = int(image_idx.max()) + 1 if image_idx.numel() else 0
    if num_images is not None:
        n_img = max(n_img, int(num_images))
    fg = is_fg.bool()
    idx = image_idx.long()
    r = torch.where(fg, torch.zeros_like(reliability), reliability.float().clamp(min=0.0))
    n_fg = torch.zeros(n_img, device=r.device).index_add_(0, idx, fg.float())
    r_sum = torch.zeros(n_img, device=r.device).index_add_(0, idx, r)
    w_fg = 1.0 / n_fg.clamp(min=1.0)
    w_bg = r / r_sum[idx].clamp(min=torch.finfo(r.dtype).tiny)
    w = torch.where(fg, w_fg[idx], w_bg)
    if num_images is not None:
        w = w / max(int(num_images), 1)
    return w


def jitter_boxes(
    boxes: torch.Tensor, n_jitter: int = 10, scale: float = 0.06, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n_jitter`` jittered copies of each box: (n_jitter, N, 4), Eq. 7's ``jitter(b_i)``.

    Each coordinate moves by ``N(0, 1) * scale * side`` (x1, x2 by the box width, y1, y2 by
    its height, sides clamped to >= 1 px). The paper does not give the jitter magnitude; 0.06
    is the public SoftTeacher code's ``jitter_scale``. Boxes are re-ordered so x1 <= x2,
    y1 <= y2. Deterministic for a given ``generator``.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"jitter_boxes: boxes must be (N, 4), got {tuple(boxes.shape)}")
    b = boxes.float()
    wh = (b[:, 2:] - b[:, :2]).clamp(min=1.0)
    side = wh.repeat(1, 2)  # (w, h, w, h)
    gen_device = generator.device if generator is not None else b.device
    noise = torch.randn((n_jitter, *b.shape), generator=generator, device=gen_device).to(b.device)
    out = b[None] + noise * scale * side[None]
    lo = torch.minimum(out[..., :2], out[..., 2:])
    hi = torch.maximum(out[..., :2], out[..., 2:])
    return torch.cat((lo, hi), -1)


def regression_variance(refined: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Box regression variance of Eq. 8-9 for each box: (N,).

    ``refined`` (J, N, 4) are the teacher's refined jittered boxes ``refine(jitter(b_i))``,
    ``boxes`` (N, 4) the pseudo boxes b_i::

        sigma_hat_k = sigma_k / (0.5 * (h(b_i) + w(b_i)))      (Eq. 9)
        sigma_bar_i = 1/4 * sum_k sigma_hat_k                   (Eq. 8)

    sigma_k is the standard deviation of coordinate k over the J refined boxes (unbiased, as
    ``torch.std`` in the public code). The box size is clamped to >= 1 px.
    """
    if refined.dim() != 3 or refined.shape[1:] != boxes.shape or boxes.shape[-1] != 4:
        raise ValueError(
            f"regression_variance: refined must be (J, N, 4) and boxes (N, 4), got "
            f"{tuple(refined.shape)} and {tuple(boxes.shape)}"
        )
    if refined.shape[0] < 2:
        raise ValueError("regression_variance: needs at least 2 jittered boxes per pseudo box")
    sigma = refined.float().std(dim=0)  # (N, 4)
    b = boxes.float()
    size = 0.5 * ((b[:, 2] - b[:, 0]) + (b[:, 3] - b[:, 1]))
    return (sigma / size.clamp(min=1.0)[:, None]).mean(-1)


def reliable_for_regression(
    variance: torch.Tensor, scores: torch.Tensor, var_thr: float = 0.02, score_thr: float = 0.5
) -> torch.Tensor:
    """G_reg of Eq. 10: boxes scoring > ``score_thr`` (only those are jittered) with variance < ``var_thr``."""
    return (scores > score_thr) & (variance < var_thr)
