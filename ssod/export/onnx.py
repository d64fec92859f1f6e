"""Torch detector -> ONNX: legacy tracer, dynamic batch, onnxslim, optional in-graph NMS, metadata.

The family is a parameter: any ``Detector`` with ``export_module()`` exports; the module's
``output_format`` attribute (default ``"dense"``) says what its output means, and in-graph NMS is
looked up per output format in ``NMS_BUILDERS``, so a new family adds an entry, not a branch.

Why the legacy exporter: torch 2.14's default (dynamo) exporter needs onnxscript, ignores opset 17
and writes external data; the TorchScript tracer (``dynamo=False``) with ``dynamic_axes`` gives a
true dynamic batch and matches torch to ~4e-5.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ssod_deploy.metadata import ModelMetadata

log = logging.getLogger("ssod")

INPUT_NAME = "images"
OUTPUT_NAME = "output0"
NMS_OUTPUT_NAME = "detections"
MIN_OPSET = 13  # ScatterND/GatherND/Squeeze-with-axes-input as used below


# What a family's graph allows, for families that do not say (``Detector.export_info()`` overrides):
# output layout, whether the batch axis (and height/width: ``rect``) can be dynamic, whether NMS is part of the network itself,
# which precisions the exporter may produce, and whether a TensorRT build was ever verified.
DEFAULT_EXPORT_INFO: dict[str, Any] = {
    "output_format": "dense", "dynamic_batch": True, "rect": True, "nms_in_graph": False,
    "precisions": ("fp32", "fp16", "int8"), "tensorrt_verified": True,
}


def export_info(model: Any) -> dict[str, Any]:
    """``DEFAULT_EXPORT_INFO`` updated with the model's own ``export_info()`` (a capability, not a name check)."""
    own = model.export_info() if hasattr(model, "export_info") else {}
    return {**DEFAULT_EXPORT_INFO, **dict(own)}


