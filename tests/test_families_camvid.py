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
    # DPT's int8 --max-drop export failed validation's pixel floor while its search had
    # reached its limit (drop 0.0099 and 99.5% agreement at the graph's output resolution,
    # validation 98.606% at image size < 99%): the search now judges candidates as
    # validation does (label maps at image size, drop and pixel floor), and int8 weights
    # are 8-bit uint8 again instead of 7-bit int8.
    ("dpt", "tiny"),
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
    # The search judges candidates as validation does (label maps at image size, the drop
    # and the pixel floor) but against the fp32 graph on held-out training images; within
    # its evaluation budget it may stop short, and then says so (reached: false, and a
    # warning).
    search = json.loads((onnx_dir / "quantization_int8.json").read_text())["search"]
    floor = search["min_agreement"]

    def shortfall(drop: float, agreement: float) -> float:  # how far from both rules
        return max(0.0, drop - 0.01) + max(0.0, floor - agreement)

    assert shortfall(search["final_drop"], search["final_agreement"]) <= shortfall(
        search["starting_drop"], search["starting_agreement"]
    )
    assert search["reached"] is (
        search["final_drop"] <= 0.01 and search["final_agreement"] >= search["min_agreement"]
    )
    MEASURED[f"{model_type}-{size}"] = (
        f"mean IoU torch {int8['mean_iou_torch']:.4f}, int8 {int8['mean_iou_onnx']:.4f} "
        f"(drop {int8['mean_iou_torch'] - int8['mean_iou_onnx']:+.4f}), int8 agreement "
        f"{int8['pixel_agreement']:.3%}, search drop {search['starting_drop']:.4f} -> "
        f"{search['final_drop']:.4f}, agreement {search['starting_agreement']:.3%} -> "
        f"{search['final_agreement']:.3%} ({search['evaluations']} evaluations), "
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
