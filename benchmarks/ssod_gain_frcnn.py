"""SSOD gain with a Faster R-CNN student on the demo data at 10% labels (issue 6).

    python benchmarks/ssod_gain_frcnn.py [--epochs 10] [--steps 60] [--imgsz 160] [--batch 4]

Same protocol as ``ssod_gain.py`` (shared supervised burn-in, same steps and LR schedule for
every row, gap closed between supervised on 10% and the 100% oracle), with
``fasterrcnn_mobilenet_v3`` (random init: nothing is downloaded) and the two-stage methods:
supervised, mean_teacher, efficient_teacher, soft_teacher, dtg, oracle. Sizes are chosen for
about an hour on 2 CPU cores; a randomly initialised Faster R-CNN learns slowly, so absolute mAP
at this budget is low — compare rows, not absolutes.
"""

from __future__ import annotations

from ssod_gain import main

ROWS = {
    "supervised": ("supervised", 0.1, {}),
    "mean_teacher": ("mean_teacher", 0.1, {}),
    "efficient_teacher": ("efficient_teacher", 0.1, {}),
    "soft_teacher": ("soft_teacher", 0.1, {}),
    "dtg": ("dtg", 0.1, {}),
    "oracle_100pct": ("supervised", 1.0, {}),
}

if __name__ == "__main__":
    main(
        ROWS, cost_methods=("efficient_teacher", "soft_teacher", "dtg"),
        model="fasterrcnn_mobilenet_v3", imgsz=160, batch=4, epochs=10, steps=60, out="runs/bench-ssod-frcnn",
    )
