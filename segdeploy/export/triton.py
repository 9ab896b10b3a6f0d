"""`segdeploy export --triton-repo DIR`: the exported graph as a Triton model repository.

For GPU users who run NVIDIA Triton itself (MMDeploy, Ultralytics and TAO document
the same layout):

    DIR/NAME/config.pbtxt          onnxruntime backend, dynamic batching, TensorRT fp16
    DIR/NAME/1/model.onnx          the fp32 graph, as exported
    DIR/NAME/preprocessing.md      what a client does before and after the model
    DIR/NAME/config.json, preprocessor_config.json   the model's classes and processor

Inputs and outputs in config.pbtxt are read from the graph (names, element types,
dimensions; -1 where the graph's axis is dynamic). The TensorRT accelerator
builds fp16 engines and caches them, so a restart of Triton does not rebuild them.
The folder is written beside its final place and moved there whole; a folder
of that name that segdeploy did not write is refused, not replaced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from segdeploy.atomic import atomic_dir
from segdeploy.errors import SegdeployError
from segdeploy.folders import CONFIG_FILE, PREPROCESSOR_FILE, OnnxFolder, read_json

#: The first line of every config.pbtxt written here: how a later export knows the folder.
MARKER = "# written by segdeploy export --triton-repo"
#: ONNX TensorProto element types -> Triton's data types.
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 10: "TYPE_FP16"}
DEFAULT_MAX_BATCH = 8
#: How long Triton may hold a request to fill a batch (microseconds).
QUEUE_DELAY_US = 2000


def _tensors(graph) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the graph: name, Triton type, dims with the batch axis."""

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in TRITON_TYPES:
                raise SegdeployError(v.name, f"ONNX element type {t.elem_type} has no Triton type")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "type": TRITON_TYPES[t.elem_type], "dims": dims})
        return out

    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    return describe(inputs), describe(graph.output)


def _tensor_block(kind: str, tensors: list[dict], batched: bool) -> str:
    items = []
    for t in tensors:
        dims = t["dims"][1:] if batched else t["dims"]
        items.append(
            f'  {{\n    name: "{t["name"]}"\n    data_type: {t["type"]}\n'
            f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"
        )
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def config_pbtxt(name: str, inputs: list[dict], outputs: list[dict], max_batch_size: int) -> str:
    """Triton's model configuration (protobuf text format) for the graph's tensors.

    Written as text here: Triton's ModelConfig protobuf comes with tritonclient, which
    export does not need; the tests parse this text with that protobuf.
    """
    batched = max_batch_size > 0
    return (
        f"{MARKER}\n"
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        + _tensor_block("input", inputs, batched)
        + _tensor_block("output", outputs, batched)
        + (
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
            if batched
            else ""
        )
        + "instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]\n"
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
        "      {\n"
        '        name: "tensorrt"\n'
        '        parameters { key: "precision_mode" value: "FP16" }\n'
        '        parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
        '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
        f'        parameters {{ key: "trt_engine_cache_path" value: "/tmp/triton_trt_cache/{name}" }}\n'
        "      }\n    ]\n  }\n}\n"
    )


