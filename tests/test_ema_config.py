"""EMA teacher math, config precedence, checkpoint safety."""

import math

import pytest
import torch
from torch import nn

from ssod.config import resolve_config
from ssod.training.engine.checkpoint import load_checkpoint, save_checkpoint
from ssod.training.engine.ema import ModelEMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_matches_formula():
    student = _net()
    ema = ModelEMA(student, decay=0.9, tau=2.0)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 3))  # moves BN running stats and num_batches_tracked
    ema.update(student)
    d = 0.9 * (1 - math.exp(-1 / 2.0))
    for k, v in ema.model.state_dict().items():
        s = student.state_dict()[k]
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, d * before[k] + (1 - d) * s)
        else:
            assert torch.equal(v, s), k  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_decay_ramp_and_copy():
    student = _net()
    ema = ModelEMA(student, decay=0.999, tau=100)
    assert ema.current_decay() == 0.0  # first update copies the student
    ema.updates = 10_000
    assert ema.current_decay() == pytest.approx(0.999, abs=1e-6)
    with torch.no_grad():
        student[0].weight.mul_(3)
    ema.copy_from(student)
    assert torch.equal(ema.model[0].weight, student[0].weight)


def test_config_precedence(tmp_path):
    user = tmp_path / "cfg.yaml"
    user.write_text("epochs: 7\nimgsz: 96\nmethod_cfg: {}\n")
    cfg = resolve_config(user, imgsz=64, batch=None)
    assert cfg["epochs"] == 7  # config file beats defaults
    assert cfg["imgsz"] == 64  # CLI beats config file
    assert cfg["batch"] == 8  # None means "not given": default stays
    bad = tmp_path / "bad.yaml"
    bad.write_text("epohcs: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_config(bad)


def test_checkpoint_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"model_spec": {}, "x": Evil()}, p)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(p)
    ok = save_checkpoint({"model_spec": {"model": "m"}, "t": torch.ones(2)}, tmp_path / "ok.pt")
    assert load_checkpoint(ok)["t"].sum() == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_ema_decay_floor_after_burn_in():
    ema = ModelEMA(_net(), decay=0.999, tau=500)
    ema.updates = 400
    assert ema.current_decay() < 0.6  # the ramp alone follows the student closely here
    ema.floor = 0.995
    assert ema.current_decay() == 0.995
