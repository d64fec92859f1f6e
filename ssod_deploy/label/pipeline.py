"""`ssod label` engine: discover -> decode+letterbox pool -> batched inference -> journal -> outputs.

Data flow (threads, not processes: simplejpeg/Pillow decoding, numpy and ONNX Runtime all release
the GIL, and threads hand decoded images over without copying them)::

    lanes:           take chunk k, queue chunk k+PREFETCH+lanes for decoding (bounded)
    decode pool:     read_image_with_size (JPEG draft) -> Detector.letterbox_one (uint8 canvas)
    lanes:           normalise chunk k into the lane's batch buffer -> Detector.infer -> output queue
    output thread:   postprocess -> thresholds -> append lines to the journal (fsync), previews

On a CPU, ``Detector.cpu_lanes`` gives two inference lanes (main thread + one more), each
with its own ONNX Runtime session on half the cores: one lane prepares its next batch while the
other runs, and no session's threads spin idle while the decoders need the cores. The price is
a second set of activations (``--lanes 1`` to save it; docs/benchmarks.md has the figures).
The second lane loads its session in its own thread while the first one already works.

Determinism. The file list is split into fixed *chunks* of ``batch`` images by position in
the full sorted list; a chunk is always inferred as one batch (minus its unreadable files),
whether the run is fresh, resumed or one shard of many (shard i takes chunks i, i+n, ...).
So every image meets the same batch companions in every kind of run, and the outputs built
from the journal are byte-identical however the work was split or interrupted.

Memory. Only the chunks in flight hold pixels; detections go straight to the journal on disk
and the final files are streamed from it (``writers.build_outputs``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssod_deploy.images import DEFAULT_MAX_PIXELS, ImageReadError, discover_images, read_image_with_size
from ssod_deploy.label import journal as jn
from ssod_deploy.label.vis import VIS_DIR, save_vis, shrink_for_vis
from ssod_deploy.label.writers import (
    FORMATS,
    LS_URL_PREFIX,
    SUMMARY_NAME,
    SafeTree,
    build_outputs,
    class_counts,
    parse_formats,
    write_json_atomic,
)

LOG = logging.getLogger("ssod")

PREFETCH = 2  # chunks decoded ahead of the one being inferred
OUTPUT_QUEUE = 4  # inferred batches post-processing may lag behind before inference waits
DEFAULT_TAU1 = 0.1  # uncertain floor when a model carries no learned thresholds
EXTERNAL_DIR = "_external"  # where files listed from outside the source folder are named


# ------------------------------------------------------------------------------ settings


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """'I/N' (0-based: 0/3, 1/3, 2/3) -> (I, N)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i_s, n_s = shard.split("/")
            i, n = int(i_s), int(n_s)
        except ValueError:
            raise ValueError(f"--shard {shard!r}: expected I/N, e.g. 0/4 (shards are numbered from 0)") from None
    else:
        i, n = (int(v) for v in shard)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {i}/{n}: need 0 <= I < N (shards are numbered from 0, e.g. 0/{max(n, 1)})")
    return i, n


