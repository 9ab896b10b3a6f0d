"""Graphs derived from the fp32 export: fp16 and onnxruntime-optimised (int8 and fused
argmax have their own modules: quantize/ and fuse_argmax.py)."""

from __future__ import annotations

import os
from pathlib import Path


def convert_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and compute, fp32 inputs and outputs (Cast nodes at the edges).

    onnxruntime's own converter; it appends the edge Casts at the end of the node
    list, so the graph is topologically re-sorted before the checker sees it.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    sorted_model = OnnxModel(model)
    sorted_model.topological_sort()
    model = sorted_model.model
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    return dst


def optimize_graph(src: Path, dst: Path) -> Path:
    """onnxruntime's graph optimisations (level EXTENDED, CPU) saved as a graph.

    EXTENDED fuses ops (FusedMatMul, ...) into com.microsoft contrib ops that both
    the CPU and CUDA providers run; level ALL would add CPU-only layout changes.
    onnxruntime.transformers' optimizer was not used: it knows BERT-like models,
    not SegFormer.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = os.fspath(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(os.fspath(src), opts, providers=["CPUExecutionProvider"])
    if not dst.is_file():
        raise RuntimeError(f"onnxruntime wrote no optimised graph at {dst}")
    return dst
