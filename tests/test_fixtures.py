import json

import onnx


def test_tiny_onnx_export_is_loadable(tiny_onnx_dir):
    model = onnx.load(tiny_onnx_dir / "model.onnx")
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    config = json.loads((tiny_onnx_dir / "config.json").read_text())
    assert len(config["id2label"]) == 5
    assert (tiny_onnx_dir / "preprocessor_config.json").is_file()
