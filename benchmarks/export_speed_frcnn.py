"""Faster R-CNN throughput (images/s): torch eager vs ONNX Runtime FP32, on the CPU.

    python benchmarks/export_speed_frcnn.py [--weights last.pt] [--model fasterrcnn_mobilenet_v3]
                                            [--sizes 320] [--seconds 10] [--threads N] [--out DIR]

Both sides run the same network end to end, NMS included: the torch side is the teacher's
``export_module()`` (what the exporter traces), the ONNX side the exported file (legacy tracer,
opset 17, fixed batch 1, the only batch this family exports by default). Pre-processing
(letterbox) is excluded; the same random input is reused. Without ``--weights`` the model has
torchvision's random initialisation and 80 classes: its near-uniform scores keep the RPN's full
top-n of proposals and many detections, so the time is an upper bound for a trained model of
the same size. Each cell is the median of timed runs after two warm-up runs, repeated until
``--seconds`` have passed (at least 3 runs). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ssod.export import export_model
from ssod.training.engine.checkpoint import load_detector, save_checkpoint
from ssod.training.models.base import build_model

from export_speed import speed_setup, time_it  # the sibling benchmark's timer (run as `python benchmarks/...`)


def random_checkpoint(path: Path, model: str, imgsz: int, nc: int = 80) -> Path:
    """An ssod checkpoint of a randomly initialised model (``weights=None``: nothing downloaded)."""
    torch.manual_seed(0)
    det = build_model({"model": model, "names": [str(i) for i in range(nc)], "imgsz": imgsz}).eval()
    sd = det.state_dict()
    save_checkpoint({"model_spec": det.spec, "names": det.names, "teacher": sd, "student": sd,
                     "config": {"imgsz": imgsz, "data": None}, "export_metadata": {"method": "supervised"}}, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="ssod Faster R-CNN checkpoint (default: random weights)")
    ap.add_argument("--model", default="fasterrcnn_mobilenet_v3")
    ap.add_argument("--sizes", default="320")
    ap.add_argument("--conf", type=float, default=0.25, help="score threshold baked into both graphs")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    ap.add_argument("--out", default=None, help="folder for the exported models (default: a temp folder)")
    args = ap.parse_args()

    threads, work, opts = speed_setup(args.threads, args.out, "ssod-speed-frcnn-")
    batch = 1

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        weights = Path(args.weights) if args.weights else random_checkpoint(work / f"random_{size}.pt", args.model, size)
        det = load_detector(weights)[0]
        module = det.export_module(conf=args.conf)
        onnx_path = export_model(weights, imgsz=size, conf=args.conf, out=work / f"frcnn_{size}.onnx")
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            eager = time_it(lambda: module(xt), batch, args.seconds)
        onnx_ips = time_it(lambda: session.run(None, {"images": x}), batch, args.seconds)
        rows.append((size, batch, eager, onnx_ips))
        print(f"{size} px, batch {batch}: torch {eager:.2f}, ort fp32 {onnx_ips:.2f} img/s", flush=True)

    name = weights.name if args.weights else f"{args.model} (random weights, 80 classes)"
    print(f"\n{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, model {name}, conf {args.conf}\n")
    print("| imgsz | batch | torch eager | ORT FP32 | ORT / torch |")
    print("|---|---|---|---|---|")
    for size, b, eager, f32 in rows:
        print(f"| {size} | {b} | {eager:.2f} | {f32:.2f} | {f32 / eager:.2f}x |")
    print("\n(images/s, network + NMS, pre-processing excluded)")


if __name__ == "__main__":
    main()
