"""`segdeploy infer` on an ONNX folder of every family, against the guide's torch path.

Per family (tests/family_models.py's tiny re-initialised models): export once into a
module-scoped folder, run the CLI on photos of several sizes and modes (in-process with
--workers 0, and with the default worker processes), and compare each label PNG with
transformers in torch: its slow image processor, forward, bilinear upsample to the photo
(align_corners=False), argmax. The dynamo-routed exports take 10-45 s each, so all but
BEiT's are marked slow, as in tests/test_export_routes.py. Then what infer must refuse
at open: a processor whose size a fixed-size graph cannot take, non-square inputs for
DPT, and absurd fields of every processor type.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from family_models import (
    CASE_IDS,
    CASES,
    PHOTOS,
    SIDE,
    label_map,
    save_model_folder,
    torch_mask,
    write_photos,
)
from PIL import Image

from segdeploy.cli import main
from segdeploy.export.routes import export_fp32
from segdeploy.runtime.image_io import load_image

SLOW = {"data2vec-vision-tiny", "mobilevitv2-tiny", "upernet-tiny", "upernet-tiny-swin"}
PARAMS = [
    pytest.param(case, id=cid, marks=[pytest.mark.slow] if cid in SLOW else [])
    for case, cid in zip(CASES, CASE_IDS, strict=True)
]
AGREEMENT = 0.999
#: Per-family agreement measured by the tests, printed at the end of the module (-s).
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """exports(model_type, size) -> (trained model folder, ONNX folder), exported once per
    family for the whole module."""
    done: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(model_type: str, size: str = "tiny") -> tuple[Path, Path]:
        if (model_type, size) not in done:
            root = tmp_path_factory.mktemp(f"{model_type}-{size}")
            model_dir = save_model_folder(root / "model", model_type, size)
            export_fp32(model_dir, root / "onnx")
            done[model_type, size] = model_dir, root / "onnx"
        return done[model_type, size]

    return get


@pytest.fixture(scope="module", params=PARAMS)
def family_onnx(request, exports) -> tuple[str, Path, Path]:
    """(case id, trained model folder, ONNX folder) of each family."""
    model_type, size = request.param
    return (f"{model_type}-{size}", *exports(model_type, size))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module", autouse=True)
def report_agreement():
    yield
    for case, share in sorted(MEASURED.items()):
        print(f"\n{case}: {share:.5%} of pixels equal to the guide's torch path")


def _infer(model: Path, *args: str):
    return CliRunner().invoke(
        main, ["infer", "--model", str(model), "--provider", "cpu", "--threads", "1", *args]
    )


@pytest.mark.parametrize("workers", ["0", None], ids=["in-process", "default-workers"])
def test_infer_masks_equal_the_guides_torch_path(family_onnx, photos, tmp_path, workers):
    case, model_dir, onnx_dir = family_onnx
    out = tmp_path / "out"
    extra = ["--workers", workers] if workers is not None else []
    result = _infer(onnx_dir, "-o", str(out), str(photos), *extra)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["images"] == len(PHOTOS) and summary["failures"] == []
    equal = total = 0
    classes: set[int] = set()
    for name, (h, w), _ in PHOTOS:
        photo = photos / name
        ours = label_map(out, photo)
        # The RGB infer decoded (same converter), so only processing and model differ.
        expected = torch_mask(model_dir, load_image(photo))
        assert ours.shape == expected.shape == (h, w), name
        classes.update(np.unique(expected).tolist())
        share = float((ours == expected).mean())
        assert share >= AGREEMENT, (name, share)
        equal, total = equal + int((ours == expected).sum()), total + h * w
    assert len(classes) >= 2, classes  # agreement on one flat class would mean little
    MEASURED[f"{case} workers={workers or 'default'}"] = equal / total


def test_library_segmenter_gives_the_clis_masks(family_onnx, photos, tmp_path):
    from segdeploy import Segmenter

    _, _, onnx_dir = family_onnx
    out = tmp_path / "out"
    assert _infer(onnx_dir, "-o", str(out), "--workers", "0", str(photos)).exit_code == 0
    seg = Segmenter(onnx_dir, provider="cpu", threads=1)
    files = [photos / name for name, _, _ in PHOTOS]
    for photo, mask in zip(files, seg.predict_batch(files), strict=True):
        assert np.array_equal(mask, label_map(out, photo)), photo.name


def test_a_clips_frames_get_the_labels_of_the_same_frames_as_pngs(family_onnx, tmp_path):
    """Issue 26 for every family's processor: the frames of a clip (odd-sized, H.264 4:2:0)
    segmented by `segdeploy infer` equal infer on each frame as PNG, on every pixel."""
    from video_clips import decoded_frames, scenes, write_clip

    _, _, onnx_dir = family_onnx
    clip = write_clip(tmp_path / "clip.mkv", scenes(4, (70, 90)), codec="libx264")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, rgb in enumerate(decoded_frames(clip)):
        Image.fromarray(rgb).save(frames / f"{i}.png")
    out = tmp_path / "out"
    assert _infer(onnx_dir, "-o", str(out), str(clip), str(frames)).exit_code == 0
    pngs = sorted((out / "clip.mkv" / "frames").glob("*.png"))
    assert len(pngs) == 4
    for i, png in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(png)), label_map(out, frames / f"{i}.png"))


# -- what infer refuses when it opens the folder ------------------------------------------


def _with_processor(onnx_dir: Path, dest: Path, **change) -> Path:
    """A copy of `onnx_dir` whose preprocessor_config.json has `change` applied."""
    shutil.copytree(onnx_dir, dest)
    path = dest / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(change)
    path.write_text(json.dumps(cfg))
    return dest


def _refused(model: Path, photos: Path, out: Path) -> str:
    result = _infer(model, "-o", str(out), str(photos))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "preprocessor_config.json" in lines[0]
    assert not out.exists()  # refused before anything was written
    return lines[0]


def test_a_fixed_size_graph_refuses_another_processor_size(exports, photos, tmp_path):
    _, onnx_dir = exports("beit")
    model = _with_processor(onnx_dir, tmp_path / "m", size={"height": 96, "width": 96})
    line = _refused(model, photos, tmp_path / "out")
    assert "96x96" in line and f"{SIDE}x{SIDE}" in line


def test_a_fixed_size_graph_refuses_a_crop_of_another_size(exports, photos, tmp_path):
    _, onnx_dir = exports("mobilenet_v2")
    model = _with_processor(onnx_dir, tmp_path / "a", crop_size={"height": 48, "width": 64})
    line = _refused(model, photos, tmp_path / "out-a")
    assert "48x64" in line and f"{SIDE}x{SIDE}" in line
    # Without its crop, shortest_edge follows each photo's aspect ratio: refused too.
    model = _with_processor(onnx_dir, tmp_path / "b", do_center_crop=False)
    line = _refused(model, photos, tmp_path / "out-b")
    assert "follows each photo" in line and f"{SIDE}x{SIDE}" in line


def test_dpt_refuses_non_square_inputs_at_open(exports, photos, tmp_path):
    _, onnx_dir = exports("dpt")
    model = _with_processor(onnx_dir, tmp_path / "a", keep_aspect_ratio=True)
    line = _refused(model, photos, tmp_path / "out-a")
    assert "square inputs only" in line and "keep_aspect_ratio" in line
    model = _with_processor(onnx_dir, tmp_path / "b", size={"height": 64, "width": 96})
    assert "64x96" in _refused(model, photos, tmp_path / "out-b")
    # keep_aspect_ratio=False with a square size makes squares of every photo: accepted
    # (the agreement test above runs the exported config, which is exactly that).
    model = _with_processor(onnx_dir, tmp_path / "c", keep_aspect_ratio=False, size=96)
    out = tmp_path / "out-c"
    assert _infer(model, "-o", str(out), "--workers", "0", str(photos)).exit_code == 0
    assert label_map(out, photos / "wide.png").shape == (33, 120)


def test_dpt_padding_is_upsampled_with_the_logits_as_transformers_does(exports, photos, tmp_path):
    """DPTImageProcessor pads to size_divisor; its post_process_semantic_segmentation
    upsamples the whole padded logits to the photo size (it never removes the padding),
    and infer does the same."""
    model_dir, onnx_dir = exports("dpt")
    change = {"size": {"height": 52, "width": 52}, "do_pad": True, "size_divisor": 32}
    model = _with_processor(onnx_dir, tmp_path / "m", **change)
    out = tmp_path / "out"
    assert _infer(model, "-o", str(out), "--workers", "0", str(photos)).exit_code == 0
    model_dir_padded = shutil.copytree(model_dir, tmp_path / "torch")
    shutil.copy2(model / "preprocessor_config.json", model_dir_padded)
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir_padded, use_fast=False)
    net = transformers.AutoModelForSemanticSegmentation.from_pretrained(model_dir_padded).eval()
    for name, (h, w), _ in PHOTOS:
        image = load_image(photos / name)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        assert pixels.shape[-2:] == (64, 64)  # 52 padded to a multiple of 32
        with torch.no_grad():
            outputs = net(pixel_values=pixels)
        expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[(h, w)])
        ours = label_map(out, photos / name)
        assert (ours == expected[0].numpy()).mean() >= AGREEMENT, name


@pytest.mark.parametrize(
    ("processor_type", "change", "field"),
    [
        ("BeitImageProcessor", {"crop_size": {"height": 0, "width": 64}}, "crop_size.height"),
        ("BeitImageProcessor", {"crop_size": "abc"}, "crop_size"),
        ("BeitImageProcessor", {"do_center_crop": "no"}, "do_center_crop"),
        ("MobileNetV2ImageProcessor", {"size": {"shortest_edge": -1}}, "size.shortest_edge"),
        ("MobileNetV2ImageProcessor", {"size": 10**6}, "size"),
        ("MobileNetV2ImageProcessor", {"crop_size": {"height": 64, "width": 1e9}}, "crop_size"),
        ("MobileViTImageProcessor", {"do_flip_channel_order": 1}, "do_flip_channel_order"),
        ("MobileViTImageProcessor", {"rescale_factor": -1}, "rescale_factor"),
        ("DPTImageProcessor", {"ensure_multiple_of": 0}, "ensure_multiple_of"),
        ("DPTImageProcessor", {"keep_aspect_ratio": "yes"}, "keep_aspect_ratio"),
        ("DPTImageProcessor", {"do_pad": True}, "size_divisor"),
        ("DPTImageProcessor", {"do_pad": True, "size_divisor": "8"}, "size_divisor"),
        ("DPTImageProcessor", {"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ("SegformerImageProcessor", {"do_resize": None}, "do_resize"),
    ],
)
def test_absurd_fields_of_every_processor_type_exit_2_naming_the_field(
    tiny_onnx_dir, photos, tmp_path, processor_type, change, field
):
    model = _with_processor(
        tiny_onnx_dir, tmp_path / "m", image_processor_type=processor_type, **change
    )
    line = _refused(model, photos, tmp_path / "out")
    assert field in line and "unexpected" not in line


def test_an_unknown_processor_type_names_the_supported_ones(tiny_onnx_dir, photos, tmp_path):
    model = _with_processor(tiny_onnx_dir, tmp_path / "m", image_processor_type="ViTImageProcessor")
    line = _refused(model, photos, tmp_path / "out")
    assert "unsupported image_processor_type 'ViTImageProcessor'" in line
    for name in ("Segformer", "Beit", "DPT", "MobileNetV2", "MobileViT"):
        assert f"{name}ImageProcessor" in line


def test_a_cropping_family_runs_torch_free(exports, photos, tmp_path):
    """MobileViT (shortest_edge, center crop, BGR) in a fresh interpreter: the command
    imports neither torch nor transformers, and writes the in-process run's masks."""
    from test_no_torch import REPORT, heavy_modules, run_python

    _, onnx_dir = exports("mobilevit")
    reference = tmp_path / "reference"
    assert _infer(onnx_dir, "-o", str(reference), "--workers", "0", str(photos)).exit_code == 0
    args = ["infer", "--model", str(onnx_dir), str(photos), "-o", str(tmp_path / "out")]
    code = (
        "import sys\n"
        "from segdeploy.cli import main\n"
        f"code = main({args!r}, standalone_mode=False)\n" + REPORT + "sys.exit(code or 0)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert heavy_modules(proc.stdout) == []
    for name, _, _ in PHOTOS:
        photo = photos / name
        assert np.array_equal(label_map(tmp_path / "out", photo), label_map(reference, photo))
