"""JPEG decoding per photo: Pillow, OpenCV and simplejpeg, one thread and a 2-thread pool.

    python benchmarks/jpeg_decode.py --photos runs/bench-label/photos [--n 1000] [--repeats 3]

Why: ``ssod_deploy.images`` decodes complete 8-bit RGB/gray JPEGs with simplejpeg
(libjpeg-turbo) and everything else with Pillow; this measures that choice on real photos
(``benchmarks/label_throughput.py`` writes the 640x480 ones it uses into ``<out>/photos``).
Every decoder returns the same RGB pixels (checked on every file before timing: the three
must agree bit for bit, else the script stops).

Rows: full size and the 1/2 draft scale (what ``ssod label`` decodes at imgsz 320 for a
640x480 photo), each decoder on one thread (a plain loop: training's loader workers and
calibration read this way) and in a pool of 2 threads (``ssod label``'s decode pool; the
images are kept for one batch of 8 and dropped, as the pipeline does). Columns: milliseconds
of CPU per photo (user + system, the median of ``--repeats`` passes) and the minor page faults
per photo (a decoded array whose memory the allocator handed back to the kernel costs its pages
again). Each decoder runs in a fresh process of its own: the allocator's state left by another
decoder (glibc raises its mmap threshold after large frees) changes the figures by up to 2x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import platform
import resource
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image


def pillow(data: bytes, scale: int) -> np.ndarray:
    with Image.open(BytesIO(data)) as im:
        if scale > 1:
            im.draft("RGB", (im.width // scale, im.height // scale))
        return np.asarray(im.convert("RGB"))


_CV2_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2}


def opencv(data: bytes, scale: int) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_FLAGS[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)


def simple(data: bytes, scale: int) -> np.ndarray:
    if scale == 1:
        return simplejpeg.decode_jpeg(data, "RGB")
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // scale), min_width=-(-w // scale))


DECODERS: dict[str, Callable[[bytes, int], np.ndarray]] = {"Pillow": pillow, "OpenCV": opencv, "simplejpeg": simple}


def cpu_and_faults() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def one_pass(fn: Callable[[bytes, int], np.ndarray], data: list[bytes], scale: int, threads: int) -> tuple[float, float]:
    """(ms of CPU per photo, page faults per photo) for one pass over ``data``."""
    c0, f0 = cpu_and_faults()
    if threads == 1:
        for d in data:
            fn(d, scale)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for k in range(0, len(data), 8):  # a batch at a time, dropped after: the pipeline's lifetime
                list(pool.map(lambda d: fn(d, scale), data[k : k + 8]))
    c1, f1 = cpu_and_faults()
    return (c1 - c0) / len(data) * 1e3, (f1 - f0) / len(data)


def cells(name: str, data: list[bytes], repeats: int) -> list[str]:
    """One decoder's four table cells, measured in this process."""
    fn = DECODERS[name]
    out = []
    for scale in (1, 2):
        for threads in (1, 2):
            one_pass(fn, data[:50], scale, threads)  # warm-up
            runs = [one_pass(fn, data, scale, threads) for _ in range(repeats)]
            out.append(f"{statistics.median(r[0] for r in runs):.2f} / {statistics.median(r[1] for r in runs):.0f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, required=True, help="folder of JPEG photos")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=list(DECODERS), help=argparse.SUPPRESS)  # the per-decoder child process
    args = ap.parse_args()
    cv2.setNumThreads(1)
    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[: args.n]
    if not files:
        sys.exit(f"{args.photos}: no JPEG files")
    data = [p.read_bytes() for p in files]
    if args.only:
        print(json.dumps(cells(args.only, data, args.repeats)))
        return
    for scale in (1, 2):  # the decoders must agree before their speed means anything
        for p, d in zip(files, data):
            ref = pillow(d, scale)
            for name, fn in DECODERS.items():
                if not np.array_equal(fn(d, scale), ref):
                    sys.exit(f"{p}: {name} pixels differ from Pillow's at scale 1/{scale}")
    h, w = pillow(data[0], 1).shape[:2]
    columns = {}
    for name in DECODERS:
        cmd = [sys.executable, __file__, "--photos", str(args.photos), "--n", str(args.n),
               "--repeats", str(args.repeats), "--only", name]
        columns[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"{len(files)} JPEGs ({w}x{h} first), {platform.machine()}, Pillow {Image.__version__}, "
          f"OpenCV {cv2.__version__}, simplejpeg {simplejpeg.__version__}; all three bit-identical")
    print("\n| scale | threads | " + " | ".join(f"{n} ms CPU / faults" for n in DECODERS) + " |")
    print("|---|---|" + "---|" * len(DECODERS))
    for k, (scale, threads) in enumerate((s_, t) for s_ in (1, 2) for t in (1, 2)):
        print(f"| 1/{scale} | {threads} | " + " | ".join(columns[n][k] for n in DECODERS) + " |")


if __name__ == "__main__":
    main()
