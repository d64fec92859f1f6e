"""YOLO dense detectors (ultralytics YAMLs: v3/v5u/v8/v9/v10/11/12/26) behind ``Detector``.

The network, its task-aligned loss and its box decoding are ultralytics' own; this module only
translates between ssod's batch contract and ultralytics' conventions, so ssod stays correct when
ultralytics improves its models. Architectures are built from the YAMLs shipped inside the
ultralytics package: nothing is ever downloaded, and weights only come from a local file the user
names (``load_weights``).

Raw outputs (what SSOD methods consume) are a list of per-level maps ``(B, 4*reg_max + nc, H, W)``:
the first ``4*reg_max`` channels are DFL logits of the left/top/right/bottom distances, the rest
are class logits. ``decode`` turns them into ``(B, 4 + nc, A)`` (xywh input pixels + class
probabilities), the same tensor the Detect head produces at inference and the exported model
outputs. End-to-end YAMLs (yolov10, yolo26) train both their heads with ultralytics' E2E loss but
are predicted and exported through the one-to-many head plus NMS, so every YOLO behaves alike.
"""

from __future__ import annotations

import copy
import logging
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ssod.training.data.batch import Batch
from ssod.training.models.base import Detections, Detector, register_family
from ssod.training.models.folded import FoldedCopy
from ssod.training.ultralytics_env import import_ultralytics

log = logging.getLogger("ssod")

_HEADS = ("Detect", "v10Detect")  # plain box heads; Segment/Pose/OBB/YOLOE heads are other tasks
_PARTS = ("box", "cls", "dfl")  # ultralytics loss order; "dfl" is the L1 distance loss when reg_max == 1


def model_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The ultralytics model dict for ``spec``: YAML found by name or path, scale overridden if asked."""
    import_ultralytics()
    from ultralytics.nn.tasks import yaml_model_load

    name = str(spec["model"])
    path = Path(name).expanduser()
    if path.suffix in (".pt", ".pth", ".onnx", ".engine"):
        raise ValueError(
            f"model '{name}': give an architecture (e.g. 'yolov8n' or a .yaml path); "
            "initialise from a weights file with load_weights()"
        )
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")  # "yolov8n" -> ultralytics' yolov8.yaml at scale n
    elif len(path.parts) > 1 and not path.is_file():
        raise ValueError(f"model '{name}': YAML file not found")
    try:
        cfg = yaml_model_load(path)
    except (FileNotFoundError, OSError) as e:
        raise ValueError(
            f"model '{name}': no such ultralytics model YAML ({e}); use e.g. yolov8n, yolo11s, yolov5nu or a .yaml path"
        ) from None
    if "backbone" not in cfg or "head" not in cfg:
        raise ValueError(f"model '{name}': {cfg.get('yaml_file', path)} is not a model YAML (needs backbone and head)")

    scales = cfg.get("scales") or {}
    scale = cfg.get("scale") or next(iter(scales), "")
    depth, width, max_channels = scales.get(scale) or (
        cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), float("inf"),
    )
    depth = float(spec.get("depth") or depth)
    width = float(spec.get("width") or width)
    max_channels = spec.get("max_channels") or max_channels
    # parse_model reads [depth, width, max_channels] from scales[scale]; one entry pins all three.
    cfg["scales"], cfg["scale"] = {scale or "custom": [depth, width, max_channels]}, scale or "custom"
    return cfg


def hyperparameters(overrides: dict[str, Any] | None = None) -> Any:
    """ultralytics' default hyperparameter namespace (loss gains box/cls/dfl, ...) with ``overrides``."""
    import_ultralytics()
    from ultralytics.cfg import DEFAULT_CFG, get_cfg

    try:
        return get_cfg(DEFAULT_CFG, overrides=dict(overrides or {}))
    except (SyntaxError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model spec 'hyp' {dict(overrides or {})}: {first}") from None


def to_ultralytics_batch(batch: Batch) -> dict[str, torch.Tensor]:
    """ssod labeled batch (xyxy pixels) -> ultralytics loss batch (normalised xywh, float ids)."""
    img = batch["img"]
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"batch 'img' must be (B, 3, H, W), got {tuple(img.shape)}")
    boxes = torch.as_tensor(batch["boxes"], dtype=torch.float32, device=img.device).reshape(-1, 4)
    cls = torch.as_tensor(batch["cls"], device=img.device).reshape(-1)
    bidx = torch.as_tensor(batch["batch_idx"], device=img.device).reshape(-1)
    if not len(boxes) == len(cls) == len(bidx):
        raise ValueError(f"batch has {len(boxes)} boxes, {len(cls)} cls, {len(bidx)} batch_idx: lengths must match")
    h, w = img.shape[-2:]
    wh = boxes.new_tensor([w, h, w, h])
    boxes = torch.minimum(boxes.clamp(min=0), wh)
    xywh = torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]), 1) / wh
    return {"img": img, "bboxes": xywh, "cls": cls.float().view(-1, 1), "batch_idx": bidx.float()}


