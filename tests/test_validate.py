"""`segdeploy validate` and the validation core: faithful graphs pass, broken ones fail."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import onnx
import pytest
from cli_checks import one_line_error
from click.testing import CliRunner
from onnx import numpy_helper

from segdeploy.cli import main
from segdeploy.data import DatasetSpec
from segdeploy.errors import SegdeployError
from segdeploy.validate import (
    load_validation_data,
    resolve_dataset,
    upsample_argmax,
    validate_onnx,
    validation_path,
)

RECORDED = DatasetSpec("synthetic:64", split="validation[:6]", eval_split="validation[:6]")


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model as `segdeploy train` leaves it: with train_args.json naming its data,
    exported by `segdeploy export` to the default MODEL_DIR/onnx."""
    model_dir = tmp_path_factory.mktemp("trained") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "train_args.json").write_text(
        json.dumps({"model": "scratch:tiny", "dataset": RECORDED.to_dict(), "image_size": 64})
    )
    result = CliRunner().invoke(main, ["export", str(model_dir)])
    assert result.exit_code == 0, result.output
    return model_dir


def _validate(*args):
    return CliRunner().invoke(main, ["validate", *map(str, args)])


def _break(onnx_dir, name="decode_head.classifier.weight"):
    """Flip the sign of one weight: the graph still loads and runs, but segments wrongly."""
    path = onnx_dir / "model.onnx"
    model = onnx.load(path)
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), name))
    onnx.save(model, path)


def test_export_validates_on_the_recorded_split(trained_dir):
    report = json.loads((trained_dir / "onnx" / "validation.json").read_text())
    assert report["mode"] == "dataset" and report["images"] == 6
    assert report["dataset"]["eval_split"] == "validation[:6]"
    assert report["passed"] is True and report["tolerance"] == 0.001
    assert report["torch_model"] == str(trained_dir)
    assert report["onnx_dir"] == str(trained_dir / "onnx")


def test_validate_defaults_to_parent_model_and_recorded_data(trained_dir, tmp_path):
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(trained_dir / "onnx", onnx_dir)
    (onnx_dir / "validation.json").unlink()
    result = _validate(onnx_dir, "--model", trained_dir, "--max-images", 3)
    assert result.exit_code == 0, result.output
    report = json.loads((onnx_dir / "validation.json").read_text())
    assert report["images"] == 3 and report["passed"] is True
    assert "IoU per class" in result.output and "PASS" in result.output
    # Without --model, the folder above ONNX_DIR must hold the weights.
    result = _validate(onnx_dir)
    assert result.exit_code == 2 and "pass --model" in result.output


def test_broken_graph_fails_with_exit_1(trained_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_dir, model_dir)
    _break(model_dir / "onnx")
    result = _validate(model_dir / "onnx")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    report = json.loads((model_dir / "onnx" / "validation.json").read_text())
    assert report["passed"] is False
    assert abs(report["mean_iou_drop"]) > report["tolerance"]
    assert report["pixel_agreement"] < 0.9
    assert report["max_abs_logit_diff"] > 1e-3