def preprocessing_text(name: str, processor: dict[str, Any], inputs, outputs, classes) -> str:
    """preprocessing.md: the client's side of the model, from preprocessor_config.json."""
    keys = (
        "image_processor_type", "do_resize", "size", "resample", "do_center_crop", "crop_size",
        "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
        "do_flip_channel_order", "do_pad", "size_divisor", "keep_aspect_ratio",
    )  # fmt: skip
    settings = "\n".join(
        f"| `{k}` | `{json.dumps(processor[k])}` |" for k in keys if k in processor
    )
    tensor_in, tensor_out = inputs[0], outputs[0]
    return f"""# {name}: what a Triton client does

The graph takes `{tensor_in["name"]}`, {tensor_in["type"]} `[batch, {", ".join(map(str, tensor_in["dims"][1:]))}]`
(-1: any size), and returns `{tensor_out["name"]}`, {tensor_out["type"]}
`[batch, {", ".join(map(str, tensor_out["dims"][1:]))}]`: per-class scores at a fraction of the
input's size ({classes} classes, names in `config.json`'s `id2label`).

## Before the model: the image processor of `preprocessor_config.json`

| setting | value |
|---|---|
{settings}

In order: decode the file to 8-bit RGB (apply the EXIF orientation; drop alpha);
resize to `size` with `resample` (Pillow's code: 2 = bilinear, 3 = bicubic); if
`do_center_crop`, crop `crop_size` from the center; multiply by `rescale_factor`
(1/255); subtract `image_mean` and divide by `image_std` per channel; lay out as
channels first (3, H, W) float32 and stack the images into a batch. For a processor
that resizes to a fixed size (SegFormer):

```python
import numpy as np
from PIL import Image

cfg = json.load(open("preprocessor_config.json"))
h, w = cfg["size"]["height"], cfg["size"]["width"]
image = Image.open(path).convert("RGB")
x = np.asarray(image.resize((w, h), resample=cfg["resample"]), np.float32) * cfg["rescale_factor"]
x = (x - cfg["image_mean"]) / cfg["image_std"]
batch = x.transpose(2, 0, 1)[None].astype(np.float32)   # [1, 3, h, w]
```

`segdeploy.runtime.processors` reproduces every family's processor without torch.

## After the model

Resize the scores bilinearly (half-pixel centers, `align_corners=False`) to the photo's
own height and width, then take the argmax over the class axis: one class id per pixel.
`segdeploy infer` and `segdeploy serve` do exactly this
(`segdeploy.runtime.upsample.upsample_argmax`).
"""


def _external_data(model) -> set[str]:
    """Files beside the graph that hold its weights (graphs over 2 GB), by their names."""
    from onnx import TensorProto

    return {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _check_target(target: Path) -> None:
    if not target.exists():
        return
    config = target / "config.pbtxt"
    ours = config.is_file() and config.read_text(errors="replace").startswith(MARKER)
    if not ours:
        raise SegdeployError(
            target,
            "exists and was not written by segdeploy export --triton-repo: remove it or "
            "choose another --triton-repo",
        )


def write_triton_repo(
    onnx_dir: str | Path,
    repo: str | Path,
    *,
    name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
) -> Path:
    """Write REPO/NAME (see the module's docstring) from an ONNX folder; its path.

    `name`: the model's name in Triton (default: the trained model folder's name).
    `max_batch_size`: the largest batch Triton forms; 0 when the graph's batch axis is
    fixed (then Triton does not batch).
    """
    import onnx

    folder = OnnxFolder.open(onnx_dir)
    graph_file = folder.graph("fp32")
    model = onnx.load(str(graph_file), load_external_data=False)
    inputs, outputs = _tensors(model.graph)
    if any(t["dims"][:1] != [-1] for t in inputs + outputs):
        max_batch_size = 0  # a fixed batch axis: Triton passes requests as they are
    if name is None:
        name = (folder.model_folder or folder.path.resolve()).name
    if not name or "/" in name or name.startswith("."):
        raise SegdeployError("--triton-repo", f"not a usable model name: {name!r}")
    target = Path(repo) / name
    _check_target(target)
    processor = read_json(folder.path / PREPROCESSOR_FILE) or {}
    config = read_json(folder.path / CONFIG_FILE) or {}
    classes = len(config.get("id2label") or {}) or "the graph's"
    with atomic_dir(target) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(graph_file, tmp / "1" / "model.onnx")
        for location in _external_data(model):  # weights kept beside a graph over 2 GB
            shutil.copyfile(graph_file.parent / location, tmp / "1" / location)
        for extra in (CONFIG_FILE, PREPROCESSOR_FILE):
            if (folder.path / extra).is_file():
                shutil.copyfile(folder.path / extra, tmp / extra)
        (tmp / "config.pbtxt").write_text(config_pbtxt(name, inputs, outputs, max_batch_size))
        (tmp / "preprocessing.md").write_text(
            preprocessing_text(name, processor, inputs, outputs, classes)
        )
    return target
