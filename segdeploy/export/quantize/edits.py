"""The graph edits around onnxruntime's quantizer, each where ORT's tools leave a gap.

Before quantizing: private float initializers (`unshare_float_initializers`) and
GELU fused by ORT's own FusionGelu (`fuse_gelu`). After: Shape nodes read the
quantized tensors (`shapes_from_quantized`), the attention scale is folded into
the query's dequantization (`fold_attention_scales`), Concat inputs are quantized
straight to the Concat's parameters (`concat_inputs_share_output_params`), unused
initializers dropped and the fp32 graph's input/output declarations restored.
Each is explained where it is done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path


def unshare_float_initializers(model) -> int:
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


def attention_score_matmuls(model) -> list[str]:
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


def shapes_from_quantized(model) -> int:
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


def fuse_gelu(model) -> int:
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


def fold_attention_scales(model, score_matmuls: Sequence[str]) -> int:
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


def concat_inputs_share_output_params(model) -> int:
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


def drop_unused_initializers(model) -> None:
    """Remove initializers no node reads any more (left behind by the edits above)."""
    used = {i for n in model.graph.node for i in n.input}
    used |= {v.name for v in (*model.graph.input, *model.graph.output)}
    dead = [i for i in model.graph.initializer if i.name not in used]
    for init in dead:
        model.graph.initializer.remove(init)


def restore_io(source, quantized) -> None:
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


def check_same_io(source, quantized, where: Path) -> None:
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
