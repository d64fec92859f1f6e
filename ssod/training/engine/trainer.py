"""The one training loop. Methods supply losses, hooks do everything else.

    for epoch:                      hooks.before_epoch  (EMA copy at burn-in end, timers)
        for labeled, unlabeled:     hooks.before_step
            losses = method.losses(labeled, unlabeled, student, teacher)
            backward, clip, step    hooks.after_step    (EMA teacher update)
                                    hooks.after_epoch   (method thresholds, eval, CSV, checkpoint)
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from ssod.training.engine.checkpoint import CHECKPOINT_VERSION, load_checkpoint, plain
from ssod.training.engine.ema import ModelEMA, teacher_dtype
from ssod.training.engine.hooks import (
    CheckpointHook,
    EMATeacherHook,
    EvalHook,
    Hook,
    MetricsLoggerHook,
    TimerHook,
    fmt_losses,
    is_finite,
    mean_dict,
)

LOG = logging.getLogger("ssod")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: stop with a message that says what to do."""


def select_device(name: str) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def next_run_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... if taken (never overwrites a run)."""
    cand, i = parent / name, 2
    while cand.exists():
        cand, i = parent / f"{name}-{i}", i + 1
    return cand


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; norms and biases are never decayed."""
    decay, no_decay, bias = [], [], []
    for module in modules:
        for m in module.modules():
            for pname, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if pname == "bias":
                    bias.append(p)
                elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                    no_decay.append(p)
                else:
                    decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "kind": "weight"},
        {"params": no_decay, "weight_decay": 0.0, "kind": "norm"},
        {"params": bias, "weight_decay": 0.0, "kind": "bias"},
    ]


# ultralytics' default is 100 epochs (YOLOv5 trained 300 from scratch); a burn-in walking the labeled
# set far more often than that is long past where supervised training levels off
LONG_BURN_IN_PASSES = 300


def schedule_summary(
    epochs: int, steps: int, batch: int, unlabeled_batch: int, n_labeled: int, n_unlabeled: int, burn_in: int,
) -> list[str]:
    """What one epoch and the burn-in mean in steps and passes over each set (``unlabeled_batch`` 0:
    no unlabeled images). An SSOD epoch walks the unlabeled set, so with few labeled and many
    unlabeled images the burn-in repeats the labeled set thousands of times: say so up front."""
    passes = steps * batch / max(n_labeled, 1)
    walk = (f"an epoch walks the {n_unlabeled} unlabeled images {steps * unlabeled_batch / n_unlabeled:.3g}x and "
            f"the {n_labeled} labeled {passes:.3g}x" if unlabeled_batch
            else f"an epoch walks the {n_labeled} labeled images {passes:.3g}x")
    lines = [f"schedule: {epochs} epochs x {steps} steps of {batch} labeled"
             + (f" + {unlabeled_batch} unlabeled" if unlabeled_batch else "") + f" images; {walk}"]
    if unlabeled_batch and burn_in > 0:
        lines.append(f"burn-in: {burn_in} epoch{'s' * (burn_in != 1)} = {burn_in * steps} supervised-only steps "
                     f"({burn_in * passes:.0f} passes over the labeled images)")
        if burn_in * passes > LONG_BURN_IN_PASSES:
            lines.append(f"warning: the burn-in walks the labeled images {burn_in * passes:.0f} times (ultralytics' "
                         "default is 100 epochs); shorten it with --burn-in-epochs, or set steps_per_epoch in a "
                         "--config file")
    return lines


def _fork_settings(cfg: dict) -> dict:
    """``Trainer.FORK_KEYS`` of a config; ``aug`` without the keys that cannot change a supervised
    burn-in: the strong-view keys (``strong_*``, unlabeled views only) and ``close_mosaic`` when
    mosaic is off."""
    out = {k: cfg.get(k) for k in Trainer.FORK_KEYS}
    if isinstance(out["aug"], dict):
        aug = {k: v for k, v in out["aug"].items() if not k.startswith("strong_")}
        if not aug.get("mosaic_p"):
            aug.pop("close_mosaic", None)
        out["aug"] = aug
    return out


