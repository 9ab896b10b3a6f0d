"""Hostile inputs to train, export, validate and bench (issue 12): each is refused by
name or reported, and nothing the user owns is lost."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.cli import main

# ------------------------------------------------------------------ bench


def _mode_images(folder):
    """One small image per mode infer converts (L, LA, P, RGBA, I;16), plus RGB."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    folder.mkdir(parents=True)
    Image.fromarray(np.stack([gray] * 3, -1), "RGB").save(folder / "rgb.png")
    Image.fromarray(gray, "L").save(folder / "gray.png")
    Image.fromarray(gray, "L").convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(gray, "L").convert("P").save(folder / "palette.png")
    Image.fromarray(np.stack([gray] * 4, -1), "RGBA").save(folder / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "deep.png")  # I;16
    assert Image.open(folder / "deep.png").mode.startswith("I;16")


@pytest.fixture(scope="module")
def bench_bad_and_gray(tiny_model_dir, tiny_onnx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_hostile")
    _mode_images(root / "images")
    (root / "images" / "empty.jpg").write_bytes(b"")
    out = root / "report.json"
    args = ["bench", "--model", str(tiny_model_dir), "--onnx", str(tiny_onnx_dir),
            "--images", str(root / "images"), "--backends", "torch,hf-pipeline,onnx-cpu",
            "--batch-sizes", "2", "--runs", "1", "--model-runs", "1", "-o", str(out)]  # fmt: skip
    return out, CliRunner().invoke(main, args)


def test_bench_lists_a_bad_image_writes_the_report_and_exits_1(bench_bad_and_gray):
    out, result = bench_bad_and_gray
    assert result.exit_code == 1, result.output
    assert "unexpected" not in result.output
    report = json.loads(out.read_text())
    (bad,) = report["failed_images"]
    assert bad["path"].endswith("empty.jpg") and "empty file" in bad["reason"]
    assert "empty.jpg" in out.with_suffix(".md").read_text()
    assert report["inputs"]["images"] == 6  # the decodable ones, in every row


@pytest.mark.parametrize("backend", ["torch", "hf-pipeline"])
def test_bench_torch_and_pipeline_rows_take_every_image_mode_as_infer_does(
    backend, tiny_model_dir, tiny_onnx_dir, tmp_path
):
    from segdeploy.bench.backends import make_runner, parse_backend
    from segdeploy.bench.worker import list_items

    _mode_images(tmp_path / "images")
    items = list_items(tmp_path / "images")
    ours = make_runner(parse_backend("onnx-cpu"), None, tiny_onnx_dir, 2, 1)
    ours.end_to_end(items, tmp_path / "out", [str(tmp_path / "images")])
    runner = make_runner(parse_backend(backend), tiny_model_dir, tiny_onnx_dir, 2, 1)
    labels = runner.end_to_end(items, tmp_path / "unused", [])
    assert len(labels) == len(items) == 6
    for item, got in zip(items, labels, strict=True):
        want = np.asarray(Image.open(tmp_path / "out" / item.out.with_name(item.out.name + ".png")))
        assert got.shape == want.shape == (40, 48)
        assert (got == want).mean() > 0.999, item.path.name  # the same RGB pixels as infer
    assert len(runner.model_inputs(items, 1)) == 1
