"""Trainer hooks (detectron2 style): everything around the step lives here, not in the loop."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ssod.training.engine.trainer import Trainer

LOG = logging.getLogger("ssod")


class Hook:
    """No-op base; override what you need. ``trainer`` exposes the whole training state."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_epoch(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_epoch(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...


class EMATeacherHook(Hook):
    """Updates the EMA teacher after every optimiser step; copies the student at burn-in's end."""

    def before_epoch(self, trainer: "Trainer") -> None:
        ssod = trainer.method.uses_unlabeled and trainer.epoch >= trainer.burn_in_epochs
        if ssod and trainer.burn_in_epochs > 0 and trainer.epoch == trainer.burn_in_epochs:
            trainer.ema.copy_from(trainer.student)
            LOG.info("burn-in done: teacher copied from the student")
        # Once pseudo labels flow, a fast-following teacher copies the student's mistakes back
        # into the targets within a few dozen steps (confirmation collapse, measured on the demo
        # data with decay ~0.6 right after burn-in); the method's `teacher_decay` bounds it.
        trainer.ema.floor = float(trainer.method.cfg.get("teacher_decay", 0.0)) if ssod else 0.0

    def after_step(self, trainer: "Trainer") -> None:
        trainer.ema.update(trainer.student)


class EvalHook(Hook):
    """COCO mAP of the EMA teacher on the val split every ``val_interval`` epochs and at the end."""

    def after_epoch(self, trainer: "Trainer") -> None:
        last = trainer.epoch + 1 == trainer.epochs
        if trainer.val_loader is None or not (last or (trainer.epoch + 1) % trainer.cfg["val_interval"] == 0):
            return
        result = trainer.evaluate()
        trainer.epoch_metrics.update({f"val/{k}": v for k, v in result["metrics"].items()})
        trainer.last_eval = result
        fitness = 0.9 * result["metrics"]["mAP50-95"] + 0.1 * result["metrics"]["mAP50"]
        # a val split without boxes scores nan: best.pt then follows the latest evaluation
        trainer.is_best = math.isnan(fitness) or fitness > trainer.best_fitness
        if trainer.is_best and not math.isnan(fitness):
            trainer.best_fitness = fitness


class MetricsLoggerHook(Hook):
    """One CSV row per epoch (losses, lr, time, val metrics, method values) and PNG plots."""

    def __init__(self, run_dir: Path, plots: bool = True):
        self.csv_path = Path(run_dir) / "results.csv"
        self.plots = plots

    def before_train(self, trainer: "Trainer") -> None:
        # On resume drop rows of epochs the checkpoint does not contain; a run forked after
        # burn-in starts with its source run's burn-in rows, so its curves show the whole run.
        rows = self._read()
        if not rows and trainer.forked_from is not None:
            rows = self._read(trainer.forked_from.resolve().parent.parent / "results.csv")
        self._write([r for r in rows if int(r["epoch"]) <= trainer.start_epoch])

    def after_epoch(self, trainer: "Trainer") -> None:
        row = {"epoch": trainer.epoch + 1, **trainer.epoch_metrics}
        rows = self._read() + [{k: _fmt(v) for k, v in row.items()}]
        self._write(rows)
        if self.plots:
            from ssod.training.engine.plots import plot_results

            try:
                plot_results(self.csv_path, self.csv_path.with_suffix(".png"))
            except Exception as e:  # a plot must never end a training run
                LOG.warning("could not plot %s: %s", self.csv_path, e)

    def after_train(self, trainer: "Trainer") -> None:
        """The final evaluation's confusion matrix and PR curves as pictures, its largest confusions in the log."""
        confusion = (trainer.last_eval or {}).get("confusion")
        if confusion is None:
            return
        from ssod_deploy.evaluate import top_confusions

        worst = top_confusions(confusion["matrix"], confusion["names"], k=3)
        if worst:
            LOG.info("most confused (true -> predicted, conf 0.25): %s", "; ".join(worst))
        if self.plots:
            from ssod.training.engine.plots import save_eval_plots

            run = self.csv_path.parent
            try:
                save_eval_plots(trainer.last_eval, run / "confusion_matrix.png", run / "PR_curve.png",
                                f"EMA teacher, epoch {trainer.epoch + 1}")
            except Exception as e:  # a plot must never end a training run
                LOG.warning("could not plot the final evaluation: %s", e)

    def _read(self, path: Path | None = None) -> list[dict[str, str]]:
        path = path or self.csv_path
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def _write(self, rows: list[dict[str, Any]]) -> None:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, restval="")
            w.writeheader()
            w.writerows(rows)
        tmp.replace(self.csv_path)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


class CheckpointHook(Hook):
    """Writes last.pt every epoch, best.pt when the EMA teacher's fitness improves, and
    epoch<N>.pt every ``save_period`` epochs (e.g. the end of burn-in, to fork SSOD runs from)."""

    def after_epoch(self, trainer: "Trainer") -> None:
        from ssod.training.engine.checkpoint import save_checkpoint

        ckpt = trainer.checkpoint_state()
        weights = trainer.run_dir / "weights"
        save_checkpoint(ckpt, weights / "last.pt")
        if trainer.is_best:
            save_checkpoint(ckpt, weights / "best.pt")
        period = int(trainer.cfg.get("save_period") or -1)
        if period > 0 and (trainer.epoch + 1) % period == 0:
            save_checkpoint(ckpt, weights / f"epoch{trainer.epoch + 1}.pt")


class TimerHook(Hook):
    """Epoch wall time and images/s into the epoch metrics."""

    def before_epoch(self, trainer: "Trainer") -> None:
        self.t0 = time.perf_counter()

    def after_epoch(self, trainer: "Trainer") -> None:
        dt = time.perf_counter() - self.t0
        trainer.epoch_metrics["time/epoch_s"] = dt


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def mean_dict(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in sorted(keys)}


def fmt_losses(d: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in d.items() if not math.isnan(v))
