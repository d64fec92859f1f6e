"""YOLO family: offline build, loss, prediction, export decode, weights, EMA-style copies.

Models are tiny (width 0.125, depth 0.33, 64 px) so the whole file runs in seconds.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssod.training.models.base import build_model, family_of
from ssod.training.models.yolo import YoloDetector, dense_nms, nms_per_image, to_ultralytics_batch

NAMES = ["cat", "dog", "bird"]
TINY = {"names": NAMES, "width": 0.125, "depth": 0.33}
S = 64


def _no_network(*args, **kwargs):
    raise OSError("network access attempted during a YOLO test")


@pytest.fixture(scope="module", autouse=True)
def socket_guard():
    """Any connect or DNS lookup while these tests run fails loudly."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket.socket, "connect_ex", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core box OpenMP's spinning
    threads make them 10x slower; the thread-count contract is checked in a subprocess."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE: dict[str, YoloDetector] = {}


def tiny(name: str = "yolov8n") -> YoloDetector:
    """A fresh copy of a tiny model (built once per name)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = build_model({"model": name, **TINY})
    return copy.deepcopy(_CACHE[name]).train()


def labeled(boxes: list[list[float]], cls: list[int], bidx: list[int], b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "img": torch.rand(b, 3, S, S, generator=g),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "cls": torch.tensor(cls, dtype=torch.int64),
        "batch_idx": torch.tensor(bidx, dtype=torch.int64),
    }


TWO_BOXES = labeled([[4, 6, 30, 40], [34, 20, 60, 58]], [0, 2], [0, 1])
NO_BOXES = labeled([], [], [])


def test_import_keeps_threads_and_stays_offline(tmp_path: Path):
    """A fresh interpreter: no network, thread count kept, config and fonts in the ssod cache."""
    code = textwrap.dedent(
        """
        import json, os, socket
        def no_net(*a, **k):
            raise OSError("network")
        socket.socket.connect = no_net
        socket.getaddrinfo = no_net
        import torch
        torch.set_num_threads(3)  # a value ultralytics would never pick on its own
        from ssod.training.ultralytics_env import import_ultralytics
        import_ultralytics()
        from ultralytics.utils import USER_CONFIG_DIR
        from ultralytics.utils.checks import check_font
        print(json.dumps({"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
                          "cfg": str(USER_CONFIG_DIR), "font": str(check_font("Arial.ttf")),
                          "ufont": str(check_font("Arial.Unicode.ttf"))}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "SSOD_", "OMP_NUM"))}
    env.update(HOME=str(tmp_path), MPLCONFIGDIR=str(tmp_path / "mpl"), XDG_CONFIG_HOME=str(tmp_path / ".config"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    cfg = tmp_path / ".cache" / "ssod" / "ultralytics" / "Ultralytics"
    assert out["threads"] == 3
    assert out["omp"] is None  # ultralytics' OMP_NUM_THREADS=1 does not leak to child processes
    assert out["cfg"] == str(cfg)
    assert out["font"] == str(cfg / "Arial.ttf") and out["ufont"] == str(cfg / "Arial.Unicode.ttf")
    assert not (tmp_path / ".config" / "Ultralytics").exists()


def test_family_registration():
    assert family_of("yolo11n") == "yolo" and family_of("configs/yolov8s.yaml") == "yolo"
    det = tiny()
    assert det.family == "yolo" and det.num_classes == 3 and det.spec["family"] == "yolo"
    assert det.stride.tolist() == [8.0, 16.0, 32.0] and det.reg_max == 16


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n", "yolov5nu"])
def test_loss_backprops_with_and_without_boxes(name: str):
    det = tiny(name)
    total, parts = det.loss(TWO_BOXES)
    assert set(parts) == {"box", "cls", "dfl"} and not any(p.requires_grad for p in parts.values())
    assert torch.isfinite(total) and all(float(p) > 0 for p in parts.values())
    # ultralytics' convention: total = sum of gain-weighted parts x batch size
    assert float(total.detach()) == pytest.approx(2 * sum(float(p) for p in parts.values()), rel=1e-5)
    total.backward()
    grads = [p.grad for p in det.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)

    det.zero_grad()
    total0, parts0 = det.loss(NO_BOXES)
    assert torch.isfinite(total0) and float(parts0["box"]) == 0 and float(parts0["cls"]) > 0
    total0.backward()  # background-only images still train the classifier
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in det.parameters())


def test_end_to_end_head_trains_both_branches_predicts_dense():
    """yolo26 (reg_max 1, one-to-one head): E2E loss, but raw/decode/predict use the one-to-many head."""
    det = tiny("yolo26n")
    total, _ = det.loss(TWO_BOXES)
    total.backward()
    assert torch.isfinite(total) and det.head.one2one_cv2[0][0].conv.weight.grad.abs().sum() > 0
    assert det.reg_max == 1 and det.criterion() is det.model.criterion.one2many
    det.eval()
    with torch.no_grad():
        torch.testing.assert_close(det.decode(det.forward_raw(TWO_BOXES["img"])), det.model(TWO_BOXES["img"])[0])
    assert len(det.predict(TWO_BOXES["img"], conf=0.0)) == 2


def test_hyp_overrides_loss_gains():
    det = build_model({"model": "yolov8n", **TINY, "hyp": {"box": 0.0, "dfl": 0.0}})
    _, parts = det.loss(TWO_BOXES)
    assert float(parts["box"]) == 0 and float(parts["dfl"]) == 0 and float(parts["cls"]) > 0
    with pytest.raises(ValueError, match="hyp"):
        build_model({"model": "yolov8n", **TINY, "hyp": {"not_a_gain": 1.0}})


def test_bad_model_names_fail_clearly():
    with pytest.raises(ValueError, match="yolov8q"):
        build_model({"model": "yolov8q", **TINY})
    with pytest.raises(ValueError, match="load_weights"):
        build_model({"model": "yolov8n.pt", **TINY})
    with pytest.raises(ValueError, match="not found"):
        build_model({"model": "/nowhere/yolo-custom.yaml", **TINY})


def test_batch_conversion_to_ultralytics():
    ub = to_ultralytics_batch(TWO_BOXES)
    torch.testing.assert_close(ub["bboxes"][0], torch.tensor([17, 23, 26, 34]) / S)
    assert ub["cls"].shape == (2, 1) and ub["batch_idx"].dtype == torch.float32


def test_raw_decode_and_export_match_eval_forward():
    det = tiny("yolo11n").eval()
    img = TWO_BOXES["img"]
    raw = det.forward_raw(img)
    assert [tuple(r.shape) for r in raw] == [(2, 4 * 16 + 3, S // s, S // s) for s in (8, 16, 32)]
    feats, raw2 = det.forward_features(img)
    assert len(feats) == 3 and [f.shape[-1] for f in feats] == [8, 4, 2]
    torch.testing.assert_close(raw2[0], raw[0])
    with torch.no_grad():
        ref = det.model(img)[0]  # ultralytics' own inference decode
        dec = det.decode(raw)
        exp = det.export_module()(img)
    assert dec.shape == (2, 4 + 3, 64 + 16 + 4)
    torch.testing.assert_close(dec, ref)
    torch.testing.assert_close(exp, ref, atol=1e-3, rtol=1e-4)  # fused conv+bn: float rounding only
    with pytest.raises(NotImplementedError):
        det.export_module(nms=True)


def test_predict_structure():
    det = tiny().eval()
    out = det.predict(TWO_BOXES["img"], conf=0.0, iou=0.7, max_det=7)
    assert isinstance(out, list) and len(out) == 2
    for d in out:
        assert set(d) == {"boxes", "scores", "labels"}
        k = len(d["scores"])
        assert 0 < k <= 7 and d["boxes"].shape == (k, 4) and d["labels"].dtype == torch.int64
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= S).all() and (d["labels"] < 3).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
    assert all(len(d["scores"]) == 0 for d in det.predict(TWO_BOXES["img"], conf=1.0))


def test_dense_nms_per_image_and_class():
    # 3 anchors x 2 images, xywh + 2 class scores
    pred = torch.zeros(2, 6, 3)
    pred[0, :4] = torch.tensor([[20, 21, 50], [20, 20, 50], [10, 10, 10], [10, 10, 10]]).float()  # 0,1 overlap
    pred[0, 4:] = torch.tensor([[0.9, 0.8, 0.1], [0.0, 0.0, 0.7]])
    pred[1, :4] = pred[0, :4]
    pred[1, 4:] = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0]])  # same boxes, different classes
    out = dense_nms(pred, conf=0.25, iou=0.5, max_det=10, hw=(64, 64))
    assert out[0]["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert out[0]["labels"].tolist() == [0, 1]
    torch.testing.assert_close(out[0]["boxes"][0], torch.tensor([15.0, 15.0, 25.0, 25.0]))
    assert out[1]["labels"].tolist() == [0, 1]  # class-aware: overlapping boxes of different classes stay
    assert [len(d["scores"]) for d in dense_nms(pred, 0.25, 0.5, 1, (64, 64))] == [1, 1]


def test_nms_per_image_agnostic_drops_other_classes_only_within_an_image():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [30, 30, 40, 40]]).float()
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 1, 1, 1])
    batch_idx = torch.tensor([0, 0, 1, 0])
    aware = nms_per_image(boxes, scores, labels, batch_idx, 0.5, 10, 2, 2)
    agnostic = nms_per_image(boxes, scores, labels, batch_idx, 0.5, 10, 2, 2, agnostic=True)
    assert aware.tolist() == [0, 1, 3, 2]  # grouped by image, score order inside
    assert agnostic.tolist() == [0, 3, 2]  # box 1 (class 1 on class 0's box) goes; image 1's box stays


