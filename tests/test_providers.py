"""Provider choice, TensorRT/CUDA options, engine caching and the fallback chain, tested on CPU.

The decisions are pure functions of the list of available providers, so the
GPU cases are exercised here by passing the lists a GPU machine would report.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from segdeploy.cli import main
from segdeploy.errors import SegdeployError
from segdeploy.runtime import providers as prov

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
GPU_ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
TRT_NO_CUDA = ["TensorrtExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [
        ("auto", CPU_ONLY, "cpu"),
        ("auto", CUDA, "cuda"),
        (
            "auto",
            GPU_ALL,
            "cuda",
        ),  # TensorRT only on request: its first run builds engines for minutes
        ("cpu", GPU_ALL, "cpu"),
        ("cuda", GPU_ALL, "cuda"),
        ("tensorrt", GPU_ALL, "tensorrt"),
        ("CUDA", CUDA, "cuda"),
    ],
)
def test_choose_provider(requested, available, expected):
    choice = prov.choose_provider(requested, available)
    assert choice.name == expected and not choice.fell_back


@pytest.mark.parametrize(
    ("requested", "available"),
    [("cuda", CPU_ONLY), ("tensorrt", CPU_ONLY), ("tensorrt", CUDA)],
)
def test_missing_provider_says_what_and_how(requested, available):
    with pytest.raises(SegdeployError) as err:
        prov.choose_provider(requested, available)
    msg = str(err.value)
    assert msg.startswith("--provider: ")
    assert prov.ORT_NAME[requested] in msg
    assert "pip install onnxruntime-gpu" in msg and "README section GPU" in msg
    assert "--fallback" in msg
    assert ("TensorRT libraries" in msg) == (requested == "tensorrt")


@pytest.mark.parametrize(
    ("requested", "available", "expected", "skipped"),
    [
        ("tensorrt", CPU_ONLY, "cpu", ("tensorrt", "cuda")),
        ("tensorrt", CUDA, "cuda", ("tensorrt",)),
        ("cuda", CPU_ONLY, "cpu", ("cuda",)),
        ("cuda", TRT_NO_CUDA, "cpu", ("cuda",)),  # the chain only goes down
    ],
)
def test_fallback_walks_down_the_chain(requested, available, expected, skipped):
    choice = prov.choose_provider(requested, available, fallback=True)
    assert (choice.name, choice.skipped, choice.requested) == (expected, skipped, requested)
    assert choice.fell_back


def test_unknown_provider():
    with pytest.raises(SegdeployError, match="unknown provider 'rocm'"):
        prov.choose_provider("rocm", GPU_ALL)


@pytest.mark.parametrize(
    "provider, batch", [("cpu", 4), ("openvino", 4), ("cuda", 16), ("tensorrt", 16)]
)
def test_default_batch_follows_the_device_not_the_name(provider, batch):
    # OpenVINO runs on the CPU: a GPU-sized batch there only costs memory.
    from segdeploy.runtime.segmenter import default_batch_size

    assert default_batch_size(provider) == batch


@pytest.mark.parametrize(
    "provider, windows", [("cpu", 1), ("openvino", 4), ("cuda", 16), ("tensorrt", 16)]
)
def test_default_windows_per_call_of_a_tiled_image(provider, windows):
    # onnxruntime's CPU provider ran SegFormer's windows faster one per call (measured);
    # the others keep their batch (OpenVINO's was not measured with windows).
    from segdeploy.runtime.segmenter import default_batch_size

    assert default_batch_size(provider, windows=True) == windows


def test_provider_lists():
    assert prov.provider_options("cpu") == ["CPUExecutionProvider"]
    assert prov.provider_options("cuda", device_id=1) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    trt = prov.provider_options(
        "tensorrt",
        fp16=True,
        trt_cache="/c/engines",
        trt_timing_cache="/c",
        trt_workspace=2 << 30,
        profile=prov.profile_shapes("pixel_values", (512, 512), 8),
    )
    names = [p[0] if isinstance(p, tuple) else p for p in trt]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = trt[0][1]
    assert opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == "/c/engines"
    assert opts["trt_timing_cache_enable"] is True and opts["trt_timing_cache_path"] == "/c"
    assert opts["trt_max_workspace_size"] == 2 << 30
    assert opts["trt_profile_min_shapes"] == "pixel_values:1x3x512x512"
    assert opts["trt_profile_opt_shapes"] == "pixel_values:8x3x512x512"
    assert opts["trt_profile_max_shapes"] == "pixel_values:8x3x512x512"
    plain = prov.provider_options("tensorrt")[0][1]
    assert plain["trt_fp16_enable"] is False
    assert not any(k.startswith(("trt_engine_cache", "trt_profile")) for k in plain)


def test_profile_shapes_follow_image_and_batch_size():
    shapes = prov.profile_shapes("x", (480, 640), 16)
    assert shapes["trt_profile_min_shapes"] == "x:1x3x480x640"
    assert shapes["trt_profile_max_shapes"] == "x:16x3x480x640"
    with pytest.raises(SegdeployError, match="positive"):
        prov.profile_shapes("x", (480, 640), 0)


def test_read_image_size(tiny_onnx_dir, tmp_path):
    assert prov.read_image_size(tiny_onnx_dir) == (64, 64)
    assert prov.read_image_size(tmp_path) is None


def test_engine_cache_folder_is_keyed_by_model_content_precision_and_profile(
    tiny_onnx_dir, tmp_path
):
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_onnx_dir / "model.onnx", model)
    key = dict(fp16=False, image_size=(64, 64), batch_size=4)
    first = prov.trt_cache_dir(tmp_path / "cache", model, **key)
    assert first == prov.trt_cache_dir(
        tmp_path / "cache", model, **key
    )  # stable: engines are reused
    assert first.parent == tmp_path / "cache"
    assert prov.trt_cache_dir(tmp_path / "cache", model, **{**key, "fp16": True}) != first
    assert prov.trt_cache_dir(tmp_path / "cache", model, **{**key, "batch_size": 8}) != first
    assert prov.trt_cache_dir(tmp_path / "cache", model, **{**key, "image_size": (64, 96)}) != first
    # New weights, same graph structure: onnxruntime's own engine names would not change.
    with model.open("ab") as f:
        f.write(b"\0")
    assert prov.trt_cache_dir(tmp_path / "cache", model, **key) != first


def test_tensorrt_cache_decisions_are_logged(tiny_onnx_dir, tmp_path, caplog):
    model = tiny_onnx_dir / "model.onnx"
    caplog.set_level(logging.INFO, logger="segdeploy.runtime.providers")
    args = prov.SessionRequest(
        fp16=True,
        trt_cache=tmp_path,
        batch_size=2,
        image_size=None,
        device_id=0,
        trt_workspace=1 << 30,
        input_name="pixel_values",
    )
    providers = prov._providers_for("tensorrt", model, args)
    engine_dir = prov.trt_cache_dir(tmp_path, model, fp16=True, image_size=(64, 64), batch_size=2)
    assert providers[0][1]["trt_engine_cache_path"] == str(engine_dir)
    assert providers[0][1]["trt_profile_opt_shapes"] == "pixel_values:2x3x64x64"  # from the config
    assert "building a TensorRT engine" in caplog.text
    caplog.clear()
    (engine_dir / "TensorrtExecutionProvider_TRTKernel_graph_main_0_0_sm80.engine").write_bytes(
        b"x"
    )
    assert prov.has_cached_engine(engine_dir)
    prov._providers_for("tensorrt", model, args)
    assert "reusing the TensorRT engine cached in" in caplog.text
    caplog.clear()
    prov._providers_for("tensorrt", model, dataclasses.replace(args, trt_cache=None))
    assert "pass --trt-cache" in caplog.text


def test_create_session_on_cpu(tiny_onnx_dir):
    session = prov.create_session(tiny_onnx_dir / "model.onnx", "cpu", threads=1)
    assert prov.active_provider(session) == "cpu"
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]


def test_create_session_refuses_missing_provider(tiny_onnx_dir):
    with pytest.raises(SegdeployError, match="no CUDAExecutionProvider"):
        prov.create_session(tiny_onnx_dir / "model.onnx", "cuda", available=CPU_ONLY)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_provider_that_fails_to_start_is_an_error_without_fallback(tiny_onnx_dir):
    # onnxruntime-gpu lists TensorRT even without the TensorRT libraries; here it is
    # "listed" but this onnxruntime cannot start it, which is that situation.
    with pytest.raises(SegdeployError, match="TensorrtExecutionProvider failed to start"):
        prov.create_session(tiny_onnx_dir / "model.onnx", "tensorrt", available=GPU_ALL)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_fallback_steps_down_and_says_so(tiny_onnx_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="segdeploy.runtime.providers")
    session = prov.create_session(
        tiny_onnx_dir / "model.onnx",
        "tensorrt",
        fallback=True,
        trt_cache=tmp_path,
        available=GPU_ALL,
    )
    assert prov.active_provider(session) == "cpu"
    assert (
        "provider tensorrt failed to start" in caplog.text and "falling back to cuda" in caplog.text
    )
    assert "provider cuda failed to start" in caplog.text and "falling back to cpu" in caplog.text
    caplog.clear()
    prov.create_session(tiny_onnx_dir / "model.onnx", "cuda", fallback=True, available=CPU_ONLY)
    assert "provider cuda is not available (cuda missing); falling back to cpu" in caplog.text


def test_missing_or_broken_model_file(tmp_path):
    with pytest.raises(SegdeployError, match="model.onnx: model file not found"):
        prov.create_session(tmp_path / "model.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(SegdeployError, match="bad.onnx: onnxruntime cannot load the model"):
        prov.create_session(tmp_path / "bad.onnx")


def test_bad_thread_count(tiny_onnx_dir):
    with pytest.raises(SegdeployError, match="--threads"):
        prov.create_session(tiny_onnx_dir / "model.onnx", threads=0)


def test_io_binding_path_equals_plain_run(tiny_onnx_dir):
    """The CUDA code path (bind input once, keep outputs as OrtValues) on the CPU device."""
    from segdeploy import Segmenter

    session = prov.create_session(tiny_onnx_dir / "model.onnx", "cpu", threads=1)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    binding = prov.run_io_binding(session, {"pixel_values": x}, device_type="cpu")
    (value,) = binding.get_outputs()
    assert value.device_name() == "cpu" and value.shape() == [2, 5, 16, 16]  # bound, not copied
    assert np.array_equal(
        binding.copy_outputs_to_cpu()[0], session.run(None, {"pixel_values": x})[0]
    )

    seg = Segmenter(tiny_onnx_dir, provider="cpu", threads=1)
    images = [
        np.random.default_rng(i).integers(0, 255, (50 + i, 70, 3), np.uint8) for i in range(3)
    ]
    plain = seg.predict_batch(images)
    seg.io_device = "cpu"  # what "cuda" does, with the CPU as the device
    bound = seg.predict_batch(images)
    assert all(np.array_equal(a, b) for a, b in zip(plain, bound, strict=True))


def test_cli_missing_provider_exits_2(tiny_onnx_dir, tmp_path):
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(img)
    result = CliRunner().invoke(
        main,
        [
            "infer",
            "--model",
            str(tiny_onnx_dir),
            "--provider",
            "cuda",
            str(img),
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "no CUDAExecutionProvider" in result.output and "onnxruntime-gpu" in result.output
    assert not (tmp_path / "o").exists()  # nothing written before the model runs


def test_cli_fallback_runs_on_cpu(tiny_onnx_dir, tmp_path, caplog):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(img)
    caplog.set_level(logging.WARNING)
    result = CliRunner().invoke(
        main,
        [
            "infer",
            "--model",
            str(tiny_onnx_dir),
            "--provider",
            "tensorrt",
            "--fallback",
            str(img),
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "on cpu" in result.output
    assert "falling back to cpu" in caplog.text
    assert (tmp_path / "o" / "a.png").is_file()
