"""Model-only throughput (images/s): torch eager vs ONNX Runtime FP32 vs ONNX Runtime INT8, on the CPU.

INT8 is measured twice: the CPU export (uint8 activations, ``--int8`` with ``--format onnx``) and
the TensorRT export (signed symmetric Q/DQ, ``--int8-target tensorrt``) run in ONNX Runtime, to
show why the CPU export exists.

    python benchmarks/export_speed.py [--weights last.pt] [--calib DIR] [--sizes 320,640] [--batches 1,8]
                                      [--seconds 10] [--threads N] [--out DIR]

Without ``--weights`` a yolov8n with Kaiming-random weights is used (speed does not depend on
the values; random rather than untrained weights so INT8 calibration sees real activation
ranges). Model-only: pre/post-processing excluded, the same random input batch reused. Each cell
is the median of timed runs after two warm-up runs, repeated until ``--seconds`` have passed
(at least 3 runs). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from ssod.export import export_model
from ssod.training.engine.checkpoint import load_detector, save_checkpoint
from ssod.training.models.base import build_model


def random_checkpoint(path: Path, model: str, nc: int = 80) -> Path:
    det = build_model({"model": model, "names": [str(i) for i in range(nc)]}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mod in det.named_modules():
            if isinstance(mod, nn.Conv2d) and "dfl" not in name:
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / mod.weight[0].numel()) ** 0.5)
    sd = det.state_dict()
    save_checkpoint({"model_spec": det.spec, "names": det.names, "teacher": sd, "student": sd,
                     "config": {"imgsz": 640, "data": None}, "export_metadata": {"method": "supervised"}}, path)
    return path


def calibration_folder(folder: Path, n: int = 32) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def time_it(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Median images/s over repeated calls (2 warm-up calls first)."""
    fn(), fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def speed_setup(threads: int | None, out: str | None, prefix: str) -> tuple[int, Path, ort.SessionOptions]:
    """Threads for torch and ONNX Runtime alike (default: the cores this process may use), the
    folder for exported models (default: a temp folder) and the matching session options."""
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    work = Path(out or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return threads, work, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="ssod checkpoint (default: random yolov8n, 80 classes)")
    ap.add_argument("--model", default="yolov8n")
    ap.add_argument("--calib", default=None, help="INT8 calibration images (default: 32 random 640x480 images)")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--sizes", default="320,640")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    ap.add_argument("--out", default=None, help="folder for the exported models (default: a temp folder)")
    args = ap.parse_args()

    threads, work, opts = speed_setup(args.threads, args.out, "ssod-speed-")
    weights = Path(args.weights) if args.weights else random_checkpoint(work / "random.pt", args.model)
    calib = Path(args.calib) if args.calib else calibration_folder(work / "calib")
    module = load_detector(weights)[0].export_module()

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        fp32 = export_model(weights, imgsz=size, out=work / f"fp32_{size}.onnx")
        int8 = export_model(weights, imgsz=size, int8=True, calib=calib, calib_size=args.calib_size,
                            out=work / f"int8_{size}.onnx")  # uint8 activations: ONNX Runtime's CPU path
        int8_trt = export_model(weights, imgsz=size, int8=True, calib=calib, calib_size=args.calib_size,
                                int8_target="tensorrt", out=work / f"int8trt_{size}.onnx")  # the Q/DQ TensorRT takes
        sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for k, p in (("fp32", fp32), ("int8", int8), ("int8_trt", int8_trt))}
        for batch in [int(b) for b in args.batches.split(",")]:
            x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                eager = time_it(lambda: module(xt), batch, args.seconds)
            res = {k: time_it(lambda s=s: s.run(None, {"images": x}), batch, args.seconds) for k, s in sessions.items()}
            rows.append((size, batch, eager, res["fp32"], res["int8"], res["int8_trt"]))
            print(f"{size} px, batch {batch}: torch {eager:.1f}, ort fp32 {res['fp32']:.1f}, ort int8 {res['int8']:.1f}, "
                  f"ort int8 (TensorRT Q/DQ) {res['int8_trt']:.1f} img/s", flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, model {weights.name if args.weights else args.model + ' (random weights)'}\n")
    print("| imgsz | batch | torch eager | ORT FP32 | ORT INT8 (CPU, u8) | INT8 / FP32 | ORT INT8 (TensorRT Q/DQ, s8) |")
    print("|---|---|---|---|---|---|---|")
    for size, batch, eager, f32, i8, i8t in rows:
        print(f"| {size} | {batch} | {eager:.1f} | {f32:.1f} | {i8:.1f} | {i8 / f32:.2f}x | {i8t:.1f} |")
    print("\n(images/s, model only)")


if __name__ == "__main__":
    main()