def test_deepcopy_and_state_dict_round_trip():
    det = tiny()
    det.loss(TWO_BOXES)  # caches the criterion: copies must still work
    ema = copy.deepcopy(det).eval()
    fresh = build_model(det.spec)
    fresh.load_state_dict(det.state_dict(), strict=True)
    det.eval(), fresh.eval()
    img = TWO_BOXES["img"]
    with torch.no_grad():
        ref = det.decode(det.forward_raw(img))
        torch.testing.assert_close(ema.decode(ema.forward_raw(img)), ref)
        torch.testing.assert_close(fresh.decode(fresh.forward_raw(img)), ref)
        next(ema.parameters()).add_(1.0)
    assert not torch.equal(next(ema.parameters()), next(det.parameters()))
    ema.train()
    total, _ = ema.loss(TWO_BOXES)
    assert torch.isfinite(total)


def test_eval_no_grad_forward_runs_a_folded_copy_kept_in_sync():
    """Eval + no grad (the teacher, validation) runs a BatchNorm-folded channels-last copy: the plain
    forward's maps to float rounding, refreshed after in-place writes (the EMA update) and
    load_state_dict, never in state_dict or deep copies, rebuilt after .to()."""
    det = tiny("yolo11n")
    img = TWO_BOXES["img"]
    with torch.no_grad():
        det.forward_raw(img)  # train mode: BN statistics move away from their init
    det.eval()

    def fast_and_plain() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            fast = det.forward_raw(img.to(next(det.parameters()).dtype))
        plain = [r.detach() for r in det.forward_raw(img.to(next(det.parameters()).dtype))]  # grad on: plain model
        return fast, plain

    fast, plain = fast_and_plain()
    folded = det.__dict__["_folded"]
    assert folded.ok and len(folded.pairs) > 10
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in folded.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    # the folded layers' activations run in place (the copy's own modules, never the source's)
    acts = [m.act for m in folded.model.modules() if hasattr(m, "conv") and isinstance(getattr(m, "act", None), torch.nn.SiLU)]
    assert acts and all(a.inplace for a in acts)
    assert not any(m.inplace for m in det.model.modules() if isinstance(m, torch.nn.SiLU))
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # what ModelEMA.update does: in-place writes to parameters and BN buffers
        for t in [*det.parameters(), *det.buffers()]:
            if t.dtype.is_floating_point:
                t.mul_(0.9)
    fast2, plain2 = fast_and_plain()
    assert not torch.allclose(fast2[0], fast[0], atol=1e-3)
    for a, b in zip(fast2, plain2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    other = tiny("yolo11n")
    det.load_state_dict(other.state_dict())
    for a, b in zip(*fast_and_plain()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert set(det.state_dict()) == set(other.state_dict())
    assert "_folded" not in copy.deepcopy(det).__dict__
    det.double()
    assert "_folded" not in det.__dict__
    fast, plain = fast_and_plain()
    assert fast[0].dtype == torch.float64
    torch.testing.assert_close(fast[0], plain[0])


def test_folded_copy_refuses_a_structure_it_cannot_sync():
    """A fold that adds or reshapes tensors the source lacks leaves ``ok`` False: the plain model runs."""
    from ssod.training.models.folded import FoldedCopy

    det = tiny().eval()

    def odd_fold(m: torch.nn.Module) -> torch.nn.Module:
        m.fuse(verbose=False)
        m.extra = torch.nn.Linear(2, 2)
        return m

    assert FoldedCopy(det.model, lambda m: m.fuse(verbose=False)).ok
    assert not FoldedCopy(det.model, odd_fold).ok


def test_folded_copy_keeps_an_activation_another_module_reads_out_of_place():
    """In-place activations only where the folded convolution is the activation's sole caller."""
    from torch import nn

    from ssod.training.models.folded import FoldedCopy

    class ConvBN(nn.Module):
        def __init__(self, act: nn.Module):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), act

        def forward(self, x):
            return self.act(self.bn(self.conv(x))) if hasattr(self, "bn") else self.act(self.conv(x))

    class Residual(nn.Module):  # reads x after its activation: x must survive
        def __init__(self, act: nn.Module):
            super().__init__()
            self.act = act

        def forward(self, x):
            return x + self.act(x)

    def fold(m: nn.Module) -> nn.Module:
        for layer in m.modules():
            if isinstance(layer, ConvBN):
                layer.conv = torch.nn.utils.fuse_conv_bn_eval(layer.conv, layer.bn)
                del layer.bn
        return m

    shared = nn.SiLU()
    net = nn.Sequential(ConvBN(shared), Residual(shared), ConvBN(nn.SiLU())).eval()
    copy_ = FoldedCopy(net, fold)
    assert copy_.ok and len(copy_.pairs) == 2
    assert not copy_.model[0].act.inplace and copy_.model[0].act is copy_.model[1].act
    assert copy_.model[2].act.inplace
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy_(net, x), net(x), atol=1e-5, rtol=1e-5)


