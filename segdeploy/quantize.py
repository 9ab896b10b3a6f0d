"""Static int8 quantization of an exported SegFormer graph, calibrated on real images.

Everything numerical is onnxruntime's own tooling: `quant_pre_process` (symbolic
shape inference and graph clean-up, which the quantizer needs to see every
tensor's type and shape), then `quantize_static` in QDQ format: activations
uint8 with per-tensor scales from calibration, weights int8 symmetric with one
scale per output channel. At session creation ORT fuses each
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

    from segdeploy.quantize import quantize_int8, training_calibration_batches
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import atomic_path
from segdeploy.errors import SegdeployError

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

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_METHOD = "minmax"
DEFAULT_CALIBRATION_IMAGES = 64


def quantize_int8(
    onnx_path: str | os.PathLike,
    output_path: str | os.PathLike,
    calibration_batches: Iterable[np.ndarray],
    *,
    per_channel: bool = True,
    exclude_op_types: Sequence[str] = DEFAULT_FLOAT_OP_TYPES,
    nodes_to_exclude: Sequence[str] | None = None,
    float_attention_scores: bool = True,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
) -> dict[str, Any]:
    """Write a static int8 (QDQ) version of the fp32 graph `onnx_path` to `output_path`.

    calibration_batches: float32 arrays [N, 3, h, w], preprocessed exactly as at
        inference (see `calibration_batches`); activation ranges come from them.
    per_channel: one weight scale per output channel (else one per tensor).
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

    Returns a JSON-safe report: settings, what stayed in float and why, node
    counts, calibration images, timings and file sizes. The output is written
    atomically and passes onnx.checker; its inputs and outputs are the
    fp32 graph's (same names, float32).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    t_start = time.perf_counter()
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    method = _calibration_method(calibration_method)
    source = _load_graph(onnx_path)
    if output_path.resolve() == onnx_path.resolve():
        raise SegdeployError(output_path, "the int8 graph must not overwrite the fp32 graph")
    input_name = _single_input(source, onnx_path)
    batches = _collect_batches(calibration_batches, input_name)
    n_images = sum(int(b.shape[0]) for b in batches)

    exclude_op_types = tuple(dict.fromkeys(exclude_op_types))
    op_types = [t for t in _quantizable_op_types() if t not in exclude_op_types]
    explicit = list(nodes_to_exclude or [])
    known = {n.name for n in source.graph.node}
    missing = [n for n in explicit if n not in known]
    if missing:
        raise SegdeployError(
            "nodes_to_exclude", f"no such node in {onnx_path.name}: {', '.join(missing[:5])}"
        )

    with tempfile.TemporaryDirectory(prefix="segdeploy-int8-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        t0 = time.perf_counter()
        quant_pre_process(str(onnx_path), str(pre))
        t_pre = time.perf_counter() - t0
        pre_model = onnx.load(str(pre))
        copies = _unshare_float_initializers(pre_model)
        gelus = _fuse_gelu(pre_model)
        if copies or gelus:
            onnx.save(pre_model, str(pre))
        attention = _attention_score_matmuls(pre_model) if float_attention_scores else []
        # quant_pre_process may fuse nodes away; an exclusion that no longer names a
        # node would silently do nothing, so say so.
        present = {n.name for n in pre_model.graph.node}
        gone = [n for n in explicit if n not in present]
        if gone:
            log.warning("pre-processing fused away nodes to exclude: %s", ", ".join(gone))
        explicit = [n for n in explicit if n in present]
        excluded_nodes = list(dict.fromkeys(explicit + attention))

        t0 = time.perf_counter()
        # ORT's histogram calibrators print a line per batch; keep stdout for our output.
        with atomic_path(output_path) as out, contextlib.redirect_stdout(_LogWriter()):
            quantize_static(
                str(pre),
                str(out),
                _Reader(input_name, batches),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                per_channel=per_channel,
                # uint8 activations x int8 weights: the pairing ORT's x86 int8 kernels
                # are built for. reduce_range (7-bit weights) is left off: it only helps
                # CPUs without VNNI, where u8 x s8 pair sums can saturate, and costs accuracy.
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded_nodes,
                calibrate_method=method,
                extra_options={
                    # One calibration batch at a time: ranges (or histograms) are merged
                    # batch by batch, so memory does not grow with the number of images.
                    "CalibStridedMinMax": 1,
                },
            )
            t_quant = time.perf_counter() - t0
            quantized = onnx.load(str(out))
            edits = {
                "gelu_fused": gelus,
                "shapes_rewired": _shapes_from_quantized(quantized),
                "attention_scales_folded": _fold_attention_scales(quantized, attention),
                "concat_inputs_requantized": _concat_inputs_share_output_params(quantized),
            }
            _drop_unused_initializers(quantized)
            _restore_io(source, quantized)
            onnx.save(quantized, str(out))
            try:
                onnx.checker.check_model(quantized)
            except onnx.checker.ValidationError as err:  # an ORT bug, not bad input
                raise RuntimeError(f"quantized graph fails onnx.checker: {err}") from err
            _check_same_io(source, quantized, output_path)

    counts = Counter(n.op_type for n in quantized.graph.node)
    float_nodes = _float_nodes(pre_model, exclude_op_types)
    float_nodes["by_name"] = explicit
    float_nodes["attention_scores"] = attention
    return {
        "source": str(onnx_path),
        "output": str(output_path),
        "format": "QDQ",
        "activations": "uint8, per tensor, asymmetric",
        "weights": f"int8, {'per channel' if per_channel else 'per tensor'}, symmetric",
        "calibration_method": calibration_method.lower(),
        "calibration_images": n_images,
        "calibration_batches": len(batches),
        "calibration_shapes": sorted({str(list(b.shape[1:])) for b in batches}),
        "float_op_types": {t: REASONS.get(t, "excluded by the caller") for t in exclude_op_types},
        "float_attention_scores": float_attention_scores,
        "float_nodes": float_nodes,
        "graph_edits": edits,
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


# --- calibration data --------------------------------------------------------------------------


def calibration_batches(
    images: Iterable[Any],
    preprocess: Callable[[list], np.ndarray],
    *,
    batch_size: int = 1,
) -> Iterator[np.ndarray]:
    """Preprocessed float32 batches [N, 3, h, w] from PIL images, `batch_size` at a time.

    `preprocess` is the deployment preprocessor (segdeploy.runtime.preprocess.
    Preprocessor.from_dir(model_dir)), so calibration sees exactly the tensors
    that inference will.
    """
    if batch_size < 1:
        raise SegdeployError("batch_size", f"must be >= 1, got {batch_size}")
    chunk: list = []
    for image in images:
        chunk.append(image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image)
        if len(chunk) == batch_size:
            yield np.asarray(preprocess(chunk), dtype=np.float32)
            chunk = []
    if chunk:
        yield np.asarray(preprocess(chunk), dtype=np.float32)


def recorded_training_data(model_dir: str | os.PathLike):
    """The DatasetSpec that `segdeploy train` recorded in `model_dir/train_args.json`.

    Cheap (reads one JSON file): callers use it to reject a folder that cannot
    be calibrated before starting a long export.
    """
    import json

    from segdeploy.data import DatasetSpec

    args_path = Path(model_dir) / "train_args.json"
    try:
        recorded = json.loads(args_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SegdeployError(
            args_path,
            "missing: int8 calibration needs the training data that `segdeploy train` "
            "records there",
        ) from None
    except (OSError, ValueError) as err:
        raise SegdeployError(args_path, f"unreadable: {err}") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("dataset"), dict):
        raise SegdeployError(args_path, "records no 'dataset' to calibrate on")
    return DatasetSpec.from_dict(recorded["dataset"])


def training_images(model_dir: str | os.PathLike, n: int, *, seed: int = 0) -> list:
    """`n` images drawn (seeded, without replacement) from the training split recorded in
    `model_dir/train_args.json` by `segdeploy train`.

    Calibrating on training images keeps the evaluation split unseen, so the int8
    graph's validation stays honest.
    """
    from segdeploy.data import load_splits

    if n < 1:
        raise SegdeployError("--calibration-images", f"must be >= 1, got {n}")
    spec = recorded_training_data(model_dir)
    data = load_splits(spec, need_train=True)
    if data.train is None or len(data.train) == 0:
        raise SegdeployError(spec.name, "the recorded dataset has no training images")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(data.train), size=min(n, len(data.train)), replace=False))
    rows = data.train.select([int(i) for i in picks])
    return [row["image"].convert("RGB") for row in rows]