def test_broken_graph_fails_on_random_inputs_too(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    CliRunner().invoke(main, ["export", str(tmp_path / "model"), "--no-validate"])
    assert not (tmp_path / "model" / "onnx" / "validation.json").exists()
    good = validate_onnx(tmp_path / "model" / "onnx" / "model.onnx", tmp_path / "model")
    assert good["passed"] is True and good["mode"] == "random_inputs"
    _break(tmp_path / "model" / "onnx")
    result = _validate(tmp_path / "model" / "onnx")
    assert result.exit_code == 1, result.output
    assert "random inputs" in result.output


def test_graph_and_variant_options(trained_dir):
    onnx_dir = trained_dir / "onnx"
    one_line_error(_validate(onnx_dir, "--variant", "fp16"), "model_fp16.onnx", "no such")
    one_line_error(_validate(onnx_dir, "--graph", "x.onnx", "--variant", "fp16"), "not both")


def test_missing_or_corrupt_graph(trained_dir, tmp_path):
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(trained_dir / "onnx", onnx_dir)
    (onnx_dir / "model.onnx").unlink()
    one_line_error(_validate(onnx_dir, "--model", trained_dir), "model.onnx", "no such")
    (onnx_dir / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    one_line_error(_validate(onnx_dir, "--model", trained_dir), "not a valid ONNX graph")
    (onnx_dir / "model.onnx").write_bytes(b"")  # e.g. a disk that filled up
    one_line_error(_validate(onnx_dir, "--model", trained_dir), "not a valid ONNX graph")


def test_not_a_segformer_onnx_folder(tmp_path, trained_dir):
    one_line_error(_validate(tmp_path), "no config.json")
    one_line_error(_validate(trained_dir / "onnx", "--model", tmp_path), "no config.json")


def test_dataset_with_other_classes(trained_dir, tmp_path):
    names = tmp_path / "id2label.json"
    names.write_text(json.dumps({str(i): f"c{i}" for i in range(7)}))
    result = _validate(trained_dir / "onnx", "--id2label", names)
    one_line_error(result, "7 classes", "the model has 5")


def test_labels_outside_the_classes_are_an_error(trained_dir, tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for sub in ("images/val", "annotations/val"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(root / "images/val/a.png")
    Image.new("L", (64, 64), 7).save(root / "annotations/val/a.png")  # class 7 of 5
    (root / "id2label.json").write_text(json.dumps({str(i): f"c{i}" for i in range(5)}))
    result = _validate(
        trained_dir / "onnx", "--dataset", root, "--split", "val", "--no-reduce-labels"
    )
    one_line_error(result, "a.png")
    assert json.loads((trained_dir / "onnx" / "validation.json").read_text())["passed"] is True


def test_resolve_dataset(trained_dir, tiny_model_dir):
    assert resolve_dataset(tiny_model_dir) is None  # nothing recorded: random inputs
    assert resolve_dataset(trained_dir) == RECORDED
    spec = resolve_dataset(trained_dir, split="validation[:2]", ignore_index=0)
    assert (spec.name, spec.split, spec.eval_split, spec.ignore_index) == (
        "synthetic:64", "validation[:2]", "validation[:2]", 0,
    )  # fmt: skip
    other = resolve_dataset(trained_dir, dataset="synthetic:32")
    assert other == DatasetSpec("synthetic:32")  # not the recorded split of another dataset
    with pytest.raises(SegdeployError, match="--dataset"):
        resolve_dataset(tiny_model_dir, split="val")


def test_validation_path_names():
    assert validation_path("d/model.onnx").name == "validation.json"
    assert validation_path("d/model_fp16.onnx").name == "validation_fp16.json"
    assert validation_path("d/other.onnx").name == "validation_other.json"


def test_upsample_argmax_is_bilinear_then_argmax():
    import torch

    logits = np.random.default_rng(0).standard_normal((4, 6, 5)).astype(np.float32)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(logits)[None], size=(23, 19), mode="bilinear", align_corners=False
    )
    np.testing.assert_array_equal(upsample_argmax(logits, (23, 19)), up[0].argmax(0).numpy())


def test_validation_streams_and_times(trained_dir):
    import torch

    data = load_validation_data(RECORDED, num_labels=5)
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    report = validate_onnx(
        trained_dir / "onnx" / "model.onnx", trained_dir, data=data, batch_size=4, threads=1,
        write=False,
    )  # fmt: skip
    assert report["images"] == 6 and report["passed"] is True  # two batches, the last short
    timings = report["timings"]
    assert timings["total_s"] <= time.perf_counter() - start
    assert timings["onnx_s"] > 0 and timings["torch_s"] > 0 and timings["load_s"] > 0
    assert timings["torch_threads"] == 1 and torch.get_num_threads() == threads_before


@pytest.mark.slow
def test_camvid_fp32_export_matches_pytorch(camvid, tmp_path):
    """A model trained by `train` on CamVid, exported at opset 17 and validated on 100 val
    images on the CPU: mean IoU within 0.001 of PyTorch's, pixel agreement >= 99.9%, and
    the validation of 100 images under 2 minutes."""
    from segdeploy.train import TrainConfig, train

    spec = DatasetSpec(str(camvid), eval_split="val", reduce_labels=False, ignore_index=11)
    model_dir = tmp_path / "model"
    # A handful of steps: the test is about the export, not about a good model.
    train(
        TrainConfig(
            model="scratch:tiny",
            dataset=spec,
            output_dir=str(model_dir),
            max_steps=8,
            eval_steps=8,
            batch_size=4,
            image_size=256,
            augment=False,
        )
    )
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["export", str(model_dir), "--max-images", "100"])
    wall = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    report = json.loads((model_dir / "onnx" / "validation.json").read_text())
    print(
        f"\nCamVid val, 100 images: {json.dumps(report['timings'])}; export+validate {wall:.1f} s"
    )
    print(result.output)
    assert report["mode"] == "dataset" and report["images"] == 100
    assert report["dataset"]["eval_split"] == "val" and report["dataset"]["ignore_index"] == 11
    assert abs(report["mean_iou_onnx"] - report["mean_iou_torch"]) <= 0.001
    assert report["pixel_agreement"] >= 0.999
    assert report["passed"] is True
    assert len(report["per_class_iou"]) == 11
    assert report["timings"]["total_s"] < 120
    assert "mean IoU" in result.output and "pixel agreement" in result.output


def test_swapped_rows_of_unpredicted_classes_fail_the_logit_rule(trained_dir, tmp_path):
    """Mean IoU and pixel agreement cannot see a change to classes that are never
    predicted; an fp32 graph must also match PyTorch's logits (issue 12)."""
    from safetensors.torch import load_file, save_file

    # The random tiny model predicts every class; push two out of reach.
    model_dir = tmp_path / "model"
    shutil.copytree(trained_dir, model_dir, ignore=shutil.ignore_patterns("onnx"))
    weights = load_file(model_dir / "model.safetensors")
    weights["decode_head.classifier.bias"][[3, 4]] = -5.0
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["export", str(model_dir)])
    assert result.exit_code == 0, result.output  # the faithful export passes every rule
    before = json.loads((model_dir / "onnx" / "validation.json").read_text())
    assert [c["onnx"] for c in before["per_class_iou"][3:]] == [0.0, 0.0]  # never predicted

    model = onnx.load(model_dir / "onnx" / "model.onnx")
    for name in ("decode_head.classifier.weight", "decode_head.classifier.bias"):
        init = next(i for i in model.graph.initializer if i.name == name)
        rows = numpy_helper.to_array(init).copy()
        rows[[3, 4]] = rows[[4, 3]]
        init.CopyFrom(numpy_helper.from_array(rows, name))
    onnx.save(model, model_dir / "onnx" / "model.onnx")

    result = _validate(model_dir / "onnx")
    assert result.exit_code == 1, result.output
    report = json.loads((model_dir / "onnx" / "validation.json").read_text())
    # Mean IoU and agreement alone would pass; the logits are wrong at every size.
    assert report["failed_rules"] == ["logits", "second_size"]
    assert report["mean_iou_drop"] == 0 and report["pixel_agreement"] == 1.0
    assert report["max_abs_logit_diff"] > report["max_abs_logit_allowed"]
    assert "failed: logits" in result.output


def test_passing_reports_list_the_rules_they_were_held_to(trained_dir):
    report = json.loads((trained_dir / "onnx" / "validation.json").read_text())
    assert report["passed"] is True and report["failed_rules"] == []
    # SegFormer's graph has dynamic height and width: also checked at a second size.
    assert set(report["rules"]) == {"mean_iou", "logits", "second_size", "pixel_agreement"}
    assert report["min_pixel_agreement"] == 0.9999
