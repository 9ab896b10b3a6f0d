"""Every family's tiny model through its exporter route: ONNX Runtime equals torch.

Per family: export into a module-scoped folder (one export per family), then compare
logits at the traced size and, where the registry allows dynamic axes, at a second
size; masks after the runtime's exact upsample_argmax against torch's bilinear
upsample + argmax at photo sizes; and the whole torch-free path (our processor, ONNX
Runtime, upsample_argmax) against the guide's torch path (transformers' processor,
forward, bilinear upsample to the photo, argmax). The dynamo-routed exports take
10-45 s each on two busy cores, so all but one of them are marked slow (about 2 min
in all with `-m slow`); BEiT stands for the dynamo route in the default suite.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from family_models import CASE_IDS, CASES, SIDE, save_model_folder
from PIL import Image

from segdeploy.data.synthetic import synthetic_sample
from segdeploy.errors import SegdeployError
from segdeploy.export.routes import check_opset, export_fp32, export_size
from segdeploy.families import FAMILIES
from segdeploy.runtime.processors import processor_from_dir
from segdeploy.runtime.upsample import upsample_argmax

SLOW = {"data2vec-vision-tiny", "mobilevitv2-tiny", "upernet-tiny", "upernet-tiny-swin"}
PARAMS = [
    pytest.param(case, id=cid, marks=[pytest.mark.slow] if cid in SLOW else [])
    for case, cid in zip(CASES, CASE_IDS, strict=True)
]
PHOTO_SIZES = [(150, 200), (97, 61), (64, 64)]  # (height, width): landscape, portrait, square
AGREEMENT = 0.999


class Exported:
    def __init__(self, model_dir, onnx_path, seconds):
        self.model_dir, self.onnx_path, self.seconds = model_dir, onnx_path, seconds
        self.model = transformers.AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def both(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            expected = self.model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
        return self.session.run(["logits"], {"pixel_values": pixels})[0], expected


@pytest.fixture(scope="module", params=PARAMS)
def exported(request, tmp_path_factory) -> tuple[str, Exported]:
    model_type, size = request.param
    root = tmp_path_factory.mktemp(f"{model_type}-{size}")
    model_dir = save_model_folder(root / "model", model_type, size)
    start = time.perf_counter()
    onnx_path = export_fp32(model_dir, root / "onnx")
    return model_type, Exported(model_dir, onnx_path, time.perf_counter() - start)


def close(got: np.ndarray, expected: np.ndarray) -> float:
    """max |delta logit| relative to max |logit|; asserted <= 1e-3."""
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def second_size(model_type: str) -> tuple[int, int]:
    return (96, 96) if FAMILIES[model_type].square_only else (96, 128)


def test_graph_has_the_contract_io(exported):
    model_type, ex = exported
    family = FAMILIES[model_type]
    graph = onnx.load(ex.onnx_path).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] in (3, "num_channels")
    if family.dynamic_spatial:
        assert all(isinstance(d, str) for d in dims[2:])
    else:
        assert dims[2:] == [SIDE, SIDE]
    opset = {o.domain: o.version for o in onnx.load(ex.onnx_path).opset_import}[""]
    assert opset == family.default_opset
    # The default opset keeps every nn.LayerNorm one node (what int8 leaves in float).
    if any(isinstance(m, torch.nn.LayerNorm) for m in ex.model.modules()):
        assert "LayerNormalization" in {n.op_type for n in graph.node}


def test_logits_equal_torch_at_traced_size_and_batch_sizes(exported):
    model_type, ex = exported
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        pixels = rng.standard_normal((batch, 3, SIDE, SIDE)).astype(np.float32)
        assert close(*ex.both(pixels)) <= 1e-3


def test_logits_equal_torch_at_a_second_size_when_dynamic(exported):
    model_type, ex = exported
    pixels = np.random.default_rng(1).standard_normal((2, 3, *second_size(model_type)))
    pixels = pixels.astype(np.float32)
    if FAMILIES[model_type].dynamic_spatial:
        assert close(*ex.both(pixels)) <= 1e-3
        if FAMILIES[model_type].square_only:  # like torch, the graph fails loudly off-square
            off_square = np.zeros((1, 3, 96, 128), np.float32)
            with pytest.raises(Exception, match="Reshape"):
                ex.session.run(["logits"], {"pixel_values": off_square})
    else:  # fixed axes: refused, never silently wrong
        with pytest.raises(Exception, match="(?i)invalid dimensions"):
            ex.session.run(["logits"], {"pixel_values": pixels})


def test_masks_equal_torch_after_upsample_argmax(exported):
    model_type, ex = exported
    pixels = np.random.default_rng(2).standard_normal((2, 3, SIDE, SIDE)).astype(np.float32)
    got, expected = ex.both(pixels)
    for size in PHOTO_SIZES:
        ours = upsample_argmax(got, size)
        torch_mask = torch.nn.functional.interpolate(
            torch.from_numpy(expected), size=size, mode="bilinear", align_corners=False
        ).argmax(1)
        assert (ours == torch_mask.numpy()).mean() >= AGREEMENT, size


def test_torch_free_path_equals_the_guides_torch_path(exported):
    """Our processor + ONNX Runtime + upsample_argmax against transformers' processor +
    forward + bilinear upsample to the photo + argmax, on photos of several sizes."""
    model_type, ex = exported
    reference = transformers.AutoImageProcessor.from_pretrained(ex.model_dir, use_fast=False)
    ours = processor_from_dir(ex.model_dir)
    for i, (h, w) in enumerate(PHOTO_SIZES):
        photo = Image.fromarray(synthetic_sample(i, size=(h, w))[0])
        pixels, geometry = ours(photo)
        expected_pixels = reference(images=photo, return_tensors="np")["pixel_values"]
        assert np.array_equal(pixels[None], expected_pixels)
        logits = ex.session.run(["logits"], {"pixel_values": pixels[None]})[0]
        mask = upsample_argmax(logits, geometry.original)[0]
        with torch.no_grad():
            torch_logits = ex.model(pixel_values=torch.from_numpy(expected_pixels)).logits
        torch_mask = torch.nn.functional.interpolate(
            torch_logits, size=(h, w), mode="bilinear", align_corners=False
        ).argmax(1)[0]
        assert mask.shape == (h, w)
        assert (mask == torch_mask.numpy()).mean() >= AGREEMENT


def test_export_took_seconds_not_minutes(exported):
    _, ex = exported
    assert ex.seconds < 240, f"export took {ex.seconds:.0f} s"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_too_low_opset_is_refused_saying_why(model_type):
    family = FAMILIES[model_type]
    check_opset(family, family.min_opset)
    with pytest.raises(SegdeployError) as err:
        check_opset(family, family.min_opset - 1)
    message = str(err.value)
    assert f"needs opset >= {family.min_opset}" in message and family.name in message
    assert "\n" not in message


def test_export_refuses_a_low_opset_before_any_work(tmp_path):
    save_model_folder(tmp_path / "model", "mobilevitv2", "tiny")
    with pytest.raises(SegdeployError, match="Col2Im"):
        export_fp32(tmp_path / "model", tmp_path / "onnx", opset=17)
    assert not (tmp_path / "onnx").exists()


def test_export_refuses_an_unsupported_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(
        SegdeployError, match="'vit' is not supported; segdeploy supports segformer"
    ):
        export_fp32(tmp_path / "model", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_export_size_comes_from_the_processor_then_the_config(tmp_path):
    from segdeploy.families import scratch_config

    beit = scratch_config("beit", "tiny", {0: "a"})
    assert export_size(beit) == (SIDE, SIDE)
    upernet = scratch_config("upernet", "tiny", {0: "a"})  # no image_size
    assert export_size(upernet, tmp_path) == (512, 512)  # no processor either
    (tmp_path / "preprocessor_config.json").write_text(
        '{"do_center_crop": true, "crop_size": {"height": 48, "width": 80}, '
        '"size": {"shortest_edge": 64}}'
    )
    assert export_size(upernet, tmp_path) == (48, 80)
    # A MobileNetV2 fine-tuned at 48x80 from a 513 checkpoint is traced at what it is fed;
    # BEiT, which runs only at its image_size, keeps it.
    mobilenet = scratch_config("mobilenet_v2", "1.0-513", {0: "a"})
    assert export_size(mobilenet, tmp_path) == (48, 80)
    assert export_size(beit, tmp_path) == (SIDE, SIDE)


def test_int8_preprocessing_needs_what_the_registry_says(exported, tmp_path, monkeypatch):
    """onnxruntime's quant_pre_process (the first step of segdeploy's int8) runs on the
    graph with the registry's skip_symbolic_shape, and needs it where it is set."""
    from onnxruntime.quantization import quant_pre_process

    model_type, ex = exported
    monkeypatch.chdir(tmp_path)  # a failing symbolic shape inference leaves files in the cwd
    skip = FAMILIES[model_type].int8_skip_symbolic_shape
    quant_pre_process(str(ex.onnx_path), str(tmp_path / "pre.onnx"), skip_symbolic_shape=skip)
    assert onnx.load(tmp_path / "pre.onnx").graph.node
    if skip:
        with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
            quant_pre_process(str(ex.onnx_path), str(tmp_path / "pre2.onnx"))


