"""`segdeploy infer --tile` and `Segmenter.predict(image, tile=...)` on a real (tiny) ONNX
SegFormer: labels equal MMSegmentation's slide inference over the same graph's logits,
large and georeferenced images come out as tiled GeoTIFFs, and bad options exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from mmseg_reference import mmseg_slide, photo
from PIL import Image
from test_large_image import GEO

from segdeploy import Segmenter
from segdeploy.cli import main as cli
from segdeploy.runtime import large_image, tiled_infer
from segdeploy.runtime.infer import run_infer
from segdeploy.runtime.tiles import TileOptions


@pytest.fixture(scope="module")
def seg(tiny_onnx_dir):
    return Segmenter(tiny_onnx_dir, provider="cpu", threads=1, batch_size=3)


def reference(seg, image, tile, stride, blend="mean"):
    from segdeploy.runtime.tiles import gaussian_weights

    weights = gaussian_weights if blend == "gaussian" else None
    return mmseg_slide(
        image, seg.logits, seg.num_labels, tile, stride, weights, seg.preprocessor.normalize
    )


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_cli_labels_equal_mmsegmentation_over_the_graphs_logits(
    tiny_onnx_dir, tmp_path, seg, blend
):
    image = photo(90, 133, seed=5, block=16)
    Image.fromarray(image).save(tmp_path / "a.png")
    result = CliRunner().invoke(
        cli,
        ["infer", str(tmp_path / "a.png"), "--model", str(tiny_onnx_dir), "-o", str(tmp_path / "out"),
         "--tile", "32", "--stride", "21", "--blend", blend, "--provider", "cpu", "--batch-size", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    labels = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert (labels == reference(seg, image, (32, 32), (21, 21), blend)).all()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rec = summary["images"][0]
    assert rec["tiles"] == {"tile": [32, 32], "stride": [21, 21], "blend": blend, "windows": 24}
    assert rec["size"] == [90, 133] and sum(c["share"] for c in rec["classes"]) == pytest.approx(1)
    assert summary["totals"]["images"] == 1 and summary["totals"]["stage_ms_per_image"]["model"] > 0


@pytest.mark.parametrize("given, per_call", [(None, 1), (3, 3)])
def test_tiled_runs_on_the_cpu_take_one_window_per_call_unless_told(
    tiny_onnx_dir, tmp_path, monkeypatch, given, per_call
):
    calls = []
    logits = Segmenter.logits

    def counted(self, pixels):
        calls.append(len(pixels))
        return logits(self, pixels)

    monkeypatch.setattr(Segmenter, "logits", counted)
    image = photo(90, 133, seed=5, block=16)  # 24 windows of 32 px at stride 21
    Image.fromarray(image).save(tmp_path / "a.png")
    batch = [] if given is None else ["--batch-size", str(given)]
    result = CliRunner().invoke(
        cli,
        ["infer", str(tmp_path / "a.png"), "--model", str(tiny_onnx_dir), "-o", str(tmp_path / "out"),
         "--tile", "32", "--stride", "21", "--provider", "cpu", *batch],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert max(calls) == per_call and sum(calls) == 24
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["batch_size"] == per_call

    api = Segmenter(tiny_onnx_dir, provider="cpu", threads=1, batch_size=given)
    assert api.batch_size == (given or 4)  # whole images keep the CPU's batch
    calls.clear()
    api.predict(image, tile=32, stride=21)
    assert max(calls) == per_call and sum(calls) == 24


def test_predict_api_tiles_paths_arrays_and_images(seg, tmp_path):
    image = photo(70, 50, seed=2, block=16)
    ref = reference(seg, image, (64, 64), (43, 43))  # auto: the processor's 64x64
    Image.fromarray(image).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", image, photometric="rgb", tile=(16, 16))
    for item in (image, Image.fromarray(image), tmp_path / "a.png", str(tmp_path / "a.tif")):
        assert (seg.predict(item, tile="auto") == ref).all()
    assert (
        seg.predict(image, tile=48, overlap=0.5) == reference(seg, image, (48, 48), (24, 24))
    ).all()
    # without tile: unchanged (resized to the model and back)
    assert (seg.predict(image) == seg.predict_batch([image])[0]).all()


def test_large_and_georeferenced_images_give_tiled_geotiffs(
    tiny_onnx_dir, tmp_path, seg, monkeypatch
):
    monkeypatch.setattr(large_image, "LARGE_PIXELS", 100 * 100)
    big = photo(150, 170, seed=7, block=16)
    small_geo = photo(60, 80, seed=8, block=16)
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "big.tif", big, photometric="rgb", tile=(32, 32), compression="zlib")
    tifffile.imwrite(src / "geo.tif", small_geo, photometric="rgb", extratags=GEO)
    Image.fromarray(small_geo).save(src / "plain.png")
    out = tmp_path / "out"
    tiling = TileOptions(64, 43)
    result = run_infer(
        [src], tiny_onnx_dir, out, segmenter=seg, tiling=tiling, overlay=True, progress=False
    )
    assert result["totals"]["images"] == 3 and result["totals"]["failed"] == 0
    assert (
        large_image.read_labels(out / "in" / "big.tif") == reference(seg, big, (64, 64), (43, 43))
    ).all()
    assert (
        large_image.read_labels(out / "in" / "geo.tif")
        == reference(seg, small_geo, (64, 64), (43, 43))
    ).all()
    assert (out / "in" / "plain.png").is_file() and not (out / "in" / "plain.tif").exists()
    with tifffile.TiffFile(out / "in" / "geo.tif") as tf:
        assert tf.pages.first.tags[34735].value == GEO[2][3]
    over = tifffile.imread(out / "in" / "big_overlay.tif")
    assert over.shape == (150, 170, 3) and over.dtype == np.uint8
    assert (out / "in" / "plain_overlay.jpg").is_file()
    records = {r["input"]: r for r in json.loads((out / "summary.json").read_text())["images"]}
    assert records[str(src / "big.tif")]["output"] == "in/big.tif"
    # --skip-existing finds the TIFFs (and redoes nothing)
    again = run_infer(
        [src],
        tiny_onnx_dir,
        out,
        segmenter=seg,
        tiling=tiling,
        overlay=True,
        skip_existing=True,
        progress=False,
    )
    assert again["totals"]["skipped"] == 3 and again["totals"]["images"] == 0


def test_a_stop_signal_leaves_no_partial_output(tiny_onnx_dir, tmp_path, seg):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo(200, 90, seed=1)).save(src / "a.png")
    calls = iter(range(100))
    out = tmp_path / "out"
    out.mkdir()
    jobs = [tiled_infer.pipeline.Job(src / "a.png", out / "a.png")]
    from segdeploy.runtime.tiles import plan_for

    records = []
    outcome = tiled_infer.run(
        jobs, seg, plan_for(seg, TileOptions(32)), out, overlay=False, skip_existing=False,
        record=records.append, stop=lambda: next(calls) >= 3,
    )  # fmt: skip
    assert outcome.interrupted and not records
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--stride", "32"], "--stride: only with --tile"),
        (["--tile", "32", "--engine", "ray"], "--tile: only with --engine local"),
        (["--tile", "32", "--stride", "40"], "--stride: must be 1 to the tile's side"),
        (["--tile", "32x"], "--tile: expected SIZE or HEIGHTxWIDTH"),
        (["--tile", "32", "--stride", "8", "--overlap", "0.5"], "not both"),
    ],
)
def test_bad_tile_options_exit_2_before_writing(tiny_onnx_dir, tmp_path, args, match):
    Image.fromarray(photo(40, 40)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["infer", str(tmp_path / "a.png"), "--model", str(tiny_onnx_dir), "-o", str(out), *args],
    )
    assert result.exit_code == 2 and match in result.output, result.output
    assert not out.exists()


def test_a_fused_graph_cannot_tile(tiny_onnx_dir, tmp_path):
    fuse = pytest.importorskip("segdeploy.export.fuse_argmax")
    folder = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, folder)
    fuse.fuse_argmax(folder / "model.onnx", folder / "model_fused.onnx", num_labels=5)
    Image.fromarray(photo(40, 40)).save(tmp_path / "a.png")
    result = CliRunner().invoke(
        cli, ["infer", str(tmp_path / "a.png"), "--model", str(folder), "--variant", "fused",
              "-o", str(tmp_path / "out"), "--tile", "auto"],
    )  # fmt: skip
    assert result.exit_code == 2 and "argmax fused in" in result.output


def test_tiled_inference_is_torch_free(tiny_onnx_dir, tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", photo(80, 90), photometric="rgb", tile=(16, 16))
    code = (
        "import sys\n"
        "from segdeploy import Segmenter\n"
        f"m = Segmenter({str(tiny_onnx_dir)!r}, provider='cpu').predict({str(tmp_path / 'a.tif')!r}, tile=48)\n"
        "assert m.shape == (80, 90), m.shape\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_clips_and_streams_are_not_tiled(tiny_onnx_dir, tmp_path, seg):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo(40, 50)).save(src / "a.png")
    (src / "drive.mp4").write_bytes(b"not decoded: refused by name")
    out = tmp_path / "out"
    result = run_infer(
        [src], tiny_onnx_dir, out, segmenter=seg, tiling=TileOptions(32), progress=False
    )
    assert result["totals"]["images"] == 1 and result["totals"]["failed"] == 1
    failure = json.loads((out / "summary.json").read_text())["failures"][0]
    assert failure["input"].endswith("drive.mp4") and "--tile segments images" in failure["reason"]
    cli_result = CliRunner().invoke(
        cli,
        [
            "infer",
            "--model",
            str(tiny_onnx_dir),
            "--stream",
            "rtsp://cam/live",
            "--tile",
            "32",
            "-o",
            str(tmp_path / "o2"),
        ],
    )
    assert cli_result.exit_code == 2 and "--tile: tiles images" in cli_result.output
