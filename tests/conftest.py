"""Shared fixtures: one tiny demo dataset per test session, tiny model settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SSOD_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "ssod-cache"))

# A model small enough to train a few steps in seconds on 2 CPU cores.
TINY = {"model": "yolov8n", "width": 0.0625, "depth": 0.33, "imgsz": 64}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A 32-image demo dataset (half labeled) with 8 val images, 64-80 px."""
    from ssod.training.data.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "tiny"
    return make_demo_dataset(out, seed=1, labeled_ratio=0.5, n_train=32, n_val=8, size=(64, 80), progress=False)


@pytest.fixture()
def tiny_cfg(tiny_demo, tmp_path):
    from ssod.config import resolve_config

    def make(**kw):
        base = dict(data=str(tiny_demo), epochs=2, batch=4, workers=0, out=str(tmp_path / "runs"),
                    warmup_epochs=0.5, plots=False, **TINY)
        base.update(kw)
        return resolve_config(None, **base)

    return make
