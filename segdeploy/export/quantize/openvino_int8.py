"""int8 for OpenVINO: NNCF's post-training quantization of the fp32 graph, saved as OpenVINO IR.

`segdeploy export --quantize int8 --int8-engine openvino` writes
`model_openvino_int8.xml` (+ `.bin`) beside the ONNX graphs, which
`segdeploy infer --provider openvino --variant openvino_int8` runs; export
validates it against PyTorch like every other graph (validation_openvino_int8.json).

Everything numerical is NNCF's own: `nncf.quantize` (calibration on the images
segdeploy's onnxruntime int8 calibrates on, preprocessed by the deployment
processor), or with `--max-drop` its accuracy-control variant
`nncf.quantize_with_accuracy_control`, which keeps the layers that hurt most in
float until the drop is within the limit. The drop is measured as the onnxruntime
search measures it (segdeploy.export.quantize.search): 1 - mean IoU of the int8
predictions against the fp32 graph's, on held-out training images, so that
`--max-drop` means the same limit for both engines.

NNCF's `transformer` model type (its patterns for attention blocks, e.g. the
Softmax and the MatMuls around it left as they are) is used for graphs that have
attention (a Softmax); CNN graphs get NNCF's default.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError
from segdeploy.folders import read_config

log = logging.getLogger(__name__)

#: Training images (besides the calibration ones) that accuracy control measures on, as
#: the onnxruntime search does.
DEFAULT_HELD_OUT_IMAGES = 16


def save_ir(model, xml: Path) -> Path:
    """Save an ov.Model as IR `xml` (+ .bin) atomically: written under temporary names
    beside it and renamed, .bin before .xml, so a reader that finds the .xml finds a
    complete model. fp32 weights are kept as they are (compress_to_fp16=False)."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".tmp-") as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(model, os.fspath(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp_xml, xml)
    return xml


def has_attention(model) -> bool:
    return any(op.get_type_name() == "Softmax" for op in model.get_ops())


def nncf_quantize(model, batches: Sequence[np.ndarray]):
    """`nncf.quantize` of an ov.Model on preprocessed batches ([N, 3, h, w] float32)."""
    import nncf

    return nncf.quantize(
        model,
        nncf.Dataset(list(batches)),
        model_type=nncf.ModelType.TRANSFORMER if has_attention(model) else None,
        subset_size=sum(int(b.shape[0]) for b in batches),
    )


def _miou_against(reference: Sequence[np.ndarray], num_labels: int):
    """NNCF's validation_fn: mean IoU of a compiled model's argmax against `reference`
    (the fp32 graph's predictions), over items (index, pixels) of the held-out set."""
    from segdeploy.train.metrics import MeanIoU

    def validate(compiled, items) -> float:
        metric = MeanIoU(num_labels, ignore_index=-1)
        for index, pixels in items:
            logits = compiled(pixels)[0]
            metric.update(np.asarray(logits).argmax(1).astype(np.int32), reference[index])
        return float(metric.compute()["mean_iou"])

    return validate


def nncf_quantize_within(
    model,
    onnx_path: Path,
    batches: Sequence[np.ndarray],
    held_out: Sequence[np.ndarray],
    max_drop: float,
    num_labels: int,
):
    """`nncf.quantize_with_accuracy_control`: the drop (1 - mean IoU against the fp32
    graph's predictions on `held_out`) kept within `max_drop`, absolute."""
    import nncf

    from segdeploy.export.quantize.search import predictions

    reference = predictions(onnx_path, held_out)
    items = list(enumerate(held_out))
    return nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(list(batches)),
        nncf.Dataset(items, lambda item: item[1]),
        validation_fn=_miou_against(reference, num_labels),
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        model_type=nncf.ModelType.TRANSFORMER if has_attention(model) else None,
        subset_size=sum(int(b.shape[0]) for b in batches),
    )


def quantize_openvino_int8(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    model_dir: str | os.PathLike,
    calibration_images: int,
    *,
    max_drop: float | None = None,
    held_out: int = DEFAULT_HELD_OUT_IMAGES,
) -> dict[str, Any]:
    """Write NNCF's int8 of the fp32 graph `onnx_path` as OpenVINO IR `output` (.xml);
    return the report (quantization_openvino_int8.json): settings, what NNCF did, timings.

    Calibrates on `calibration_images` images of the training split `segdeploy train`
    recorded in `model_dir` (the images onnxruntime's int8 calibrates on); with
    `max_drop`, accuracy control measures on `held_out` other training images.
    """
    import nncf
    import openvino as ov

    from segdeploy.export.quantize import calibration_batches, training_images
    from segdeploy.export.quantize.search import held_out_images
    from segdeploy.runtime.processors import model_processor

    start = time.perf_counter()
    onnx_path, output = Path(onnx_path), Path(output)
    preprocess = model_processor(model_dir).pixel_values
    images = training_images(model_dir, calibration_images)
    batches = list(calibration_batches(images, preprocess))
    model = ov.Core().read_model(os.fspath(onnx_path))
    attention = has_attention(model)
    held: list[np.ndarray] = []
    if max_drop is None:
        quantized = nncf_quantize(model, batches)
    else:
        held_images, _ = held_out_images(model_dir, images, held_out)
        if not held_images:
            raise SegdeployError(
                model_dir, "--max-drop needs training images beyond the calibration images"
            )
        held = list(calibration_batches(held_images, preprocess, batch_size=4))
        num_labels = len(read_config(Path(model_dir))["id2label"])
        quantized = nncf_quantize_within(model, onnx_path, batches, held, max_drop, num_labels)
    save_ir(quantized, output)
    ops = [op.get_type_name() for op in quantized.get_ops()]
    return {
        "engine": "nncf",
        "source": str(onnx_path),
        "output": str(output),
        "format": "OpenVINO IR, FakeQuantize (NNCF)",
        "method": "nncf.quantize_with_accuracy_control"
        if max_drop is not None
        else "nncf.quantize",
        "model_type": "transformer" if attention else "default",
        "preset": "nncf's default for the model type (mixed for transformer, else performance)",
        "calibration_images": sum(int(b.shape[0]) for b in batches),
        "max_drop": max_drop,
        "drop_measure": (
            "1 - mean IoU of int8 against the fp32 graph's predictions on held-out training "
            "images (absolute)"
            if max_drop is not None
            else None
        ),
        "held_out_images": sum(int(b.shape[0]) for b in held),
        "fake_quantize": ops.count("FakeQuantize"),
        "versions": {"nncf": nncf.__version__, "openvino": ov.__version__},
        "size_bytes": {
            "fp32": onnx_path.stat().st_size,
            "int8": output.stat().st_size + output.with_suffix(".bin").stat().st_size,
        },
        "seconds": round(time.perf_counter() - start, 2),
    }
