"""What a training method is: teacher targets in, student losses out.

A method never touches the loop. Each step the trainer hands it the labeled batch, the
unlabeled batch (weak and strong views, or ``None`` for supervised training), the student and
the EMA teacher; it returns named, already-weighted loss tensors which the trainer sums.
Epoch-level state (per-class thresholds, ...) lives in the method, is exposed through
``state_dict`` (plain tensors/numbers/lists only: checkpoints load with ``weights_only=True``)
and is saved by the checkpoint hook. A method may add trainer hooks through ``hooks()``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ssod.config import method_defaults
from ssod.training.data.batch import Batch

if TYPE_CHECKING:
    from ssod.training.engine.hooks import Hook
    from ssod.training.models.base import Detector


class Method:
    """Hyperparameters: ``DEFAULTS`` is read from ``ssod/configs/methods/<name>.yaml`` (the one
    defaults file, each value with its source) when a subclass sets ``name``; ``cfg`` overrides
    them and is validated by ``method_config`` against ``FRACTIONS`` (values in [0, 1]) and
    ``CHOICES`` (allowed strings), so subclasses only declare what to check."""

    name: str = "base"
    uses_unlabeled: bool = False
    DEFAULTS: dict[str, Any] = {}
    FRACTIONS: tuple[str, ...] = ()
    CHOICES: dict[str, tuple[str, ...]] = {}
    ANY_LENGTH: tuple[str, ...] = ()  # list keys whose length may differ from the default's

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.DEFAULTS = method_defaults(cls.name)

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = method_config(self.name, self.DEFAULTS, dict(cfg), self.FRACTIONS, self.CHOICES, self.ANY_LENGTH)
        self.epoch = 0
        self.burn_in = False  # True while only the supervised part runs (set by the trainer)
        self.ssod_epochs = 0.0  # epochs (fractional, per step) since pseudo labels started (set by the trainer)
        # Extra per-step numbers to log (not summed into the loss), e.g. loss parts.
        self.step_log: dict[str, float] = {}
        # The student's pseudo-labeled images and targets of this step, kept only when a hook asks
        # (``capture_targets``; the preview pictures), via ``record_targets``.
        self.capture_targets = False
        self.captured_targets: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def record_targets(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        """Keep the strong images and the pseudo boxes placed on them (``boxes``, ``labels``,
        ``scores``, ``batch_idx``, optionally ``reliable``) when a hook asked for this step's."""
        if self.capture_targets:
            self.captured_targets = (images.detach(), {k: v.detach() for k, v in targets.items()
                                                       if isinstance(v, torch.Tensor)})

    def losses(
        self,
        labeled: Batch,
        unlabeled: Batch | None,
        student: "Detector",
        teacher: "Detector | None",
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def hooks(self) -> list["Hook"]:
        return []

    def teacher_view_size(self, imgsz: int, student: "Detector") -> int:
        """Side of the square weak view the loader draws for the teacher (``imgsz``: the usual
        view). A method whose teacher looks at the image enlarged asks for the enlarged side here,
        so the view comes from the file with its real detail rather than an upsampled ``imgsz``
        view; it then runs its teacher on the weak view as it is."""
        return int(imgsz)

    def unsup_weight(self) -> float:
        """``lambda_u`` at this step: ramped up over ``unsup_warmup_epochs`` after the switch
        (methods whose config has no such key get the full weight at once)."""
        ramp = sigmoid_rampup(self.ssod_epochs, float(self.cfg.get("unsup_warmup_epochs", 0.0)))
        return float(self.cfg["lambda_u"]) * ramp

    def log_values(self) -> dict[str, float]:
        """Numbers the metrics logger writes to the CSV after each epoch."""
        return {}

    def export_metadata(self) -> dict[str, Any]:
        """What an exported model carries from this method (e.g. per-class thresholds)."""
        return {"method": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def sigmoid_rampup(epochs: float, length: float) -> float:
    """exp(-5 (1 - t)^2), t = epochs / length clipped to [0, 1]: the unsupervised weight ramp of
    Laine & Aila (2017) and Tarvainen & Valpola's Mean Teacher (2017); 1 when ``length`` <= 0."""
    if length <= 0:
        return 1.0
    t = min(max(epochs / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def method_config(
    name: str,
    defaults: dict[str, Any],
    cfg: dict[str, Any],
    fractions: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
    any_length: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``defaults`` updated with ``cfg``; an unknown key is an error (a typo must not pass silently).

    Values are checked against the defaults' types; the keys in ``fractions`` must lie in [0, 1]
    and those in ``choices`` must be one of their listed strings, so every method validates its
    config in one place with one wording.
    """
    unknown = sorted(set(cfg) - set(defaults))
    if unknown and not defaults:  # e.g. `--method supervised --set lambda_u=1`: say so rather than ignore it
        raise ValueError(f"method '{name}' has no hyperparameters; got method_cfg keys {unknown}")
    if unknown:
        raise ValueError(f"method '{name}': unknown method_cfg keys {unknown}; known: {sorted(defaults)}")
    out = dict(defaults)
    for k, v in cfg.items():
        if v is None:
            continue
        d = defaults[k]
        if isinstance(d, bool):
            if not isinstance(v, bool):
                raise ValueError(f"method '{name}': method_cfg '{k}' must be true/false, got {v!r}")
        elif isinstance(d, (int, float)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"method '{name}': method_cfg '{k}' must be a number, got {v!r}")
            if isinstance(d, int) and not float(v).is_integer():
                raise ValueError(f"method '{name}': method_cfg '{k}' must be an integer, got {v!r}")
            v = type(d)(v)
        elif isinstance(d, (list, tuple)):
            is_list = isinstance(v, (list, tuple))
            n_ok = is_list and (len(v) >= 1 if k in any_length else len(v) == len(d))
            if not n_ok or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
            ):
                size = "one or more" if k in any_length else str(len(d))
                raise ValueError(f"method '{name}': method_cfg '{k}' must be a list of {size} numbers, got {v!r}")
            v = [float(x) for x in v]
        out[k] = v
    for k in fractions:
        if not 0.0 <= out[k] <= 1.0:
            raise ValueError(f"method '{name}': {k} must be in [0, 1], got {out[k]}")
    for k, allowed in (choices or {}).items():
        if out[k] not in allowed:
            raise ValueError(f"method '{name}': {k} must be {' or '.join(allowed)}, not {out[k]!r}")
    return out


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, cfg: dict[str, Any]) -> Method:
    from ssod.training import methods  # noqa: F401  (imports register every method)

    if name not in METHODS:
        raise ValueError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](cfg)
