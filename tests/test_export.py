"""`segdeploy export`: Optimum export, variants, atomic output, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from cli_checks import one_line_error
from click.testing import CliRunner

from segdeploy.cli import main
from segdeploy.data import DatasetSpec
from segdeploy.export import export_onnx
from segdeploy.validate import load_validation_data

SMALL = DatasetSpec("synthetic:64", split="validation[:4]", eval_split="validation[:4]")


@pytest.fixture(scope="module")
def small_data():
    return load_validation_data(SMALL, num_labels=5)


@pytest.fixture(scope="module")
def cli_export(tiny_model_dir, tmp_path_factory):
    """`segdeploy export --fp16 --optimize` of the tiny model, no dataset recorded."""
    out = tmp_path_factory.mktemp("cli_export") / "onnx"
    result = CliRunner().invoke(
        main, ["export", str(tiny_model_dir), "--output", str(out), "--fp16", "--optimize"]
    )
    return out, result


def _torch_logits(model_dir, pixel_values):
    import torch
    from transformers import SegformerForSemanticSegmentation

    model = SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(pixel_values=torch.from_numpy(pixel_values)).logits.numpy()


@pytest.mark.parametrize("opset", [17, 18])
def test_export_at_opset_is_checked_and_validates(tiny_model_dir, tmp_path, small_data, opset):
    out = tmp_path / "onnx"
    result = export_onnx(tiny_model_dir, out, opset=opset, data=small_data)

    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert result.passed is True
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] is True and report["opset"] == opset
    assert report["mode"] == "dataset" and report["images"] == 4
    assert report["mean_iou_torch"] == pytest.approx(report["mean_iou_onnx"], abs=1e-3)
    assert report["pixel_agreement"] >= 0.999
    assert len(report["per_class_iou"]) == 5
    # Loadable as is: the model's configuration travels with the graph.
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "segformer" and len(config["id2label"]) == 5
    assert (out / "preprocessor_config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left"


def test_graph_has_dynamic_batch_and_spatial_axes(tiny_onnx_dir, tiny_model_dir):
    """Exported with 64x64 inputs, the graph runs at another size and batch, like PyTorch."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(tiny_onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((3, 3, 96, 128)).astype(np.float32)
    (got,) = session.run(["logits"], {"pixel_values": x})
    ref = _torch_logits(tiny_model_dir, x)
    assert got.shape == ref.shape == (3, 5, 24, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_cli_export_prints_times_and_says_data_is_missing(cli_export):
    out, result = cli_export
    assert result.exit_code == 0, result.output
    assert (
        "export: model.onnx, model_fp16.onnx, model_optimized.onnx (opset 17, optimum route) in"
        in result.output
    )
    assert "validation: " in result.output and " s" in result.output
    assert "random inputs" in result.output  # the warning that this proves less
    for name in ("validation.json", "validation_fp16.json", "validation_optimized.json"):
        report = json.loads((out / name).read_text())
        assert report["mode"] == "random_inputs" and report["passed"] is True
        assert "proves less" in report["note"]


def test_fp16_graph_has_fp16_weights_and_fp32_io(cli_export):
    out, _ = cli_export
    model = onnx.load(out / "model_fp16.onnx")
    onnx.checker.check_model(model)
    f16 = onnx.TensorProto.FLOAT16
    assert sum(i.data_type == f16 for i in model.graph.initializer) > 10
    io = list(model.graph.input) + list(model.graph.output)
    assert [(v.name, v.type.tensor_type.elem_type) for v in io] == [
        ("pixel_values", onnx.TensorProto.FLOAT),
        ("logits", onnx.TensorProto.FLOAT),
    ]
    report = json.loads((out / "validation_fp16.json").read_text())
    assert report["precision"] == "fp16" and report["provider"] == "cpu"
    assert report["max_abs_logit_diff"] > 0  # really computed in fp16


def test_optimized_graph_is_fused_and_faithful(cli_export):
    out, _ = cli_export
    plain = onnx.load(out / "model.onnx")
    optimized = onnx.load(out / "model_optimized.onnx")
    assert len(optimized.graph.node) < len(plain.graph.node)
    assert any(n.domain == "com.microsoft" for n in optimized.graph.node)
    report = json.loads((out / "validation_optimized.json").read_text())
    assert report["passed"] is True and report["max_abs_logit_diff"] < 1e-4


def test_optimum_ort_model_loads_the_folder(cli_export, tiny_model_dir):
    from optimum.onnxruntime import ORTModelForSemanticSegmentation

    out, _ = cli_export
    model = ORTModelForSemanticSegmentation.from_pretrained(out)
    assert model.path.name == "model.onnx"  # the fp32 graph, not a variant beside it
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    got = model(pixel_values=x).logits
    np.testing.assert_allclose(np.asarray(got), _torch_logits(tiny_model_dir, x), atol=1e-4)


def test_failed_export_keeps_the_previous_folder(tiny_model_dir, tmp_path, monkeypatch):
    import segdeploy.export as export_mod

    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous export")

    def half_export(model_dir, out_dir, *, opset, rewrite):
        (out_dir / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export_fp32", half_export)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_model_dir, out, validate=False)
    assert (out / "model.onnx").read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


# ---------------------------------------------------------------- bad input


def _invoke(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def test_not_a_model_folder_of_a_known_family(tmp_path, tiny_model_dir):
    one_line_error(_invoke(tmp_path / "missing"), "not a folder")
    one_line_error(_invoke(tmp_path), "no config.json")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    one_line_error(
        _invoke(other), "bert/config.json", "'bert' is not supported", "segformer, dpt, beit"
    )
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(tiny_model_dir / "config.json", weightless)
    one_line_error(_invoke(weightless), "no PyTorch weights")
    assert not (weightless / "onnx").exists()


def test_opset_out_of_range(tiny_model_dir):
    highest = onnx.defs.onnx_opset_version()
    one_line_error(_invoke(tiny_model_dir, "--opset", highest + 1), "--opset", f"<= {highest}")
    one_line_error(_invoke(tiny_model_dir, "--opset", 9), "--opset", ">= 11")
    from torch.onnx import _constants

    torch_max = _constants.ONNX_MAX_OPSET
    if torch_max < highest:  # onnx 1.23 writes 28, torch 2.13's exporter 23
        one_line_error(
            _invoke(tiny_model_dir, "--opset", torch_max + 1), "torch", f"<= {torch_max}"
        )
    assert not (tiny_model_dir / "onnx").exists()


def test_output_must_not_replace_the_model(tiny_model_dir):
    one_line_error(_invoke(tiny_model_dir, "--output", tiny_model_dir), "--output")
    one_line_error(_invoke(tiny_model_dir, "--output", tiny_model_dir.parent), "--output")


def test_dataset_whose_classes_do_not_fit(tiny_model_dir, tmp_path):
    names = tmp_path / "id2label.json"
    names.write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    result = _invoke(
        tiny_model_dir, "--dataset", "synthetic:64", "--split", "validation[:2]",
        "--id2label", names, "--output", tmp_path / "onnx",
    )  # fmt: skip
    one_line_error(result, "3 classes", "the model has 5")
    assert not (tmp_path / "onnx").exists()


def test_missing_provider_fails_before_exporting(tiny_model_dir, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    out = tmp_path / "onnx"
    one_line_error(_invoke(tiny_model_dir, "--output", out, "--provider", "cuda"), "--provider")
    assert not out.exists()
    # --no-validate runs no session, so the provider does not matter.
    assert (
        _invoke(tiny_model_dir, "--output", out, "--no-validate", "--provider", "cuda").exit_code
        == 0
    )
    assert (out / "model.onnx").is_file() and not (out / "validation.json").exists()


def test_segdeploy_runtime_loads_the_folder(cli_export, tiny_model_dir):
    from PIL import Image

    from segdeploy import Segmenter

    out, _ = cli_export
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 80, 3), np.uint8))
    for variant in ("fp32", "fp16", "optimized"):
        mask = Segmenter(out, provider="cpu", variant=variant).predict(image)
        assert mask.shape == (48, 80) and mask.max() < 5


def test_fp16_graph_the_provider_cannot_run_is_reported_skipped(
    tiny_model_dir, tmp_path, monkeypatch
):
    import segdeploy.runtime.providers as providers
    from segdeploy.errors import SegdeployError

    real = providers.create_session

    def no_fp16(path, *args, **kwargs):
        if path.name == "model_fp16.onnx":
            raise SegdeployError(path, "NOT_IMPLEMENTED: Could not find an implementation")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(providers, "create_session", no_fp16)
    result = _invoke(tiny_model_dir, "--output", tmp_path / "onnx", "--fp16")
    assert result.exit_code == 0, result.output
    assert "model_fp16.onnx not validated" in result.output and "SKIPPED" in result.output
    report = json.loads((tmp_path / "onnx" / "validation_fp16.json").read_text())
    assert report["skipped"] is True and report["passed"] is None
    assert "--variant fp16 --provider cuda" in report["reason"]
    assert json.loads((tmp_path / "onnx" / "validation.json").read_text())["passed"] is True