class Trainer:
    """Builds data, model, teacher, method and hooks from a resolved config, then trains."""

    def __init__(self, cfg: dict[str, Any], run_dir: str | Path | None = None):
        from ssod.training.data.formats import load_dataset
        from ssod.training.methods.base import build_method
        from ssod.training.models.base import build_model, fit_imgsz

        self.cfg = cfg = dict(cfg)
        self.device = select_device(str(cfg["device"]))
        if cfg.get("deterministic"):
            torch.use_deterministic_algorithms(True, warn_only=True)

        ckpt = None
        if cfg.get("resume"):
            ckpt = load_checkpoint(cfg["resume"])
            saved = ckpt["config"]
            # The saved config decides everything but the device/worker count of the new machine.
            cfg = self.cfg = {**saved, "resume": cfg["resume"], "device": cfg["device"], "workers": cfg["workers"]}
            run_dir = Path(cfg["resume"]).resolve().parent.parent

        if not cfg.get("data"):
            from ssod.training.data.demo import ensure_demo_dataset

            cfg["data"] = str(ensure_demo_dataset())
        self.spec = load_dataset(cfg["data"])
        self.names = list(self.spec.names)
        for line in self.spec.summary():
            (LOG.warning if line.startswith("warning") else LOG.info)(line)

        model_spec = {"model": cfg["model"], "names": self.names, "width": cfg.get("width"), "depth": cfg.get("depth"),
                      "imgsz": int(cfg["imgsz"])}
        if ckpt is not None:
            model_spec = ckpt["model_spec"]
        torch.manual_seed(cfg["seed"])
        self.student = build_model(model_spec).to(self.device)
        cfg["imgsz"] = self.student.spec["imgsz"] = fit_imgsz(self.student, cfg["imgsz"])
        if cfg.get("weights") and ckpt is None:
            self.student.load_weights(cfg["weights"])

        self.method = build_method(cfg["method"], cfg.get("method_cfg") or {})
        # Trainable modules a method adds (e.g. a domain discriminator sized to the student's neck).
        self.extra: nn.Module | None = getattr(self.method, "extra_modules", lambda student=None: None)(self.student)
        if self.extra is not None:
            self.extra.to(self.device)
        mb = cfg.get("burn_in_epochs")
        self.burn_in_epochs = int(mb if mb is not None else self.method.cfg.get("burn_in_epochs", 0))
        self.ema = ModelEMA(self.student, cfg["ema_decay"], cfg["ema_tau"])
        # runs saved before the setting existed pseudo-labelled in float32
        precision = cfg.get("teacher_precision", "fp32")
        self.teacher.pseudo_label_dtype = teacher_dtype(precision, self.device, self.student)
        if self.method.uses_unlabeled:
            LOG.info("teacher pseudo-labels in %s (teacher_precision %s)",
                     str(self.teacher.pseudo_label_dtype or torch.float32).removeprefix("torch."), precision)

        self._build_data()
        self.optimizer = self._build_optimizer()
        self.use_amp = bool(cfg["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

        self.epochs = int(cfg["epochs"])
        self.start_epoch = 0
        self.iteration = 0
        self.best_fitness = -math.inf
        self.is_best = False
        self.last_eval: dict[str, Any] | None = None
        self.forked_from: Path | None = None
        self.batch: tuple[dict, dict | None] | None = None  # this step's (labeled, unlabeled) batch, for hooks
        if ckpt is not None:
            self._restore(ckpt)
        elif cfg.get("burn_in_from"):
            self._start_after_burn_in(cfg["burn_in_from"])

        name = cfg.get("name") or f"{cfg['method']}-{Path(str(cfg['model'])).stem}"
        self.run_dir = Path(run_dir) if run_dir else next_run_dir(Path(cfg["out"]), name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(plain(cfg), sort_keys=False))

        self.hooks: list[Hook] = [
            TimerHook(),
            EMATeacherHook(),
            *self.method.hooks(),
            EvalHook(),
            MetricsLoggerHook(self.run_dir, plots=cfg["plots"]),
            CheckpointHook(),
        ]
        if cfg["plots"]:
            from ssod.training.engine.previews import PreviewHook

            self.hooks.append(PreviewHook(self.run_dir, list(self.names)))

    # ----------------------------------------------------------------------------- building
    def _build_data(self) -> None:
        from ssod.training.data.loader import LabeledDataset, PairedLoader, UnlabeledDataset, build_val_loader
        from ssod.training.data.views import LabeledAug, WeakAug, labeled_strong, strong_aug

        cfg, aug = self.cfg, self.cfg["aug"]
        if not self.spec.train:
            raise ValueError(f"{cfg['data']}: the train split has no labeled images")
        geo = dict(flip_p=aug["flip_p"], scale=tuple(aug["scale"]), translate=aug["translate"],
                   degrees=aug["degrees"], shear=aug["shear"])
        labeled = LabeledDataset(
            self.spec.train, cfg["imgsz"],
            LabeledAug(**geo, hsv_h=aug["hsv_h"], hsv_s=aug["hsv_s"], hsv_v=aug["hsv_v"],
                       mosaic_p=aug["mosaic_p"], mixup_p=aug["mixup_p"],
                       mosaic_until_epoch=max(0, cfg["epochs"] - int(aug.get("close_mosaic") or 0)),
                       strong=labeled_strong(aug, geo) if aug.get("strong_labeled_p") else None,
                       strong_p=float(aug.get("strong_labeled_p") or 0.0),
                       strong_from_epoch=self.burn_in_epochs),
            train=True, seed=cfg["seed"],
        )
        until, closed = labeled.aug.mosaic_until_epoch, int(aug.get("close_mosaic") or 0)
        if labeled.aug.mosaic_p > 0 and until > 0:
            LOG.info("mosaic on labeled images (p %g) for epochs 1-%d, whole images after (close_mosaic %d)",
                     labeled.aug.mosaic_p, until, closed)
        elif labeled.aug.mosaic_p > 0:
            LOG.warning("aug.mosaic_p is %g but close_mosaic %d >= epochs %d: no epoch uses mosaic",
                        labeled.aug.mosaic_p, closed, cfg["epochs"])
        unlabeled = None
        if self.method.uses_unlabeled:
            if not self.spec.unlabeled:
                raise ValueError(f"{cfg['data']}: method '{self.method.name}' needs unlabeled images (`unlabeled:` key)")
            unlabeled = UnlabeledDataset(
                self.spec.unlabeled, cfg["imgsz"], WeakAug(flip_p=aug["flip_p"]), strong_aug(aug, geo),
                seed=cfg["seed"], hidden=self.spec.unlabeled_hidden,
                weak_size=self.method.teacher_view_size(cfg["imgsz"], self.student),
            )
        self.loader = PairedLoader(
            labeled, unlabeled, batch_size=cfg["batch"], unlabeled_ratio=cfg["unlabeled_ratio"],
            workers=cfg["workers"], seed=cfg["seed"], steps_per_epoch=cfg.get("steps_per_epoch"),
        )
        self.val_loader = (
            build_val_loader(self.spec.val, cfg["imgsz"], cfg["batch"] * 2, cfg["workers"]) if self.spec.val else None
        )

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        modules = [self.student] + ([self.extra] if self.extra is not None else [])
        groups = param_groups(modules, cfg["weight_decay"])
        if cfg["optimizer"] == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg["lr0"], momentum=cfg["momentum"], nesterov=True)
        elif cfg["optimizer"] == "adamw":
            opt = torch.optim.AdamW(groups, lr=cfg["lr0"], betas=(cfg["momentum"], 0.999))
        else:
            raise ValueError(f"unknown optimizer '{cfg['optimizer']}': use sgd or adamw")
        return opt

    # ----------------------------------------------------------------------------- schedule
    def lr_factor(self, progress: float) -> float:
        """LR multiplier at ``progress`` in [0, 1] of the whole run (cosine or linear to lrf)."""
        lrf = self.cfg["lrf"]
        if self.cfg["scheduler"] == "cosine":
            return lrf + (1 - lrf) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1 - (1 - lrf) * progress

    def set_lr(self) -> float:
        cfg, steps = self.cfg, len(self.loader)
        total = max(1, self.epochs * steps)
        warm = int(round(cfg["warmup_epochs"] * steps))
        base = cfg["lr0"] * self.lr_factor(self.iteration / total)
        for g in self.optimizer.param_groups:
            lr = base
            if self.iteration < warm:
                t = self.iteration / warm
                start = cfg["warmup_bias_lr"] if g["kind"] == "bias" and cfg["optimizer"] == "sgd" else 0.0
                lr = start + (base - start) * t
                if "momentum" in g:
                    g["momentum"] = 0.8 + (cfg["momentum"] - 0.8) * t
            g["lr"] = lr
        return base

    # ----------------------------------------------------------------------------- loop
    @property
    def teacher(self):
        return self.ema.model

    def _call(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)(self)

    def train(self) -> dict[str, Any]:
        from ssod.training.engine.progress import progress_bar

        self._call("before_train")
        LOG.info("training %s on %s for %d epochs -> %s", self.cfg["method"], self.device, self.epochs, self.run_dir)
        for line in schedule_summary(
            self.epochs, len(self.loader), self.loader.labeled_batch_size,
            self.loader.unlabeled_batch_size if self.method.uses_unlabeled else 0, len(self.spec.train),
            len(self.spec.unlabeled), self.burn_in_epochs,
        ):
            (LOG.warning if line.startswith("warning") else LOG.info)(line)
        for self.epoch in range(self.start_epoch, self.epochs):
            # Seeding per epoch makes a resumed run draw exactly what an uninterrupted one would.
            torch.manual_seed(self.cfg["seed"] * 1000 + self.epoch)
            random.seed(self.cfg["seed"] * 1000 + self.epoch)
            np.random.seed((self.cfg["seed"] * 1000 + self.epoch) % 2**32)
            self.method.epoch = self.epoch
            self.method.burn_in = self.epoch < self.burn_in_epochs
            self.epoch_metrics: dict[str, Any] = {}
            self.is_best = False
            self._call("before_epoch")
            self.student.train()
            if self.extra is not None:
                self.extra.train()
            step_logs: list[dict[str, float]] = []
            skipped = 0
            use_unlabeled = self.method.uses_unlabeled and not self.method.burn_in
            with progress_bar(len(self.loader), f"epoch {self.epoch + 1}/{self.epochs}") as bar:
                for labeled, unlabeled in self.loader.epoch(self.epoch, with_unlabeled=use_unlabeled):
                    skipped += self._report_skipped(labeled, unlabeled)
                    self.batch = (labeled, unlabeled)
                    self._call("before_step")
                    lr = self.set_lr()
                    self.method.ssod_epochs = self.iteration / len(self.loader) - self.burn_in_epochs
                    logs = self.run_step(labeled, unlabeled)
                    step_logs.append(logs)
                    self.iteration += 1
                    self._call("after_step")
                    self.batch = None
                    bar.advance(fmt_losses(logs))
            self.epoch_metrics.update({f"train/{k}": v for k, v in mean_dict(step_logs).items()})
            self.epoch_metrics["lr"] = lr
            self.epoch_metrics.update({f"method/{k}": v for k, v in self.method.log_values().items()})
            if skipped:
                self.epoch_metrics["data/skipped_images"] = skipped
            self._call("after_epoch")
            parts = [f"epoch {self.epoch + 1}/{self.epochs}", f"loss {self.epoch_metrics.get('train/total', float('nan')):.3f}"]
            if "val/mAP50-95" in self.epoch_metrics:
                parts.append(f"mAP50-95 {self.epoch_metrics['val/mAP50-95']:.4f} mAP50 {self.epoch_metrics['val/mAP50']:.4f}")
            parts.append(f"{self.epoch_metrics.get('time/epoch_s', 0):.0f}s")
            LOG.info("  ".join(parts))
        self._call("after_train")
        return {"run_dir": str(self.run_dir), "metrics": (self.last_eval or {}).get("metrics", {})}

    def run_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, float]:
        labeled = _to_device(labeled, self.device)
        unlabeled = _to_device(unlabeled, self.device) if unlabeled is not None else None
        with torch.autocast(self.device.type, enabled=self.use_amp):
            losses = self.method.losses(labeled, unlabeled, self.student, self.teacher)
        if unlabeled is not None and "cutouts_pending" in unlabeled and not self.method.burn_in:
            raise ValueError(f"aug.strong_cutout: spare_objects needs a method that places its pseudo boxes with "
                             f"pseudo.weak_to_strong; {self.method.name} does not: use true or false")
        total = sum(losses.values())
        if not is_finite(total):
            parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise TrainingDiverged(
                f"loss became non-finite at epoch {self.epoch + 1}, step {self.iteration} ({parts}); "
                f"lower lr0 (now {self.cfg['lr0']}) or check the labels; resume from {self.run_dir / 'weights' / 'last.pt'}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg["clip_grad"]:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg["clip_grad"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        logs = {k: float(v.detach()) for k, v in losses.items()}
        logs["total"] = float(total.detach())
        logs.update(self.method.step_log)
        return logs

    def _report_skipped(self, labeled: dict, unlabeled: dict | None) -> int:
        seen = getattr(self, "_skipped_seen", set())
        self._skipped_seen = seen
        new = 0
        for batch in (labeled, unlabeled):
            for path, reason in (batch or {}).get("skipped", []):
                if path not in seen:
                    seen.add(path)
                    new += 1
                    LOG.warning("skipped %s: %s", path, reason)
        return new

    # ----------------------------------------------------------------------------- eval / state
    @torch.no_grad()
    def evaluate(self, model=None) -> dict[str, Any]:
        from ssod.training.engine.evaluation import evaluate_detector

        return evaluate_detector(
            model or self.teacher, self.val_loader, self.spec, self.device,
            conf=self.cfg["val_conf"], iou=self.cfg["val_iou"], max_det=self.cfg["max_det"],
        )

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "epoch": self.epoch + 1,
            "iteration": self.iteration,
            "model_spec": plain(self.student.spec),
            "names": list(self.names),
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.name,
            "method_state": plain(self.method.state_dict()),
            "export_metadata": plain(self.method.export_metadata()),
            "extra": self.extra.state_dict() if self.extra is not None else {},
            "config": plain(self.cfg),
            "best_fitness": self.best_fitness,
            "metrics": plain(self.epoch_metrics),
        }

    # Settings that must equal the burn-in checkpoint's for the forked run to be the run it
    # would have been had it done its own burn-in (the burn-in is supervised-only, so the method
    # and its settings may differ).
    FORK_KEYS = (
        "data", "model", "width", "depth", "weights", "imgsz", "epochs", "batch", "seed", "optimizer", "lr0",
        "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_bias_lr", "scheduler", "clip_grad",
        "ema_decay", "ema_tau", "aug",
    )

    def _start_after_burn_in(self, path: str | Path) -> None:
        """Continue from a supervised checkpoint taken at the end of burn-in (``burn_in_from``).

        Burn-in epochs are supervised-only and draw the same labeled batches whatever the
        method, so an SSOD run forked from a supervised run's epoch-``burn_in_epochs``
        checkpoint equals the SSOD run that did its own burn-in — and several methods can
        share one burn-in (the benchmarks do). Mismatched settings are refused, naming the key.
        """
        ckpt = load_checkpoint(path)
        saved, mine = _fork_settings(ckpt.get("config") or {}), _fork_settings(self.cfg)
        diff = [k for k in self.FORK_KEYS if saved.get(k) != mine.get(k)]
        if diff:
            k = diff[0]
            raise ValueError(
                f"{path}: burn_in_from checkpoint was trained with {k}={saved.get(k)!r}, this run has "
                f"{k}={mine.get(k)!r} (all of {', '.join(diff)} must match)"
            )
        steps = int(ckpt["iteration"]) // max(int(ckpt["epoch"]), 1)
        if int(ckpt["epoch"]) != self.burn_in_epochs or steps != len(self.loader):
            raise ValueError(
                f"{path}: burn_in_from needs a checkpoint at the end of burn-in (epoch {self.burn_in_epochs}, "
                f"{len(self.loader)} steps/epoch); it is at epoch {ckpt['epoch']} with {steps} steps/epoch "
                f"(train the supervised run with save_period={self.burn_in_epochs})"
            )
        try:
            self.student.load_state_dict(ckpt["student"])
            self.ema.model.load_state_dict(ckpt["teacher"])
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit this model: {str(e).splitlines()[0]}") from None
        self.ema.updates = int(ckpt["ema_updates"])
        load_optimizer_prefix(self.optimizer, ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt["iteration"])
        self.best_fitness = float(ckpt["best_fitness"])
        self.forked_from = Path(path)
        LOG.info("starting after burn-in from %s (epoch %d)", path, self.start_epoch)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.ema.model.load_state_dict(ckpt["teacher"])
        self.ema.updates = int(ckpt["ema_updates"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.method.load_state_dict(ckpt.get("method_state") or {})
        if self.extra is not None and ckpt.get("extra"):
            self.extra.load_state_dict(ckpt["extra"])
        self.start_epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt["iteration"])
        self.best_fitness = float(ckpt["best_fitness"])
        if self.start_epoch >= self.epochs:
            LOG.info("checkpoint already finished all %d epochs", self.epochs)


def load_optimizer_prefix(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load an optimizer state saved for a prefix of each parameter group.

    ``param_groups`` lists the student's parameters first in every group, then a method's extra
    modules (e.g. a domain discriminator); a supervised burn-in checkpoint has only the former.
    Parameters beyond the saved prefix start with fresh state (they had no gradient before).
    """
    cur = opt.state_dict()
    if len(saved["param_groups"]) != len(cur["param_groups"]):
        raise ValueError(
            f"optimizer state has {len(saved['param_groups'])} parameter groups, this run has {len(cur['param_groups'])}"
        )
    state: dict[int, Any] = {}
    groups = []
    for old, new in zip(saved["param_groups"], cur["param_groups"]):
        if len(old["params"]) > len(new["params"]):
            raise ValueError("optimizer state covers more parameters than this run's model")
        for i, j in zip(old["params"], new["params"]):
            if i in saved["state"]:
                state[j] = saved["state"][i]
        groups.append({**old, "params": new["params"]})
    opt.load_state_dict({"state": state, "param_groups": groups})


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train from a resolved config (see ``ssod.config.resolve_config``)."""
    torch.set_num_threads(max(1, int(os.environ.get("SSOD_THREADS", os.cpu_count() or 1))))
    return Trainer(cfg).train()
