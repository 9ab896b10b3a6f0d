"""`--provider openvino`: OpenVINO's runtime behind Segmenter, infer, validate and bench; its
settings, its compiled-model cache, its refusals and fallback; NNCF int8 from export."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.cli import main
from segdeploy.errors import SegdeployError
from segdeploy.runtime import providers as prov

pytest.importorskip("openvino", reason="openvino extra not installed")

from segdeploy.runtime import openvino_runner as ovr  # noqa: E402

CPU_ONLY = ["CPUExecutionProvider"]
WITH_OV = ["CPUExecutionProvider", "OpenVINO"]


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Each test's own user cache, so compiled models never leak between tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "segdeploy" / "openvino"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photos of several sizes and modes: what infer's label maps are compared on."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("photos")
    for i, (h, w) in enumerate([(48, 64), (97, 61), (64, 64), (30, 90), (70, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(folder / "g.png")
    return folder


def _labels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


# -- the registry -------------------------------------------------------------------------


def test_openvino_is_chosen_only_by_name_and_falls_back_to_onnxruntime_cpu():
    assert prov.choose_provider("openvino", WITH_OV).name == "openvino"
    assert prov.choose_provider("auto", WITH_OV).name == "cpu"  # auto on a CPU stays ORT
    with pytest.raises(SegdeployError) as err:
        prov.choose_provider("openvino", CPU_ONLY)
    assert "pip install 'segdeploy[openvino]'" in str(err.value) and "--fallback" in str(err.value)
    choice = prov.choose_provider("openvino", CPU_ONLY, fallback=True)
    assert (choice.name, choice.skipped) == ("cpu", ("openvino",))


def test_available_providers_lists_openvino_when_installed():
    assert "OpenVINO" in prov.available_providers()


@pytest.mark.parametrize(
    ("batch", "threads", "expected"),
    [(1, 2, ("LATENCY", 1)), (4, 1, ("LATENCY", 1)), (4, 2, ("THROUGHPUT", 2)),
     (2, 8, ("THROUGHPUT", 2)), (16, 4, ("THROUGHPUT", 4))],
)  # fmt: skip
def test_settings_follow_batch_size_and_threads(batch, threads, expected):
    s = ovr.OpenVINOSettings.choose(batch, threads)
    assert (s.mode, s.streams, s.threads) == (*expected, threads)
    assert s.key == f"{expected[0].lower()}-t{threads}-s{expected[1]}-f32"


# -- Segmenter and the session ------------------------------------------------------------


def test_segmenter_on_openvino_gives_onnxruntimes_labels_and_logits(tiny_onnx_dir, photos):
    from segdeploy.runtime.segmenter import Segmenter

    for batch in (1, 4):  # LATENCY, and THROUGHPUT with the batch split over two streams
        ov = Segmenter(tiny_onnx_dir, "openvino", batch_size=batch, threads=2)
        ort = Segmenter(tiny_onnx_dir, "cpu", batch_size=batch, threads=2)
        assert ov.provider == "openvino" and ov.session.settings.streams == min(batch, 2)
        images = sorted(photos.iterdir())
        for a, b in zip(ov.predict_batch(images), ort.predict_batch(images), strict=True):
            assert a.shape == b.shape and float((a == b).mean()) >= 0.999
        x = np.random.default_rng(1).standard_normal((5, 3, 64, 64)).astype(np.float32)
        assert np.abs(ov.logits(x) - ort.logits(x)).max() < 1e-4  # 5 = an odd split too


def test_outputs_belong_to_the_caller(tiny_onnx_dir):
    """OpenVINO reuses a request's output buffers; a batch's logits must survive the next."""
    session = ovr.open_session(tiny_onnx_dir / "model.onnx", threads=1)
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(2))
    first = session.run(None, {"pixel_values": a})[0]
    kept = first.copy()
    session.run(None, {"pixel_values": b})
    assert np.array_equal(first, kept)


def test_compiled_model_is_cached_outside_the_model_folder_and_reused(
    tiny_onnx_dir, tmp_path, cache_home, caplog
):
    from segdeploy.runtime.segmenter import Segmenter

    model = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, model)
    before = sorted(p.name for p in model.iterdir())
    Segmenter(model, "openvino", batch_size=1, threads=1)
    (blob,) = cache_home.glob("*.blob")
    assert sorted(p.name for p in model.iterdir()) == before  # nothing written beside the model
    import openvino as ov

    release = "-".join(ov.__version__.split("-")[:2])
    assert blob.name.startswith(f"model-{ovr.graph_digest(model / 'model.onnx')}-ov{release}-")
    assert "latency-t1-s1-f32-64x64" in blob.name
    stamp = blob.stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="segdeploy.runtime.openvino_runner")
    Segmenter(model, "openvino", batch_size=1, threads=1)
    assert "from the cache" in caplog.text and blob.stat().st_mtime_ns == stamp
    # Other settings, or a changed graph: another file, never the stale one.
    Segmenter(model, "openvino", batch_size=4, threads=2)
    import onnx

    graph = onnx.load(model / "model.onnx")
    graph.doc_string = "exported again"  # same graph, other bytes: another hash
    onnx.save(graph, model / "model.onnx")
    Segmenter(model, "openvino", batch_size=1, threads=1)
    assert len(list(cache_home.glob("*.blob"))) == 3


def test_a_damaged_cache_file_is_rebuilt_and_an_unwritable_cache_only_warns(
    tiny_onnx_dir, tmp_path, cache_home, caplog
):
    graph = tiny_onnx_dir / "model.onnx"
    settings = ovr.OpenVINOSettings.choose(1, 1)
    _, blob = ovr.compile_graph(graph, settings)
    blob.write_bytes(b"garbage")
    caplog.set_level(logging.WARNING, logger="segdeploy.runtime.openvino_runner")
    session = ovr.OpenVINOSession(graph, settings)
    assert "ignoring the cached OpenVINO model" in caplog.text
    assert blob.read_bytes() != b"garbage"  # replaced by a good one
    assert session.run(None, {"pixel_values": np.zeros((1, 3, 64, 64), np.float32)})[0].shape[1]
    # A cache folder that cannot be made (here: a file is in the way; a read-only home
    # alike, which root would not notice): a warning, and the session runs.
    (tmp_path / "a-file").write_bytes(b"")
    caplog.clear()
    session = ovr.OpenVINOSession(graph, settings, cache=tmp_path / "a-file" / "cache")
    assert "cannot cache the compiled OpenVINO model" in caplog.text
    assert session.run(None, {"pixel_values": np.zeros((1, 3, 64, 64), np.float32)})[0].ndim == 4


def _unsupported_graph(folder):
    """A graph onnxruntime runs and OpenVINO cannot (com.microsoft.Inverse has no
    conversion rule in OpenVINO's ONNX frontend)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [None, 3, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3, 4, 4])
    node = helper.make_node("Inverse", ["pixel_values"], ["logits"], domain="com.microsoft")
    graph = helper.make_model(
        helper.make_graph([node], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.save(graph, folder / "model_inverse.onnx")
    return folder / "model_inverse.onnx"


def test_a_graph_openvino_cannot_run_is_refused_with_the_reason_or_falls_back(tmp_path, caplog):
    path = _unsupported_graph(tmp_path)
    with pytest.raises(SegdeployError) as err:
        prov.create_session(path, "openvino", threads=1)
    assert str(path) in str(err.value) and "com.microsoft.Inverse" in str(err.value)
    assert "Exception from" not in str(err.value)  # OpenVINO's reason, not its source file
    caplog.set_level(logging.WARNING, logger="segdeploy.runtime.providers")
    session = prov.create_session(path, "openvino", fallback=True, threads=1)
    assert prov.active_provider(session) == "cpu"
    assert (
        "provider openvino failed to start" in caplog.text and "falling back to cpu" in caplog.text
    )


def test_an_openvino_ir_runs_on_openvino_only(tiny_onnx_dir, tmp_path):
    import openvino as ov

    from segdeploy.export.quantize.openvino_int8 import save_ir

    xml = save_ir(ov.Core().read_model(tiny_onnx_dir / "model.onnx"), tmp_path / "m.xml")
    assert prov.active_provider(prov.create_session(xml, "auto", threads=1)) == "openvino"
    with pytest.raises(
        SegdeployError, match="OpenVINO IR graph, which runs on --provider openvino only"
    ):
        prov.create_session(xml, "cpu", fallback=True)
    assert ovr.ir_precision(xml) == "fp32"
    xml.with_suffix(".bin").unlink()
    with pytest.raises(SegdeployError, match="needs its .xml and .bin"):
        ovr.ir_precision(xml)


# -- the commands -------------------------------------------------------------------------


def test_infer_on_openvino_writes_onnxruntimes_label_maps(tiny_onnx_dir, photos, tmp_path):
    runs = {}
    for provider in ("cpu", "openvino"):
        out = tmp_path / provider
        result = CliRunner().invoke(
            main, ["infer", "--model", str(tiny_onnx_dir), "--provider", provider,
                   str(photos), "-o", str(out)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"on {provider}" in result.output
        assert json.loads((out / "summary.json").read_text())["provider"] == provider
        runs[provider] = _labels(out)
    assert runs["cpu"].keys() == runs["openvino"].keys() and len(runs["cpu"]) == 6
    for name, labels in runs["cpu"].items():
        assert float((runs["openvino"][name] == labels).mean()) >= 0.999, name


def test_infer_refuses_what_openvino_cannot_run_and_falls_back_when_told(
    tiny_onnx_dir, photos, tmp_path
):
    onnx = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, onnx)
    _unsupported_graph(onnx)
    cmd = ["infer", "--model", str(onnx), "--variant", "inverse", "--provider", "openvino",
           str(photos / "p2.png"), "-o", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(main, cmd)
    assert result.exit_code == 2 and "com.microsoft.Inverse" in result.output
    assert not (tmp_path / "out").exists()
    # An IR variant is refused on onnxruntime's providers, naming the way out.
    onnx_ir = tmp_path / "ir"
    shutil.copytree(tiny_onnx_dir, onnx_ir)
    import openvino as ov

    from segdeploy.export.quantize.openvino_int8 import save_ir

    save_ir(ov.Core().read_model(onnx / "model.onnx"), onnx_ir / "model_openvino_int8.xml")
    result = CliRunner().invoke(
        main, ["infer", "--model", str(onnx_ir), "--variant", "openvino_int8", "--provider",
               "cpu", str(photos / "p2.png"), "-o", str(tmp_path / "o2")],
    )  # fmt: skip
    assert result.exit_code == 2 and "use --provider openvino" in result.output


def test_infer_without_openvino_installed_says_how_or_falls_back(
    tiny_onnx_dir, photos, tmp_path, monkeypatch
):
    monkeypatch.setattr(prov, "available_providers", lambda: list(CPU_ONLY))
    cmd = ["infer", "--model", str(tiny_onnx_dir), "--provider", "openvino",
           str(photos / "p2.png"), "-o", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(main, cmd)
    assert result.exit_code == 2 and "pip install 'segdeploy[openvino]'" in result.output
    result = CliRunner().invoke(main, [*cmd, "--fallback"])
    assert result.exit_code == 0 and "on cpu" in result.output, result.output


def test_validate_on_openvino(tiny_model_dir, tiny_onnx_dir, tmp_path):
    """The fp32 graph run by OpenVINO passes the fp32 rules against PyTorch."""
    onnx = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, onnx)
    result = CliRunner().invoke(
        main, ["validate", str(onnx), "--model", str(tiny_model_dir), "--provider", "openvino",
               "--random-inputs", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((onnx / "validation.json").read_text())
    assert report["provider"] == "openvino" and report["passed"] is True


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A model folder that records its training data (int8 calibrates on it)."""
    from segdeploy.data import DatasetSpec

    model = tmp_path_factory.mktemp("ov_trained") / "model"
    shutil.copytree(tiny_model_dir, model)
    spec = DatasetSpec("synthetic:64", split="train[:40]", eval_split="validation[:4]")
    (model / "train_args.json").write_text(json.dumps({"dataset": spec.to_dict()}))
    return model


def test_export_writes_and_validates_nncf_int8_for_openvino(trained, photos, tmp_path):
    out = tmp_path / "onnx"
    cmd = ["export", str(trained), "--output", str(out), "--quantize", "int8",
           "--int8-engine", "openvino", "--calibration-images", "8", "--max-images", "4"]  # fmt: skip
    result = CliRunner().invoke(main, cmd)
    assert "model_openvino_int8.xml" in result.output, result.output
    assert (out / "model_openvino_int8.xml").is_file() and (
        out / "model_openvino_int8.bin"
    ).is_file()
    assert not (out / "model_int8.onnx").exists()  # only the engine asked for
    quant = json.loads((out / "quantization_openvino_int8.json").read_text())
    assert quant["engine"] == "nncf" and quant["method"] == "nncf.quantize"
    assert quant["calibration_images"] == 8 and quant["fake_quantize"] > 0
    assert quant["model_type"] == "transformer"  # SegFormer has attention
    report = json.loads((out / "validation_openvino_int8.json").read_text())
    assert report["precision"] == "int8" and report["provider"] == "openvino"
    assert report["images"] == 4 and "pixel_agreement" in report["rules"]
    assert result.exit_code == (0 if report["passed"] else 1)
    # validate and infer take the variant by name; validate writes the report anew.
    (out / "validation_openvino_int8.json").unlink()
    result = CliRunner().invoke(
        main, ["validate", str(out), "--model", str(trained), "--variant", "openvino_int8",
               "--max-images", "4"],
    )  # fmt: skip
    again = json.loads((out / "validation_openvino_int8.json").read_text())
    assert again["provider"] == "openvino" and again["graph"] == "model_openvino_int8.xml"
    assert result.exit_code == (0 if again["passed"] else 1), result.output
    result = CliRunner().invoke(
        main, ["infer", "--model", str(out), "--provider", "openvino", "--variant",
               "openvino_int8", str(photos), "-o", str(tmp_path / "masks")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(_labels(tmp_path / "masks")) == 6


def test_export_refuses_int8_engine_options_it_cannot_honour(trained, tmp_path, monkeypatch):
    base = ["export", str(trained), "--output", str(tmp_path / "o"), "--no-validate"]
    result = CliRunner().invoke(main, [*base, "--int8-engine", "openvino"])
    assert result.exit_code == 2 and "add --quantize int8" in result.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a)
    )
    result = CliRunner().invoke(main, [*base, "--quantize", "int8", "--int8-engine", "openvino"])
    assert result.exit_code == 2 and "needs nncf" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_export_accuracy_control_keeps_the_drop_within_max_drop(trained, tmp_path):
    out = tmp_path / "onnx"
    cmd = ["export", str(trained), "--output", str(out), "--quantize", "int8",
           "--int8-engine", "openvino", "--calibration-images", "8", "--max-drop", "0.05",
           "--max-images", "4"]  # fmt: skip
    result = CliRunner().invoke(main, cmd)
    assert "model_openvino_int8.xml" in result.output, result.output
    quant = json.loads((out / "quantization_openvino_int8.json").read_text())
    assert quant["method"] == "nncf.quantize_with_accuracy_control"
    assert quant["max_drop"] == 0.05 and quant["held_out_images"] > 0


def test_ray_engine_model_stage_runs_on_openvino(tiny_onnx_dir, photos):
    """The Ray engine's building block (one Segmenter per actor) takes the provider: its
    label maps on OpenVINO are onnxruntime's (no Ray cluster needed to call it)."""
    from segdeploy.runtime.ray_engine import SegmentBatch

    images = np.array([str(p) for p in sorted(photos.iterdir())], dtype=object)
    out = {
        provider: SegmentBatch(tiny_onnx_dir, provider=provider, threads=1)({"image": images})
        for provider in ("cpu", "openvino")
    }
    assert out["openvino"]["labels"].shape == out["cpu"]["labels"].shape == (6,)
    for a, b in zip(out["openvino"]["labels"], out["cpu"]["labels"], strict=True):
        assert a.shape == b.shape and float((a == b).mean()) >= 0.999
