"""Every family of the guide through the whole tool: train, export, validate, infer.

Per family (tests/family_models.py's tiny configs, UPerNet with ConvNeXt and with Swin):
`segdeploy train` a few steps from a local folder of re-initialised weights (default
init makes some tiny nets output ~1e-45 logits, and agreement on those would mean
nothing), `segdeploy export` with fp16, fused argmax and int8 (the family's float op types)
validated on the recorded split, then `segdeploy infer` on photos of several sizes and modes, whose label maps must
equal transformers in torch (slow processor, forward, bilinear upsample to the photo,
argmax) on >= 99.9% of the pixels. A `scratch:<family>-tiny` run checks the offline ids.

The dynamo-routed families take 30-60 s each here, so they are marked slow (CI runs
them too), as in tests/test_infer_families.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from family_models import CASE_IDS, CASES, PHOTOS, label_map, save_model_folder, torch_mask
from family_models import write_photos as _write_photos
from safetensors.numpy import load_file

from segdeploy.cli import main
from segdeploy.families import FAMILIES
from segdeploy.runtime.image_io import load_image

SLOW = {"data2vec-vision-tiny", "mobilevitv2-tiny", "upernet-tiny", "upernet-tiny-swin"}
PARAMS = [
    pytest.param(case, id=cid, marks=[pytest.mark.slow] if cid in SLOW else [])
    for case, cid in zip(CASES, CASE_IDS, strict=True)
]
AGREEMENT = 0.999
#: Enough steps at a high rate for the decisions to have margins: on untrained weights the
#: logits of neighbouring classes nearly tie, and fp16/int8 flip such pixels by the percent.
STEPS = 20
#: fp16 and int8 agreement per family, printed at the end of the module (-s).
MEASURED: dict[str, dict[str, float]] = {}
VARIANTS = ("validation.json", "validation_fp16.json", "validation_fused.json")
#: OpenVINO (issue 27): with the openvino extra, every family is also exported with NNCF's
#: int8 for OpenVINO and inferred on OpenVINO, fp32 and int8.
HAS_OPENVINO = all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))
OPENVINO_EXPORT = ["--int8-engine", "onnxruntime", "--int8-engine", "openvino"]
#: Families whose NNCF int8 IR OpenVINO's CPU plugin cannot compile (openvino 2026.4.1:
#: in MobileViTV2's, a Gather's shape inference fails at compile): export refuses it
#: with OpenVINO's reason, as issue 27 asks; their fp32 graph still runs on OpenVINO.
OPENVINO_INT8_REFUSED = {"mobilevitv2"}


def _run(*args: str):
    return CliRunner().invoke(main, [*args])


@pytest.fixture(scope="module", autouse=True)
def report_agreement():
    yield
    for case, shares in sorted(MEASURED.items()):
        print(f"\n{case}: " + ", ".join(f"{k} {v:.3%}" for k, v in shares.items()))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _write_photos(tmp_path_factory.mktemp("photos"))


def _train(model: str, out: Path, data: Path):
    return _run(
        "train", "--model", model, "--dataset", str(data), "--image-size", "64",
        "--max-steps", str(STEPS), "--batch-size", "4", "--lr", "1e-3", "--eval-steps", str(STEPS),
        "--no-reduce-labels", "-o", str(out),
    )  # fmt: skip


@pytest.mark.parametrize("case", PARAMS)
def test_train_export_validate_infer(case, synthetic_dir, photos, tmp_path):
    model_type, size = case
    family = FAMILIES[model_type]
    base = save_model_folder(tmp_path / "base", model_type, size)

    # train: a few steps from the local folder; the weights move, the folder is complete.
    model = tmp_path / "model"
    result = _train(str(base), model, synthetic_dir)
    assert result.exit_code == 0, result.output
    assert json.loads((model / "config.json").read_text())["model_type"] == model_type
    before, after = load_file(base / "model.safetensors"), load_file(model / "model.safetensors")
    assert any(not np.array_equal(before[k], after[k]) for k in before), "training changed nothing"
    assert json.loads((model / "metrics.json").read_text())["step"] == STEPS

    # export + validate on the recorded split: the exact graphs (fp32, fused argmax) pass;
    # fp16 and int8 (with the family's float op types) are held to the same rules, and the
    # exit status follows their verdicts.
    export = ["export", str(model), "--fp16", "--fuse-argmax", "--quantize", "int8",
              "--calibration-images", "8", "--max-images", "8"]  # fmt: skip
    ov_int8 = HAS_OPENVINO and model_type not in OPENVINO_INT8_REFUSED
    if HAS_OPENVINO and not ov_int8:
        refused = _run(*export, *OPENVINO_EXPORT)
        assert refused.exit_code == 2, refused.output
        assert "OpenVINO cannot compile the graph" in refused.output, refused.output
        assert not (model / "onnx").exists()  # nothing of the refused export is left
    result = _run(*export, *(OPENVINO_EXPORT if ov_int8 else []))
    onnx_dir = model / "onnx"
    assert f"(opset {family.default_opset}, {family.route} route)" in result.output, result.output
    names = ("", "_fused", "_fp16", "_fp16_fused", "_int8")
    reports = {
        name: json.loads((onnx_dir / f"validation{name}.json").read_text())
        for name in (*names, *(("_openvino_int8",) if ov_int8 else ()))
    }
    for name in ("", "_fused"):
        assert reports[name]["passed"] is True, (name, reports[name]["reason"])
        assert reports[name]["exporter"]["route"] == family.route
        assert reports[name]["mode"] == "dataset" and reports[name]["images"] > 0, name
    assert reports["_int8"]["precision"] == "int8" and reports["_fp16"]["precision"] == "fp16"
    if ov_int8:
        assert reports["_openvino_int8"]["precision"] == "int8"
        assert reports["_openvino_int8"]["provider"] == "openvino"
    quantized = json.loads((onnx_dir / "quantization_int8.json").read_text())
    assert set(quantized["float_op_types"]) == set(family.int8_float_op_types)
    assert quantized["skip_symbolic_shape"] is family.int8_skip_symbolic_shape
    all_passed = all(r["passed"] for r in reports.values())
    assert result.exit_code == (0 if all_passed else 1), result.output
    MEASURED[f"{model_type}-{size}"] = {
        k.strip("_"): r["pixel_agreement"]
        for k, r in reports.items()
        if k in ("_fp16", "_int8", "_openvino_int8")
    }

    # infer: label maps of photos of several sizes equal the guide's torch path, on
    # onnxruntime and on OpenVINO; OpenVINO's NNCF int8 is measured against it.
    expected = {name: torch_mask(model, load_image(photos / name)) for name, _, _ in PHOTOS}
    runs = [("cpu", "fp32")] + ([("openvino", "fp32")] if HAS_OPENVINO else [])
    runs += [("openvino", "openvino_int8")] if ov_int8 else []
    for provider, variant in runs:
        out = tmp_path / f"masks-{provider}-{variant}"
        result = _run(
            "infer", "--model", str(onnx_dir), "--provider", provider, "--variant", variant,
            "-o", str(out), str(photos),
        )  # fmt: skip
        assert result.exit_code == 0, (provider, variant, result.output)
        shares = []
        for name, (h, w), _ in PHOTOS:
            ours = label_map(out, photos / name)
            assert ours.shape == expected[name].shape == (h, w), name
            shares.append(float((ours == expected[name]).mean()))
        if variant == "fp32":
            assert min(shares) >= AGREEMENT, (provider, shares)
        if provider == "openvino":
            MEASURED[f"{model_type}-{size}"][f"infer openvino {variant}"] = float(np.mean(shares))
    classes = set().union(*(np.unique(m).tolist() for m in expected.values()))
    assert len(classes) >= 2, classes  # one flat class everywhere would prove little


@pytest.mark.parametrize(
    "scratch",
    [pytest.param(f, marks=[pytest.mark.slow] if f != "segformer" else []) for f in FAMILIES],
)
def test_scratch_ids_train_offline(scratch, synthetic_dir, tmp_path):
    family = FAMILIES[scratch]
    result = _train(f"scratch:{family.scratch_name}-tiny", tmp_path / "m", synthetic_dir)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == scratch and len(config["id2label"]) == 5


def test_a_pretrained_beit_keeps_its_size_and_refuses_another(synthetic_dir, tmp_path):
    base = save_model_folder(tmp_path / "base", "beit", "tiny")  # config image_size 64
    result = _run(
        "train", "--model", str(base), "--dataset", str(synthetic_dir), "--image-size", "96",
        "--max-steps", "1", "-o", str(tmp_path / "m"),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "96 differs from" in result.output and "image_size 64" in result.output
    assert not (tmp_path / "m").exists()