def resolve_thresholds(meta: Any, conf: str | float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-class (tau1, tau2) and where they came from.

    ``auto``: the model's learned per-class thresholds (boxes >= tau2 are labels, tau1..tau2
    uncertain); a model without them uses its ``conf`` as tau2 and min(0.1, conf) as tau1.
    A number: one threshold for every class, no uncertain band.
    """
    nc = len(meta.names)
    if conf is None or (isinstance(conf, str) and conf.strip().lower() == "auto"):
        t1, t2 = getattr(meta, "tau1", None), getattr(meta, "tau2", None)
        if t1 is not None and t2 is not None:
            tau1 = np.asarray(t1, np.float64).reshape(-1)
            tau2 = np.asarray(t2, np.float64).reshape(-1)
            if len(tau1) != nc or len(tau2) != nc:
                raise ValueError(f"model metadata has {len(tau1)} tau1 / {len(tau2)} tau2 values for {nc} classes")
            source = "model metadata: per-class tau1/tau2 learned in training"
        else:
            c = float(getattr(meta, "conf", 0.25))
            tau2 = np.full(nc, c)
            tau1 = np.full(nc, min(DEFAULT_TAU1, c))
            source = f"model metadata has no learned thresholds: tau2 = model conf {c:g}, tau1 = {min(DEFAULT_TAU1, c):g}"
    else:
        try:
            c = float(conf)
        except ValueError:
            raise ValueError(f"--conf {conf!r}: expected 'auto' or a number in [0, 1]") from None
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"--conf {c}: must be within [0, 1]")
        tau1 = tau2 = np.full(nc, c)
        source = f"--conf {c:g} for every class (no uncertain band)"
    if not (np.all(np.isfinite(tau1)) and np.all(np.isfinite(tau2))) or np.any(tau1 > tau2):
        raise ValueError(f"invalid thresholds: tau1 {tau1.tolist()} must be <= tau2 {tau2.tolist()}")
    return tau1, tau2, source


def _metadata_dict(meta: Any) -> dict[str, Any]:
    if hasattr(meta, "to_json"):
        return json.loads(meta.to_json())
    if dataclasses.is_dataclass(meta):
        return dataclasses.asdict(meta)
    return dict(vars(meta))


def _file_sha256(path: str | os.PathLike | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Item:
    path: str
    name: str  # safe relative posix name used in every output
    skip: str | None = None  # reason known before decoding (duplicate output name)


def relative_name(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """Output name of ``path``: relative to ``base``, or ``_external/<absolute path>`` when the
    file lies outside it (e.g. ``../x.jpg`` in a list), so no name can contain '..'."""
    ap = os.path.abspath(path)
    b = os.path.abspath(base)
    prefix = b if b.endswith(os.sep) else b + os.sep
    if ap.startswith(prefix):  # the common case, without relpath's per-call cost
        return ap[len(prefix):].replace(os.sep, "/")
    drive, tail = os.path.splitdrive(ap)
    parts = [p for p in tail.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join([EXTERNAL_DIR, *([drive.rstrip(":")] if drive else []), *parts])


def collect_images(source: str | os.PathLike, out: str | os.PathLike, recursive: bool = True) -> list[Item]:
    """Discovered images (deterministic order) with their output names; OUT itself is excluded."""
    src = Path(source)
    base = src if src.is_dir() else src.parent
    out_abs = os.path.abspath(out) + os.sep
    out_real = os.path.realpath(out) + os.sep
    # Resolving every path is slow on huge folders: only needed when OUT sits inside the source.
    check_real = out_real.startswith(os.path.realpath(base) + os.sep)
    items: list[Item] = []
    seen: dict[str, str] = {}
    for p in discover_images(src, recursive):
        ap = os.path.abspath(p)
        if ap.startswith(out_abs) or (check_real and os.path.realpath(ap).startswith(out_real)):
            continue  # our own previews, on a re-run with OUT inside the source folder
        name = relative_name(ap, base)
        if name in seen:
            items.append(Item(str(p), name, f"same output name as {seen[name]}"))
            continue
        seen[name] = str(p)
        items.append(Item(str(p), name))
    return items


def default_out(source: str | os.PathLike) -> Path:
    """runs/label/<source name>: stable, so re-running with --resume finds the same folder."""
    src = Path(source)
    name = (src.name if src.is_dir() else src.stem) or "images"
    return Path("runs") / "label" / name


# ------------------------------------------------------------------------------ the engine


@dataclass
class _Loaded:
    i: int
    x: np.ndarray | None  # (H, W, 3) uint8 letterboxed canvas, dropped once batched
    params: Any
    arr_hw: tuple[int, int]
    orig_hw: tuple[int, int]
    preview: np.ndarray | None


@dataclass
class _Skipped:
    i: int
    reason: str


@dataclass
class _Batch:
    """One inferred chunk on its way to post-processing and the journal."""

    results: list  # _Loaded | _Skipped, in image-index order
    raw: list | None  # Detector.infer_each groups for the _Loaded ones (indices into them)


class _OutputThread(threading.Thread):
    """Post-processes inferred chunks, appends them to the journal and saves previews.

    Runs beside the inference loop, so the network starts its next batch while NMS, threshold
    and JSON work on the previous one. Its queue is short: raw outputs are megabytes each and a
    slow disk should slow inference down rather than grow memory.
    """

    def __init__(self, det: Any, items: Sequence[Item], done: np.ndarray, writer: jn.JournalWriter,
                 tau1: np.ndarray, tau2: np.ndarray, vis_dir: Path, names: list[str], progress: _Progress):
        super().__init__(name="ssod-output", daemon=True)
        self.det, self.items, self.done, self.writer = det, items, done, writer
        self.tau1, self.tau2 = tau1, tau2
        self.conf_floor = max(0.0, float(tau1.min()) - 1e-6)  # postprocess keeps scores > conf
        self.vis, self.names, self.progress = SafeTree(vis_dir), names, progress  # previews stay inside OUT/vis
        self.q: queue.Queue[_Batch | None] = queue.Queue(OUTPUT_QUEUE)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # keep draining so the inference loop never blocks on a dead thread
            try:
                lines, previews, new = self._process(item)
                self.writer.append(lines)
            except BaseException as e:  # noqa: BLE001 -- re-raised on the main thread
                self.error = e
                continue
            self.progress.advance(new)
            for name, img, sxy, b, s, c, u in previews:  # a preview is never worth a failed run
                try:
                    save_vis(self.vis.join(name, ".jpg"), img, sxy, b, s, c, u, self.names)
                except Exception as e:  # noqa: BLE001
                    LOG.warning("preview of %s not saved: %s", name, e)

    def _process(self, item: _Batch) -> tuple[list[str], list, int]:
        loaded = [r for r in item.results if isinstance(r, _Loaded)]
        per_image: dict[int, tuple] = {}
        if loaded:
            dets = self.det.postprocess_each(item.raw, [r.params for r in loaded], [r.arr_hw for r in loaded],
                                        conf=self.conf_floor)
            for r, d in zip(loaded, dets):
                per_image[r.i] = _to_original(self.tau1, self.tau2, r, d)
        lines: list[str] = []
        previews = []
        new = 0
        for r in item.results:
            if self.done[r.i]:
                continue  # finished before a restart; re-inferred only to keep the batch identical
            new += 1
            name = self.items[r.i].name
            if isinstance(r, _Skipped):
                LOG.warning("skipping %s: %s", self.items[r.i].path, r.reason)
                lines.append(jn.encode_skip(r.i, name, r.reason))
                continue
            b, s, c, u = per_image[r.i]
            lines.append(jn.encode_record(r.i, name, r.orig_hw, b, s, c, u))
            if r.preview is not None:
                ph, pw = r.preview.shape[:2]
                previews.append((name, r.preview, (pw / r.orig_hw[1], ph / r.orig_hw[0]), b, s, c, u))
        return lines, previews, new

    def put(self, item: _Batch) -> None:
        self._check()
        while True:  # a bounded put that notices if the thread died meanwhile
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                self._check()

    def close(self) -> None:
        self.q.put(None)
        self.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"post-processing or writing the journal failed: {self.error}") from self.error


class _Progress:
    """rich progress bar (images/s, ETA) on a terminal; a log line every 30 s otherwise."""

    def __init__(self, total: int, enabled: bool, done_before: int = 0):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self._bar = None
        self._last_log = self.t0
        self.enabled = enabled and total > 0
        if not self.enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:  # pragma: no cover - rich is a dependency
            return
        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self._bar = Progress(
            TextColumn("labeling"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self._task = self._bar.add_task("label", total=total, rate="-- img/s")
        self._bar.start()

    def advance(self, n: int) -> None:
        self.n += n
        now = time.perf_counter()
        rate = self.n / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{rate:.1f} img/s")
        elif self.enabled and (now - self._last_log >= 30 or self.n == self.total):
            self._last_log = now
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            LOG.info("labeled %d/%d images, %.1f img/s, ETA %s", self.n, self.total, rate, _fmt_s(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _fmt_s(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _to_original(tau1: np.ndarray, tau2: np.ndarray, loaded: _Loaded,
                 d: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Detections on the decoded array -> original pixels, thresholded per class."""
    boxes = np.asarray(d.boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(d.scores, np.float64).reshape(-1)
    labels = np.asarray(d.labels, np.int64).reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(tau1)):
        raise RuntimeError(f"model predicted class {int(labels.max())} but its metadata names {len(tau1)} classes")
    (ah, aw), (oh, ow) = loaded.arr_hw, loaded.orig_hw
    if (ah, aw) != (oh, ow):  # JPEG draft decoded a reduced image: scale back up
        boxes = boxes * np.array([ow / aw, oh / ah, ow / aw, oh / ah])
    np.clip(boxes[:, 0::2], 0, ow, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, oh, out=boxes[:, 1::2])
    keep = (scores >= tau1[labels]) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = np.argsort(-scores, kind="stable")
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    return boxes, scores, labels, scores < tau2[labels]


