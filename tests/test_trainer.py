"""The training loop end to end on tiny data: outputs, exact resume, NaN guard."""

from __future__ import annotations

import csv
from pathlib import Path

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
    run = Path(result["run_dir"])
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


def test_ssod_run_forked_after_burn_in_equals_full_run(tiny_cfg):
    """burn_in_from: a supervised epoch-N checkpoint + SSOD from N == SSOD with its own burn-in."""
    kw = dict(deterministic=True, epochs=2, burn_in_epochs=1, steps_per_epoch=3)
    full = Trainer(tiny_cfg(method="efficient_teacher", name="et-full", **kw))
    full.train()
    sup = Trainer(tiny_cfg(method="supervised", name="sup", save_period=1, **kw))
    sup.train()
    burn_in = sup.run_dir / "weights" / "epoch1.pt"
    assert burn_in.exists() and (sup.run_dir / "weights" / "epoch2.pt").exists()

    fork = Trainer(tiny_cfg(method="efficient_teacher", name="et-fork", burn_in_from=str(burn_in), **kw))
    assert fork.start_epoch == 1 and fork.iteration == 3
    fork.train()
    for key in ("student", "teacher"):
        a, b = getattr(full, key).state_dict(), getattr(fork, key).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{key}.{k} differs between the forked and the full run"
    rows = list(csv.DictReader(open(fork.run_dir / "results.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # the burn-in row comes from the supervised run


def test_burn_in_from_refuses_a_different_run(tiny_cfg):
    kw = dict(epochs=2, burn_in_epochs=1, steps_per_epoch=2)
    sup = Trainer(tiny_cfg(method="supervised", name="sup", save_period=1, **kw))
    sup.train()
    with pytest.raises(ValueError, match="imgsz=64"):
        Trainer(tiny_cfg(method="mean_teacher", imgsz=96, burn_in_from=str(sup.run_dir / "weights" / "epoch1.pt"), **kw))
    with pytest.raises(ValueError, match="end of burn-in"):
        Trainer(tiny_cfg(method="mean_teacher", burn_in_from=str(sup.run_dir / "weights" / "epoch2.pt"), **kw))
    epoch1 = str(sup.run_dir / "weights" / "epoch1.pt")
    with pytest.raises(ValueError, match="aug="):  # the labeled views' augmentation shaped the burn-in
        Trainer(tiny_cfg(method="mean_teacher", aug={"hsv_h": 0.0}, burn_in_from=epoch1, **kw))
    # the strong view shapes unlabeled images only, which a supervised burn-in never draws
    fork = Trainer(tiny_cfg(method="mean_teacher", aug={"strong_blur_p": 0.0}, burn_in_from=epoch1, **kw))
    assert fork.start_epoch == 1
    # close_mosaic cannot change views while mosaic is off (checkpoints from before the key fork too)
    fork = Trainer(tiny_cfg(method="mean_teacher", aug={"close_mosaic": 3}, burn_in_from=epoch1, **kw))
    assert fork.start_epoch == 1
    with pytest.raises(ValueError, match="aug="):
        Trainer(tiny_cfg(method="mean_teacher", aug={"mosaic_p": 1.0}, burn_in_from=epoch1, **kw))


def test_val_split_without_boxes_warns_and_best_follows_the_last_epoch(tiny_cfg, tiny_demo, tmp_path, caplog):
    """mAP is nan without val boxes; the run says so up front and best.pt still exists to export."""
    y = tmp_path / "noboxes.yaml"
    y.write_text(f"path: {tiny_demo.parent}\ntrain: images/train\nval: images/unlabeled\nnames: {list(range(10))}\n")
    result = Trainer(tiny_cfg(data=str(y), epochs=1)).train()
    assert "val split has no boxes" in caplog.text
    assert (Path(result["run_dir"]) / "weights" / "best.pt").exists()


def test_imgsz_off_the_stride_is_rounded_up_with_a_warning(tiny_cfg, caplog):
    trainer = Trainer(tiny_cfg(imgsz=70, epochs=1))
    assert trainer.cfg["imgsz"] == 96 and trainer.student.spec["imgsz"] == 96
    assert "imgsz 70 is not a multiple of the model's largest stride 32: training at 96" in caplog.text
    assert trainer.train()["metrics"]["mAP50-95"] >= 0.0
    from ssod.training.evaluate_cli import evaluate_checkpoint  # `ssod eval --imgsz` takes the same rule

    result, _ = evaluate_checkpoint(str(trainer.run_dir / "weights" / "last.pt"), imgsz=70, workers=0)
    assert result["metrics"]["mAP50-95"] >= 0.0 and "evaluating at 96" in caplog.text


def test_schedule_summary_counts_passes_and_flags_a_burn_in_that_repeats_the_labeled_set():
    from ssod.training.engine.trainer import schedule_summary

    # the product's case: 300 labeled, 50,000 unlabeled, batch 8 + 8: an epoch is 6,250 steps
    lines = schedule_summary(30, 6250, 8, 8, 300, 50000, 10)
    assert lines[0] == ("schedule: 30 epochs x 6250 steps of 8 labeled + 8 unlabeled images; an epoch walks "
                        "the 50000 unlabeled images 1x and the 300 labeled 167x")
    assert lines[1] == "burn-in: 10 epochs = 62500 supervised-only steps (1667 passes over the labeled images)"
    assert lines[2].startswith("warning: the burn-in walks the labeled images 1667 times")
    # the demo's proportions (200 labeled, 1,800 unlabeled): no warning
    lines = schedule_summary(30, 225, 8, 8, 200, 1800, 10)
    assert len(lines) == 2 and not any(line.startswith("warning") for line in lines)
    # supervised: one line, the labeled set once per epoch
    assert schedule_summary(30, 25, 8, 0, 200, 1800, 0) == [
        "schedule: 30 epochs x 25 steps of 8 labeled images; an epoch walks the 200 labeled images 1x"]