def training_calibration_batches(
    model_dir: str | os.PathLike, n: int = DEFAULT_CALIBRATION_IMAGES, *, seed: int = 0
) -> Iterator[np.ndarray]:
    """`n` training images of `model_dir`, preprocessed by its deployment preprocessor."""
    from segdeploy.runtime.preprocess import Preprocessor

    preprocess = Preprocessor.from_dir(model_dir)
    return calibration_batches(training_images(model_dir, n, seed=seed), preprocess)


# --- helpers -----------------------------------------------------------------------------------


class _LogWriter:
    """A stdout stand-in that sends what ORT prints to the debug log."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("onnxruntime: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        pass


class _Reader:
    """ORT CalibrationDataReader over materialised batches, with the range protocol that
    ORT's strided calibration (CalibStridedMinMax) uses to collect one slice at a time."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches = input_name, batches
        self.set_range(0, len(batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    key = str(name).lower()
    if key not in methods:
        raise SegdeployError(
            "--calibration-method", f"unknown {name!r}; choose one of {', '.join(methods)}"
        )
    return methods[key]


def _load_graph(path: Path):
    import onnx

    if not path.is_file():
        raise SegdeployError(path, "missing: no ONNX graph to quantize (run `segdeploy export`)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises its own DecodeError family
        raise SegdeployError(path, f"not a readable ONNX graph: {err}") from None


def _single_input(model, path: Path) -> str:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise SegdeployError(path, f"expected one image input, the graph has {inputs}")
    return inputs[0]


def _collect_batches(batches: Iterable[np.ndarray], input_name: str) -> list[np.ndarray]:
    out = []
    for i, batch in enumerate(batches):
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[0] < 1 or batch.shape[1] != 3:
            raise SegdeployError(
                "calibration data",
                f"batch {i} has shape {batch.shape}; expected [N, 3, height, width]",
            )
        if not np.issubdtype(batch.dtype, np.floating):
            raise SegdeployError(
                "calibration data",
                f"batch {i} is {batch.dtype}; expected preprocessed float32 pixels",
            )
        if not np.isfinite(batch).all():
            raise SegdeployError("calibration data", f"batch {i} contains NaN or infinity")
        out.append(np.ascontiguousarray(batch, dtype=np.float32))
    if not out:
        raise SegdeployError(
            "calibration data", f"no calibration images for input {input_name!r}: need at least 1"
        )
    return out


def _quantizable_op_types() -> list[str]:
    # Exactly what quantize_static quantizes when given no op types.
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def _unshare_float_initializers(model) -> int:
    """Give every node its own float initializers; returns how many copies were made.

    The exporter merges identical initializers, so tensors that happen to be
    equal (all the zero biases and unit LayerNorm scales of an untrained model)
    are shared between unrelated nodes. The quantizer decides per tensor: a
    shared Conv bias quantized as an Add's uint8 activation keeps that Conv out
    of QLinearConv, and a LayerNorm kept in float would read a DequantizeLinear
    of a bias meant for someone else. Private copies keep each node's choice
    its own; a trained model rarely shares anything, so this costs nothing there.
    """
    import onnx
    from onnx import numpy_helper

    floats = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    uses = Counter(i for n in model.graph.node for i in n.input if i in floats)
    seen: Counter = Counter()
    copies = 0
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if uses.get(name, 0) < 2:
                continue
            seen[name] += 1
            if seen[name] == 1:  # the first consumer keeps the original
                continue
            copy = numpy_helper.from_array(
                numpy_helper.to_array(floats[name]), f"{name}/{node.name}/{k}"
            )
            model.graph.initializer.append(copy)
            node.input[k] = copy.name
            copies += 1
    return copies


def _attention_score_matmuls(model) -> list[str]:
    """The Q.K^T MatMuls: both inputs are activations and the output goes (through the
    1/sqrt(d) scaling, if any) into a Softmax."""
    inits, _, consumers = _graph_index(model.graph)
    consts = set(inits) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}

    def feeds_softmax(tensor: str, hops: int) -> bool:
        for c in consumers.get(tensor, []):
            if c.op_type == "Softmax":
                return True
            if (
                hops > 0
                and c.op_type in ("Div", "Mul", "Add")
                and feeds_softmax(c.output[0], hops - 1)
            ):
                return True
        return False

    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and not any(i in consts for i in n.input)
        and feeds_softmax(n.output[0], 2)
    ]


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


def _shapes_from_quantized(model) -> int:
    """Let Shape nodes read a quantized tensor instead of its DequantizeLinear output.

    The exported graph takes the shape of many activations (dynamic reshapes);
    once they are quantized, ORT would run a full DequantizeLinear (on one
    thread) only for Shape to read its dimensions, which are the quantized
    tensor's. Rewiring Shape to the uint8 tensor changes no value and leaves
    those DequantizeLinear nodes unused, so they are dropped. Returns the number
    of Shape nodes rewired.
    """
    _, producer, _ = _graph_index(model.graph)
    rewired = 0
    for node in model.graph.node:
        if node.op_type != "Shape":
            continue
        dq = producer.get(node.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            node.input[0] = dq.input[0]
            rewired += 1
    if rewired:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [
            n for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.output[0] not in used
        ]  # fmt: skip
        for n in dead:
            model.graph.node.remove(n)
    return rewired


def _fuse_gelu(model) -> int:
    """Fuse each exported erf-GELU (Div, Erf, Add, Mul, Mul) into one com.microsoft Gelu.

    ORT fuses the pattern at session creation in the fp32 graph, but not once
    Q/DQ pairs sit between its five ops: quantized, GELU would run as five
    kernels (float Div and Erf, integer Add and Muls) with a Q/DQ pair each.
    Fused first, the quantizer leaves Gelu alone (it has no integer kernel) and
    it runs once, in float, between one DequantizeLinear and one QuantizeLinear.
    The fusion is ORT's own, from its quantization tools. Returns the number of
    Gelu nodes.
    """
    from onnxruntime.quantization.fusions import FusionGelu
    from onnxruntime.quantization.onnx_model import ONNXModel

    FusionGelu(ONNXModel(model)).apply()
    return sum(n.op_type == "Gelu" for n in model.graph.node)


def _fold_attention_scales(model, score_matmuls: Sequence[str]) -> int:
    """Fold each attention's 1/sqrt(head size) into its query's dequantization scale.

    The exporter writes scores = (Q @ K^T) / c. With float scores, ORT runs the
    MatMul as MatMulIntegerToFloat, which multiplies its integer sums by the
    query's and key's scales; giving the query's DequantizeLinear scale/c yields
    the divided scores directly and drops a float Div over the largest tensor
    of the model (tokens x reduced tokens x heads). The fp32 graph gets the
    same from ORT (FusedMatMul's alpha); no QDQ fusion does it. Returns the
    number of Divs folded.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits, producer, consumers = _graph_index(graph)
    outputs = {o.name for o in graph.output}
    folded = 0
    for mm in [n for n in graph.node if n.name in set(score_matmuls)]:
        users = consumers.get(mm.output[0], [])
        if len(users) != 1 or users[0].op_type not in ("Div", "Mul"):
            continue
        scale_op = users[0]
        const = inits.get(scale_op.input[1])
        dq = producer.get(mm.input[0])
        if (
            const is None
            or numpy_helper.to_array(const).size != 1
            or scale_op.output[0] in outputs
            or dq is None
            or dq.op_type != "DequantizeLinear"
            or len(consumers.get(dq.output[0], [])) != 1
            or dq.input[1] not in inits
            or numpy_helper.to_array(inits[dq.input[1]]).size != 1
        ):
            continue
        c = float(numpy_helper.to_array(const).reshape(()))
        factor = 1.0 / c if scale_op.op_type == "Div" else c
        scale = numpy_helper.to_array(inits[dq.input[1]])
        new_scale = numpy_helper.from_array(
            (scale * factor).astype(scale.dtype), f"{dq.input[1]}/{mm.name}/scaled"
        )
        graph.initializer.append(new_scale)
        dq.input[1] = new_scale.name
        for user in consumers.get(scale_op.output[0], []):
            for k, name in enumerate(user.input):
                if name == scale_op.output[0]:
                    user.input[k] = mm.output[0]
        graph.node.remove(scale_op)
        folded += 1
    return folded


def _concat_inputs_share_output_params(model) -> int:
    """Quantize each input of a quantized Concat straight to the Concat's output parameters.

    ORT's QLinearConcat copies an input whose scale and zero point equal the
    output's, and otherwise remaps every byte through a lookup table, on one
    thread: SegFormer's decode head concatenates four 256-channel maps at a
    quarter of the image size, 4 ms of some 90 per 512x512 image on this CPU.
    When a QuantizeLinear -> DequantizeLinear pair only feeds the Concat, it can
    quantize with the output's parameters directly: the lookup table would map
    it there anyway, so this is one rounding instead of two. Returns the number
    of inputs changed.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits, producer, consumers = _graph_index(graph)

    def per_tensor(node) -> bool:
        return all(
            len(node.input) > k
            and node.input[k] in inits
            and numpy_helper.to_array(inits[node.input[k]]).size == 1
            for k in (1, 2)
        )

    changed = 0
    for concat in [n for n in graph.node if n.op_type == "Concat"]:
        users = consumers.get(concat.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or not per_tensor(users[0]):
            continue
        params = list(users[0].input[1:3])
        for name in concat.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None else None
            if (
                dq is None
                or dq.op_type != "DequantizeLinear"
                or q is None
                or q.op_type != "QuantizeLinear"
                or len(consumers.get(dq.output[0], [])) != 1
                or len(consumers.get(q.output[0], [])) != 1
                or not (per_tensor(dq) and per_tensor(q))
                or list(dq.input[1:3]) == params
            ):
                continue
            q.input[1:3] = params
            dq.input[1:3] = params
            changed += 1
    return changed


def _graph_index(graph) -> tuple[dict, dict, dict[str, list]]:
    """(initializers by name, the node producing each tensor, the nodes reading each tensor)."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return inits, producer, consumers


def _drop_unused_initializers(model) -> None:
    """Remove initializers no node reads any more (left behind by the edits above)."""
    used = {i for n in model.graph.node for i in n.input}
    used |= {v.name for v in (*model.graph.input, *model.graph.output)}
    dead = [i for i in model.graph.initializer if i.name not in used]
    for init in dead:
        model.graph.initializer.remove(init)


def _restore_io(source, quantized) -> None:
    """Put back the fp32 graph's input and output declarations.

    Symbolic shape inference (part of quant_pre_process) renames output dims, e.g.
    "height" becomes "floor(height/4 - 1/4) + 1" and "num_labels" a number; the
    int8 graph should declare exactly what the fp32 graph does.
    """
    for src_list, dst_list in (
        (source.graph.input, quantized.graph.input),
        (source.graph.output, quantized.graph.output),
    ):
        declared = {v.name: v for v in src_list}
        for v in dst_list:
            if v.name in declared:
                v.CopyFrom(declared[v.name])


def _check_same_io(source, quantized, where: Path) -> None:
    def io(model):
        inits = {i.name for i in model.graph.initializer}
        return (
            [
                (i.name, i.type.tensor_type.elem_type)
                for i in model.graph.input
                if i.name not in inits
            ],
            [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output],
        )

    if io(source) != io(quantized):
        raise RuntimeError(f"{where}: quantization changed the graph's inputs or outputs")