def test_validation_fails_a_dynamic_graph_that_is_wrong_at_another_size(tmp_path):
    """MobileViT through Optimum's own (dynamic-axes) export: right at the traced 64x64,
    broken at 100x132. Validation's second-size rule fails it, naming the size, which is
    why the registry exports MobileViT with fixed axes."""
    from dataclasses import replace

    from segdeploy.export.routes import export_optimum, load_for_export
    from segdeploy.validate import validate_onnx

    model_dir = save_model_folder(tmp_path / "model", "mobilevit", "tiny")
    dynamic = replace(FAMILIES["mobilevit"], route="optimum", dynamic_spatial=True)
    model = load_for_export(model_dir)
    onnx_path = export_optimum(model, model_dir, tmp_path / "onnx", dynamic, 17, (SIDE, SIDE))
    report = validate_onnx(onnx_path, model_dir, random_inputs=2, write=False)
    assert report["failed_rules"] == ["second_size"], report["reason"]
    assert "at 100x132 (dynamic axes)" in report["rules"]["second_size"]["reason"]
    assert report["rules"]["logits"]["passed"]  # right at the traced size

    fixed = export_fp32(model_dir, tmp_path / "fixed")  # the registry's route
    report = validate_onnx(fixed, model_dir, random_inputs=2, write=False)
    assert report["passed"] and "second_size" not in report["rules"], report["reason"]
