"""An inference copy of a network with BatchNorm folded into its convolutions, kept in sync.

Why: the EMA teacher runs a forward pass on every unlabeled batch, and in eval mode each
BatchNorm is an affine map that can be folded into the convolution before it (ultralytics'
``fuse``, what export does). Folded and in channels-last layout the forward costs about a third
less on CPU (yolov8n, 16 x 160 px, one thread: 0.118 -> 0.076 s; docs/benchmarks.md Run 13).
The teacher's weights change every step, so instead of re-fusing a deep copy the copy is built
once and its folded weights are recomputed in place whenever a source tensor changed
(``Tensor._version`` counts in-place writes: EMA updates and ``load_state_dict`` both bump it).
The owner drops the copy when the source moves (``.to``, ``.half``): ``YoloDetector._apply``.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


class FoldedCopy:
    """``fold(deepcopy(model))`` in channels-last layout, refreshed from ``model`` before each use.

    ``fold`` folds in place the modules whose BatchNorm it removes (ultralytics ``fuse``). A module
    ``m`` counts as folded when the source has ``m.conv`` and ``m.bn`` and the copy kept ``conv`` but
    lost ``bn``; every other tensor of the copy must exist with the same shape in the source (it is
    copied as is). Anything else (a re-parameterised block, say) makes ``ok`` False: the caller then
    runs the source model, never a copy that would drift from it.
    """

    def __init__(self, model: nn.Module, fold: Callable[[nn.Module], nn.Module]):
        folded = fold(copy.deepcopy(model).eval())
        folded.requires_grad_(False)
        self.model = folded.to(memory_format=torch.channels_last)
        src_modules = dict(model.named_modules())
        self.pairs: list[tuple[nn.Conv2d, str, str]] = []  # (folded conv, source conv name, source bn name)
        covered: set[str] = set()
        folded_modules: list[nn.Module] = []
        for name, m in self.model.named_modules():
            src = src_modules.get(name)
            if src is not None and hasattr(src, "bn") and hasattr(src, "conv") and hasattr(m, "conv") \
                    and not hasattr(m, "bn"):
                prefix = f"{name}." if name else ""
                self.pairs.append((m.conv, f"{prefix}conv", f"{prefix}bn"))
                folded_modules.append(m)
                covered |= {f"{prefix}conv.weight", f"{prefix}conv.bias"}
        self._inplace_activations(folded_modules)
        src_state, dst_state = model.state_dict(), self.model.state_dict()
        self.copied = [k for k in dst_state if k not in covered]
        self.ok = all(k in src_state and src_state[k].shape == dst_state[k].shape for k in self.copied)
        self._source: list[torch.Tensor] = []  # the source's parameters and buffers, bound on first refresh
        self._key: tuple[int, int] | None = None

    def _inplace_activations(self, folded: list[nn.Module]) -> None:
        """Let the folded modules' activations overwrite their convolution's output (no autograd
        here, and that output has no other reader): one tensor fewer per layer, ~8% off the
        teacher forward (yolov8n, 16 x 192 px, one thread: 107 -> 98 ms), same outputs bit for bit.
        An activation module that any other module also holds is left alone."""
        ids = {id(m) for m in folded}
        elsewhere = {id(c) for m in self.model.modules() if id(m) not in ids for c in m.children()}
        for m in folded:
            act = getattr(m, "act", None)
            if isinstance(act, nn.Module) and hasattr(act, "inplace") and id(act) not in elsewhere:
                act.inplace = True

    def _bind(self, model: nn.Module) -> None:
        """Resolve the source tensors once (again only if the source's tensors were replaced)."""
        self._source = [*model.parameters(), *model.buffers()]
        src = model.state_dict(keep_vars=True)
        dst = self.model.state_dict(keep_vars=True)
        self._copy_src = [src[k].data for k in self.copied]
        self._copy_dst = [dst[k].data for k in self.copied]
        folds = []
        for conv, conv_name, bn_name in self.pairs:
            bias = src.get(f"{conv_name}.bias")
            folds.append((
                conv.weight.data, conv.bias.data, src[f"{conv_name}.weight"].data,
                None if bias is None else bias.data,
                *(src[f"{bn_name}.{k}"].data for k in ("weight", "bias", "running_mean", "running_var")),
                float(model.get_submodule(bn_name).eps),
            ))
        # one list per role, so refresh folds every pair in a few fused calls (no per-layer Python)
        self._folds = [list(x) for x in zip(*folds)] if folds else []

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Recompute the folded weights from ``model`` if any of its tensors changed since last time."""
        if not self._source:
            self._bind(model)
        # in-place writes (EMA updates, load_state_dict) bump _version; replaced storage changes data_ptr
        key = sum(t._version for t in self._source), sum(t.data_ptr() for t in self._source)
        if key == self._key:
            return
        if self._key is not None and key[1] != self._key[1]:
            self._bind(model)
        if self._copy_dst:  # a model whose every tensor is folded has nothing to copy as is
            torch._foreach_copy_(self._copy_dst, self._copy_src)
        if self._folds:  # w' = w * s, b' = beta + (b - mean) * s with s = gamma / sqrt(var + eps)
            w_out, b_out, w, b, gamma, beta, mean, var, eps = self._folds
            scale = torch._foreach_div(gamma, torch._foreach_sqrt(torch._foreach_add(var, eps)))
            torch._foreach_copy_(w_out, torch._foreach_mul(w, [x.view(-1, 1, 1, 1) for x in scale]))
            shift = [m if bi is None else m - bi for m, bi in zip(mean, b)]  # mean - b: b is usually None
            torch._foreach_copy_(b_out, torch._foreach_sub(beta, torch._foreach_mul(shift, scale)))
        self._key = key

    def __call__(self, model: nn.Module, img: torch.Tensor):
        self.refresh(model)
        return self.model(img.contiguous(memory_format=torch.channels_last))
