"""One detector interface over every backend: images in, boxes in original pixels out.

``Detector`` owns what all backends share — letterbox + normalisation before, and decoding,
NMS, un-letterboxing and clipping after — so an ONNX model, a TensorRT engine and the PyTorch
teacher give the same detections for the same raw outputs. A backend only runs the network
(``infer``: normalised (B, 3, H, W) float32 -> raw outputs) and says what it loaded
(``metadata``, and ``input_dtype`` where the model takes uint8 pixels instead: the ONNX
Runtime INT8 exports, whose input quantizer is the normalisation itself). Backends are imported
lazily: ``import ssod_deploy.detector`` never needs onnxruntime's GPU libraries, tensorrt or torch.

Post-processing is looked up by the model's ``output_format`` in ``POSTPROCESSORS``; a new
output format (e.g. a Faster R-CNN's boxes/scores/labels) registers a function, no branches.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from ssod_deploy.boxes import letterbox, postprocess_dense, unletterbox_boxes
from ssod_deploy.metadata import ModelMetadata

log = logging.getLogger("ssod")

LetterboxParams = tuple[float, float, float]  # (scale, pad_x, pad_y)
RawDetections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes xyxy input pixels, scores, labels


@dataclass
class Detections:
    """Detections of one image, in ORIGINAL image pixels."""

    boxes: np.ndarray  # (K, 4) float32 xyxy
    scores: np.ndarray  # (K,) float32
    labels: np.ndarray  # (K,) int64

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


class Backend(Protocol):
    name: str  # e.g. "onnxruntime[CPUExecutionProvider]"
    metadata: ModelMetadata
    max_batch: int | None  # None = any batch size
    # optional ``input_dtype``: np.uint8 for a model that takes raw RGB pixels (no normalisation)

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """(B, 3, H, W) float32 normalised (or uint8 pixels, see ``input_dtype``) -> raw outputs
        (batch first); H = W = imgsz unless ``rect``."""
        ...


def takes_pixels(backend: Backend) -> bool:
    """True when the model's input is uint8 RGB pixels, planar, which the model normalises itself."""
    return np.dtype(getattr(backend, "input_dtype", np.float32)) == np.uint8


# ------------------------------------------------------------------------------ pre-processing


def _norm_constants(meta: ModelMetadata) -> tuple[np.float32, np.ndarray, np.ndarray]:
    norm = getattr(meta, "normalize", None) or {}
    scale = np.float32(norm.get("scale", 1 / 255))
    mean = np.asarray(norm.get("mean", [0.0, 0.0, 0.0]), np.float32).reshape(3)
    std = np.asarray(norm.get("std", [1.0, 1.0, 1.0]), np.float32).reshape(3)
    return scale, mean, std


def plain_scale(meta: ModelMetadata) -> float | None:
    """The normalisation's scale when it is a plain multiply (mean 0, std 1; ultralytics' 1/255),
    else None: what decides whether an INT8 export can take the pixels themselves."""
    scale, mean, std = _norm_constants(meta)
    return float(scale) if not mean.any() and (std == 1).all() else None


_SCRATCH = threading.local()  # per-thread uint8 planes for the float path (decode pools, lanes)


