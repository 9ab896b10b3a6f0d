"""`segdeploy export --quantize int8 --max-drop`: measured float exclusions (segdeploy.export.quantize.search)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from segdeploy.cli import main
from segdeploy.errors import SegdeployError
from segdeploy.export.quantize.search import candidate_groups, drop_against, quantize_int8_within


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with its decode head re-initialised 8x larger, so that its
    predictions vary across the image (int8 then has something to get wrong), with
    its training data recorded for calibration, and exported."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import SegformerForSemanticSegmentation

    from segdeploy.data import DatasetSpec

    out = tmp_path_factory.mktemp("sharp") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = SegformerForSemanticSegmentation.from_pretrained(out).eval()
    with torch.no_grad():
        for p in model.decode_head.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    model.save_pretrained(out)
    spec = DatasetSpec("synthetic:64", split="train[:24]", eval_split="validation[:4]")
    (out / "train_args.json").write_text(json.dumps({"dataset": spec.to_dict()}))
    main_export(str(out), output=out / "fp32", task="semantic-segmentation", opset=17)
    return out


def test_drop_is_zero_for_identical_and_grows_with_disagreement():
    ref = [np.array([[0, 0, 1, 1], [2, 2, 1, 1]])]
    assert drop_against(ref, ref, 3) == 0.0
    worse = [np.array([[0, 1, 1, 1], [2, 2, 1, 1]])]
    worst = [np.array([[1, 1, 1, 1], [2, 1, 1, 1]])]
    assert 0 < drop_against(ref, worse, 3) < drop_against(ref, worst, 3) <= 1


def test_groups_cover_the_quantizable_nodes_within_the_bound(sharp_model):
    from segdeploy.export.quantize import DEFAULT_FLOAT_OP_TYPES, _quantizable_op_types

    onnx_path = sharp_model / "fp32" / "model.onnx"
    groups = candidate_groups(onnx_path, _quantizable_op_types(), DEFAULT_FLOAT_OP_TYPES, 6)
    assert 1 < len(groups) <= 6
    names = [n for members in groups.values() for n in members]
    assert len(names) == len(set(names))  # each node in one group
    import onnx

    ops = {n.name: n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert not {ops[n] for n in names} & set(DEFAULT_FLOAT_OP_TYPES)
    assert {"Conv", "MatMul"} <= {ops[n] for n in names}


# Slow (about 100 s on 2 cores: the search tries every group since int8 weights went to
# 7 bits); CI runs it with the slow tests.
@pytest.mark.slow
def test_tighter_limit_keeps_more_in_float_and_passes_validation(sharp_model, tmp_path):
    fp32 = sharp_model / "fp32" / "model.onnx"
    loose = quantize_int8_within(fp32, tmp_path / "loose.onnx", sharp_model, 4, 1.0)["search"]
    assert loose["reached"] and loose["nodes_kept_in_float"] == [] and loose["evaluations"] == 2

    result = CliRunner().invoke(
        main,
        ["export", str(sharp_model), "--quantize", "int8", "--calibration-images", "4",
         "--max-drop", "0.02"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output  # validation (int8 included) passed
    onnx_dir = sharp_model / "onnx"
    assert json.loads((onnx_dir / "validation_int8.json").read_text())["passed"]
    report = json.loads((onnx_dir / "quantization_int8.json").read_text())
    tight = report["search"]
    assert tight["starting_drop"] > 0.02  # the limit made the search work
    assert len(tight["nodes_kept_in_float"]) > len(loose["nodes_kept_in_float"])
    assert tight["final_drop"] < tight["starting_drop"]
    assert tight["reached"] == (tight["final_drop"] <= 0.02)
    assert tight["evaluations"] <= tight["max_evaluations"]
    # Every group kept in float is there because of a measured gain.
    assert tight["kept_in_float"] and all(
        "measured" in why for why in tight["kept_in_float"].values()
    )
    assert set(tight["nodes_kept_in_float"]) == set(report["float_nodes"]["by_name"])


def test_max_drop_needs_int8_and_a_sane_limit(sharp_model, tmp_path):
    result = CliRunner().invoke(main, ["export", str(sharp_model), "--max-drop", "0.01"])
    assert result.exit_code == 2 and "--quantize int8" in result.output
    result = CliRunner().invoke(
        main, ["export", str(sharp_model), "--quantize", "int8", "--max-drop", "2"]
    )
    assert result.exit_code == 2
    with pytest.raises(SegdeployError, match="max-drop"):
        quantize_int8_within(
            sharp_model / "fp32" / "model.onnx", tmp_path / "x.onnx", sharp_model, 4, -0.1
        )


def test_dynamo_graphs_are_grouped_by_module_scope(tmp_path):
    """torch's dynamo exporter names nodes node_conv2d_1: the search groups them by the
    module scopes it records in each node's metadata, not by op type (which would put every
    Conv of the model in one group, all kept in float or none)."""
    from family_models import save_model_folder

    from segdeploy.export.quantize import DEFAULT_FLOAT_OP_TYPES, _quantizable_op_types
    from segdeploy.export.routes import export_fp32

    model = save_model_folder(tmp_path / "model", "beit", "tiny")
    onnx_path = export_fp32(model, tmp_path / "onnx")
    groups = candidate_groups(onnx_path, _quantizable_op_types(), DEFAULT_FLOAT_OP_TYPES, 8)
    assert 1 < len(groups) <= 8
    assert all(name.startswith("/model") for name in groups), sorted(groups)
    assert any("/encoder" in name for name in groups) and any("head" in name for name in groups)
