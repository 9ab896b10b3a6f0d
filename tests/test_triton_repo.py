"""`segdeploy export --triton-repo DIR`: a Triton model repository that Triton's own
ModelConfig protobuf (from tritonclient) parses, with the graph's tensors."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from segdeploy.errors import SegdeployError
from segdeploy.export.triton import MARKER, write_triton_repo

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed"
)
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path) -> object:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def test_repository_from_an_onnx_folder(tiny_onnx_dir, tmp_path):
    target = write_triton_repo(tiny_onnx_dir, tmp_path / "repo", name="segformer", max_batch_size=4)
    assert target == tmp_path / "repo" / "segformer"
    assert (target / "1" / "model.onnx").read_bytes() == (tiny_onnx_dir / "model.onnx").read_bytes()
    config = parse(target / "config.pbtxt")
    assert config.name == "segformer" and config.backend == "onnxruntime"
    assert config.max_batch_size == 4
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    # inputs and outputs as the graph declares them, the batch axis left to Triton
    session = ort.InferenceSession(str(target / "1" / "model.onnx"))
    (graph_in,), (graph_out,) = session.get_inputs(), session.get_outputs()
    (cfg_in,), (cfg_out,) = config.input, config.output
    assert cfg_in.name == graph_in.name and cfg_out.name == graph_out.name
    assert cfg_in.data_type == cfg_out.data_type == model_config_pb2.TYPE_FP32
    expect = [d if isinstance(d, int) else -1 for d in graph_in.shape[1:]]
    assert list(cfg_in.dims) == expect and len(cfg_out.dims) == len(graph_out.shape) - 1
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert trt.parameters["precision_mode"] == "FP16"
    assert trt.parameters["trt_engine_cache_enable"] == "1"
    assert trt.parameters["trt_engine_cache_path"].endswith("/segformer")
    # the graph in the repository runs, on a batch
    logits = session.run(None, {cfg_in.name: np.zeros((2, 3, 64, 64), np.float32)})[0]
    assert logits.shape[:2] == (2, 5)
    text = (target / "preprocessing.md").read_text()
    processor = json.loads((tiny_onnx_dir / "preprocessor_config.json").read_text())
    assert f"| `image_mean` | `{json.dumps(processor['image_mean'])}` |" in text
    assert "argmax" in text
    assert (target / "config.json").is_file() and (target / "preprocessor_config.json").is_file()


def test_a_rewrite_replaces_its_own_folder_but_not_a_users(tiny_onnx_dir, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(tiny_onnx_dir, repo, name="m")
    (repo / "m" / "stale.txt").write_text("from before")
    write_triton_repo(tiny_onnx_dir, repo, name="m")
    assert not (repo / "m" / "stale.txt").exists()
    assert (repo / "m" / "config.pbtxt").read_text().startswith(MARKER)
    mine = repo / "theirs"
    mine.mkdir()
    (mine / "config.pbtxt").write_text('name: "theirs"\n')
    with pytest.raises(SegdeployError, match="not written by segdeploy"):
        write_triton_repo(tiny_onnx_dir, repo, name="theirs")
    assert (mine / "config.pbtxt").read_text() == 'name: "theirs"\n'


def test_export_command_writes_the_repository(tiny_model_dir, tmp_path):
    from segdeploy.cli import main

    result = CliRunner().invoke(
        main,
        ["export", str(tiny_model_dir), "--output", str(tmp_path / "onnx"), "--no-validate",
         "--triton-repo", str(tmp_path / "triton")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    target = tmp_path / "triton" / tiny_model_dir.name
    assert f"triton: {target}" in result.output
    assert parse(target / "config.pbtxt").name == tiny_model_dir.name
    onnx_bytes = (tmp_path / "onnx" / "model.onnx").read_bytes()
    assert (target / "1" / "model.onnx").read_bytes() == onnx_bytes
