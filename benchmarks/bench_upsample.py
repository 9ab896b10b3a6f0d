"""upsample_argmax (numpy) vs torch's interpolate(bilinear, align_corners=False).argmax(1).

The case of the issue: 150 classes (ADE20K), logits 128x171 upsampled to 512x683
(SegFormer's logits are 1/4 of its input). Three kinds of logits:

- region: class regions with a margin and noise, the shape real logits have;
- camvid: the same, laid out like real street scenes (CamVid val annotations,
  when ../shared/data/camvid is there);
- random: i.i.d. noise, the worst case (every cell is a class border).

Prints a table, checks pixel agreement, and writes benchmarks/results/upsample.json.

    .venv/bin/python benchmarks/bench_upsample.py [--repeats 20] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "annotations" / "val"


def region_logits(rng, classes, h, w, regions=12, margin=6.0):
    pts = rng.uniform(0, 1, (regions, 2)) * (h, w)
    cls = rng.choice(classes, regions, replace=False)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = (yy[None] - pts[:, :1, None]) ** 2 + (xx[None] - pts[:, 1:, None]) ** 2
    return _logits_from_labels(rng, cls[dist.argmin(0)], classes, margin)


def _logits_from_labels(rng, labels, classes, margin):
    h, w = labels.shape
    logits = rng.normal(0, 1, (classes, h, w)).astype(np.float32)
    logits[labels, np.arange(h)[:, None], np.arange(w)[None]] += margin
    return logits


def camvid_logits(rng, classes, h, w, margin=6.0):
    from PIL import Image

    files = sorted(CAMVID.glob("*.png"))
    if not files:
        return None
    with Image.open(files[0]) as im:
        ann = np.asarray(im.resize((w, h), Image.Resampling.NEAREST)).astype(np.int64)
    ids = rng.choice(classes, int(ann.max()) + 1, replace=False)  # spread over the 150 ids
    return _logits_from_labels(rng, ids[ann], classes, margin)


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--logits-size", type=int, nargs=2, default=(128, 171), metavar=("H", "W"))
    ap.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--torch-threads", type=int, default=None, help="default: torch's own (all cores)"
    )
    ap.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "upsample.json"
    )
    args = ap.parse_args(argv)

    import torch

    from segdeploy import upsample_argmax

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    h, w = args.logits_size
    cases = {"region": region_logits(rng, args.classes, h, w)}
    cam = camvid_logits(rng, args.classes, h, w)
    if cam is not None:
        cases["camvid"] = cam
    cases["random"] = rng.normal(size=(args.classes, h, w)).astype(np.float32)

    rows = []
    for name, logits in cases.items():
        t_logits = torch.from_numpy(logits)[None]

        def with_torch(t_logits=t_logits):
            up = torch.nn.functional.interpolate(
                t_logits, size=tuple(args.size), mode="bilinear", align_corners=False
            )
            return up.argmax(1)[0].numpy()

        def with_numpy(logits=logits):
            return upsample_argmax(logits, args.size)

        agreement = float((with_torch() == with_numpy()).mean())
        t_med, t_min = timed(with_torch, args.repeats)
        n_med, n_min = timed(with_numpy, args.repeats)
        rows.append(
            {
                "logits": name,
                "torch_ms": round(t_med * 1e3, 2),
                "numpy_ms": round(n_med * 1e3, 2),
                "speedup": round(t_med / n_med, 2),
                "torch_min_ms": round(t_min * 1e3, 2),
                "numpy_min_ms": round(n_min * 1e3, 2),
                "pixel_agreement": agreement,
            }
        )

    title = f"{args.classes} classes, logits {h}x{w} -> {args.size[0]}x{args.size[1]}, median of {args.repeats}"
    print(title)
    print(f"{'logits':8} {'torch ms':>9} {'numpy ms':>9} {'speedup':>8} {'agreement':>10}")
    for r in rows:
        print(
            f"{r['logits']:8} {r['torch_ms']:9.1f} {r['numpy_ms']:9.1f} {r['speedup']:7.1f}x {r['pixel_agreement']:10.6f}"
        )
    result = {
        "benchmark": "upsample_argmax",
        "case": title,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
        "numpy_threads": 1,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    sys.path.insert(0, str(ROOT))
    from segdeploy.atomic import write_json

    write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0 if all(r["pixel_agreement"] >= 0.99999 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
