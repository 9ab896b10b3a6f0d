"""Issue 25's memory target: a 16,384 x 16,384 RGB TIFF through `segdeploy infer --tile` with
a 150-class model in at most 3 GB of peak RSS (MMSegmentation's C x H x W float buffer alone
would be 150 GiB). Slow: ~2300 windows. The figures for SegFormer b0 at 1k to 16k are in
benchmarks/results/tiles_cpu.md (benchmarks/bench_tiles.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

SIDE = 16384
LIMIT_MB = 3 * 1024

RUN = textwrap.dedent(
    """
    import sys
    from segdeploy.cli import main
    try:
        main(sys.argv[1:], standalone_mode=False)
    finally:
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
        print("PEAK_MB=%.1f" % (int(hwm) / 1024))
    """
)


@pytest.fixture(scope="module")
def model_150(tmp_path_factory):
    """scratch:tiny SegFormer with 150 classes, random weights, processor at 512 px."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from segdeploy.train.models import scratch_config

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("model150")
    model = SegformerForSemanticSegmentation(
        scratch_config("tiny", {i: f"c{i}" for i in range(150)})
    )
    model.eval().save_pretrained(root / "model")
    SegformerImageProcessor(size={"height": 512, "width": 512}).save_pretrained(root / "model")
    main_export(str(root / "model"), output=root / "onnx", task="semantic-segmentation", opset=17)
    return root / "onnx"


def scene(path, side: int):
    """A side x side RGB TIFF, tiled, written tile by tile (the test never holds it)."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (64, 3), dtype=np.uint8)

    def tiles():
        for y in range(0, side, 512):
            for x in range(0, side, 512):
                tile = np.empty((512, 512, 3), np.uint8)
                tile[:] = colours[(y // 512 * 7 + x // 512 * 3) % 64]
                tile[::7, ::5] = colours[(y + x) // 512 % 64]
                yield tile

    tifffile.imwrite(
        path,
        tiles(),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(512, 512),
        photometric="rgb",
        bigtiff=True,
    )
    return path


@pytest.mark.slow
def test_16k_tiff_with_150_classes_stays_under_3_gb(model_150, tmp_path):
    image = scene(tmp_path / "scene.tif", SIDE)
    out = tmp_path / "out"
    args = [
        "infer",
        str(image),
        "--model",
        str(model_150),
        "-o",
        str(out),
        "--tile",
        "auto",
        "--provider",
        "cpu",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = float(proc.stdout.split("PEAK_MB=")[-1])
    summary = json.loads((out / "summary.json").read_text())
    rec = summary["images"][0]
    assert rec["size"] == [SIDE, SIDE] and rec["output"] == "scene.tif"
    assert rec["tiles"]["windows"] == 48 * 48
    with tifffile.TiffFile(out / "scene.tif") as tf:
        assert tf.pages.first.shape == (SIDE, SIDE) and tf.pages.first.is_tiled
    print(f"peak RSS {peak:.0f} MB for {SIDE}x{SIDE}, 150 classes")
    assert peak <= LIMIT_MB