def split_planes(canvas: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> ``out`` (3, H, W) uint8 planes, written in place by ``cv2.split``.

    In place matters: ``cv2.split`` without destinations allocates three fresh planes per image,
    which measured 1.0-1.5 ms per 640x480 image against 0.05 ms in place with two training
    processes on the machine (0.11 against 0.05 ms on an idle one)."""
    dst = list(out)
    got = cv2.split(canvas, dst)
    for g, d in zip(got, dst):
        if g.ctypes.data != d.ctypes.data:  # OpenCV allocated after all (never seen): copy
            d[...] = g
    return out


def _scratch_planes(h: int, w: int) -> np.ndarray:
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < 3 * h * w:
        buf = _SCRATCH.buf = np.empty(3 * h * w, np.uint8)
    return buf[: 3 * h * w].reshape(3, h, w)


def normalise_into(canvas: np.ndarray, out: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """(H, W, 3) uint8 RGB canvas -> ``out`` (3, H, W) float32, as the model expects; a uint8
    ``out`` (a model that ``takes_pixels``) gets the planes as they are.

    Contiguous planes first (``split_planes``, into ``out`` or a reused per-thread scratch),
    then one cast-and-scale pass over them: about half the time of a transposed copy followed
    by a cast and a scale, and no full-size temporaries."""
    if out.dtype == np.uint8:
        return split_planes(canvas, out)
    planes = split_planes(canvas, _scratch_planes(*canvas.shape[:2]))
    scale, mean, std = _norm_constants(meta)
    np.multiply(planes, scale, out=out, casting="unsafe")
    if mean.any() or (std != 1).any():
        out -= mean.reshape(3, 1, 1)
        out /= std.reshape(3, 1, 1)
    return out


def normalise(canvases: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB letterboxed canvases -> (B, 3, H, W) float32 as the model expects."""
    b, h, w = canvases.shape[:3]
    x = np.empty((b, 3, h, w), np.float32)
    for i in range(b):
        normalise_into(canvases[i], x[i], meta)
    return x


def pad_value(meta: ModelMetadata) -> int:
    """The letterbox border colour the model was trained with (ultralytics gray 114 by default)."""
    return int((meta.letterbox or {}).get("pad_value", 114))


def letterbox_stride(meta: ModelMetadata) -> int | None:
    """The stride rectangular letterboxing rounds to, or None for the square (``meta.rect``)."""
    return int(meta.stride) if meta.rect else None


def preprocess_images(
    images: Sequence[np.ndarray], meta: ModelMetadata, dtype: type = np.float32
) -> tuple[np.ndarray, list[LetterboxParams]]:
    """Letterbox each (H, W, 3) uint8 RGB image (square, or its own rectangle for ``rect``
    models) and normalise them into one batch (``dtype`` uint8: planar pixels, for a model that
    ``takes_pixels``); different rectangles are padded at the bottom/right to the batch's
    largest H and W with the pad colour, which keeps every image's letterbox parameters valid."""
    dtype = np.dtype(dtype)
    if not len(images):
        return np.zeros((0, 3, meta.imgsz, meta.imgsz), dtype), []
    pad = pad_value(meta)
    stride = letterbox_stride(meta)
    canvases, params = zip(*(letterbox(np.asarray(img), meta.imgsz, pad, stride) for img in images))
    h = max(c.shape[0] for c in canvases)
    w = max(c.shape[1] for c in canvases)
    x = np.empty((len(canvases), 3, h, w), dtype)
    scale, mean, std = _norm_constants(meta)
    fill = pad if dtype == np.uint8 else ((pad * scale - mean) / std).reshape(3, 1, 1)
    for i, c in enumerate(canvases):
        ch, cw = c.shape[:2]
        if (ch, cw) != (h, w):
            x[i] = fill
        normalise_into(c, x[i, :, :ch, :cw], meta)
    return x, list(params)


# ----------------------------------------------------------------------------- post-processing

Postprocess = Callable[[list[np.ndarray], float, float, int], list[RawDetections]]
POSTPROCESSORS: dict[str, Postprocess] = {}


def register_postprocess(output_format: str, fn: Postprocess) -> None:
    """Make ``Detector`` understand models whose metadata says ``output_format``."""
    POSTPROCESSORS[output_format] = fn


def _post_dense(raw: list[np.ndarray], conf: float, iou: float, max_det: int) -> list[RawDetections]:
    return postprocess_dense(raw[0], conf=conf, iou=iou, max_det=max_det)


def _post_nms(raw: list[np.ndarray], conf: float, iou: float, max_det: int) -> list[RawDetections]:
    """(B, K, 6) rows x1,y1,x2,y2,score,class from in-graph NMS; padding rows have class -1."""
    out = np.asarray(raw[0], dtype=np.float32)
    if out.ndim != 3 or out.shape[2] != 6:
        raise ValueError(f"'nms' output must be (B, max_det, 6), got {out.shape}")
    keep = (out[..., 4] > conf) & (out[..., 5] >= 0)
    res: list[RawDetections] = []
    for rows, k in zip(out, keep):
        r = rows[k][:max_det]  # already sorted by score in the graph
        res.append((r[:, :4].copy(), r[:, 4].copy(), r[:, 5].astype(np.int64)))
    return res


register_postprocess("dense", _post_dense)
register_postprocess("nms", _post_nms)


# ------------------------------------------------------------------------------------ backends

BACKENDS: dict[str, str] = {  # name -> "module:class"; imported only when used
    "onnxruntime": "ssod_deploy.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "ssod_deploy.backends.tensorrt:TensorRTBackend",
    "torch": "ssod_deploy.backends.torch_ckpt:TorchCheckpointBackend",
}
SUFFIX_BACKEND: dict[str, str] = {
    ".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".trt": "tensorrt",
    ".pt": "torch", ".pth": "torch",
}


def backend_for(model: str | Path, backend: str = "auto") -> str:
    """Which backend runs ``model``: by file suffix unless forced."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use auto, {', '.join(BACKENDS)}")
        return backend
    suffix = Path(model).suffix.lower()
    if suffix not in SUFFIX_BACKEND:
        raise ValueError(
            f"{model}: unknown model type '{suffix}' (expected {', '.join(sorted(SUFFIX_BACKEND))})"
        )
    return SUFFIX_BACKEND[suffix]


def load_backend(model: str | Path, backend: str = "auto", threads: int | None = None) -> Backend:
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    name = backend_for(path, backend)
    module_name, cls_name = BACKENDS[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)(path, threads=threads)


def lane_threads(model: str | Path, backend: str = "auto", lanes: int = 2) -> int | None:
    """Threads per session for ``lanes`` CPU lanes when ``model`` will surely run on ONNX Runtime's
    CPU provider (no GPU provider in this install); None otherwise (load on every core, and let
    ``Detector.cpu_lanes`` decide once the session shows where it runs)."""
    if lanes < 2 or backend_for(model, backend) != "onnxruntime":
        return None
    from ssod_deploy.backends.onnxruntime import available_cores, cpu_only_install

    cores = available_cores()
    return cores // min(lanes, cores) if cores >= 2 and cpu_only_install() else None


# ------------------------------------------------------------------------------------ Detector


class Detector:
    """Load a model file and detect objects in RGB uint8 images.

    ``conf``/``iou``/``max_det`` default to the values stored in the model. With NMS inside the
    graph the model's own conf/iou were applied already; ``conf`` can only raise the threshold.
    """

    def __init__(
        self,
        model: str | Path,
        backend: str = "auto",
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        threads: int | None = None,
    ):
        self.backend: Backend = load_backend(model, backend, threads)
        self.metadata: ModelMetadata = self.backend.metadata
        m = self.metadata
        if m.output_format not in POSTPROCESSORS:
            raise ValueError(
                f"{model}: output format '{m.output_format}' is unknown to this runtime "
                f"(known: {', '.join(POSTPROCESSORS)}); update ssod"
            )
        self.conf = float(m.conf if conf is None else conf)
        self.iou = float(m.iou if iou is None else iou)
        self.max_det = int(m.max_det if max_det is None else max_det)
        if m.output_format == "nms" and conf is not None and conf < m.conf:
            log.warning(f"{model}: NMS in the graph already dropped scores <= {m.conf}; conf={conf} cannot restore them")
        self.model_path = Path(model)
        # what preprocessing hands the backend: planar uint8 pixels or normalised float32
        self.input_dtype = np.dtype(np.uint8 if takes_pixels(self.backend) else np.float32)
        self.threads = threads
        self._init_args = {"backend": backend, "conf": conf, "iou": iou, "max_det": max_det}

    def cpu_lanes(self, lanes: int = 2) -> list["Detector"]:
        """``lanes`` detectors that split this machine's cores between them, for running batches
        concurrently on the CPU; ``[self]`` where that does not apply (GPU providers, torch).

        Why: one ONNX Runtime session on every core spins its threads at each operator's end
        and idles while its caller prepares the next batch; independent sessions with fewer
        threads each keep the cores on useful work (docs/benchmarks.md: on 2 cores 2 x 1-thread
        sessions run the model ~5% faster than 1 x 2 threads, and waste far less of the CPU
        when image decoding shares the cores). A detector loaded with ``lane_threads(...)``
        threads is itself the first lane, so no session is loaded only to be thrown away."""
        return [make() for make in self.cpu_lane_makers(lanes)]

    def cpu_lane_makers(self, lanes: int = 2) -> list[Callable[[], "Detector"]]:
        """``cpu_lanes`` as zero-argument builders, so each lane's session can load in the thread
        that will run it: ``ssod label`` starts its first lane while the others load."""
        from ssod_deploy.backends.onnxruntime import available_cores

        cores = available_cores()
        if lanes < 2 or cores < 2 or not getattr(self.backend, "cpu_only", False):
            return [lambda: self]
        lanes = min(lanes, cores)
        first = [lambda: self] if self.threads == cores // lanes else []
        make = functools.partial(Detector, self.model_path, threads=cores // lanes, **self._init_args)
        return first + [make] * (lanes - len(first))

    def __repr__(self) -> str:
        m = self.metadata
        return f"Detector({self.model_path.name}, {self.backend.name}, {m.imgsz}px, {m.precision}, {m.num_classes} classes)"

    @property
    def names(self) -> list[str]:
        return self.metadata.names

    # ----------------------------------------------------------------------------- stages
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxParams]]:
        """Letterbox + normalise: (B, 3, H, W) ``input_dtype`` and each image's letterbox parameters."""
        return preprocess_images(images, self.metadata, self.input_dtype)

    def preprocess_one(self, image: np.ndarray) -> tuple[np.ndarray, LetterboxParams]:
        """One image -> (3, H, W) ``input_dtype`` and its letterbox parameters."""
        batch, params = preprocess_images([image], self.metadata, self.input_dtype)
        return batch[0], params[0]

    def letterbox_one(self, image: np.ndarray) -> tuple[np.ndarray, LetterboxParams]:
        """One image -> its (H, W, 3) uint8 letterboxed canvas (the image itself when it already
        fits) for ``infer_each``: what decode pools hand over, a quarter of the float's bytes."""
        m = self.metadata
        return letterbox(np.asarray(image), m.imgsz, pad_value(m), letterbox_stride(m))

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the network on any number of images (``preprocess`` output): split by the backend's
        max batch, pad a fixed batch."""
        batch = np.asarray(batch)
        if (batch.dtype == np.uint8) != (self.input_dtype == np.uint8):
            raise ValueError(f"infer: {self.model_path.name} takes {self.input_dtype} input, got {batch.dtype} "
                             "(use Detector.preprocess)")
        batch = batch.astype(self.input_dtype, copy=False)
        n = batch.shape[0]
        if n == 0:
            raise ValueError("infer: empty batch")
        fixed = None if self.metadata.dynamic_batch else self.metadata.batch
        step = fixed or self.backend.max_batch or n
        outs: list[list[np.ndarray]] = []
        for start in range(0, n, step):
            chunk = batch[start : start + step]
            real = chunk.shape[0]
            if fixed and real < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - real, *chunk.shape[1:]), chunk.dtype)])
            outs.append([o[:real] for o in self.backend.infer(np.ascontiguousarray(chunk))])
        if len(outs) == 1:
            return outs[0]
        return [np.concatenate(parts) for parts in zip(*outs)]

    def postprocess(
        self,
        raw: list[np.ndarray],
        params: Sequence[LetterboxParams],
        orig_hws: Sequence[tuple[int, int]],
        conf: float | None = None,
    ) -> list[Detections]:
        """Raw outputs -> per-image detections in original pixels (NMS in numpy for dense outputs)."""
        fn = POSTPROCESSORS[self.metadata.output_format]
        per_image = fn(raw, self.conf if conf is None else float(conf), self.iou, self.max_det)
        if not len(per_image) == len(params) == len(orig_hws):
            raise ValueError(f"postprocess: {len(per_image)} outputs, {len(params)} params, {len(orig_hws)} sizes")
        return [
            Detections(unletterbox_boxes(b, p, hw).astype(np.float32), s.astype(np.float32), lab.astype(np.int64))
            for (b, s, lab), p, hw in zip(per_image, params, orig_hws)
        ]

    def infer_each(self, canvases: Sequence[np.ndarray]) -> list[tuple[list[int], list[np.ndarray]]]:
        """Run ``letterbox_one`` canvases, batching the same-shaped ones: (indices, raw outputs)
        per shape. A rect model sees several shapes; grouping them instead of padding to the
        largest keeps every image's result independent of its batch-mates (so shards, resumed
        runs and single calls agree), as ultralytics does by using rect only for same-shape batches.
        Each canvas is normalised straight into a reused batch buffer (no per-image float copy)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(canvases):
            groups.setdefault(tuple(c.shape[:2]), []).append(i)
        out = []
        for (h, w), idx in groups.items():
            buf = self._batch_buffer(len(idx), (3, h, w))
            for j, i in enumerate(idx):
                normalise_into(canvases[i], buf[j], self.metadata)
            out.append((idx, self.infer(buf)))
        return out

    def _batch_buffer(self, n: int, shape: tuple[int, ...]) -> np.ndarray:
        """An ``input_dtype`` (n, *shape) array reused from call to call (the backend has finished with it
        when ``infer`` returns): a fresh multi-MB array per batch costs page faults every time."""
        key = (n, *shape)
        buffers = self.__dict__.setdefault("_buffers", {})
        if key not in buffers:
            if len(buffers) >= 8:  # a rect model on mixed aspect ratios: keep the recent shapes only
                buffers.pop(next(iter(buffers)))
            buffers[key] = np.empty(key, self.input_dtype)
        return buffers[key]

    def postprocess_each(
        self,
        groups: list[tuple[list[int], list[np.ndarray]]],
        params: Sequence[LetterboxParams],
        orig_hws: Sequence[tuple[int, int]],
        conf: float | None = None,
    ) -> list[Detections]:
        """``postprocess`` for ``infer_each``'s groups, back in input order."""
        out: list[Detections | None] = [None] * len(params)
        for idx, raw in groups:
            dets = self.postprocess(raw, [params[i] for i in idx], [orig_hws[i] for i in idx], conf)
            for i, d in zip(idx, dets):
                out[i] = d
        if any(d is None for d in out):
            raise ValueError(f"postprocess_each: groups cover {sum(len(i) for i, _ in groups)} of {len(out)} images")
        return out  # type: ignore[return-value]

    def __call__(self, images: Sequence[np.ndarray], conf: float | None = None) -> list[Detections]:
        if not len(images):
            return []
        canvases, params = zip(*(self.letterbox_one(im) for im in images))
        groups = self.infer_each(canvases)
        return self.postprocess_each(groups, params, [tuple(np.asarray(i).shape[:2]) for i in images], conf)