def _run_chunks(
    det: Any,
    more_lanes: Sequence[Callable[[], Any]],
    items: Sequence[Item],
    chunks: Sequence[int],
    batch: int,
    done: np.ndarray,
    output: _OutputThread,
    workers: int,
    max_pixels: int,
    vis_budget: int,
) -> None:
    """The inference loop: decode ahead in the pool, infer chunk after chunk, hand outputs on.

    Lane 0 is ``det`` on this thread; each of ``more_lanes`` (``Detector.cpu_lane_makers``) builds
    its detector on a thread of its own and joins in once loaded. Each lane takes the next decoded
    chunk and infers it as one batch, so lanes change which thread runs a chunk, never what the
    chunk's batch holds. A failure in any lane (loading included) stops all.
    """
    imgsz = int(det.metadata.imgsz)
    letterbox_one = det.letterbox_one  # depends on the metadata only: the same in every lane
    vis_lock = threading.Lock()
    vis_claimed = 0

    def claim_preview() -> bool:
        """First come first served: the first ``vis_budget`` readable images get previews."""
        nonlocal vis_claimed
        with vis_lock:
            if vis_claimed >= vis_budget:
                return False
            vis_claimed += 1
            return True

    def load(i: int) -> _Loaded | _Skipped:
        item = items[i]
        if item.skip is not None:
            return _Skipped(i, item.skip)
        try:
            arr, orig_hw = read_image_with_size(item.path, max_pixels, target_size=imgsz)
            x, params = letterbox_one(arr)
        except ImageReadError as e:
            return _Skipped(i, e.reason)
        except Exception as e:  # noqa: BLE001 -- one odd file must never end a long run
            return _Skipped(i, f"cannot preprocess image ({type(e).__name__}: {e})")
        preview = shrink_for_vis(arr) if vis_budget and not done[i] and claim_preview() else None
        return _Loaded(i, x, params, tuple(arr.shape[:2]), tuple(orig_hw), preview)

    pending: deque[list[Future]] = deque()
    chunk_iter = iter(chunks)
    n_total = len(items)
    take_lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ssod-decode") as pool:

        def submit_next() -> None:
            k = next(chunk_iter, None)
            if k is not None:
                pending.append([pool.submit(load, i) for i in range(k * batch, min((k + 1) * batch, n_total))])

        def take() -> list[Future] | None:
            """The next chunk's decode futures; queues another chunk so the pool stays busy."""
            with take_lock:
                if stop.is_set() or not pending:
                    return None
                futs = pending.popleft()
                submit_next()
                return futs

        def lane(det: Any) -> None:
            while (futs := take()) is not None:
                results = [f.result() for f in futs]
                loaded = [r for r in results if isinstance(r, _Loaded)]
                raw = None
                if loaded:
                    inputs = [r.x for r in loaded]
                    for r in loaded:
                        r.x = None  # only `inputs` holds the canvases now: freed once batched
                    # batched per input shape (rect models); Detector.infer splits/pads fixed-batch models
                    raw = det.infer_each(inputs)
                    del inputs
                output.put(_Batch(results, raw))

        def side_lane(make: Callable[[], Any]) -> None:
            try:
                lane(make())
            except BaseException as e:  # noqa: BLE001 -- re-raised on the main thread
                errors.append(e)
                stop.set()

        with take_lock:
            for _ in range(PREFETCH + 1 + len(more_lanes)):
                submit_next()
        side = [threading.Thread(target=side_lane, args=(m,), name=f"ssod-lane{k}", daemon=True)
                for k, m in enumerate(more_lanes, 1)]
        try:
            for t in side:
                t.start()
            lane(det)
        except BaseException:
            stop.set()
            raise
        finally:
            for t in side:
                while t.is_alive():  # a timed join stays interruptible
                    t.join(0.2)
            stop.set()
            for futs in pending:
                for f in futs:
                    f.cancel()
        if errors:
            raise errors[0]


