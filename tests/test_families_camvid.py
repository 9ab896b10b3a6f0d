"""Three non-SegFormer families on real photos (CamVid), one per exporter route.

MobileNetV2 (Optimum's custom OnnxConfig), DPT (Optimum) and UPerNet on ConvNeXt
(torch's dynamo exporter), each from `scratch:<family>-tiny`: `segdeploy train` on
CamVid photos, `segdeploy export --quantize int8 --max-drop 0.01` (accuracy-aware
int8: float exclusions found by measured sensitivity) validated on CamVid val against
PyTorch (both graphs must pass), then `segdeploy infer` on val photos. Slow: about a minute and a half each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.cli import main
from segdeploy.families import FAMILIES

pytestmark = pytest.mark.slow

CASES = [
    ("mobilenet_v2", "tiny"),
    # Known failure, kept visible as xfail (not strict: on a CPU with VNNI the int8
    # kernels differ, and it may pass there; XPASS in the summary says so). Since int8 weights went to 7 bits (issue 22), the --max-drop
    # search reaches its measure (drop 0.0099, 99.5% pixel agreement with the fp32 graph
    # on held-out training images at the graph's output resolution), but validation's
    # label maps at image size agree with PyTorch on 98.6% (floor 99%): the search must
    # measure agreement as validation does.
    pytest.param(
        ("dpt", "tiny"),
        marks=pytest.mark.xfail(
            strict=False, reason="int8 --max-drop search passes, validation's pixel floor fails"
        ),
    ),
    ("upernet", "tiny"),
]
#: Per family: what validation measured, printed at the end of the module (-s).
MEASURED: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    for case, line in sorted(MEASURED.items()):
        print(f"\n{case}: {line}")


def _run(*args: str):
    return CliRunner().invoke(main, [*args])


@pytest.mark.parametrize("case", CASES, ids=["mobilenet_v2-tiny", "dpt-tiny", "upernet-tiny"])
def test_camvid_train_export_int8_validate_infer(case, camvid, tmp_path):
    model_type, size = case
    family = FAMILIES[model_type]
    model = tmp_path / "model"
    result = _run(
        "train", "--model", f"scratch:{family.scratch_name}-{size}", "--dataset", str(camvid),
        "--split", "train[:64]", "--eval-split", "val[:16]", "--image-size", "128",
        "--max-steps", "150", "--batch-size", "8", "--lr", "1e-3", "--eval-steps", "150",
        "--no-reduce-labels", "--ignore-index", "11", "-o", str(model),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["mean_iou"] > 0.1, metrics["mean_iou"]  # it learned something

    result = _run(
        "export", str(model), "--quantize", "int8", "--max-drop", "0.01",
        "--calibration-images", "16", "--max-images", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    onnx_dir = model / "onnx"
    for name in ("validation.json", "validation_int8.json"):
        report = json.loads((onnx_dir / name).read_text())
        assert report["passed"] is True and report["mode"] == "dataset", report["reason"]
        assert report["images"] == 16
    int8 = json.loads((onnx_dir / "validation_int8.json").read_text())
    assert abs(int8["mean_iou_torch"] - int8["mean_iou_onnx"]) <= 0.01
    # The search's own measure (1 - mean IoU of int8 against fp32 predictions on held-out
    # training images) is stricter than validation's; within its evaluation budget it may
    # stop above the limit, and then says so (reached: false, and a warning).
    search = json.loads((onnx_dir / "quantization_int8.json").read_text())["search"]
    assert search["final_drop"] <= search["starting_drop"]
    assert search["reached"] is (search["final_drop"] <= 0.01)
    MEASURED[f"{model_type}-{size}"] = (
        f"mean IoU torch {int8['mean_iou_torch']:.4f}, int8 {int8['mean_iou_onnx']:.4f} "
        f"(drop {int8['mean_iou_torch'] - int8['mean_iou_onnx']:+.4f}), int8 agreement "
        f"{int8['pixel_agreement']:.3%}, search drop {search['starting_drop']:.4f} -> "
        f"{search['final_drop']:.4f} ({search['evaluations']} evaluations), "
        f"kept in float: {sorted(search['kept_in_float'])}"
    )

    photos = sorted((camvid / "images" / "val").glob("*"))[:4]
    out = tmp_path / "masks"
    result = _run("infer", "--model", str(onnx_dir), "-o", str(out), *map(str, photos))
    assert result.exit_code == 0, result.output
    for photo in photos:
        with Image.open(photo) as im, Image.open(out / f"{Path(photo).stem}.png") as labels:
            assert labels.size == im.size
            assert int(np.asarray(labels).max()) < len(metrics["id2label"])
