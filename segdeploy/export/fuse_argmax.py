"""Fuse the bilinear upsampling and argmax of the logits into an exported graph.

On a GPU the logits (N x classes x H/4 x W/4, float) are much larger than the
label maps the user wants; with the upsampling and argmax inside the graph, the
device returns only N x H x W class ids. The result equals the numpy path
(`segdeploy.upsample_argmax`) up to floating-point ties, because ONNX Resize with
`half_pixel` coordinates is the same bilinear interpolation as torch's
`align_corners=False`.

The graph gains an input `output_size` (int64 [2]: height, width) and its output
`logits` is replaced by `labels` (uint8 when the classes fit, else int32).
Written with onnx.helper because no exporter offers this post-processing.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from segdeploy.atomic import atomic_path
from segdeploy.errors import SegdeployError
from segdeploy.folders import OUTPUT_SIZE_INPUT as OUTPUT_SIZE
from segdeploy.validate.graphs import graph_opset, load_graph

LABELS = "labels"


def fuse_argmax(src: str | os.PathLike, dst: str | os.PathLike, num_labels: int) -> Path:
    """Write to `dst` a copy of the graph at `src` that outputs label maps instead of logits."""
    src, dst = Path(src), Path(dst)
    model = load_graph(src, check=False)
    graph = model.graph
    outputs = [o.name for o in graph.output]
    if outputs != ["logits"]:
        raise SegdeployError(src, f"expected one output 'logits', found {outputs}")
    logits = graph.output[0]
    opset = graph_opset(model)
    if opset < 13:
        raise SegdeployError(src, f"opset {opset} is too old to fuse argmax (needs >= 13)")

    label_type = TensorProto.UINT8 if num_labels <= 256 else TensorProto.INT32
    graph.input.append(helper.make_tensor_value_info(OUTPUT_SIZE, TensorProto.INT64, [2]))
    graph.node.extend(
        [
            # sizes = shape(logits)[0:2] ++ output_size: keep batch and classes, resize H and W.
            helper.make_node("Shape", ["logits"], ["fuse/shape"], end=2),
            helper.make_node("Concat", ["fuse/shape", OUTPUT_SIZE], ["fuse/sizes"], axis=0),
            helper.make_node(
                "Resize",
                ["logits", "", "", "fuse/sizes"],
                ["fuse/upsampled"],
                mode="linear",
                coordinate_transformation_mode="half_pixel",
            ),
            helper.make_node("ArgMax", ["fuse/upsampled"], ["fuse/argmax"], axis=1, keepdims=0),
            helper.make_node("Cast", ["fuse/argmax"], [LABELS], to=label_type),
        ]
    )
    graph.output.remove(logits)
    graph.output.append(
        helper.make_tensor_value_info(LABELS, label_type, ["batch_size", "out_height", "out_width"])
    )
    onnx.checker.check_model(model)
    with atomic_path(dst) as tmp:
        onnx.save(model, tmp)
    return dst
