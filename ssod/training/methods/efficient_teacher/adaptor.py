"""Epoch Adaptor (seed 004, after LabelMatch): per-class thresholds and domain adaptation.

Thresholds. At the end of epoch k, for class c with ``n_c`` labeled instances in ``N_l``
labeled images, the teacher should produce about ``n_c / N_l`` boxes of class c per image, so
over the ``N_u`` unlabeled images of the epoch::

    tau1^k[c] = P_c^k[ n_c * N_u / N_l ]           (the score of the target-th best box)
    tau2^k[c] = P_c^k[ alpha * n_c * N_u / N_l ]   (alpha = 0.6: the surest 60% are reliable)

where ``P_c^k`` are the teacher's class-c scores of that epoch sorted high to low. Scores are
kept as a fixed-size histogram per class (``bins`` on [0, 1]), so memory does not grow with
the data; the quantile is linearly interpolated inside its bin. Thresholds are clamped (tau1
to ``tau1_bounds``, tau2 to [max(tau1 + gap, tau2_bounds[0]), tau2_bounds[1]]). A class with
no teacher scores keeps the configured defaults; a class with no labeled instance expects no
pseudo boxes (thresholds at their ceilings). Scores below the detection floor are never seen:
a target larger than the boxes seen puts tau1 at its floor. ``beta`` (an ssod option, 1 = the
paper's rule) multiplies tau1's target: above 1 the uncertain band reaches lower scores
(docs/benchmarks.md Run 22: 1.5 lost 0.4-0.5 mAP50-95 on two demo draws).

Class prior. ``n_c`` counted on a few hundred labeled images is a noisy estimate of the class
mix the unlabeled images have (65 / 57 / 37 labeled disks / squares / triangles stood for
509 / 487 / 484 unlabeled ones in the shapes benchmark): a class drawn short in the labeled
sample gets a short target, high thresholds and too few pseudo labels. ``shrunk_class_counts``
(``class_prior: shrunk``) is the empirical-Bayes answer: each class share moves toward uniform by
how much of the spread between classes its sampling noise explains, and no more. Off by default:
on two demo draws and the shapes data it moved mAP50-95 by -0.1 to +0.1 (docs/benchmarks.md Run 20).

Threshold rule ``gmm`` (Consistent-Teacher, seed 004 slides: "GMM dynamically determines the
threshold"), instead of the class counts: per class, a two-component 1-D Gaussian mixture is
fitted to the epoch's teacher scores (the same histogram; weighted EM on the bin centres, all
classes at once), the component with the higher mean being the true objects. The slides give one
threshold, tau^c = argmax_s P(pos | s); Consistent-Teacher's code ("high" policy) takes about the
positive component's mean. PLA needs two, so: tau2 = the positive mean (the surest half of the
objects the mixture finds are reliable) and tau1 = the score where P(pos | s) rises through 1/2
below that mean (every box more likely an object than not is at least uncertain). The labeled
class counts are not used. Choices the slides leave open, made here: thresholds once per epoch
from the whole epoch's scores (the paper refits per batch; an epoch gives a steadier fit at the
Epoch Adaptor's cadence), means initialised at the lowest and highest score seen (as its code
does), EM until the means move < 1e-6 (at most 200 steps), standard deviations floored at a bin's
width, and a class with fewer than ``GMM_MIN_BOXES`` scores keeps its previous thresholds. The
same bounds and gap apply.

Domain adaptation. A small discriminator on each neck level (1x1 conv, SiLU, global average
pool, linear) classifies labeled (0) vs unlabeled strong-view (1) images behind a gradient
reversal layer, so the features are pushed to be domain-invariant (seed 004, weight 0.1).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssod.training.methods.grl import grad_reverse

__all__ = ["EpochAdaptor", "threshold_for_count", "gmm_thresholds", "shrunk_class_counts", "DomainDiscriminator"]

THRESHOLD_RULES = ("counts", "gmm")
GMM_MIN_BOXES = 20  # fewer scores than this in an epoch: no mixture is fitted for the class


def shrunk_class_counts(per_image: torch.Tensor) -> torch.Tensor:
    """Labeled class counts (C,) from per-image counts (N, C), each share shrunk toward 1/C.

    Empirical Bayes (Efron & Morris 1975; the James-Stein estimator with an estimated prior
    variance): with labeled shares p_c, their sampling variances v_c and the between-class
    variance of the true shares around 1/C estimated as tau^2 = max(0, sum_c (p_c - 1/C)^2 /
    (C - 1) - mean_c v_c), the share becomes p_c + v_c / (v_c + tau^2) * (1/C - p_c). Choices the
    papers leave open, made here:

    - v_c is the by-image (cluster-robust, delta-method) variance of the ratio p_c = sum_i n_ic /
      sum_i n_i, not the multinomial p(1 - p)/n: objects of one image are not independent draws
      (a crowd of one class in one photo);
    - the shrinkage target is uniform (what is assumed about the classes without data); classes
      whose spread exceeds the noise (a long-tailed label set) keep their shares nearly as they
      are, and on a large labeled set v_c -> 0 gives the plain counts (the paper's prior);
    - a class with no labeled instance has v_c = 0 and stays at 0 (no pseudo labels expected);
    - the shares are renormalized and scaled to the labeled total, so only the mix changes.

    Fewer than two images or classes, or no instances: the plain counts.
    """
    m = torch.as_tensor(per_image, dtype=torch.float64)
    if m.ndim != 2:
        raise ValueError(f"per-image class counts must be (images, classes), got shape {tuple(m.shape)}")
    counts = m.sum(0)
    n_img, k = m.shape
    total = counts.sum()
    if n_img < 2 or k < 2 or total <= 0:
        return counts
    share = counts / total
    per_img = m.sum(1)
    resid = m - share[None] * per_img[:, None]  # (N, C): n_ic - p_c n_i
    var = resid.var(0, correction=1) / n_img / per_img.mean() ** 2
    tau2 = ((share - 1.0 / k) ** 2).sum() / (k - 1) - var.mean()
    weight = torch.where(var > 0, var / (var + tau2.clamp(min=0)), torch.zeros_like(var))  # 0/0 -> keep
    shrunk = share + weight * (1.0 / k - share)
    return shrunk / shrunk.sum() * total


def threshold_for_count(hist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row of ``hist`` (C, bins) over [0, 1]: the score s with #(scores >= s) == target (C,).

    Linear interpolation inside the bin where the count from the top reaches ``target``.
    Rows whose total is below ``target`` give 0; a target <= 0 gives 1.
    """
    c, bins = hist.shape
    hist = hist.double()
    target = target.double().to(hist.device)
    # above[:, b] = number of scores in bins b..bins-1 (>= b / bins); above[:, bins] = 0
    above = torch.cat((hist.flip(1).cumsum(1).flip(1), hist.new_zeros(c, 1)), 1)
    b_star = ((above[:, :bins] >= target[:, None]).sum(1) - 1).clamp(min=0)  # last bin reaching target
    upper = (b_star + 1).double() / bins
    rows = torch.arange(c, device=hist.device)
    inside = hist[rows, b_star].clamp(min=1e-12)
    need = target - above[rows, b_star + 1]
    s = upper - need / inside / bins
    s = torch.where(above[:, 0] < target, torch.zeros_like(s), s)
    s = torch.where(target <= 0, torch.ones_like(s), s)
    return s.clamp(0.0, 1.0)


def gmm_thresholds(hist: torch.Tensor, iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``hist`` (C, bins) over [0, 1]: (boundary, positive mean) of a 2-Gaussian mixture.

    EM with the bin counts as weights, vectorised over rows. ``boundary``: the lowest score
    below the positive mean from which up to that mean the positive component's posterior
    stays >= 1/2 (a bin's lower edge). Rows without scores give (0, 0); callers check counts.
    """
    c, bins = hist.shape
    w = hist.double()
    x = (torch.arange(bins, dtype=torch.float64, device=w.device) + 0.5) / bins
    has = w > 0
    lo = torch.where(has, x, torch.full_like(x, 2.0)).amin(1).clamp(max=1.0)
    hi = torch.where(has, x, torch.full_like(x, -1.0)).amax(1).clamp(min=0.0)
    mu = torch.stack((lo, hi), 1)  # (C, 2): negative, positive
    floor = 1.0 / bins**2
    var = ((hi - lo) / 4).pow(2).clamp(min=floor)[:, None].repeat(1, 2)
    pi = torch.full((c, 2), 0.5, dtype=torch.float64, device=w.device)
    d = x[None, None, :]

    def responsibilities() -> torch.Tensor:  # (C, 2, bins): P(component | bin centre)
        logp = -0.5 * (d - mu[..., None]).pow(2) / var[..., None] - 0.5 * var.log()[..., None] + pi.log()[..., None]
        return torch.softmax(logp, 1)

    for _ in range(iters):
        rw = responsibilities() * w[:, None, :]
        nk = rw.sum(2).clamp(min=1e-12)
        mu, last = (rw * d).sum(2) / nk, mu
        var = ((rw * (d - mu[..., None]).pow(2)).sum(2) / nk).clamp(min=floor)
        pi = (nk / nk.sum(1, keepdim=True)).clamp(min=1e-12)
        if float((mu - last).abs().max()) < 1e-6:  # converged (well-separated scores: ~20-40 steps)
            break
    pos = mu.argmax(1)  # the component with the higher mean is the objects
    rows = torch.arange(c, device=w.device)
    post = responsibilities()[rows, pos]  # (C, bins) P(pos | s)
    mu_pos = mu[rows, pos]
    below = (post < 0.5) & (x[None, :] < mu_pos[:, None])
    idx = torch.arange(bins, device=w.device).expand(c, bins)
    last_below = torch.where(below, idx, torch.full_like(idx, -1)).amax(1)
    boundary = (last_below + 1).double() / bins
    empty = ~has.any(1)
    zero = torch.zeros_like(mu_pos)
    return torch.where(empty, zero, boundary.minimum(mu_pos)), torch.where(empty, zero, mu_pos)


class EpochAdaptor:
    """Per-class (tau1, tau2) recomputed each epoch from the teacher's score histogram."""

    def __init__(
        self,
        num_classes: int,
        tau1: float = 0.1,
        tau2: float = 0.6,
        alpha: float = 0.6,
        bins: int = 1000,
        tau1_bounds: Sequence[float] = (0.05, 0.5),
        tau2_bounds: Sequence[float] = (0.2, 0.9),
        gap: float = 0.05,
        beta: float = 1.0,
        rule: str = "counts",
    ):
        if rule not in THRESHOLD_RULES:
            raise ValueError(f"Epoch Adaptor threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"Epoch Adaptor alpha must be in (0, 1], got {alpha}")
        if not 0 < beta <= 10:
            raise ValueError(f"Epoch Adaptor beta must be in (0, 10], got {beta}")
        self.nc = int(num_classes)
        self.default = (float(tau1), float(tau2))
        self.alpha, self.beta = float(alpha), float(beta)
        self.rule = rule
        self.bins = int(bins)
        self.tau1_bounds = (float(tau1_bounds[0]), float(tau1_bounds[1]))
        self.tau2_bounds = (float(tau2_bounds[0]), float(tau2_bounds[1]))
        self.gap = float(gap)
        # float64 so that checkpoints and logs hold the configured decimals (0.1, not 0.100000001)
        self.tau1 = torch.full((self.nc,), self.default[0], dtype=torch.float64)
        self.tau2 = torch.full((self.nc,), self.default[1], dtype=torch.float64)
        self.class_counts: torch.Tensor | None = None  # labeled instances per class
        self.n_labeled = 0
        self.reset()

    # --------------------------------------------------------------------------- statistics
    def set_label_statistics(self, class_counts: Sequence[int] | torch.Tensor, n_labeled_images: int) -> None:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
        if counts.numel() != self.nc:
            raise ValueError(f"Epoch Adaptor: {counts.numel()} class counts for {self.nc} classes")
        if n_labeled_images <= 0:
            raise ValueError("Epoch Adaptor: the labeled set is empty")
        self.class_counts, self.n_labeled = counts, int(n_labeled_images)

    def reset(self) -> None:
        self.hist = torch.zeros(self.nc, self.bins, dtype=torch.float64)
        self.images = 0

    @torch.no_grad()
    def observe(self, scores: torch.Tensor, labels: torch.Tensor, n_images: int) -> None:
        """Add one step's teacher detections (all of them, at the detection floor) of ``n_images``."""
        self.images += int(n_images)
        if scores.numel() == 0:
            return
        b = (scores.detach().float().clamp(0, 1) * self.bins).long().clamp_(max=self.bins - 1)
        flat = labels.detach().long() * self.bins + b
        self.hist += torch.bincount(flat.cpu(), minlength=self.nc * self.bins).view(self.nc, self.bins).double()

    # --------------------------------------------------------------------------- thresholds
    def targets(self) -> torch.Tensor:
        """Expected class-c box count over the images seen: n_c / N_l * N_u."""
        assert self.class_counts is not None
        return self.class_counts / self.n_labeled * self.images

    def update(self) -> bool:
        """Recompute thresholds from this epoch's histogram and reset it; False if nothing to use."""
        if (self.rule == "counts" and self.class_counts is None) or self.images == 0:
            self.reset()
            return False
        if self.rule == "gmm":
            t1, t2 = gmm_thresholds(self.hist)
            seen = self.hist.sum(1) >= GMM_MIN_BOXES
            keep1, keep2 = self.tau1, self.tau2  # too few scores to fit: the previous thresholds
        else:
            t = self.targets()
            t1 = threshold_for_count(self.hist, self.beta * t)
            t2 = threshold_for_count(self.hist, self.alpha * t)
            seen = self.hist.sum(1) > 0
            keep1 = torch.full_like(self.tau1, self.default[0])
            keep2 = torch.full_like(self.tau2, self.default[1])
        t1 = t1.clamp(*self.tau1_bounds)
        lo2 = torch.clamp(t1 + self.gap, min=self.tau2_bounds[0])
        t2 = torch.minimum(torch.maximum(t2, lo2), torch.tensor(self.tau2_bounds[1], dtype=torch.float64))
        self.tau1 = torch.where(seen, t1, keep1)
        self.tau2 = torch.where(seen, t2, keep2)
        self.reset()
        return True

    def floor(self) -> float:
        """The lowest score any threshold can take: the teacher's detection confidence."""
        return min(self.tau1_bounds[0], float(self.tau1.min()))

    def state_dict(self) -> dict[str, list[float]]:
        return {"tau1": [float(x) for x in self.tau1], "tau2": [float(x) for x in self.tau2]}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        t1, t2 = state.get("tau1"), state.get("tau2")
        if t1 is None or t2 is None:
            return
        if len(t1) != self.nc or len(t2) != self.nc:
            raise ValueError(f"checkpoint has thresholds for {len(t1)} classes, the model has {self.nc}")
        self.tau1 = torch.tensor([float(x) for x in t1], dtype=torch.float64)
        self.tau2 = torch.tensor([float(x) for x in t2], dtype=torch.float64)


class DomainDiscriminator(nn.Module):
    """Image-level domain classifier per neck level, behind gradient reversal."""

    def __init__(self, channels: Sequence[int], hidden: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(int(c), hidden, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1)
            )
            for c in channels
        )

    def forward(self, feats: Sequence[torch.Tensor], coeff: float = 1.0) -> torch.Tensor:
        """Domain logits (B, levels); gradients reaching ``feats`` are reversed and scaled by ``coeff``."""
        if len(feats) != len(self.heads):
            raise ValueError(f"discriminator built for {len(self.heads)} levels, got {len(feats)} feature maps")
        return torch.cat([h(grad_reverse(f, coeff)) for h, f in zip(self.heads, feats)], 1)

    def loss(self, feats: Sequence[torch.Tensor], domain: torch.Tensor, coeff: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE averaged over images and levels, detached accuracy) for ``domain`` (B,) in {0, 1}."""
        logits = self(feats, coeff).float()
        target = domain.float()[:, None].expand_as(logits)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        acc = ((logits > 0).float() == target).float().mean().detach()
        return loss, acc
