import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from segdeploy.errors import SegdeployError
from segdeploy.export.fuse_argmax import fuse_argmax


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


def test_export_fuse_argmax_validates_and_infers_like_the_logits_graph(tiny_model_dir, tmp_path):
    from PIL import Image

    from segdeploy import Segmenter
    from segdeploy.data import DatasetSpec
    from segdeploy.data.synthetic import synthetic_samples
    from segdeploy.export import export_onnx
    from segdeploy.validate import load_validation_data, validate_onnx

    data = load_validation_data(
        DatasetSpec("synthetic:64", split="validation[:3]", eval_split="validation[:3]"),
        num_labels=5,
    )
    out = tmp_path / "onnx"
    result = export_onnx(tiny_model_dir, out, data=data, fuse_argmax=True)
    assert set(result.graphs) == {"fp32", "fused"}
    report = result.reports["fused"]
    assert report["fused_argmax"] is True and report["max_abs_logit_diff"] is None
    assert report["passed"] is True and report["pixel_agreement"] >= 0.999
    assert "agree with PyTorch" in report["reason"]

    # Without data the verdict is the agreement alone (logits cannot be compared).
    random_report = validate_onnx(out / "model_fused.onnx", tiny_model_dir, write=False)
    assert random_report["passed"] is True and random_report["mean_iou_drop"] is None

    images = [Image.fromarray(img) for img, _ in synthetic_samples(3, seed=2, size=(50, 70))]
    fused = Segmenter(out, provider="cpu", variant="fused").predict_batch(images)
    plain = Segmenter(out, provider="cpu").predict_batch(images)
    for a, b in zip(fused, plain, strict=True):
        assert a.shape == (50, 70) and (a == b).mean() >= 0.999


def test_a_broken_fused_graph_fails_validation(tiny_model_dir, tiny_onnx_dir, tmp_path):
    from segdeploy.validate import validate_onnx

    model = onnx.load(tiny_onnx_dir / "model.onnx")
    # Flip the classifier's weights: the labels change almost everywhere.
    classifier = next(i for i in model.graph.initializer if "classifier.weight" in i.name)
    w = onnx.numpy_helper.to_array(classifier)
    classifier.CopyFrom(onnx.numpy_helper.from_array(-w, classifier.name))
    onnx.save(model, tmp_path / "broken.onnx")
    fused = fuse_argmax(tmp_path / "broken.onnx", tmp_path / "model_fused.onnx", num_labels=5)
    report = validate_onnx(fused, tiny_model_dir, write=False)
    assert report["passed"] is False and report["pixel_agreement"] < 0.999
