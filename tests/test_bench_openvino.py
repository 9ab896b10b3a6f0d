"""`segdeploy bench --backends openvino,openvino-int8`: OpenVINO as a CPU peer."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from segdeploy.bench import check_backend, parse_backend
from segdeploy.bench import openvino as ovb
from segdeploy.cli import main
from segdeploy.data.synthetic import write_synthetic_folder

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tiny_onnx_dir, tmp_path_factory):
    """A model folder that records its training data (int8 calibrates on it) and a
    writable copy of its export (the NNCF model is cached there)."""
    from segdeploy.data import DatasetSpec

    root = tmp_path_factory.mktemp("ov")
    model, onnx = root / "model", root / "onnx"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(tiny_onnx_dir, onnx)
    spec = DatasetSpec("synthetic:64", split="train[:8]", eval_split="validation[:4]")
    (model / "train_args.json").write_text(json.dumps({"dataset": spec.to_dict()}))
    data = write_synthetic_folder(root / "data", n_train=0, n_val=3, seed=5, size=48)
    return model, onnx, data / "images" / "validation", data / "annotations" / "validation"


def test_rows_are_skipped_with_the_reason(folders, tmp_path, monkeypatch):
    model, onnx, _, _ = folders
    for name in ("openvino", "openvino-int8"):
        backend = parse_backend(name)
        assert backend.kind == name and "OpenVINO" in backend.description
        assert "no ONNX export" in check_backend(backend, model, tmp_path, CPU)
    assert "train_args.json" in check_backend(parse_backend("openvino-int8"), tmp_path, onnx, CPU)
    monkeypatch.setattr(ovb, "_has", lambda name: name != "openvino")
    assert "openvino extra" in check_backend(parse_backend("openvino"), model, onnx, CPU)
    monkeypatch.setattr(ovb, "_has", lambda name: name != "nncf")
    assert "nncf is not installed" in check_backend(
        parse_backend("openvino-int8"), model, onnx, CPU
    )


def test_openvino_rows_run_agree_with_torch_and_cache_the_int8_model(folders, tmp_path):
    pytest.importorskip("openvino", reason="openvino extra not installed")
    pytest.importorskip("nncf", reason="openvino extra (nncf) not installed")
    model, onnx, images, labels = folders
    assert check_backend(parse_backend("openvino-int8"), model, onnx, CPU) is None

    def bench(out):
        args = ["bench", "--model", str(model), "--onnx", str(onnx), "--images", str(images),
                "--labels", str(labels), "--backends", "torch,openvino,openvino-int8",
                "--batch-sizes", "2", "--runs", "1", "--model-runs", "2", "--threads", "1",
                "--output", str(out)]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return {r["backend"]: r for r in json.loads(out.read_text())["results"]}

    rows = bench(tmp_path / "a.json")
    for name in ("openvino", "openvino-int8"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["mean_iou"] is not None
    assert not rows["openvino"]["torch_imported"]  # a deployment-like worker
    # fp32 OpenVINO with segdeploy's preprocessing and exact upsampling: torch's masks.
    assert rows["openvino"]["pixel_agreement_with_torch"] > 0.99
    cached = sorted((onnx / "openvino").glob("*.xml"))
    assert len(cached) == 1 and cached[0].with_suffix(".bin").is_file()
    stamp = cached[0].stat().st_mtime_ns
    rows = bench(tmp_path / "b.json")  # made once: the second run reuses it
    assert rows["openvino-int8"]["status"] == "ok"
    # Quantizing imports nncf (which imports torch when present); the cached model does not.
    assert not rows["openvino-int8"]["torch_imported"]
    assert sorted((onnx / "openvino").glob("*.xml")) == cached
    assert cached[0].stat().st_mtime_ns == stamp
