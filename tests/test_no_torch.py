"""ssod_deploy must import without torch: edge devices install the runtime alone.

Runs a fresh interpreter in which importing torch (or anything built on it) fails, then
imports every module of the package found by walking it, so modules added later are covered.
Only modules whose own name says they are the torch backend (e.g. ``backends/torch_ckpt``)
may fail, and then only with an ImportError naming torch; a module needing an optional
package that is not installed here at all (e.g. tensorrt) is tolerated too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    r"""
    import importlib, importlib.abc, importlib.util, json, pkgutil, sys

    BLOCKED = {"torch", "torchvision", "ultralytics", "lightning", "pytorch_lightning"}

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named '{name}' (blocked by test)", name=name)
            return None

    sys.meta_path.insert(0, BlockTorch())

    import ssod_deploy

    report = {"ok": ["ssod_deploy"], "torch_backend_refused": [], "optional_missing": {}}
    failed = {}
    def onerror(name):
        failed[name] = repr(sys.exc_info()[1])

    names = [m.name for m in pkgutil.walk_packages(ssod_deploy.__path__, "ssod_deploy.", onerror=onerror)]
    for name in sorted(set(names)):
        try:
            importlib.import_module(name)
            report["ok"].append(name)
        except ImportError as e:
            leaf = name.rsplit(".", 1)[-1]
            missing = (e.name or "").split(".")[0]
            if "torch" in leaf and missing in BLOCKED:
                report["torch_backend_refused"].append(name)
            elif missing and missing not in BLOCKED and importlib.util.find_spec(missing) is None:
                # an optional accelerator (tensorrt, ...) not installed here: not our concern
                report["optional_missing"][name] = missing
            else:
                failed[name] = repr(e)
        except Exception as e:
            failed[name] = repr(e)
    report["failed"] = failed
    report["torch_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps(report))
    """
)


def test_ssod_deploy_imports_without_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}, report["failed"]
    assert report["torch_loaded"] == []
    for required in ("ssod_deploy.images", "ssod_deploy.boxes", "ssod_deploy.evaluate"):
        assert required in report["ok"]


def test_blocker_really_blocks() -> None:
    """Guard against a vacuous pass: the same blocker makes a torch import fail."""
    probe = SCRIPT.split("import ssod_deploy")[0] + textwrap.dedent(
        """
        try:
            import torch
        except ImportError:
            print("blocked")
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "blocked", proc.stderr
