"""Reduced precision inside the ONNX (FP16 mixed precision, INT8 Q/DQ), verifiable on any CPU.

TensorRT 11 removed the FP16/INT8 builder flags and calibrators: precision must live in the
model, and a strongly typed TensorRT build takes it from there (TensorRT 10 accepts the same
models). Both kinds of model run in ONNX Runtime on the CPU, so their accuracy is measured here.

The numerically sensitive part of a detector is the end of its head: the per-level outputs
merged along the anchor axis, the DFL softmax-expectation and the box decode (anchor + distance,
times stride), whose values reach the input size (hundreds of pixels). ``decode_tail_nodes``
finds those nodes from the graph alone — every node downstream of the first tensor laid out along
the anchor axis — so it needs no knowledge of the family's node names. They stay FP32.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger("ssod")

_SHAPE_ONLY = {"Reshape", "Concat", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}


def _static_shapes(model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None) -> dict[str, list[int | str]]:
    """Every tensor's shape; ``input_shape`` pins a dynamic input (rect exports: symbolic H, W,
    hence a symbolic anchor axis) so that shapes computed from it become numbers again."""
    if input_shape is not None:
        model = copy.deepcopy(model)
        del model.graph.value_info[:]  # the tracer's symbolic shapes would win over the pinned ones
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for d, v in zip(dims, input_shape):
            d.Clear()
            d.dim_value = int(v)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=input_shape is not None)
    vis = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in vis}


def decode_tail_nodes(model: onnx.ModelProto, anchors: int, with_output_convs: bool = False,
                      input_shape: tuple[int, ...] | None = None) -> list[str]:
    """Names of the nodes from the merge along the anchor axis (last dim == ``anchors`` at
    ``input_shape``, which a graph with a dynamic H, W needs) to the output.

    ``with_output_convs`` adds the convolutions that produce the per-level raw outputs (reached
    from the tail through shape-only ops), e.g. the DFL-logit and class-logit 1x1 convs.
    """
    shapes = _static_shapes(model, input_shape)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producer: dict[str, onnx.NodeProto] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
        for o in n.output:
            producer[o] = n
    seeds = [
        n for n in model.graph.node
        if any(len(shapes.get(o, [])) >= 3 and shapes[o][-1] == anchors for o in n.output)
    ]
    if not seeds:
        raise ValueError(f"no tensor with {anchors} anchors on its last axis: cannot locate the decode tail")
    tail: dict[str, onnx.NodeProto] = {}
    stack = list(seeds)
    while stack:
        n = stack.pop()
        if n.name in tail:
            continue
        tail[n.name] = n
        for o in n.output:
            stack.extend(consumers[o])
    names = set(tail)
    if with_output_convs:
        stack = [i for n in tail.values() for i in n.input]
        seen: set[str] = set()
        while stack:
            t = stack.pop()
            if t in seen or t not in producer:
                continue
            seen.add(t)
            n = producer[t]
            if n.name in names and n.name not in tail:
                continue
            if n.op_type in ("Conv", "ConvTranspose"):
                names.add(n.name)
            elif n.op_type in _SHAPE_ONLY and n.name not in tail:
                names.add(n.name)
                stack.extend(n.input)
    names |= shape_derived_nodes(model)
    return [n.name for n in model.graph.node if n.name in names]


def shape_derived_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes whose values come only from tensor shapes and constants, never from pixel values.

    With a dynamic H, W the grid of anchor points and strides is built in-graph from ``Shape``
    (Shape -> Gather -> Range -> Add 0.5 ...). Those are pixel coordinates, cheap to compute, and
    the FP16 converter cannot type a Range-fed chain on a symbolic shape; they stay FP32.
    """
    constant = {t.name for t in model.graph.initializer}
    derived: set[str] = set()
    names: set[str] = set()
    for n in model.graph.node:  # ONNX nodes are topologically sorted
        ins = [i for i in n.input if i]
        if n.op_type == "Constant":
            constant.update(n.output)
        elif n.op_type == "Shape" or (ins and all(i in constant or i in derived for i in ins)
                                      and any(i in derived for i in ins)):
            derived.update(n.output)
            names.add(n.name)
    return names


# ----------------------------------------------------------------------------------- FP16


