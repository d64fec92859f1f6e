"""What an exported model says about itself, so the runtime needs nothing but the model file.

The exporter stores one JSON document (``ModelMetadata.to_json``) in the ONNX ``metadata_props``
under the key ``ssod`` and next to a TensorRT engine as a ``.json`` sidecar. A few keys are also
stored in ultralytics' style (``names``, ``imgsz``, ``stride``, ``task``, ``batch``) so that other
tools that read those keys see sensible values.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ONNX_KEY = "ssod"
OUTPUT_FORMATS = ("dense", "nms")  # known to the runtime's post-processing registry (more can register)
PRECISIONS = ("fp32", "fp16", "int8")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ssod")
    except Exception:  # noqa: BLE001 -- not installed as a distribution (source checkout, edge copy)
        from ssod_deploy import __version__

        return __version__


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class ModelMetadata:
    """Everything pre/post-processing needs to use a model exactly as it was trained."""

    names: list[str]
    imgsz: int  # longest input side the model was exported for (the square side unless ``rect``)
    stride: int = 32
    # True: the network takes any H, W that are multiples of ``stride`` (up to imgsz), so each
    # image is letterboxed to its smallest stride-multiple rectangle; False: the imgsz square.
    rect: bool = False
    family: str = "yolo"
    # "dense": (B, 4+nc, A) xywh + class scores; "nms": (B, max_det, 6) x1,y1,x2,y2,score,class,
    # padding rows have score 0 and class -1.
    output_format: str = "dense"
    letterbox: dict[str, Any] = field(default_factory=lambda: {"pad_value": 114, "center": True})
    normalize: dict[str, Any] = field(
        default_factory=lambda: {"scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    )  # applied to RGB pixels, then HWC -> CHW
    dynamic_batch: bool = True
    batch: int = 1  # the fixed batch when not dynamic (the preferred one when dynamic)
    precision: str = "fp32"
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    tau1: list[float] | None = None  # per-class thresholds learned in training (Efficient Teacher)
    tau2: list[float] | None = None
    method: str = "supervised"
    ssod_version: str = field(default_factory=_version)
    date: str = field(default_factory=_now)
    extra: dict[str, Any] = field(default_factory=dict)  # other method/exporter facts (e.g. a fixed threshold)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        if not self.names:
            raise ValueError("model metadata: 'names' is empty")
        self.imgsz = int(self.imgsz)
        if self.imgsz <= 0:
            raise ValueError(f"model metadata: imgsz must be positive, got {self.imgsz}")
        self.stride, self.batch, self.max_det = int(self.stride), int(self.batch), int(self.max_det)
        self.conf, self.iou = float(self.conf), float(self.iou)
        self.rect = bool(self.rect)
        for key in ("tau1", "tau2"):
            v = getattr(self, key)
            if v is not None:
                v = [float(x) for x in v]
                if len(v) != len(self.names):
                    raise ValueError(f"model metadata: {key} has {len(v)} values for {len(self.names)} classes")
                setattr(self, key, v)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    # ------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMetadata":
        """Known keys only: a model written by a newer ssod still loads (unknown keys go to ``extra``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        unknown = {k: v for k, v in d.items() if k not in known}
        if unknown:
            kw["extra"] = {**unknown, **(kw.get("extra") or {})}
        missing = {"names", "imgsz"} - set(kw)
        if missing:
            raise ValueError(f"model metadata lacks {sorted(missing)}")
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str) -> "ModelMetadata":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"model metadata is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError("model metadata JSON is not an object")
        return cls.from_dict(d)

    # ------------------------------------------------------------------------------ ONNX
    def to_onnx_props(self) -> dict[str, str]:
        """``metadata_props`` entries: the full JSON plus ultralytics-style keys for other tools."""
        return {
            ONNX_KEY: self.to_json(),
            "names": repr(dict(enumerate(self.names))),
            "imgsz": repr([self.imgsz, self.imgsz]),
            "stride": str(self.stride),
            "task": "detect",
            "batch": str(self.batch),
            "description": f"ssod {self.method} teacher ({self.family}, {self.precision}, output {self.output_format})",
        }

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelMetadata":
        """From ``metadata_props``; falls back to ultralytics-style keys for models ssod did not write."""
        if ONNX_KEY in props:
            return cls.from_json(props[ONNX_KEY])
        if "names" in props and "imgsz" in props:
            try:
                names = ast.literal_eval(props["names"])
                imgsz = ast.literal_eval(props["imgsz"])
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"{source}: unreadable 'names'/'imgsz' metadata ({e})") from None
            names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
            size = imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz
            return cls(names=names, imgsz=int(size), stride=int(props.get("stride", 32)), method="unknown")
        raise ValueError(f"{source}: no ssod metadata (export the model with `ssod export`)")

    @classmethod
    def from_onnx(cls, model: Any) -> "ModelMetadata":
        """From an ONNX path, an ``onnx.ModelProto`` or an ``onnxruntime.InferenceSession``."""
        if hasattr(model, "get_modelmeta"):  # InferenceSession: no second parse of the file
            return cls.from_props(dict(model.get_modelmeta().custom_metadata_map), "onnx session")
        if hasattr(model, "metadata_props"):
            return cls.from_props({p.key: p.value for p in model.metadata_props}, "onnx model")
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 -- protobuf raises assorted errors on junk
            raise ValueError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None
        return cls.from_props({p.key: p.value for p in proto.metadata_props}, str(path))

    # -------------------------------------------------------------------------- sidecar
    @staticmethod
    def sidecar_path(engine_path: str | os.PathLike) -> Path:
        """``model.engine`` -> ``model.engine.json`` (where the exporter writes it)."""
        p = Path(engine_path)
        return p.with_name(p.name + ".json")

    def save_sidecar(self, engine_path: str | os.PathLike, **engine_info: Any) -> Path:
        """Write the sidecar; ``engine_info`` (TensorRT version, profile) goes under ``extra.engine``."""
        path = self.sidecar_path(engine_path)
        d = self.to_dict()
        if engine_info:
            d["extra"] = {**d.get("extra", {}), "engine": engine_info}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_sidecar(cls, engine_path: str | os.PathLike) -> "ModelMetadata":
        """From ``<engine>.json`` (or ``<engine stem>.json``) next to a TensorRT engine."""
        p = Path(engine_path)
        for cand in (cls.sidecar_path(p), p.with_suffix(".json")):
            if cand.is_file():
                try:
                    return cls.from_json(cand.read_text())
                except ValueError as e:
                    raise ValueError(f"{cand}: {e}") from None
        raise FileNotFoundError(
            f"{p}: metadata sidecar {cls.sidecar_path(p).name} not found (it is written by `ssod export --format trt`)"
        )