def _load_detector(model: str | os.PathLike, backend: str, iou: float | None, imgsz: int | None,
                   lanes: int = 1) -> Any:
    """The model's detector, loaded as the first of ``lanes`` CPU lanes where it surely runs on the CPU."""
    from ssod_deploy.detector import Detector, lane_threads  # lazy: onnxruntime etc. load only when labeling

    det = Detector(model, backend=backend, iou=iou, threads=lane_threads(model, backend, lanes))
    if imgsz is not None and int(imgsz) != int(det.metadata.imgsz):
        raise ValueError(
            f"{model}: exported for imgsz {det.metadata.imgsz}, not {imgsz}; "
            f"export it again with that size (ssod export ... --imgsz {imgsz}) or drop --imgsz"
        )
    return det


def label_images(
    source: str | os.PathLike,
    model: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    detector: Any = None,
    formats: str | Sequence[str] = FORMATS,
    conf: str | float = "auto",
    iou: float | None = None,
    imgsz: int | None = None,
    batch: int = 8,
    workers: int | None = None,
    lanes: int = 0,
    backend: str = "auto",
    resume: bool = False,
    shard: str | tuple[int, int] | None = None,
    recursive: bool = True,
    save_vis: int = 0,
    save_conf: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    ls_url_prefix: str = LS_URL_PREFIX,
) -> dict[str, Any]:
    """Pseudo-label every image under ``source`` with an exported model; returns summary.json's dict.

    ``source``: a folder, one image, or a .txt list of paths. ``detector`` may be passed instead
    of ``model`` (anything with the ``ssod_deploy.detector.Detector`` interface; it runs as given).
    ``lanes``: CPU inference lanes (``Detector.cpu_lanes``); 0 = auto (2 on a multi-core CPU).
    """
    if detector is None and model is None:
        raise ValueError("give a model file (--model) or a detector")
    if int(batch) < 1:
        raise ValueError(f"--batch {batch}: must be >= 1")
    if int(lanes) < 0:
        raise ValueError(f"--lanes {lanes}: must be >= 0 (0 = auto)")
    batch = int(batch)
    fmts = parse_formats(formats)
    shard_i, shard_n = parse_shard(shard)
    workers = int(workers) if workers else max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    out = Path(out) if out is not None else default_out(source)
    if not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such file or folder")

    n_lanes = int(lanes) or 2
    det = detector if detector is not None else _load_detector(model, backend, iou, imgsz, n_lanes)
    meta = det.metadata
    names = [str(n) for n in meta.names]
    tau1, tau2, thr_source = resolve_thresholds(meta, conf)
    meta_dict = _metadata_dict(meta)
    fingerprint = hashlib.sha256(json.dumps(meta_dict, sort_keys=True, default=str).encode()).hexdigest()
    stem = Path(model).stem if model is not None else "model"
    iou_v = float(iou) if iou is not None else float(getattr(meta, "iou", 0.7))

    out.mkdir(parents=True, exist_ok=True)
    items = collect_images(source, out, recursive)
    if not items:
        raise ValueError(f"{source}: no images found (recursive={recursive})")
    n_total = len(items)
    settings = {
        "conf": "auto" if conf is None or str(conf).strip().lower() == "auto" else float(conf),
        "tau1": [float(v) for v in tau1], "tau2": [float(v) for v in tau2],
        "iou": iou_v, "imgsz": int(meta.imgsz), "max_pixels": int(max_pixels),
        "max_det": int(getattr(meta, "max_det", 300)),
    }
    header = jn.make_header(
        n_total=n_total, list_sha256=jn.list_fingerprint([it.name for it in items]), batch=batch,
        names=names, settings=settings, model_fingerprint=fingerprint, shard=[shard_i, shard_n],
        model_version=f"{stem}@{fingerprint[:8]}", source=str(source),
    )

    jpath = out / jn.JOURNAL_NAME
    resumed = False
    if jpath.exists():
        if not resume:
            raise ValueError(f"{out} already holds a labeling run ({jn.JOURNAL_NAME}): pass --resume to continue it, or choose another --out")
        index = jn.read_journal(jpath)
        diff = jn.header_mismatch(index.header, header, (*jn.RUN_KEYS, "shard"))
        if diff:
            raise jn.JournalError(
                f"{jpath}: cannot resume: {jn.describe_mismatch(index.header, header, diff)} changed since "
                "the run started; resume with the same source, model, --batch, --conf/--iou/--imgsz and "
                "--shard, or label into another --out"
            )
        done = index.done.copy()
        jwriter = jn.open_for_append(index)
        header = index.header
        resumed = True
    else:
        if resume:
            LOG.info("%s: no journal to resume, starting a fresh run", out)
        jwriter = jn.create_journal(jpath, header)
        done = np.zeros(n_total, bool)

    n_chunks = -(-n_total // batch)
    my_chunks = np.arange(shard_i, n_chunks, shard_n)
    mine = jn.shard_mask(n_total, batch, shard_i, shard_n)
    todo_mask = mine & ~done
    todo_chunks = [int(k) for k in my_chunks if todo_mask[k * batch : (k + 1) * batch].any()]
    n_todo = int(todo_mask.sum())
    done_before = int((mine & done).sum())
    if resumed:
        LOG.info("resuming %s: %d images done, %d to go", out, done_before, n_todo)

    vis_dir = out / VIS_DIR
    vis_have = sum(1 for _ in vis_dir.rglob("*.jpg")) if save_vis and vis_dir.is_dir() else 0
    t0 = time.perf_counter()
    bar = _Progress(n_todo, progress)
    # a caller's own detector runs as given; one we loaded may split the CPU into lanes
    split = detector is None and hasattr(det, "cpu_lane_makers") and n_lanes != 1
    makers = det.cpu_lane_makers(n_lanes) if split else [lambda: det]
    det = makers[0]()  # a full-core session (a GPU install that fell back to the CPU) is released
    if len(makers) > 1:
        LOG.info("%d CPU inference lanes, one session each (--lanes 1: one session on every core)", len(makers))
    output = _OutputThread(det, items, done, jwriter, tau1, tau2, vis_dir, names, bar)
    output.start()
    try:
        try:
            _run_chunks(det, makers[1:], items, todo_chunks, batch, done, output, workers, int(max_pixels),
                        max(0, int(save_vis) - vis_have))
        finally:
            try:
                output.close()  # finishes (and journals) every batch already inferred
            finally:
                bar.close()
    except KeyboardInterrupt:
        LOG.warning("interrupted: finished images are saved in %s; continue with --resume", jpath)
        raise
    finally:
        jwriter.close()
    elapsed = time.perf_counter() - t0

    index = jn.read_journal(jpath)
    missing = int((mine & ~index.done).sum())
    if missing:
        raise RuntimeError(f"{jpath}: {missing} images of this shard have no record after the run")
    stats = build_outputs(index, out, fmts, save_conf=save_conf, ls_url_prefix=ls_url_prefix)
    summary = make_summary(
        header=header, stats=stats, formats=fmts, source=str(source), out=str(out),
        model={
            "file": str(model) if model is not None else None, "sha256": _file_sha256(model),
            "backend": getattr(getattr(det, "backend", None), "name", type(det).__name__),
            "metadata": meta_dict, "metadata_fingerprint": fingerprint,
        },
        thresholds_source=thr_source,
        throughput={
            "images_this_run": n_todo, "seconds": round(elapsed, 3),
            "images_per_s": round(n_todo / elapsed, 2) if elapsed > 0 else None,
            "batch": batch, "workers": workers, "resumed": resumed, "done_before_this_run": done_before,
        },
        images_in_shard=int(mine.sum()),
    )
    write_json_atomic(out / SUMMARY_NAME, summary)
    return summary


def make_summary(*, header: dict, stats: Any, formats: Sequence[str], source: str, out: str, model: dict,
                 thresholds_source: str, throughput: dict, images_in_shard: int) -> dict[str, Any]:
    """summary.json: counts, skipped files with reasons, throughput, model and thresholds used."""
    names = list(header["names"])
    s = header["settings"]
    from ssod_deploy import __version__

    shard_i, shard_n = header.get("shard", [0, 1])
    return {
        "ssod_version": __version__,
        "source": source,
        "out": out,
        "shard": f"{shard_i}/{shard_n}",
        "formats": list(formats),
        "model": {**model, "model_version": header.get("model_version")},
        "thresholds": {
            "source": thresholds_source, "conf": s["conf"], "iou": s["iou"], "imgsz": s["imgsz"],
            "max_det": s.get("max_det"), "max_pixels": s.get("max_pixels"),
            "tau1": dict(zip(names, s["tau1"])), "tau2": dict(zip(names, s["tau2"])),
        },
        "images": {
            "in_list": header["n_total"], "in_shard": images_in_shard, "labeled": stats.images,
            "skipped": len(stats.skipped), "without_boxes": stats.empty_images,
            "with_uncertain_boxes": stats.uncertain_images,
        },
        "boxes": {
            "labels": class_counts(names, stats.label_counts),
            "uncertain": class_counts(names, stats.uncertain_counts),
            "labels_total": int(stats.label_counts.sum()), "uncertain_total": int(stats.uncertain_counts.sum()),
        },
        "skipped": [{"file": f, "reason": r} for f, r in stats.skipped],
        "yolo_name_collisions": [{"file": f, "reason": r} for f, r in stats.yolo_collisions],
        "throughput": throughput,
        "outputs": stats.outputs,
    }
