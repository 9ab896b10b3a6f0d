"""The two sides of a comparison, opened and checked: the PyTorch model folder and ONNX graphs."""

from __future__ import annotations

import os
from pathlib import Path

from segdeploy.errors import SegdeployError, first_line
from segdeploy.families import family_of
from segdeploy.folders import ModelFolder

INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
}


def open_model(model_dir: str | os.PathLike, *, need_weights: bool = True) -> ModelFolder:
    """A model folder segdeploy can export and compare with; SegdeployError otherwise.

    With `need_weights`, every weight file is checked too: truncated or garbage
    weights are named now, not as a library error half-way through.
    """
    from segdeploy.train.models import check_weight_file

    folder = ModelFolder.open(model_dir, need_weights=False)
    family_of(folder.config, where=folder.config_path)  # a one-line refusal for other families
    if need_weights:
        folder.require_weights()
        for path in folder.weight_files:
            check_weight_file(path)
        check_config_fits_weights(folder)
    return folder


def check_config_fits_weights(folder: ModelFolder) -> None:
    """SegdeployError naming config.json when the model it describes cannot hold the weights
    (another class count, other sizes): transformers would say so only after building the
    model, in a page-long RuntimeError.

    The model is built on torch's meta device (shapes only, no memory) and compared with
    the tensor shapes in the safetensors headers; pickled weights are not read here.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    files = [p for p in folder.weight_files if p.suffix == ".safetensors"]
    index = folder.path / "model.safetensors.index.json"
    if index in folder.weight_files:  # sharded: the shards the index names
        import json

        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        files += [folder.path / name for name in sorted(shards)]
    if not files:
        return
    config = AutoConfig.from_pretrained(folder.path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForSemanticSegmentation.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                want = expected.get(name)
                have = tuple(f.get_slice(name).get_shape())
                if want is not None and want != have:
                    raise SegdeployError(
                        folder.config_path,
                        f"does not fit the weights: {path.name} holds {name} of shape "
                        f"{list(have)}, the model this config.json describes "
                        f"({folder.num_labels} classes) needs {list(want)}",
                    )


def load_graph(onnx_path: str | os.PathLike, *, check: bool = True, external_data: bool = True):
    """The ONNX model, checked by onnx's checker; SegdeployError when missing or corrupt.

    The one ONNX loader of export and validation. `check=False` skips onnx's
    checker (for graphs segdeploy has just written itself); `external_data=False`
    leaves large weights on disk when only the structure is read.
    """
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise SegdeployError(
            onnx_path, "missing: no such ONNX graph (run `segdeploy export` first)"
        )
    try:
        model = onnx.load(os.fspath(onnx_path), load_external_data=external_data)
        if check:
            onnx.checker.check_model(model)
    except Exception as err:  # onnx raises DecodeError, ValidationError, OSError...
        problem = "not a valid ONNX graph" if check else "not a readable ONNX graph"
        raise SegdeployError(onnx_path, f"{problem}: {first_line(err)}") from err
    return model


def graph_precision(model) -> str:
    """'int8' when quantised, 'fp16' when it holds float16 weights, else 'fp32'."""
    from onnx import TensorProto

    if any(node.op_type in INT8_OPS for node in model.graph.node):
        return "int8"
    if any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer):
        return "fp16"
    return "fp32"


def graph_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def inspect(path: str | os.PathLike) -> tuple[Path, str, int | None]:
    """(path, precision, opset) of a graph, which is loaded and checked; an OpenVINO IR
    (export's model_openvino_int8.xml) has no opset."""
    from segdeploy.runtime.openvino_runner import ir_precision, is_ir

    if is_ir(path):
        return Path(path), ir_precision(path), None
    model = load_graph(path)
    return Path(path), graph_precision(model), graph_opset(model)
