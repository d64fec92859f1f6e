"""The `ssod` command line: train -> eval on tiny data, demo data, one-line errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
from typer.testing import CliRunner

from ssod.cli import app

runner = CliRunner()


def test_train_then_eval(tiny_demo, tmp_path):
    args = ["train", "--data", str(tiny_demo), "--model", "yolov8n", "--width", "0.0625", "--depth", "0.33",
            "--imgsz", "64", "--epochs", "1", "--batch", "4", "--workers", "0", "--out", str(tmp_path), "--name", "cli"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "mAP50-95" in r.output
    weights = tmp_path / "cli" / "weights" / "last.pt"
    assert weights.exists()
    r = runner.invoke(app, ["eval", str(weights), "--batch", "4"])
    assert r.exit_code == 0, r.output
    saved = json.loads((weights.parent / "last_eval_teacher.json").read_text())
    assert set(saved["metrics"]) >= {"mAP50-95", "mAP50", "mAP75"}
    assert len(saved["per_class"]) == 10
    # the confusion matrix: every val box lands in one column (found or missed), the picture is written
    matrix = np.asarray(saved["confusion"]["matrix"])
    n_val = sum(r["n_gt"] for r in saved["per_class"])
    assert matrix.shape == (11, 11) and matrix[:, :10].sum() == n_val
    for png in ("last_eval_teacher_confusion.png", "last_eval_teacher_pr.png"):
        assert (weights.parent / png).stat().st_size > 0
    assert len(saved["pr_curve"]["recall"]) == 101 and len(saved["pr_curve"]["precision"]) == 10
    for png in ("confusion_matrix.png", "PR_curve.png"):  # and training's final ones
        assert (tmp_path / "cli" / png).exists()
    # the exported model through the runtime's pipeline, on the same val split
    r = runner.invoke(app, ["export", str(weights), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1 and "give --data" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "m.onnx"), "--data", str(tiny_demo), "--batch", "4"])
    assert r.exit_code == 0, r.output
    onnx_eval = json.loads((tmp_path / "m_eval_model.json").read_text())
    assert len(onnx_eval["per_class"]) == 10 and (tmp_path / "m_eval_model_confusion.png").exists()
    assert np.asarray(onnx_eval["confusion"]["matrix"])[:, :10].sum() == n_val
    for k in ("mAP50-95", "mAP50"):  # another letterbox (minimal rectangles) and NMS: close, not equal
        assert abs(onnx_eval["metrics"][k] - saved["metrics"][k]) < 0.02
    if importlib.util.find_spec("tensorrt") is None:  # the engine is left to the GPU machine: exit code 3, one error
        r = runner.invoke(app, ["export", str(weights), "--format", "trt", "--out", str(tmp_path / "m.engine")])
        assert r.exit_code == 3, r.output
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "TensorRT is not installed" in errors[0]
        assert (tmp_path / "m.onnx").exists() and (tmp_path / "m.engine.json").exists()


def test_bad_data_path_is_one_line_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    r = runner.invoke(app, ["train", "--data", str(missing), "--epochs", "1"])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "nope.yaml" in lines[0]


def test_data_demo_command(tmp_path):
    out = tmp_path / "d"
    r = runner.invoke(app, ["data", "demo", str(out), "--n-train", "12", "--n-val", "4", "--size", "64,72"])
    assert r.exit_code == 0, r.output
    assert (out / "data.yaml").exists() and (out / "preview.png").exists()
    assert len(list((out / "images" / "val").glob("*.jpg"))) == 4


def test_help_lists_every_train_option():
    r = runner.invoke(app, ["train", "--help"], terminal_width=200)
    for opt in ("--data", "--model", "--method", "--epochs", "--imgsz", "--batch", "--out", "--resume",
                "--device", "--workers", "--config", "--set"):
        assert opt in r.output, opt


def test_set_overrides_method_hyperparameters(tiny_demo, tmp_path):
    from ssod.config import parse_overrides, resolve_config

    over = parse_overrides(["lambda_u=1", "adaptive_thresholds=false", "tau1 = 0.2"])
    assert over == {"lambda_u": 1, "adaptive_thresholds": False, "tau1": 0.2}
    cfg = resolve_config(None, method="efficient_teacher", method_cfg=over)
    assert (cfg["method_cfg"]["lambda_u"], cfg["method_cfg"]["adaptive_thresholds"]) == (1, False)
    assert cfg["method_cfg"]["tau2"] == 0.6  # the rest keeps its defaults
    r = runner.invoke(app, ["train", "--data", str(tiny_demo), "--method", "efficient_teacher", "--set", "lambda_u"])
    assert r.exit_code == 1 and "expected KEY=VALUE" in r.output
    r = runner.invoke(app, ["train", "--data", str(tiny_demo), "--method", "efficient_teacher", "--set", "tua2=0.5",
                            "--model", "yolov8n", "--width", "0.0625", "--depth", "0.33", "--imgsz", "64",
                            "--epochs", "1", "--workers", "0", "--out", str(tmp_path)])
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
    assert r.exit_code == 1 and len(lines) == 1 and "tua2" in lines[0], r.output
