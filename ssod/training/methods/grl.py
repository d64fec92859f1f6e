"""Gradient reversal (Ganin & Lempitsky, 2015): identity forward, ``-coeff * grad`` backward.

Put between a feature extractor and a domain discriminator, it lets one backward pass train
the discriminator to tell the domains apart while pushing the features to make them
indistinguishable (the Epoch Adaptor's domain adaptation).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GradReverse", "grad_reverse"]


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """``x`` unchanged; its gradient is multiplied by ``-coeff`` on the way back."""
    return GradReverse.apply(x, coeff)