def torch_to_onnx(
    model: Any, imgsz: int, batch: int = 1, dynamic: bool = True, opset: int = 17, module: Any = None,
    rect: bool = False,
) -> tuple[onnx.ModelProto, str, tuple[int, ...]]:
    """Trace ``module`` (default ``model.export_module()``) -> (ONNX model, output format, first
    output's shape at ``batch`` and the imgsz square).

    The module may declare ``output_format`` (default ``"dense"``) and ``output_names`` (default
    ``["output0"]``) so a family with several outputs exports without changes here. ``rect``
    makes the input's height and width dynamic too (a dense output's anchor axis follows them).
    """
    import torch

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: use {MIN_OPSET} or newer (17 recommended)")
    if module is None:
        if not hasattr(model, "export_module"):
            raise ValueError(f"model family '{getattr(model, 'family', type(model).__name__)}' has no export_module()")
        module = model.export_module()
    fmt = str(getattr(module, "output_format", "dense"))
    names = list(getattr(module, "output_names", [OUTPUT_NAME]))
    x = torch.zeros(max(1, batch), 3, imgsz, imgsz)
    with torch.no_grad():
        out = module(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if len(outs) != len(names):
        raise ValueError(f"export module returns {len(outs)} outputs but names {len(names)}: {names}")
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} if dynamic else {} for n in [INPUT_NAME, *names]}
    if rect:
        axes[INPUT_NAME].update({2: "height", 3: "width"})
        if fmt == "dense":
            axes[names[0]][2] = "anchors"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
        torch.onnx.export(
            module, (x,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=names, dynamic_axes={k: v for k, v in axes.items() if v} or None,
        )
    proto = onnx.load_from_string(buf.getvalue())
    if fmt == "dense":  # (B, 4 + nc, A): only the batch and (rect) the anchor axis are symbolic
        for name, t in zip(names, outs):
            _set_output_shape(proto, name, [axes[name].get(i, d) for i, d in enumerate(t.shape)])
    return proto, fmt, tuple(outs[0].shape)


def _set_output_shape(model: onnx.ModelProto, name: str, dims: list[int | str]) -> None:
    """The tracer names non-batch output dims symbolically; pin them to the traced sizes."""
    for out in model.graph.output:
        if out.name == name:
            shape = out.type.tensor_type.shape
            del shape.dim[:]
            for d in dims:
                dim = shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = int(d)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim (constant folding, dead-node removal, fusions); the input model if it fails."""
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed: exporting the unsimplified ONNX (pip install onnxslim)")
        return model
    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # noqa: BLE001 -- an optimiser failure must not lose the export
        log.warning(f"onnxslim failed ({type(e).__name__}: {e}); exporting the unsimplified ONNX")
        return model
    return slim if isinstance(slim, onnx.ModelProto) else model


# ------------------------------------------------------------------------------------ NMS


def append_dense_nms(
    model: onnx.ModelProto, num_classes: int, conf: float, iou: float, max_det: int
) -> onnx.ModelProto:
    """Append NMS to a dense-output model: (B, 4+nc, A) -> fixed (B, max_det, 6).

    Rows are ``x1, y1, x2, y2, score, class`` sorted by score; padding rows are zeros with
    class -1. Same semantics as ``ssod_deploy.boxes.postprocess_dense``: one label per anchor
    (the best class), score > conf, class-aware NMS (ONNX NonMaxSuppression per class, which
    ONNX Runtime and TensorRT >= 8.6 both run), at most ``max_det`` per image.

    Fixed-size output without loops: the selected scores are scattered into a (B, A + max_det)
    zero matrix, TopK(max_det) picks the best per image; the extra ``max_det`` zero columns keep
    TopK valid when A < max_det, and gathering from sources padded the same way keeps indices
    in range.
    """
    g = model.graph
    out = next((o for o in g.output if o.name == OUTPUT_NAME), None)
    if out is None:
        raise ValueError(f"model has no output '{OUTPUT_NAME}'")
    dims = out.type.tensor_type.shape.dim
    anchors = dims[2].dim_value if len(dims) == 3 else 0
    symbolic_anchors = len(dims) == 3 and bool(dims[2].dim_param)  # rect export: A follows H, W
    if (anchors <= 0 and not symbolic_anchors) or dims[1].dim_value != 4 + num_classes:
        raise ValueError(f"'{OUTPUT_NAME}' must be (B, {4 + num_classes}, A) to append NMS")
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"iou must be in [0, 1], got {iou}")
    k = int(max_det)
    p = "/nms/"
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), p + name))
        return p + name

    def node(op: str, inputs: list[str], name: str, n_out: int = 1, **attrs: Any) -> list[str]:
        outs = [p + name] if n_out == 1 else [f"{p}{name}_{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op, inputs, outs, name=p + name, **attrs))
        return outs

    xywh_to_xyxy = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]], np.float32)
    (t,) = node("Transpose", [OUTPUT_NAME], "transpose", perm=[0, 2, 1])  # (B, A, 4+nc)
    (xywh,) = node("Slice", [t, const("s0", [0]), const("s4", [4]), const("ax2", [2])], "xywh")
    (cls,) = node("Slice", [t, p + "s4", const("send", [np.iinfo(np.int64).max]), p + "ax2"], "cls")
    (xyxy,) = node("MatMul", [xywh, const("m", xywh_to_xyxy, np.float32)], "xyxy")  # (B, A, 4)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if opset >= 18:  # ReduceMax takes axes as an input from opset 18
        (best,) = node("ReduceMax", [cls, p + "ax2"], "best", keepdims=1)  # (B, A, 1)
    else:
        (best,) = node("ReduceMax", [cls], "best", axes=[2], keepdims=1)
    (label,) = node("ArgMax", [cls], "label", axis=2, keepdims=0)  # (B, A) int64
    (is_best,) = node("Equal", [cls, best], "is_best")
    # Other classes get -1, below any score threshold: each anchor enters NMS once, with its best class.
    (one,) = node("Where", [is_best, cls, const("neg1", np.float32(-1), np.float32)], "one_label")
    (scores,) = node("Transpose", [one], "scores", perm=[0, 2, 1])  # (B, nc, A)
    (sel,) = node(
        "NonMaxSuppression",
        [xyxy, scores, const("max_out", [k]), const("iou", [iou], np.float32), const("thr", [conf], np.float32)],
        "nms", center_point_box=0,
    )  # (N, 3) [batch, class, anchor]
    (ba,) = node("Gather", [sel, const("cols", [0, 2])], "batch_anchor", axis=1)  # (N, 2)
    (best2,) = node("Squeeze", [best, p + "ax2"], "best2")  # (B, A)
    (sel_scores,) = node("GatherND", [best2, ba], "sel_scores")  # (N,)
    (shape,) = node("Shape", [OUTPUT_NAME], "shape")
    (bdim,) = node("Slice", [shape, p + "s0", const("s1", [1]), const("ax0", [0])], "bdim")  # [B]
    if anchors > 0:
        wide_cols = const("wide_cols", [anchors + k])
    else:
        (adim,) = node("Slice", [shape, p + "ax2", const("s3", [3]), p + "ax0"], "adim")  # [A]
        (wide_cols,) = node("Add", [adim, const("kk", [k])], "wide_cols")
    (wide,) = node("Concat", [bdim, wide_cols], "wide_shape", axis=0)
    (zeros,) = node("ConstantOfShape", [wide], "zeros", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
    (dense,) = node("ScatterND", [zeros, ba, sel_scores], "dense")  # (B, A + K) selected scores
    topv, topi = node("TopK", [dense, const("k", [k])], "topk", n_out=2, axis=1, largest=1, sorted=1)
    (valid,) = node("Greater", [topv, const("zero", np.float32(0), np.float32)], "valid")  # (B, K)
    # sources padded with K rows so every TopK index is in range
    (pad_shape,) = node("Concat", [bdim, const("k1", [k]), const("four", [4])], "pad_shape", axis=0)
    (pad_boxes,) = node("ConstantOfShape", [pad_shape], "pad_boxes",
                        value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
    (boxes_src,) = node("Concat", [xyxy, pad_boxes], "boxes_src", axis=1)  # (B, A + K, 4)
    (label_f,) = node("Cast", [label], "label_f", to=TensorProto.FLOAT)
    (pad2,) = node("Concat", [bdim, p + "k1"], "pad2_shape", axis=0)
    (pad_labels,) = node("ConstantOfShape", [pad2], "pad_labels",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1.0]))
    (labels_src,) = node("Concat", [label_f, pad_labels], "labels_src", axis=1)  # (B, A + K)
    (ti3,) = node("Unsqueeze", [topi, p + "ax2"], "topi3")  # (B, K, 1)
    (ti4,) = node("Expand", [ti3, const("e4", [1, 1, 4])], "topi4")  # (B, K, 4)
    (gb,) = node("GatherElements", [boxes_src, ti4], "gboxes", axis=1)
    (gl,) = node("GatherElements", [labels_src, topi], "glabels", axis=1)
    (v3,) = node("Unsqueeze", [valid, p + "ax2"], "valid3")
    (boxes,) = node("Where", [v3, gb, const("zf", np.float32(0), np.float32)], "boxes")
    (labels,) = node("Where", [valid, gl, p + "neg1"], "labels")
    (s3,) = node("Unsqueeze", [topv, p + "ax2"], "score3")
    (l3,) = node("Unsqueeze", [labels, p + "ax2"], "label3")
    nodes.append(helper.make_node("Concat", [boxes, s3, l3], [NMS_OUTPUT_NAME], name=p + "out", axis=2))

    g.node.extend(nodes)
    g.initializer.extend(inits)
    batch_dim = dims[0].dim_param or dims[0].dim_value
    new_out = helper.make_tensor_value_info(NMS_OUTPUT_NAME, TensorProto.FLOAT, [batch_dim, k, 6])
    del g.output[:]
    g.output.append(new_out)
    return model


NmsBuilder = Callable[[onnx.ModelProto, int, float, float, int], onnx.ModelProto]
# output_format of the exported module -> (in-graph NMS builder, output_format after it)
NMS_BUILDERS: dict[str, tuple[NmsBuilder, str]] = {"dense": (append_dense_nms, "nms")}


def add_nms(model: onnx.ModelProto, meta: ModelMetadata) -> onnx.ModelProto:
    """In-graph NMS for ``meta.output_format`` (updates ``meta.output_format``)."""
    if meta.output_format not in NMS_BUILDERS:
        raise ValueError(
            f"in-graph NMS is not available for '{meta.output_format}' outputs (family {meta.family}); export with --no-nms"
        )
    build, new_format = NMS_BUILDERS[meta.output_format]
    model = build(model, meta.num_classes, meta.conf, meta.iou, meta.max_det)
    meta.output_format = new_format
    return model


# ------------------------------------------------------------------------------- metadata


def set_metadata(model: onnx.ModelProto, meta: ModelMetadata) -> onnx.ModelProto:
    """Replace ``metadata_props`` with ``meta`` (plus ultralytics-style keys) and name the producer."""
    del model.metadata_props[:]
    for k, v in meta.to_onnx_props().items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "ssod"
    model.producer_version = meta.ssod_version
    model.doc_string = f"ssod {meta.family} detector, {meta.precision}, output {meta.output_format}"
    return model


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Check and write one self-contained file (no external data: models here are small)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"exported ONNX fails the checker: {str(e).splitlines()[0]}") from None
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path
