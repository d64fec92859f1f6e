"""The training loop end to end on tiny data: outputs, exact resume, NaN guard."""

from __future__ import annotations

import csv

import pytest
import torch

from ssod.training.engine.checkpoint import load_checkpoint
from ssod.training.engine.hooks import Hook
from ssod.training.engine.trainer import Trainer, TrainingDiverged


class _StopAfterEpoch(Hook):
    """Simulates a killed run: dies right after epoch ``n``'s checkpoint is written."""

    def __init__(self, n: int):
        self.n = n

    def after_epoch(self, trainer):
        if trainer.epoch + 1 == self.n:
            raise KeyboardInterrupt


def test_train_writes_run_folder(tiny_cfg):
    result = Trainer(tiny_cfg(plots=True)).train()
    run = result["run_dir"]
    from pathlib import Path

    run = Path(run)
    for f in ("weights/last.pt", "weights/best.pt", "results.csv", "results.png", "config.yaml"):
        assert (run / f).exists(), f
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert "val/mAP50-95" in rows[-1] and "train/total" in rows[-1]
    ckpt = load_checkpoint(run / "weights/last.pt")  # weights_only=True
    assert ckpt["epoch"] == 2 and ckpt["names"] == [str(i) for i in range(10)]
    assert set(ckpt) >= {"student", "teacher", "optimizer", "config", "method_state", "model_spec"}
    assert 0.0 <= result["metrics"]["mAP50-95"] <= 1.0


def test_resume_reproduces_uninterrupted_run(tiny_cfg):
    cfg = tiny_cfg(deterministic=True, name="full")
    full = Trainer(cfg)
    full.train()

    cfg_b = tiny_cfg(deterministic=True, name="killed")
    killed = Trainer(cfg_b)
    killed.hooks.append(_StopAfterEpoch(1))
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    last = killed.run_dir / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 1

    resumed = Trainer({**cfg_b, "resume": str(last)})
    assert resumed.start_epoch == 1 and resumed.run_dir == killed.run_dir
    resumed.train()
    for key in ("student", "teacher"):
        a = getattr(full, key if key == "student" else "teacher").state_dict()
        b = getattr(resumed, key if key == "student" else "teacher").state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{key}.{k} differs after resume"
    rows = list(csv.DictReader(open(resumed.run_dir / "results.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_nan_guard_stops_with_clear_message(tiny_cfg, monkeypatch):
    t = Trainer(tiny_cfg(epochs=1))
    monkeypatch.setattr(t.method, "losses", lambda *a, **k: {"sup": torch.tensor(float("nan"), requires_grad=True)})
    with pytest.raises(TrainingDiverged, match="non-finite.*lower lr0"):
        t.train()
