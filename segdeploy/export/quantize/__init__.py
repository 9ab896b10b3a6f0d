"""Static int8 quantization of an exported SegFormer graph, calibrated on real images.

Everything numerical is onnxruntime's own tooling: `quant_pre_process` (symbolic
shape inference and graph clean-up, which the quantizer needs to see every
tensor's type and shape), then `quantize_static` in QDQ format: activations
uint8 with per-tensor scales from calibration, weights symmetric with one scale
per output channel, stored as uint8 by default (WEIGHT_FORMATS says why). At
session creation ORT fuses each
DequantizeLinear -> op -> QuantizeLinear group into an integer kernel
(QLinearConv, QLinearMatMul, ...). Dynamic quantization is not offered: on
this model it runs ConvInteger kernels that are slower than float.

What stays in floating point (DEFAULT_FLOAT_OP_TYPES and REASONS; attention
scores, see `float_attention_scores`) was chosen by measuring speed and mean IoU
on CamVid; see the README's int8 section. Before quantizing, GELU is fused with
ORT's own FusionGelu. Five small graph edits are hand-written because ORT's
tools leave a gap there, each explained where it is done: private float
initializers before quantizing; then Shape nodes reading the quantized tensors,
the attention scale folded into the query's dequantization, Concat inputs
quantized straight to the Concat's parameters, and the fp32 graph's
input/output declarations restored.

    from segdeploy.export.quantize import quantize_int8, training_calibration_batches
    report = quantize_int8("m/onnx/model.onnx", "m/onnx/model_int8.onnx",
                           training_calibration_batches("m", 64))
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import atomic_path
from segdeploy.errors import SegdeployError
from segdeploy.export.quantize.calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    CalibrationReader,
    calibration_batches,
    calibration_method_of,
    collect_batches,
    recorded_training_data,
    training_calibration_batches,
    training_images,
)
from segdeploy.export.quantize.edits import (
    attention_score_matmuls,
    check_same_io,
    concat_inputs_share_output_params,
    drop_unused_initializers,
    fold_attention_scales,
    fuse_gelu,
    restore_io,
    shapes_from_quantized,
    unshare_float_initializers,
)
from segdeploy.validate.graphs import load_graph

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_CALIBRATION_METHOD",
    "DEFAULT_FLOAT_OP_TYPES",
    "DEFAULT_WEIGHTS",
    "REASONS",
    "WEIGHT_FORMATS",
    "calibration_batches",
    "quantize_int8",
    "recorded_training_data",
    "training_calibration_batches",
    "training_images",
]

log = logging.getLogger(__name__)

# Op types kept in float by default, with the reason (shown in the report). Measured
# on a CamVid-trained scratch:b0 at 512x512 (README, int8 section).
REASONS: dict[str, str] = {
    "Softmax": (
        "ORT's QLinearSoftmax is slow on the CPU (83 ms per 512x512 image on b0, float "
        "Softmax 5.5 ms), and uint8 attention weights cost fidelity when a query attends "
        "to many keys: at 512x512 (256 keys), quantizing Softmax and LayerNorm moved "
        "CamVid mean IoU by 0.014 and cut pixel agreement with fp32 from 98.4% to 96.1%"
    ),
    "LayerNormalization": (
        "ORT has no int8 LayerNorm kernel: quantizing it only adds Q/DQ nodes "
        "and rounds its scale and bias to 8 bits"
    ),
}
DEFAULT_FLOAT_OP_TYPES: tuple[str, ...] = ("Softmax", "LayerNormalization")


@dataclass(frozen=True)
class WeightFormat:
    """How quantize_static stores the weights: ORT's QuantType name and reduce_range."""

    quant_type: str
    reduce_range: bool
    describe: str
    why: str


