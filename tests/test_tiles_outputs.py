"""A tiled run's outputs obey infer's rules for every output (issue 22 on issue 25's files):
each carries segdeploy's mark (PNG, JPEG and the TIFFs of large or georeferenced images),
a file segdeploy did not write at an output path is refused before the run unless
--overwrite, --skip-existing trusts only this model's unchanged outputs, and a model that
fails on one image's windows fails that image alone."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from mmseg_reference import photo
from PIL import Image
from test_large_image import GEO

from segdeploy import Segmenter
from segdeploy.cli import main as cli
from segdeploy.runtime import large_image, tiled_infer
from segdeploy.runtime.infer import run_infer
from segdeploy.runtime.provenance import owned, read_mark
from segdeploy.runtime.tiles import TileOptions, plan_for


@pytest.fixture(scope="module")
def seg(tiny_onnx_dir):
    return Segmenter(tiny_onnx_dir, provider="cpu", threads=1, batch_size=3)


@pytest.fixture
def large(monkeypatch):
    """Images over 100x100 pixels count as large (written as tiled TIFF)."""
    monkeypatch.setattr(large_image, "LARGE_PIXELS", 100 * 100)


def _inputs(folder):
    folder.mkdir()
    tifffile.imwrite(folder / "big.tif", photo(150, 170, seed=7), photometric="rgb", tile=(32, 32))
    tifffile.imwrite(folder / "geo.tif", photo(60, 80, seed=8), photometric="rgb", extratags=GEO)
    Image.fromarray(photo(60, 70, seed=9)).save(folder / "plain.png")
    return folder


def _infer(model, *args):
    return CliRunner().invoke(
        cli, ["infer", "--model", str(model), "--tile", "64", "--stride", "43", *args]
    )


def test_every_tiled_output_carries_the_mark(tiny_onnx_dir, tmp_path, seg, large):
    src = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    run_infer(
        [src], tiny_onnx_dir, out, segmenter=seg, tiling=TileOptions(64, 43), overlay=True,
        progress=False,
    )  # fmt: skip
    sizes = {"big": (150, 170), "geo": (60, 80), "plain": (60, 70)}
    names = ["big.tif", "big_overlay.tif", "geo.tif", "geo_overlay.tif", "plain.png",
             "plain_overlay.jpg"]  # fmt: skip
    assert sorted(p.name for p in (out / "in").iterdir()) == sorted(names)
    for name in names:
        mark = owned(out / "in" / name, f"in/{name}")
        assert mark is not None, name
        assert (
            mark.model == seg.fingerprint and mark.size == sizes[name.split("_")[0].split(".")[0]]
        )
    # the mark's tag leaves the pixels and the GeoTIFF tags as they were
    with tifffile.TiffFile(out / "in" / "geo.tif") as tf:
        assert tf.pages.first.tags[34735].value == GEO[2][3]
        assert tf.pages.first.asarray().shape == (60, 80)
    # a byte changed anywhere but the mark: not segdeploy's any more
    data = bytearray((out / "in" / "big.tif").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "in" / "big.tif").write_bytes(bytes(data))
    assert read_mark(out / "in" / "big.tif") is None


def test_a_user_tiff_at_an_output_path_is_refused_unless_overwrite(tiny_onnx_dir, tmp_path, large):
    src = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    (out / "in").mkdir(parents=True)
    mine = np.full((150, 170), 4, np.uint8)
    tifffile.imwrite(out / "in" / "big.tif", mine)  # the user's own mask where big's goes
    Image.fromarray(mine).save(out / "in" / "geo.png")  # geo writes geo.tif: not in the way
    before = {p.name: p.read_bytes() for p in (out / "in").iterdir()}
    result = _infer(tiny_onnx_dir, str(src), "-o", str(out))
    assert result.exit_code == 2, result.output
    assert "big.tif" in result.output and "holds a file segdeploy did not write" in result.output
    assert {p.name: p.read_bytes() for p in (out / "in").iterdir()} == before
    assert not (out / "summary.json").exists()

    result = _infer(tiny_onnx_dir, str(src), "-o", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert owned(out / "in" / "big.tif", "in/big.tif") is not None
    assert (out / "in" / "geo.png").read_bytes() == before["geo.png"]  # never an output path
    assert owned(out / "in" / "geo.tif", "in/geo.tif") is not None


def test_skip_existing_trusts_only_this_models_unchanged_tiffs(tiny_onnx_dir, tmp_path, seg, large):
    src = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    first = _infer(tiny_onnx_dir, str(src), "-o", str(out), "--overlay")
    assert first.exit_code == 0, first.output
    written = {r["output"]: r for r in json.loads((out / "summary.json").read_text())["images"]}
    again = _infer(tiny_onnx_dir, str(src), "-o", str(out), "--overlay", "--skip-existing")
    assert again.exit_code == 0, again.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["skipped"] == 3 and summary["totals"]["images"] == 0
    rec = {r["output"]: r for r in summary["images"]}["in/big.tif"]
    assert rec["overlay"] == "in/big_overlay.tif" and rec["size"] == [150, 170]
    assert rec["classes"] == written["in/big.tif"]["classes"]  # counted from the TIFF

    # the input changed size since: its TIFF is another image's, redone
    tifffile.imwrite(src / "big.tif", photo(140, 170, seed=3), photometric="rgb", tile=(32, 32))
    # an overlay edited since: not ours any more; refused, then redone with --overwrite
    data = bytearray((out / "in" / "geo_overlay.tif").read_bytes())
    data[-1] ^= 0xFF
    (out / "in" / "geo_overlay.tif").write_bytes(bytes(data))
    refused = _infer(tiny_onnx_dir, str(src), "-o", str(out), "--overlay", "--skip-existing")
    assert refused.exit_code == 2 and "geo_overlay.tif" in refused.output
    redo = _infer(
        tiny_onnx_dir, str(src), "-o", str(out), "--overlay", "--skip-existing", "--overwrite"
    )
    assert redo.exit_code == 0, redo.output
    totals = json.loads((out / "summary.json").read_text())["totals"]
    assert (totals["images"], totals["skipped"]) == (2, 1)
    assert tifffile.imread(out / "in" / "big.tif").shape == (140, 170)
    assert read_mark(out / "in" / "geo_overlay.tif") is not None


def test_a_file_that_appears_after_planning_is_not_replaced(tmp_path, seg):
    """check_plan refuses before the run; each image checks again as it writes."""
    Image.fromarray(photo(50, 60)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"the user's")
    jobs = [tiled_infer.pipeline.Job(tmp_path / "a.png", out / "a.png")]
    records = []
    plan = plan_for(seg, TileOptions(32))
    tiled_infer.run(jobs, seg, plan, out, overlay=False, skip_existing=False, record=records.append)
    assert "did not write" in records[0]["reason"]
    assert (out / "a.png").read_bytes() == b"the user's"
    tiled_infer.run(
        jobs, seg, plan, out, overlay=False, skip_existing=False, record=records.append,
        overwrite=True,
    )  # fmt: skip
    assert "reason" not in records[1] and owned(out / "a.png", "a.png") is not None


def test_a_model_failure_fails_that_image_alone(tiny_onnx_dir, tmp_path, monkeypatch):
    seg = Segmenter(tiny_onnx_dir, provider="cpu", threads=1)
    logits = seg.logits

    def fails_on_narrow(x):  # the 40-pixel-wide image's windows are 40 wide
        if x.shape[-1] == 40:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated")
        return logits(x)

    monkeypatch.setattr(seg, "logits", fails_on_narrow)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo(50, 40)).save(src / "narrow.png")
    Image.fromarray(photo(50, 90)).save(src / "wide.png")
    out = tmp_path / "out"
    result = run_infer(
        [src], tiny_onnx_dir, out, segmenter=seg, tiling=TileOptions(64), progress=False
    )
    assert (result["totals"]["images"], result["totals"]["failed"]) == (1, 1)
    failure = json.loads((out / "summary.json").read_text())["failures"][0]
    assert failure["input"].endswith("narrow.png")
    assert "the model cannot run this image's windows" in failure["reason"]
    assert "simulated" in failure["reason"]
    assert sorted(os.listdir(out / "in")) == ["wide.png"]
