"""The class-share plot of docs/video.md: a clip's classes.png, as `segdeploy infer` draws it.

The clip pans across a 3 x 10 mosaic of the synthetic data's shapes (the mosaic
of scripts/tiles_figure.py, wider), 288x384 frames at 30 fps for 4 s, encoded as
H.264 with PyAV, so that shapes enter and leave the frame and the shares change
smoothly; it is segmented by the model `segdeploy demo` trains.

    segdeploy demo                      # trains models/demo (a minute or two)
    python scripts/video_figure.py --model models/demo/model/onnx -o docs/images/video_classes.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tiles_figure import scene

from segdeploy.cli import main as segdeploy
from segdeploy.runtime.video import import_av

FPS = 30


def pan(mosaic: np.ndarray, width: int, frames: int) -> list[np.ndarray]:
    """`frames` views `width` wide, their left edge moving evenly across `mosaic`."""
    lefts = np.linspace(0, mosaic.shape[1] - width, frames).round().astype(int)
    return [mosaic[:, x : x + width] for x in lefts]


def write_clip(path: Path, frames: list[np.ndarray]) -> None:
    av = import_av(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="the demo's ONNX folder")
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/images/video_classes.png"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "pan.mp4"
        write_clip(clip, pan(scene(cols=10), width=384, frames=4 * FPS))
        out = Path(tmp) / "out"
        segdeploy(["infer", "--model", str(args.model), str(clip), "-o", str(out)],
                  standalone_mode=False)  # fmt: skip
        args.output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / clip.name / "classes.png", args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