# Activations are uint8 in both; the weight format decides which integer kernel ORT's
# x86 CPU provider runs, and whether it computes what the graph says. Measured on CamVid
# scratch:b0 at 512x512 (101 val images; label maps against the fp32 graph, which agrees
# with PyTorch on 100.000%), 2-core AMD EPYC, AVX2 only (no VNNI), onnxruntime 1.32:
#   uint8       99.713% pixels agree, model 182-187 ms (batch 1) / 660-688 ms (batch 4)
#   int8-7bit   99.400%,              model 175-178 ms / 588-595 ms
#   int8 8-bit  99.272% (saturating), model 171 ms / 591 ms (not offered)
WEIGHT_FORMATS: dict[str, WeightFormat] = {
    "uint8": WeightFormat(
        "QUInt8",
        False,
        "uint8 (8 bits, zero point 128)",
        "uint8 x uint8 kernels widen both operands to 16 bits before multiplying "
        "(vpmaddwd), so no product pair can saturate on any x86 CPU, with or without "
        "VNNI, and the weights keep all 8 bits: on CamVid b0 the label maps agreed with "
        "PyTorch on 99.71% of the pixels, against 99.40% with 7-bit int8 weights, for "
        "a model 2-16% slower than 7-bit int8 on an AVX2 CPU",
    ),
    "int8-7bit": WeightFormat(
        "QInt8",
        True,
        "int8 in [-64, 64] (7-bit range)",
        "uint8 x int8 kernels on a CPU without VNNI (AVX2 only) add the products in int16 "
        "pairs (vpmaddubsw), which saturate with full 8-bit weights (255 x 127 x 2 > "
        "32767: QLinearMatMul off by up to 49 output steps, pixel agreement 95.6% on an "
        "AVX2 EPYC); 7-bit weights cannot (255 x 64 x 2 < 32767), at the cost of half a "
        "weight step of precision",
    ),
}
DEFAULT_WEIGHTS = "uint8"


def weight_format_of(name: str) -> WeightFormat:
    if name not in WEIGHT_FORMATS:
        raise SegdeployError(
            "weights", f"unknown weight format {name!r}; choose one of {', '.join(WEIGHT_FORMATS)}"
        )
    return WEIGHT_FORMATS[name]


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_METHOD = "minmax"


def _known_nodes(source, names: Sequence[str] | None, onnx_path: Path) -> list[str]:
    """`names` as a list, each the name of a node of `source` (else exit 2 naming them)."""
    explicit = list(names or [])
    missing = [n for n in explicit if n not in {n.name for n in source.graph.node}]
    if missing:
        raise SegdeployError(
            "nodes_to_exclude", f"no such node in {onnx_path.name}: {', '.join(missing[:5])}"
        )
    return explicit