def test_load_weights(tmp_path: Path):
    src = tiny()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    ssod_ckpt = tmp_path / "last.pt"
    torch.save({"model": src.state_dict(), "spec": src.spec}, ssod_ckpt)
    dst = tiny()
    n = len(dst.state_dict())
    assert dst.load_weights(ssod_ckpt) == {"matched": n, "total": n, "source": n}
    torch.testing.assert_close(dst.state_dict(), src.state_dict())

    ul_ckpt = tmp_path / "ultra.pt"  # ultralytics layout: pickled DetectionModel under "model", ema None
    torch.save({"model": copy.deepcopy(src.model).half(), "ema": None}, ul_ckpt)
    with pytest.raises(ValueError, match="pickled"):
        tiny().load_weights(ul_ckpt, allow_pickle=False)
    other = build_model({"model": "yolov8n", **TINY, "names": ["a", "b"]})  # different class count
    with pytest.warns(UserWarning, match="weights_only=False"):
        info = other.load_weights(ul_ckpt)
    assert 0 < info["matched"] < info["total"]  # everything but the class logits layers

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: not a torch checkpoint"):
        tiny().load_weights(bad)
    with pytest.raises(FileNotFoundError):
        tiny().load_weights(tmp_path / "missing.pt")


def test_overfits_one_image():
    torch.manual_seed(0)
    det = tiny()
    batch = labeled([[4, 6, 30, 40], [34, 20, 60, 58]], [0, 2], [0, 0], b=1)
    opt = torch.optim.Adam(det.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        total, _ = det.loss(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert sum(losses[-3:]) / 3 < 0.35 * losses[0], losses
