"""The one door to ultralytics: import it offline, quiet, and without stealing CPU threads.

Importing ultralytics as-is has side effects ssod cannot accept on a deployment machine:
it sets ``OMP_NUM_THREADS=1`` before torch loads (halving CPU training speed), may pip-install
packages and resolve DNS names, writes settings to ``~/.config`` and downloads ``Arial.ttf``
when it plots. Every ssod module that needs ultralytics calls ``import_ultralytics()`` instead
of ``import ultralytics`` so these are neutralised in one place.

Never call ``ultralytics.utils.torch_utils.select_device`` from ssod: it resets
``torch.set_num_threads`` to ``cpu_count - 1``. Use ``restore_threads()`` if something did.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
_state: dict[str, int] = {}


def cache_dir() -> Path:
    """ssod's cache folder: ``$SSOD_CACHE`` or ``~/.cache/ssod``."""
    return Path(os.environ.get("SSOD_CACHE") or Path.home() / ".cache" / "ssod").expanduser()


def import_ultralytics() -> ModuleType:
    """Import ultralytics once, offline and quiet, keeping torch's thread count; return the module."""
    import sys

    if "ultralytics" in sys.modules and _state:
        return sys.modules["ultralytics"]

    # torch must load first: it reads OMP_NUM_THREADS at import, which ultralytics sets to 1.
    import torch

    threads = torch.get_num_threads()
    omp_before = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no DNS probes, no update checks, no analytics
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")  # never pip-install a "missing" requirement
    os.environ.setdefault("YOLO_VERBOSE", "False")  # no settings banner on first import
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cache_dir() / "ultralytics"))

    import ultralytics
    from PIL import Image
    from ultralytics.utils import LOGGER, USER_CONFIG_DIR, patches

    # ultralytics replaces PIL's Image.open globally with a HEIC-probing wrapper that turns
    # "not an image" into "No module named pi_heif": undo it so bad files keep honest reasons.
    if Image.open is getattr(patches, "image_open", None):
        Image.open = patches._image_open

    if omp_before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp_before
    _state["threads"] = threads
    restore_threads()
    LOGGER.setLevel(logging.WARNING)
    # USER_CONFIG_DIR is where check_font looks (it may fall back to /tmp if the dir is read-only).
    _install_fonts(Path(USER_CONFIG_DIR))
    return ultralytics


def restore_threads() -> None:
    """Put torch's intra-op thread count back to what it was before ultralytics was imported."""
    import torch

    if _state.get("threads") and torch.get_num_threads() != _state["threads"]:
        torch.set_num_threads(_state["threads"])


def _install_fonts(folder: Path) -> None:
    """Save matplotlib's DejaVuSans as the Arial files ultralytics would otherwise download."""
    missing = [folder / n for n in _FONT_NAMES if not (folder / n).is_file()]
    if not missing:
        return
    spec = importlib.util.find_spec("matplotlib")  # locate without importing matplotlib (slow)
    if spec is None or not spec.submodule_search_locations:
        logging.getLogger("ssod").warning("matplotlib not found: ultralytics plots may try to download Arial.ttf")
        return
    src = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for dst in missing:
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)  # atomic: a concurrent process never sees a half-written font
    except OSError as e:
        logging.getLogger("ssod").warning(f"could not place fonts in {folder}: {e}")
