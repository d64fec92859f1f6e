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


# --- the teacher's pseudo-labelling precision (teacher_precision) ------------------------------------


def _tiny_yolo():
    from ssod.training.models.base import build_model

    torch.manual_seed(0)
    return build_model({"model": "yolov8n", "names": ["a", "b"], "width": 0.0625, "depth": 0.33}).eval()


def test_teacher_dtype_resolution(monkeypatch):
    from ssod.training.engine import ema

    yolo, cpu = _tiny_yolo(), torch.device("cpu")

    class TwoStage(nn.Module):  # a family without reduced-precision support (Faster R-CNN's flag is False)
        reduced_precision_inference = False

    assert ema.teacher_dtype("fp32", cpu, yolo) is None
    assert ema.teacher_dtype("bf16", cpu, yolo) is torch.bfloat16
    with pytest.raises(ValueError, match="TwoStage does not support.*fp32"):
        ema.teacher_dtype("bf16", cpu, TwoStage())
    with pytest.raises(ValueError, match="teacher_precision 'fp16'"):
        ema.teacher_dtype("fp16", cpu, yolo)
    for hardware_bf16, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(ema, "cpu_has_bf16_matmul", lambda v=hardware_bf16: v)
        assert ema.teacher_dtype("auto", cpu, yolo) is expected
        assert ema.teacher_dtype("auto", cpu, TwoStage()) is None  # never picked for a family that cannot
        assert ema.teacher_dtype("auto", torch.device("cuda"), yolo) is None  # CUDA: the trainer's amp decides


def test_hardware_bf16_is_amx_or_avx512_bf16(monkeypatch):
    from ssod.training.engine import ema

    for amx, avx512_bf16 in ((False, False), (True, False), (False, True), (True, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert ema.cpu_has_bf16_matmul() is (amx or avx512_bf16)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # an older torch without the probe
    assert ema.cpu_has_bf16_matmul() is True  # AMX still answers


def test_bf16_teacher_forward_is_float32_and_close_and_validation_stays_fp32():
    from ssod.training.pseudo import eval_mode

    model = _tiny_yolo()
    x = torch.rand(2, 3, 64, 64)
    with eval_mode(model):
        ref = model.forward_raw(x)
        ref_dets = model.predict(x, conf=0.0)
    model.pseudo_label_dtype = torch.bfloat16
    with eval_mode(model):
        raw = model.forward_raw(x)
        dets = model.predict(x, conf=0.0)
    assert all(r.dtype == torch.float32 for r in raw) and dets[0]["boxes"].dtype == torch.float32
    for a, b in zip(raw, ref):
        assert not torch.equal(a, b)  # autocast took effect ...
        assert torch.allclose(a, b, atol=0.05 * float(b.abs().max()))  # ... to bf16's ~3 significant digits
    assert dets[0]["scores"].numel() > 0
    assert torch.allclose(dets[0]["scores"][:5], ref_dets[0]["scores"][:5], rtol=0.05)
    with torch.no_grad():  # validation calls predict without eval_mode: float32, bit for bit
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(model.predict(x, conf=0.0), ref_dets))


def test_trainer_sets_the_teacher_precision_and_trains(tiny_cfg):
    from ssod.training.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg(method="efficient_teacher", burn_in_epochs=0, teacher_precision="bf16", epochs=1,
                               steps_per_epoch=2))
    assert trainer.teacher.pseudo_label_dtype is torch.bfloat16 and trainer.student.pseudo_label_dtype is None
    import csv

    run = trainer.train()["run_dir"]
    row = list(csv.DictReader(open(f"{run}/results.csv")))[-1]
    assert math.isfinite(float(row["train/total"])) and float(row["train/unsup_cls"]) > 0
    assert Trainer(tiny_cfg(teacher_precision="fp32")).teacher.pseudo_label_dtype is None
    with pytest.raises(ValueError, match="teacher_precision"):
        Trainer(tiny_cfg(teacher_precision="half"))
