import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from segdeploy.errors import SegdeployError
from segdeploy.fuse_argmax import fuse_argmax


def _torch_labels(logits: np.ndarray, size) -> np.ndarray:
    up = torch.nn.functional.interpolate(
        torch.from_numpy(logits), size=size, mode="bilinear", align_corners=False
    )
    return up.argmax(1).numpy()


def test_fused_graph_returns_the_torch_label_maps(tiny_onnx_dir, tmp_path):
    fused = fuse_argmax(tiny_onnx_dir / "model.onnx", tmp_path / "model_fused.onnx", num_labels=5)
    onnx.checker.check_model(onnx.load(fused))
    plain = ort.InferenceSession(
        str(tiny_onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["labels"]

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    for size in [(61, 90), (128, 128), (37, 20)]:
        (labels,) = session.run(None, {"pixel_values": x, "output_size": np.array(size, np.int64)})
        (logits,) = plain.run(None, {"pixel_values": x})
        assert labels.dtype == np.uint8 and labels.shape == (2, *size)
        agreement = (labels == _torch_labels(logits, size)).mean()
        assert agreement >= 0.999, agreement


def test_refuses_a_graph_without_logits(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(SegdeployError, match="expected one output 'logits'"):
        fuse_argmax(tmp_path / "other.onnx", tmp_path / "out.onnx", num_labels=3)
    assert not (tmp_path / "out.onnx").exists()