def nms_per_image(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, batch_idx: torch.Tensor,
    iou: float, max_det: int, batch_size: int, nc: int, agnostic: bool = False,
) -> torch.Tensor:
    """Indices kept by class-aware NMS (class-agnostic with ``agnostic``; one ``batched_nms`` for the
    batch), grouped by image in score order, at most ``max_det`` per image."""
    groups = batch_idx if agnostic else batch_idx * nc + labels
    keep = torchvision.ops.batched_nms(boxes, scores, groups, iou)  # score-descending
    keep = keep[torch.sort(batch_idx[keep], stable=True).indices]  # group by image, score order kept inside
    img_of = batch_idx[keep]
    counts = torch.bincount(img_of, minlength=batch_size)
    rank = torch.arange(len(keep), device=keep.device) - (torch.cumsum(counts, 0) - counts)[img_of]
    return keep[rank < max_det]


def clipped_xyxy(xywh: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Centre-size boxes (..., 4) -> corner boxes clipped to an ``hw`` image (decoded head outputs)."""
    xy, wh = xywh[..., :2], xywh[..., 2:4]
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), -1)
    h, w = hw
    return torch.minimum(boxes.clamp(min=0), boxes.new_tensor([w, h, w, h]))


def dense_nms(
    pred: torch.Tensor, conf: float, iou: float, max_det: int, hw: tuple[int, int], max_nms: int = 30000
) -> list[Detections]:
    """Class-aware NMS over decoded ``(B, 4 + nc, A)`` outputs, one label (the best class) per anchor.

    The whole batch goes through one ``batched_nms`` call (groups = image x class).
    """
    b, _, a = pred.shape
    p = pred.transpose(1, 2).float()  # (B, A, 4 + nc)
    scores, labels = p[..., 4:].max(-1)  # (B, A)
    k = min(max_nms, a)
    top, idx = scores.topk(k, dim=1)  # bound NMS cost per image like ultralytics' max_nms
    bi, ki = (top > conf).nonzero(as_tuple=True)
    ai = idx[bi, ki]
    boxes = clipped_xyxy(p[bi, ai, :4], hw)
    s, lab = scores[bi, ai], labels[bi, ai]
    keep = nms_per_image(boxes, s, lab, bi, iou, max_det, b, pred.shape[1] - 4)
    sizes = torch.bincount(bi[keep], minlength=b).tolist()
    return [
        {"boxes": bx, "scores": sc, "labels": lb}
        for bx, sc, lb in zip(boxes[keep].split(sizes), s[keep].split(sizes), lab[keep].long().split(sizes))
    ]


def _as_float(x: Any) -> Any:
    """Floating tensors (alone or in a list/tuple) as float32; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_as_float(t) for t in x)
    return x