def to_fp16(model: onnx.ModelProto, keep_fp32_nodes: list[str]) -> onnx.ModelProto:
    """Mixed-precision FP16 with FP32 inputs/outputs; ``keep_fp32_nodes`` (the decode tail) stay FP32.

    onnxconverter-common's default block list (Resize, TopK, NonMaxSuppression, Range, ...) also
    stays FP32. Its own clean-up of redundant casts raises when a kept-FP32 node feeds a graph
    output (FP32 -> Cast16 -> Cast32 -> output), so that clean-up is replaced by
    ``_drop_cast_pairs``, which also handles that case.
    """
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise RuntimeError("--half needs onnxconverter-common: pip install onnxconverter-common") from None
    original = float16.remove_unnecessary_cast_node
    float16.remove_unnecessary_cast_node = lambda graph: None
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "values truncated to fp16 range" for tiny weights
            out = float16.convert_float_to_float16(
                model, keep_io_types=True, node_block_list=list(keep_fp32_nodes), min_positive_val=1e-7,
                max_finite_val=1e4,
            )
    finally:
        float16.remove_unnecessary_cast_node = original
    _drop_cast_pairs(out)
    del out.graph.value_info[:]  # the converter leaves stale FP32 annotations on cast outputs
    return out


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _drop_cast_pairs(model: onnx.ModelProto) -> None:
    """Remove ``x(fp32) -> Cast(fp16) -> Cast(fp32)`` round trips (a precision loss for nothing)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    dropped: set[int] = set()
    renames: dict[str, str] = {}  # tensor -> replacement
    for n in g.node:
        if _cast_to(n) != onnx.TensorProto.FLOAT16 or n.output[0] in outputs:
            continue
        cons = consumers[n.output[0]]
        if not cons or any(_cast_to(c) != onnx.TensorProto.FLOAT for c in cons):
            continue
        src = n.input[0]
        for c in cons:
            renames[c.output[0]] = src
            dropped.add(id(c))
        dropped.add(id(n))
    if not renames:
        return
    # a removed cast that produced a graph output: its source tensor takes the output's name
    out_alias = {src: dst for dst, src in renames.items() if dst in outputs}
    keep = [n for n in g.node if id(n) not in dropped]
    for n in keep:
        for i, name in enumerate(n.input):
            src = renames.get(name)
            if src is not None:
                n.input[i] = out_alias.get(src, src)
            elif name in out_alias:
                n.input[i] = out_alias[name]
        for i, name in enumerate(n.output):
            if name in out_alias:
                n.output[i] = out_alias[name]
    del g.node[:]
    g.node.extend(keep)


# ----------------------------------------------------------------------------------- INT8

CALIB_METHODS = ("entropy", "percentile", "minmax")
INT8_TARGETS = ("tensorrt", "cpu")  # signed symmetric activations (TensorRT) | uint8 asymmetric (ORT CPU)


def quantize_int8(
    model: onnx.ModelProto,
    out_path: str | Path,
    reader: Any,
    exclude_nodes: list[str],
    method: str = "entropy",
    percentile: float = 99.999,
    target: str = "tensorrt",
    pixel_input: tuple[str, float] | None = None,
) -> tuple[onnx.ModelProto, str]:
    """Post-training static quantization to a Q/DQ model (int8 symmetric per-channel weights).

    Activations depend on ``target`` (``INT8_TARGETS``): TensorRT's explicit quantization only
    takes signed int8 with zero point 0 (symmetric), while ONNX Runtime's x86 CPU kernels are fast
    only with uint8 activations (U8S8: measured 1.35x faster than FP32, whereas S8S8 Q/DQ ran 2.5x
    slower than FP32 on the same CPU, because ORT leaves int8-activation convolutions unfused on
    x86). Asymmetric uint8 also spends no code on the negative side SiLU barely reaches.
    ``reader`` is a ``CalibrationReader``; it is
    fed to the calibrator one batch at a time (``CalibStridedMinMax`` = 1 batch), which keeps the
    histogram calibrators' memory to one batch of activations instead of the whole set.
    ``pixel_input`` = (input name, normalisation scale, e.g. 1/255) fixes that input's uint8
    quantizer to exactly the normalisation's range [0, 255 * scale] instead of calibrating it:
    the range is known, and it makes the quantizer undo the normalisation, so ``take_pixels``
    can hand the model raw pixels (``target`` cpu only: TensorRT's int8 input is signed).
    Returns (quantized model, calibration method actually used).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
               "minmax": CalibrationMethod.MinMax}
    if method not in methods:
        raise ValueError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, not {method!r}")
    if target not in INT8_TARGETS:
        raise ValueError(f"INT8 target must be one of {', '.join(INT8_TARGETS)}, not {target!r}")
    symmetric = target == "tensorrt"
    act_type = QuantType.QInt8 if symmetric else QuantType.QUInt8
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".quant.tmp")
    extra = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        "CalibStridedMinMax": 1,  # one batch per collect call (bounded memory; ragged last batch is fine)
        "CalibTensorRangeSymmetric": symmetric,
    }
    if method == "percentile":
        extra["CalibPercentile"] = float(percentile)
    if pixel_input is not None and not symmetric:
        name, scale = pixel_input
        extra["TensorQuantOverrides"] = {
            name: [{"scale": np.array(scale, np.float32), "zero_point": np.array(0, np.uint8)}]
        }

    src = out_path.with_name(out_path.name + ".fp32.tmp")  # quantize_static mutates a ModelProto: give it a file
    onnx.save(model, str(src))

    def run(m: str) -> None:
        reader.rewind()
        with contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
            quantize_static(
                str(src), str(tmp), calibration_data_reader=reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=act_type, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
                calibrate_method=methods[m], extra_options=extra,
            )

    try:
        run(method)
    except ValueError as e:
        # onnxruntime's histogram calibrators fail on a (near-)constant tensor ("Too many bins for
        # data range", "max must be larger than min"), e.g. an untrained branch; min-max is always defined.
        if method == "minmax" or not any(w in str(e) for w in ("bins", "range")):
            raise
        log.warning(f"{method} calibration failed on a (near-)constant tensor ({e}); using minmax calibration")
        extra.pop("CalibPercentile", None)
        run("minmax")
        method = "minmax"
    finally:
        src.unlink(missing_ok=True)
    try:
        q = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    return q, method


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs "consider pre-processing" warnings on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def take_pixels(model: onnx.ModelProto, input_name: str, scale: float) -> bool:
    """Make ``input_name`` a uint8 input of raw pixels when its only consumer is a uint8
    QuantizeLinear that maps every pixel value v, normalised as the runtime does
    (float32 v * scale), back to v: that quantizer is then the identity on pixels and is removed.

    Why: the runtime no longer converts every image to float32 (a quarter of the bytes, ~0.2 ms
    less per 640x480 image on the CPU) and the model skips a full-size quantize; outputs are
    bit-identical. Returns False (model untouched) when the input is anything else."""
    g = model.graph
    inputs = [i for i in g.input if i.name == input_name]
    consumers = [n for n in g.node if input_name in n.input]
    if len(inputs) != 1 or len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear":
        return False
    q = consumers[0]
    inits = {t.name: t for t in g.initializer}
    if (len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits
            or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT):
        return False
    q_scale = numpy_helper.to_array(inits[q.input[1]])
    zp = numpy_helper.to_array(inits[q.input[2]])
    if zp.dtype != np.uint8 or q_scale.size != 1 or zp.size != 1:
        return False
    v = np.arange(256, dtype=np.float32)
    # ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)
    levels = np.rint(v * np.float32(scale) / q_scale.astype(np.float32).reshape(()))
    back = np.clip(levels + float(zp.reshape(())), 0, 255)
    if not np.array_equal(back, v):
        return False
    g.node.remove(q)
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == q.output[0]:
                n.input[k] = input_name
    inputs[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return True


def qdq_activation_type(model: onnx.ModelProto) -> str | None:
    """"s8" / "u8" from the QuantizeLinear zero points (None for a model without Q/DQ)."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            return "u8" if inits[n.input[2]] == onnx.TensorProto.UINT8 else "s8"
    return None


def count_qdq(model: onnx.ModelProto) -> tuple[int, int]:
    """(QuantizeLinear, DequantizeLinear) node counts."""
    ops = [n.op_type for n in model.graph.node]
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear")
