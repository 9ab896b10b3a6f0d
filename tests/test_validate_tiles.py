"""`segdeploy validate --tile`: PyTorch and the ONNX graph through the same sliding windows
(segdeploy.runtime.tiles), for SegFormer (dynamic axes) and a family exported at a fixed
size; a broken graph still fails."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner
from family_models import save_model_folder
from onnx import numpy_helper

from segdeploy.cli import main
from segdeploy.validate import ValidationSettings, validate_onnx

#: The issue's target: tiled ONNX label maps equal tiled PyTorch's on >= 99.9% of pixels.
FAITHFUL = 0.999


def test_segformer_tiled_onnx_equals_tiled_pytorch(tiny_model_dir, tiny_onnx_dir):
    settings = ValidationSettings(tile="48", stride="32", random_inputs=3)
    report = validate_onnx(tiny_onnx_dir / "model.onnx", tiny_model_dir, settings, write=False)
    assert report["tiles"] == {"tile": [48, 48], "stride": [32, 32], "blend": "mean", "windows": 48}
    assert report["pixel_agreement"] >= FAITHFUL
    assert report["rules"]["logits"]["passed"]  # every window's logits compared
    assert report["passed"], report["reason"]


def test_tiled_validation_on_labelled_data_from_the_command_line(
    tiny_model_dir, tiny_onnx_dir, synthetic_dir, tmp_path
):
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, onnx_dir)
    result = CliRunner().invoke(
        main,
        ["validate", str(onnx_dir), "--model", str(tiny_model_dir), "--dataset", str(synthetic_dir),
         "--split", "validation", "--tile", "40", "--overlap", "0.5", "--blend", "gaussian"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((onnx_dir / "validation.json").read_text())
    assert report["tiles"]["tile"] == [40, 40] and report["tiles"]["blend"] == "gaussian"
    assert report["mode"] == "dataset" and report["pixel_agreement"] >= FAITHFUL
    assert report["mean_iou_torch"] == pytest.approx(report["mean_iou_onnx"], abs=1e-3)


def test_a_broken_graph_fails_tiled_validation(tiny_model_dir, tiny_onnx_dir, tmp_path):
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, onnx_dir)
    model = onnx.load(onnx_dir / "model.onnx")
    init = next(i for i in model.graph.initializer if i.name == "decode_head.classifier.weight")
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, onnx_dir / "model.onnx")
    report = validate_onnx(
        onnx_dir / "model.onnx", tiny_model_dir, ValidationSettings(tile="auto"), write=False
    )
    assert not report["passed"] and report["pixel_agreement"] < 0.9


def test_fixed_size_family_tiles_at_its_size(tmp_path):
    """MobileNetV2 (DeepLabV3) is exported with fixed axes (TF 'same' padding): its tiles are
    its 64x64 input, windows smaller than that (an image smaller than a tile) are padded."""
    model_dir = save_model_folder(tmp_path / "mnv2", "mobilenet_v2", "tiny")
    result = CliRunner().invoke(main, ["export", str(model_dir), "--no-validate"])
    assert result.exit_code == 0, result.output
    onnx_path = model_dir / "onnx" / "model.onnx"
    report = validate_onnx(
        onnx_path, model_dir, ValidationSettings(tile="auto", random_inputs=2), write=False
    )
    assert report["tiles"]["tile"] == [64, 64] and report["tiles"]["windows"] == 2 * 16
    assert report["pixel_agreement"] >= FAITHFUL and report["passed"], report["reason"]
    wrong = ValidationSettings(tile="48", random_inputs=1)
    from segdeploy.errors import SegdeployError

    with pytest.raises(SegdeployError, match="takes only 64x64"):
        validate_onnx(onnx_path, model_dir, wrong, write=False)