def quantize_int8(
    onnx_path: str | os.PathLike,
    output_path: str | os.PathLike,
    calibration_batches: Iterable[np.ndarray],
    *,
    per_channel: bool = True,
    weights: str = DEFAULT_WEIGHTS,
    exclude_op_types: Sequence[str] = DEFAULT_FLOAT_OP_TYPES,
    nodes_to_exclude: Sequence[str] | None = None,
    float_attention_scores: bool = True,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    skip_symbolic_shape: bool = False,
) -> dict[str, Any]:
    """Write a static int8 (QDQ) version of the fp32 graph `onnx_path` to `output_path`.

    calibration_batches: float32 arrays [N, 3, h, w], preprocessed exactly as at
        inference (see `calibration_batches`); activation ranges come from them.
    per_channel: one weight scale per output channel (else one per tensor).
    weights: how weights are stored, a key of WEIGHT_FORMATS: "uint8" (the default,
        8 bits, runs exactly on every x86 CPU) or "int8-7bit" (issue 22's format,
        faster without VNNI but half a weight step coarser); see WEIGHT_FORMATS.
    exclude_op_types: op types the quantizer leaves in float (default
        DEFAULT_FLOAT_OP_TYPES). Note that ORT itself may still run an excluded
        Conv/MatMul whose input and output are both quantized as an integer kernel
        (it quantizes float weights at load); `cpu_kernels` in the report shows
        what actually runs.
    nodes_to_exclude: node names left in float, in addition.
    float_attention_scores: let each attention's Q.K^T MatMul write float scores.
        It still multiplies in int8 (ORT runs it as MatMulIntegerToFloat), but the
        scores, the largest activations of the model (tokens x reduced tokens per
        head), skip a uint8 round trip and the DequantizeLinear that ORT would run
        on one thread before the float scaling and Softmax.
    calibration_method: "minmax", "entropy" or "percentile" (ORT's calibrators).
    skip_symbolic_shape: see `pre_process` (the family registry says which need it).

    Returns a JSON-safe report: settings, what stayed in float and why, node
    counts, calibration images, timings and file sizes. The output is written
    atomically and passes onnx.checker; its inputs and outputs are the
    fp32 graph's (same names, float32).
    """
    t_start = time.perf_counter()
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    method = calibration_method_of(calibration_method)
    weight_format = weight_format_of(weights)
    source = load_graph(onnx_path, check=False, external_data=False)
    if output_path.resolve() == onnx_path.resolve():
        raise SegdeployError(output_path, "the int8 graph must not overwrite the fp32 graph")
    input_name = _single_input(source, onnx_path)
    batches = collect_batches(calibration_batches, input_name)
    exclude_op_types = tuple(dict.fromkeys(exclude_op_types))
    explicit = _known_nodes(source, nodes_to_exclude, onnx_path)

    with tempfile.TemporaryDirectory(prefix="segdeploy-int8-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        t0 = time.perf_counter()
        plan = _prepare(onnx_path, pre, explicit, float_attention_scores, skip_symbolic_shape)
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        op_types = [t for t in _quantizable_op_types() if t not in exclude_op_types]
        quantized, edits = _quantize(
            pre, output_path, source, input_name, batches, op_types, per_channel, method, plan,
            weight_format,
        )  # fmt: skip
        t_quant = time.perf_counter() - t0

    counts = Counter(n.op_type for n in quantized.graph.node)
    float_nodes = _float_nodes(plan.model, exclude_op_types)
    float_nodes["by_name"] = plan.explicit
    float_nodes["attention_scores"] = plan.attention
    return {
        "source": str(onnx_path),
        "output": str(output_path),
        "format": "QDQ",
        "activations": "uint8, per tensor, asymmetric",
        "weights": f"{weight_format.describe}, "
        f"{'per channel' if per_channel else 'per tensor'}, symmetric",
        "weight_format": weights,
        "weight_format_why": weight_format.why,
        "reduce_range": weight_format.reduce_range,
        "calibration_method": calibration_method.lower(),
        "skip_symbolic_shape": skip_symbolic_shape,
        "calibration_images": sum(int(b.shape[0]) for b in batches),
        "calibration_batches": len(batches),
        "calibration_shapes": sorted({str(list(b.shape[1:])) for b in batches}),
        "float_op_types": {t: REASONS.get(t, "excluded by the caller") for t in exclude_op_types},
        "float_attention_scores": float_attention_scores,
        "float_nodes": float_nodes,
        "graph_edits": {"gelu_fused": plan.gelus, **edits},
        "quantize_linear": counts.get("QuantizeLinear", 0),
        "dequantize_linear": counts.get("DequantizeLinear", 0),
        "cpu_kernels": _cpu_kernels(output_path),
        "size_bytes": {"fp32": onnx_path.stat().st_size, "int8": output_path.stat().st_size},
        "seconds": {
            "pre_process": round(t_pre, 2),
            "calibrate_and_quantize": round(t_quant, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
    }


@dataclass
class _Plan:
    """The pre-processed graph and what stays in float, as the quantizer will be told."""

    model: Any
    explicit: list[str]  # nodes excluded by name that still exist after pre-processing
    attention: list[str]  # attention-score MatMuls that write float scores
    gelus: int

    @property
    def excluded_nodes(self) -> list[str]:
        return list(dict.fromkeys(self.explicit + self.attention))


def pre_process(
    src: str | os.PathLike, dst: str | os.PathLike, *, skip_symbolic_shape: bool
) -> None:
    """ORT's quant_pre_process (shape inference, graph optimisation) of `src` into `dst`.

    `skip_symbolic_shape`: leave out ORT's symbolic shape inference, which fails on some
    families' graphs ("Incomplete symbolic shape inference": DPT, MobileViT, MobileViTV2;
    segdeploy.families.Family.int8_skip_symbolic_shape); onnx's own inference still runs.
    """
    from onnxruntime.quantization import quant_pre_process

    quant_pre_process(os.fspath(src), os.fspath(dst), skip_symbolic_shape=skip_symbolic_shape)


def _prepare(
    onnx_path: Path, pre: Path, explicit: list[str], float_attention: bool, skip_symbolic: bool
) -> _Plan:
    """ORT's quant_pre_process, then the edits before quantizing; saved at `pre`."""
    import onnx

    pre_process(onnx_path, pre, skip_symbolic_shape=skip_symbolic)
    model = onnx.load(str(pre))
    copies = unshare_float_initializers(model)
    gelus = fuse_gelu(model)
    if copies or gelus:
        onnx.save(model, str(pre))
    attention = attention_score_matmuls(model) if float_attention else []
    # quant_pre_process may fuse nodes away; an exclusion that no longer names a
    # node would silently do nothing, so say so.
    present = {n.name for n in model.graph.node}
    gone = [n for n in explicit if n not in present]
    if gone:
        log.warning("pre-processing fused away nodes to exclude: %s", ", ".join(gone))
    return _Plan(model, [n for n in explicit if n in present], attention, gelus)


def _quantize(
    pre, output_path, source, input_name, batches, op_types, per_channel, method, plan, weights
):
    """quantize_static in QDQ format, then the edits after it; (quantized model, edit counts)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    # ORT's histogram calibrators print a line per batch; keep stdout for our output.
    with atomic_path(output_path) as out, contextlib.redirect_stdout(_LogWriter()):
        quantize_static(
            str(pre),
            str(out),
            CalibrationReader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=per_channel,
            # Weights as WEIGHT_FORMATS says (why: see there); activations uint8.
            reduce_range=weights.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=getattr(QuantType, weights.quant_type),
            nodes_to_exclude=plan.excluded_nodes,
            calibrate_method=method,
            extra_options={
                # One calibration batch at a time: ranges (or histograms) are merged
                # batch by batch, so memory does not grow with the number of images.
                "CalibStridedMinMax": 1,
                # Symmetric weights for uint8 too (zero point 128): ORT's QLinearConv
                # needs one zero point for all channels, and the products of a
                # symmetric weight need no zero-point correction term. (Per channel,
                # ORT makes them symmetric anyway; this covers per_channel=False.)
                "WeightSymmetric": True,
            },
        )
        quantized = onnx.load(str(out))
        edits = {
            "shapes_rewired": shapes_from_quantized(quantized),
            "attention_scales_folded": fold_attention_scales(quantized, plan.attention),
            "concat_inputs_requantized": concat_inputs_share_output_params(quantized),
        }
        drop_unused_initializers(quantized)
        restore_io(source, quantized)
        onnx.save(quantized, str(out))
        try:
            onnx.checker.check_model(quantized)
        except onnx.checker.ValidationError as err:  # an ORT bug, not bad input
            raise RuntimeError(f"quantized graph fails onnx.checker: {err}") from err
        check_same_io(source, quantized, output_path)
    return quantized, edits


class _LogWriter:
    """A stdout stand-in that sends what ORT prints to the debug log."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("onnxruntime: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        pass


def _single_input(model, path: Path) -> str:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise SegdeployError(path, f"expected one image input, the graph has {inputs}")
    return inputs[0]


def _quantizable_op_types() -> list[str]:
    # Exactly what quantize_static quantizes when given no op types.
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def _float_nodes(model, exclude_op_types: Sequence[str]) -> dict:
    """How many quantizable nodes each excluded op type leaves in float."""
    quantizable = set(_quantizable_op_types())
    by_type = Counter(
        n.op_type
        for n in model.graph.node
        if n.op_type in exclude_op_types and n.op_type in quantizable
    )
    return {"by_op_type": dict(sorted(by_type.items()))}


def _cpu_kernels(path: Path) -> dict[str, int]:
    """Compute kernels ORT's CPU provider actually runs for the graph, by op type.

    The QDQ graph only marks what may run in int8; which DequantizeLinear ->
    op -> QuantizeLinear groups ORT fuses into integer kernels is decided at
    session creation, so the report reads the session's optimised graph.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="segdeploy-int8-") as tmp:
        options = ort.SessionOptions()
        # EXTENDED runs the QDQ fusions; ALL would add machine-specific layouts.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.intra_op_num_threads = 1
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts = Counter(n.op_type for n in optimized.graph.node)
    return {
        op: counts[op] for op in sorted(counts) if op in _COMPUTE_OPS or op.startswith("QLinear")
    }


# Ops worth reporting in cpu_kernels: the integer kernels and the float ops that cost time.
_COMPUTE_OPS = {
    "Conv", "MatMul", "FusedMatMul", "Gemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "Softmax", "LayerNormalization", "SkipLayerNormalization", "Resize", "Add", "Mul", "Div",
    "Gelu", "Erf", "QuantizeLinear", "DequantizeLinear", "Transpose", "Concat",
}  # fmt: skip