class _DecodedOutput(nn.Module):
    """Export wrapper: image (B, 3, S, S) in [0, 1] -> decoded (B, 4 + nc, A)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.model(img)


class YoloDetector(Detector):
    """An ultralytics ``DetectionModel`` (``self.model``) speaking ssod's batch and detection contracts.

    Spec keys: ``model`` (name like ``yolov8n``/``yolo11s``/``yolov5nu`` or a YAML path), ``names``,
    optional ``width``/``depth``/``max_channels`` (override the YAML scale, e.g. tiny test models)
    and ``hyp`` (ultralytics hyperparameter overrides, e.g. loss gains ``{"box": 7.5}``).
    """

    family = "yolo"
    reduced_precision_inference = True
    loss_sums_over_images = True

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        import_ultralytics()
        from ultralytics.nn.tasks import DetectionModel

        if not self.names:
            raise ValueError(f"model '{spec['model']}': spec 'names' is empty")
        cfg = model_config(spec)
        try:
            self.model = DetectionModel(cfg, ch=3, nc=self.num_classes, verbose=False)
        except (AssertionError, RuntimeError, KeyError, IndexError, TypeError, ValueError) as e:
            scale = cfg["scales"][cfg["scale"]]
            raise ValueError(
                f"model '{spec['model']}' (depth, width, max_channels = {scale}): cannot build: {type(e).__name__}: {e}"
            ) from e
        head = self.model.model[-1]
        if type(head).__name__ not in _HEADS:
            raise ValueError(f"model '{spec['model']}': head {type(head).__name__} is not a box detector head")
        if not hasattr(head, "forward_head"):
            raise RuntimeError("ssod needs ultralytics>=8.4 (dict-valued Detect head outputs)")
        if getattr(head, "one2one_cv2", None) is not None:
            self.model.end2end = False  # predict through the one-to-many head + NMS (see module doc)
        self.model.names = dict(enumerate(self.names))
        self.model.args = hyperparameters(spec.get("hyp"))  # the loss reads gains from model.args
        self.model.criterion = None
        # Channels-last weights and inputs: oneDNN's convolutions on the CPU (and cuDNN's with AMP)
        # run faster in NHWC; measured here, a yolov8n train step at 32 x 160 px, one thread: -15%.
        # Outputs equal the NCHW ones to float rounding; state_dict and export are unaffected.
        self.model.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------------------- structure
    @property
    def head(self) -> nn.Module:
        """The ultralytics Detect module (last layer)."""
        return self.model.model[-1]

    @property
    def stride(self) -> torch.Tensor:
        """Per-level strides, e.g. tensor([8., 16., 32.])."""
        return self.head.stride

    @property
    def reg_max(self) -> int:
        return int(self.head.reg_max)

    # ----------------------------------------------------------------------------- forward
    def _forward(self, img: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
        """One pass: (one-to-many raw dict with boxes/scores/feats, decoded output when in eval mode).

        Eval mode without grad (the teacher, validation) runs a BatchNorm-folded channels-last copy
        (``folded.FoldedCopy``: same outputs to float rounding, about a third faster on CPU).
        """
        if not self.training and not torch.is_grad_enabled():
            folded = self._folded_copy()
            out = folded(self.model, img) if folded is not None else self.model(img)
        else:
            out = self.model(img.contiguous(memory_format=torch.channels_last))
        decoded, preds = out if isinstance(out, tuple) else (None, out)
        preds = preds.get("one2many", preds)
        if not torch.is_grad_enabled() and torch.is_autocast_enabled(img.device.type):
            # a reduced-precision teacher (pseudo.eval_mode): its callers get float32
            preds = {k: _as_float(v) for k, v in preds.items()}
            decoded = _as_float(decoded)
        return preds, decoded

    def _folded_copy(self) -> FoldedCopy | None:
        """Built on first use, outside the module tree (never in state_dict, dropped by deepcopy)."""
        folded = self.__dict__.get("_folded")
        if folded is None:
            folded = FoldedCopy(self.model, lambda m: m.fuse(verbose=False))
            self.__dict__["_folded"] = folded
        return folded if folded.ok else None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "YoloDetector":
        self.__dict__.pop("_folded", None)  # .to / .half / .cuda: rebuild the folded copy on the new tensors
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and deepcopy (the EMA teacher is one) leave the folded copy behind."""
        return {k: v for k, v in self.__dict__.items() if k != "_folded"}

    def _levels(self, preds: dict[str, Any]) -> list[torch.Tensor]:
        flat = torch.cat((preds["boxes"], preds["scores"]), 1)  # (B, no, A)
        feats = preds["feats"]
        sizes = [f.shape[2] * f.shape[3] for f in feats]
        return [
            t.reshape(t.shape[0], t.shape[1], f.shape[2], f.shape[3]) for t, f in zip(flat.split(sizes, 2), feats)
        ]

    def forward_features(self, img: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(neck feature maps feeding the Detect head, raw per-level outputs) from one forward pass.

        The features keep their graph, so a domain discriminator can backpropagate into the backbone.
        """
        preds, _ = self._forward(img)
        return list(preds["feats"]), self._levels(preds)

    def forward_raw(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Per-level raw maps (B, 4*reg_max + nc, H, W), in train or eval mode alike."""
        return self._levels(self._forward(img)[0])

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_raw(img)

    def raw_to_preds(self, raw: list[torch.Tensor]) -> dict[str, Any]:
        """Per-level raw maps -> the dict ultralytics' ``v8DetectionLoss.loss`` takes.

        ``feats`` holds the raw maps themselves: the loss only reads their shapes to lay out anchors.
        """
        flat = torch.cat([r.flatten(2) for r in raw], 2)
        n = 4 * self.reg_max
        return {"boxes": flat[:, :n], "scores": flat[:, n:], "feats": list(raw)}

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> (B, 4 + nc, A): xywh input pixels + class probabilities (Detect's inference form)."""
        from ultralytics.utils.tal import dist2bbox, make_anchors

        p = self.raw_to_preds(raw)
        anchors, strides = make_anchors(raw, self.stride, 0.5)  # (A, 2) grid units, (A, 1)
        dist = self.head.dfl(p["boxes"])  # (B, 4, A) expected ltrb distance in grid units
        xywh = dist2bbox(dist, anchors.T.unsqueeze(0), xywh=True, dim=1) * strides.T
        return torch.cat((xywh, p["scores"].sigmoid()), 1)

    # ----------------------------------------------------------------------------- loss
    def _model_criterion(self) -> Any:
        """ultralytics' own criterion for this model (E2E for end-to-end heads), rebuilt after a device move."""
        crit = self.model.criterion
        dev = next(self.model.parameters()).device
        dense = getattr(crit, "one2many", crit)
        if crit is None or dense.device != dev:
            crit = self.model.criterion = self.model.init_criterion()
        return crit

    def criterion(self) -> Any:
        """The (cached) one-to-many ``v8DetectionLoss``: works on ``raw_to_preds(forward_raw(img))``.

        Methods reuse its ``assigner`` (task-aligned) and ``bbox_loss`` (CIoU + DFL).
        """
        crit = self._model_criterion()
        return getattr(crit, "one2many", crit)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ultralytics' detection loss on a labeled batch.

        Scaling follows ultralytics: ``total = (box*gain_box + cls*gain_cls + dfl*gain_dfl) * B`` where
        each part is normalised by the summed target scores, so ultralytics' learning rates and
        weight decay transfer unchanged. The returned parts are the gain-weighted per-image values
        (not multiplied by B), detached.
        """
        ul_batch = to_ultralytics_batch(batch)
        preds = self.model(ul_batch["img"])
        vec, items = self._model_criterion()(preds, ul_batch)
        return vec.sum(), {k: v.detach() for k, v in zip(_PARTS, items.values())}

    # ----------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(
        self, img: torch.Tensor, conf: float = 0.001, iou: float = 0.7, max_det: int = 300
    ) -> list[Detections]:
        """Boxes (xyxy input pixels), scores and labels per image after class-aware NMS."""
        preds, decoded = self._forward(img)
        if decoded is None:  # called in train mode: decode the raw maps ourselves
            decoded = self.decode(self._levels(preds))
        return dense_nms(decoded, conf, iou, max_det, tuple(img.shape[-2:]))

    def export_module(self, nms: bool = False) -> nn.Module:
        """A fused eval copy whose forward(img (B,3,S,S) in [0,1]) returns decoded (B, 4 + nc, A).

        NMS stays outside the graph: ssod_deploy runs it on the decoded output.
        """
        if nms:
            raise NotImplementedError("in-graph NMS is not supported: export with nms=False, the runtime runs NMS")
        model = copy.deepcopy(self.model).float().eval()
        model.criterion = None
        model.fuse(verbose=False)
        head = model.model[-1]
        head.export, head.format, head.dynamic = True, "onnx", True
        module = _DecodedOutput(model).eval()
        module.requires_grad_(False)
        return module

    # ----------------------------------------------------------------------------- weights
    def load_weights(self, path: str | Path, allow_pickle: bool = True) -> dict[str, int]:
        """Initialise from a local checkpoint, copying every tensor whose name and shape match.

        Accepts an ssod checkpoint (dict with a ``model`` state_dict, loaded with
        ``weights_only=True``), a bare state_dict, or an ultralytics ``.pt``. The latter is a pickle
        that can run code when loaded: it is only read when ``allow_pickle`` (default, because the
        user named the file) and with a warning; code that finds files on its own must pass False.
        Returns ``{"matched", "total", "source"}`` tensor counts.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found")
        if not zipfile.is_zipfile(path):  # torch.save and ultralytics both write zip archives
            raise ValueError(f"{path}: not a torch checkpoint (not a torch.save zip archive)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if not allow_pickle:
                raise ValueError(f"{path}: pickled checkpoint (code, not only tensors); refusing to load it") from None
            warnings.warn(
                f"{path}: loading a pickled (ultralytics) checkpoint with weights_only=False; "
                "this can run code stored in the file, only use files you trust",
                UserWarning,
                stacklevel=2,
            )
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:  # a pickle can fail in arbitrary ways
                raise ValueError(f"{path}: cannot load checkpoint: {type(e).__name__}: {e}") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"{path}: not a torch checkpoint ({type(e).__name__}: {e})") from None
        source = _state_dict_of(ckpt, path)
        own = self.state_dict()
        match = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if not match:
            raise ValueError(f"{path}: no tensor matches model '{self.spec['model']}' (different architecture?)")
        self.load_state_dict(match, strict=False)
        log.info(f"{path}: loaded {len(match)}/{len(own)} tensors ({len(source)} in file)")
        return {"matched": len(match), "total": len(own), "source": len(source)}


def _state_dict_of(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, named like ``YoloDetector.state_dict()`` keys."""

    def of_module(m: nn.Module) -> dict[str, torch.Tensor]:
        sd = m.state_dict()
        return sd if isinstance(m, Detector) else {f"model.{k}": v for k, v in sd.items()}  # bare DetectionModel

    if isinstance(ckpt, nn.Module):
        return of_module(ckpt)
    if isinstance(ckpt, Mapping):
        ema, model = ckpt.get("ema"), ckpt.get("model")
        if isinstance(ema, nn.Module) or isinstance(model, nn.Module):  # ultralytics: ema if kept, else model
            return of_module(ema if isinstance(ema, nn.Module) else model)
        teacher = ckpt.get("teacher")
        if isinstance(teacher, Mapping) and teacher and all(isinstance(v, torch.Tensor) for v in teacher.values()):
            return dict(teacher)  # ssod checkpoint: initialise from the EMA teacher
        if isinstance(model, Mapping) and model and all(isinstance(v, torch.Tensor) for v in model.values()):
            return dict(model)
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return dict(ckpt)  # bare state_dict
    raise ValueError(f"{path}: no model weights found (expected an ssod checkpoint with 'teacher' or an ultralytics .pt)")


register_family("yolo", YoloDetector, prefixes=("yolo",))
