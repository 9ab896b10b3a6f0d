"""`segdeploy export --quantize int8 --max-drop`: measured float exclusions (segdeploy.export.quantize.search)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from segdeploy.cli import main
from segdeploy.errors import SegdeployError
from segdeploy.export.quantize.search import (
    HeldOut,
    Measure,
    candidate_groups,
    drop_against,
    label_maps,
    quantize_int8_within,
)


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


def test_a_graph_passes_only_when_it_passes_both_of_validations_rules():
    """Validation fails an int8 graph below the pixel floor whatever its mean IoU drop; so
    does the search (before, it judged the drop alone and returned a DPT graph with drop
    0.0099 that validation failed at 98.6% agreement)."""
    within = Measure(drop=0.0099, agreement=0.995, max_drop=0.01, min_agreement=0.99)
    assert within.passes and within.shortfall == 0.0
    low = Measure(drop=0.0099, agreement=0.986, max_drop=0.01, min_agreement=0.99)
    assert not low.passes and low.shortfall == pytest.approx(0.004)
    both = Measure(drop=0.03, agreement=0.986, max_drop=0.01, min_agreement=0.99)
    assert both.shortfall == pytest.approx(0.024) and both.shortfall > low.shortfall


def test_label_maps_are_validations_at_each_images_size(tiny_onnx_dir):
    """The search compares label maps at image size through validation's own
    post-processing, not argmaxes at the graph's output resolution."""
    import onnxruntime as ort

    from segdeploy.validate.compare import upsample_argmax

    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, 3, 64, 64)).astype(np.float32)]
    sizes = [(37, 53), (90, 120)]
    maps = label_maps(tiny_onnx_dir / "model.onnx", HeldOut(batches, sizes))
    assert [m.shape for m in maps] == sizes
    logits = ort.InferenceSession(str(tiny_onnx_dir / "model.onnx")).run(
        None, {"pixel_values": batches[0]}
    )[0]
    assert logits.shape[-1] != 53  # the output is not at image size: maps were upsampled
    for got, one, size in zip(maps, logits, sizes, strict=True):
        assert np.array_equal(got, upsample_argmax(one, size))
    with pytest.raises(ValueError, match="per held-out image"):
        HeldOut(batches, sizes[:1])


@pytest.mark.slow
def test_search_keeps_nodes_in_float_for_the_agreement_floor(sharp_model, tmp_path):
    """With no limit on the drop, a pixel floor above the graph's agreement still makes the
    search keep groups in float until the agreement rises (the old search, judging the
    drop alone, stopped at once with nothing in float)."""
    fp32 = sharp_model / "fp32" / "model.onnx"
    free = quantize_int8_within(
        fp32, tmp_path / "free.onnx", sharp_model, 4, 1.0, min_agreement=0.0
    )["search"]
    assert free["reached"] and free["nodes_kept_in_float"] == []
    start = free["final_agreement"]
    assert start < 0.999  # int8 changes some labels of the sharp model
    floor = start + (1 - start) / 2
    held = quantize_int8_within(
        fp32, tmp_path / "held.onnx", sharp_model, 4, 1.0, min_agreement=floor,
        max_groups=4, max_evaluations=8,
    )["search"]  # fmt: skip
    assert held["min_agreement"] == floor and held["starting_agreement"] == start
    assert held["nodes_kept_in_float"] and held["final_agreement"] > start
    assert held["reached"] == (held["final_agreement"] >= floor)


def test_held_out_images_are_unseen_by_the_model_when_it_trained_on_a_slice(sharp_model, tmp_path):
    """The sharp model trained on train[:24]: the search measures on other rows of train
    (images the model never saw, as validation's), not on its training images."""
    import shutil

    from segdeploy.data import DatasetSpec
    from segdeploy.export.quantize import training_images
    from segdeploy.export.quantize.search import held_out_images

    trained_on = {np.asarray(im).tobytes() for im in training_images(sharp_model, 24)}
    held, what = held_out_images(sharp_model, [], 6)
    assert len(held) == 6 and "not trained on" in what
    assert not {np.asarray(im).tobytes() for im in held} & trained_on

    # Trained on the whole split: no unseen rows, so held-out training images, said so.
    whole = tmp_path / "whole"
    shutil.copytree(sharp_model, whole)
    spec = DatasetSpec("synthetic:64", split="train", eval_split="validation[:4]")
    (whole / "train_args.json").write_text(json.dumps({"dataset": spec.to_dict()}))
    calibration = training_images(whole, 4)
    held, what = held_out_images(whole, calibration, 6)
    assert len(held) == 6 and what.startswith("training images")
    assert not {np.asarray(im).tobytes() for im in held} & {
        np.asarray(im).tobytes() for im in calibration
    }


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
    loose = quantize_int8_within(
        fp32, tmp_path / "loose.onnx", sharp_model, 4, 1.0, min_agreement=0.0
    )["search"]
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
    assert tight["min_agreement"] == 0.99  # validation's int8 floor
    assert tight["reached"] == (
        tight["final_drop"] <= 0.02 and tight["final_agreement"] >= tight["min_agreement"]
    )
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
