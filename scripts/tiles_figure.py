"""The picture of docs/tiles.md: one scene segmented by sliding windows three ways.

A 288x480 scene of the synthetic data's shapes (a 3 x 5 mosaic of 96 px samples, so
that objects straddle the 64 px windows) is segmented by the model `segdeploy demo`
trains (64 px input) with `Segmenter.predict(image, tile=64, ...)`: windows side by
side (stride 64, no overlap), MMSegmentation's mean over windows overlapping by a
third (stride 43), and the gaussian blend at the same stride. Label maps are drawn
over the image with the run's palette, the window borders of the no-overlap run in
white.

    segdeploy demo                      # trains models/demo (a minute or two)
    python scripts/tiles_figure.py --model models/demo/model/onnx -o docs/images/tiles_seams.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segdeploy import Segmenter
from segdeploy.data.synthetic import synthetic_sample
from segdeploy.runtime.palette import overlay, palette_for

TILE = 64


def scene(rows: int = 3, cols: int = 5, cell: int = 96) -> np.ndarray:
    out = np.zeros((rows * cell, cols * cell, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            image, _ = synthetic_sample(r * cols + c, seed=7, size=cell)
            out[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = image
    return out


def panel(image: np.ndarray, labels: np.ndarray, palette, title: str, grid: bool = False):
    im = overlay(image, labels, palette).convert("RGB")
    draw = ImageDraw.Draw(im)
    if grid:
        for x in range(TILE, im.width, TILE):
            draw.line([(x, 0), (x, im.height)], fill=(255, 255, 255), width=1)
        for y in range(TILE, im.height, TILE):
            draw.line([(0, y), (im.width, y)], fill=(255, 255, 255), width=1)
    canvas = Image.new("RGB", (im.width, im.height + 22), (255, 255, 255))
    canvas.paste(im, (0, 22))
    ImageDraw.Draw(canvas).text((4, 5), title, fill=(0, 0, 0))
    return canvas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="the demo's ONNX folder")
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/images/tiles_seams.jpg"))
    args = ap.parse_args(argv)
    seg = Segmenter(args.model, provider="cpu")
    image = scene()
    palette = palette_for(seg.num_labels)
    side = seg.predict(image, tile=TILE, stride=TILE)
    mean = seg.predict(image, tile=TILE, stride=43)
    gauss = seg.predict(image, tile=TILE, stride=43, blend="gaussian")
    resized = seg.predict(image)
    panels = [
        panel(image, resized, palette, "no --tile: resized to 64x64 and back"),
        panel(image, side, palette, "--tile 64 --stride 64: windows side by side", grid=True),
        panel(image, mean, palette, "--tile 64 (stride 43) --blend mean"),
        panel(image, gauss, palette, "--tile 64 (stride 43) --blend gaussian"),
    ]
    w, h = panels[0].size
    out = Image.new("RGB", (2 * w + 8, 2 * h + 8), (255, 255, 255))
    for i, p in enumerate(panels):
        out.paste(p, ((i % 2) * (w + 8), (i // 2) * (h + 8)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.output, quality=88)
    for name, labels in (("side by side", side), ("gaussian", gauss)):
        print(f"{name}: {np.mean(labels != mean):.1%} of pixels differ from mean")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
