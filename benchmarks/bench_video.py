"""`segdeploy infer` on a clip against the same frames as JPEGs (issue 26): one command, in `make bench`.

The frames: every CamVid frame, train then val, each split in file-name order
(468 photos of driving sequences, 480x360), encoded as one clip, H.264 4:2:0
(crf 18, MP4, 30 fps). The val split alone (101 frames) made a run of the tiny
model last 0.5-1 s, so fixed per-clip costs (opening the clip, its plot) set
the ratio more than the per-frame work does; 468 frames are a run of a few
seconds. "The same frames as JPEGs" are the frames
PyAV decodes from that clip saved as JPEGs (quality 95), so both runs segment
the same pictures; only the container differs. Models: a SegFormer b0 at
512x512 (CamVid's 11 classes; random weights exported by Optimum: the weights
do not change the time) and the tiny one (scratch:tiny, 64 px) whose model is
nearly free, so the host work around it is what is measured.

1. speed: `segdeploy infer` in a fresh process on the clip and on the JPEG
   folder, interleaved round by round (load from other processes hits both
   alike), default threads and workers, as a user runs it; frames/s and images/s
   from summary.json (the run itself, model load excluded). Target: the clip
   >= 0.9x the JPEGs.
2. lossless: the frames encoded losslessly (FFV1 in bgr0, and H.264 at qp 0 in
   RGB), segmented as a clip (label PNGs and the FFV1 label stream) against the
   same frames as PNGs: equal pixels / all pixels. Target: 100%.
3. memory: peak RSS of `segdeploy infer --overlay --video-labels ffv1` on a short
   and a long clip (the CamVid frames repeated; tiny model). Target: flat.

    .venv/bin/python benchmarks/bench_video.py [--rounds 3] [--long-seconds 100]

Writes benchmarks/results/video_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
RESULTS = ROOT / "benchmarks" / "results"
RATE = 30


def models(work: Path) -> dict[str, Path]:
    from random_segformer import random_segformer

    from segdeploy.data.synthetic import ID2LABEL

    id2label = json.loads((CAMVID / "id2label.json").read_text())
    id2label = {int(k): v for k, v in id2label.items() if int(k) < 11}
    return {
        "b0-512": random_segformer(work / "b0", work / "b0-onnx", "b0", id2label, 512),
        "tiny-64": random_segformer(work / "tiny", work / "tiny-onnx", "tiny", ID2LABEL, 64),
    }


#: The bench's frames: CamVid's splits in this order, each in file-name order.
SPLITS = ("train", "val")
#: The ratio the earlier run measured on the val split alone (101 frames), quoted in the md.
EARLIER = (
    "tiny-64 0.36x, b0-512 1.03x (2026-12-07, CamVid val alone, 101 frames; before the plot "
    "process and the two reader threads)"
)


def camvid_frames(limit: int | None = None) -> list:
    import numpy as np
    from PIL import Image

    files = [f for s in SPLITS for f in sorted((CAMVID / "images" / s).glob("*.jpg"))][:limit]
    if not files:
        raise SystemExit(f"error: CamVid not found at {CAMVID}")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def write_clip(path: Path, frames, codec: str, fmt: str, options: dict | None = None) -> Path:
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=RATE)
        s.width, s.height, s.pix_fmt = w, h, fmt
        s.options = options or {}
        for a in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode(None))
    return path


def decoded(path: Path) -> list:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def save_frames(frames, folder: Path, suffix: str) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(frames):
        Image.fromarray(a).save(folder / f"{i:05d}{suffix}", quality=95)
    return folder


#: The child's own peak RSS: VmHWM belongs to its address space, new at exec (ru_maxrss
#: would carry over the forking parent's, this script's, which holds every frame).
_RSS = (
    "print('RSS_KB', next(int(x.split()[1]) for x in open('/proc/self/status') "
    "if x.startswith('VmHWM')))"
)


def infer(model: Path, src: Path, out: Path, *extra: str) -> dict:
    """`segdeploy infer` in a fresh process: summary.json's totals, and its peak RSS (kB)."""
    args = ["infer", "--model", str(model), str(src), "-o", str(out), *extra]
    code = (
        "import sys\nfrom segdeploy.cli import main\n"
        f"rc = main({args!r}, standalone_mode=False)\n{_RSS}\nsys.exit(rc or 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"infer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    totals = json.loads((out / "summary.json").read_text())["totals"]
    totals["rss_kb"] = int(proc.stdout.split("RSS_KB")[-1])
    return totals


def equal_share(a: list, b: list) -> tuple[int, int]:

    if len(a) != len(b):
        return 0, max(sum(x.size for x in a), sum(x.size for x in b), 1)
    same = sum(int((x == y).sum()) if x.shape == y.shape else 0 for x, y in zip(a, b, strict=True))
    return same, sum(int(x.size) for x in b)


def read_pngs(folder: Path) -> list:
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def speed(work: Path, nets: dict[str, Path], clip: Path, jpegs: Path, rounds: int) -> dict:
    runs: dict[str, dict[str, list[float]]] = {m: {"clip": [], "jpeg": []} for m in nets}
    for r in range(rounds):
        for name, model in nets.items():
            for kind, src in (("clip", clip), ("jpeg", jpegs)) if r % 2 == 0 else (
                ("jpeg", jpegs), ("clip", clip)):  # fmt: skip
                out = work / f"speed-{name}-{kind}-{r}"
                t = infer(model, src, out)
                rate = t["frames_per_s"] if kind == "clip" else t["images_per_s"]
                runs[name][kind].append(rate)
                print(f"  round {r + 1} {name} {kind}: {rate:.2f}/s", flush=True)
    table = {}
    for name, r in runs.items():
        ratios = [c / j for c, j in zip(r["clip"], r["jpeg"], strict=True)]
        table[name] = {
            "clip_frames_per_s": [round(x, 3) for x in r["clip"]],
            "jpeg_images_per_s": [round(x, 3) for x in r["jpeg"]],
            "ratio_per_round": [round(x, 3) for x in ratios],
            "ratio_median": round(statistics.median(ratios), 3),
        }
    return table


def lossless(work: Path, model: Path, frames) -> dict:
    pngs = save_frames(frames, work / "lossless-pngs", ".png")
    reference = work / "lossless-ref"
    infer(model, pngs, reference)
    expected = read_pngs(reference / pngs.name)
    rows = {}
    for name, codec, fmt, opts in [
        ("ffv1-bgr0.mkv", "ffv1", "bgr0", None),
        ("h264-rgb-qp0.mkv", "libx264rgb", "rgb24", {"qp": "0"}),
    ]:
        clip = write_clip(work / name, frames, codec, fmt, opts)
        for labels in ("png", "ffv1"):
            out = work / f"lossless-{name}-{labels}"
            infer(model, clip, out, "--video-labels", labels)
            if labels == "png":
                got = read_pngs(out / name / "frames")
            else:
                import av

                with av.open(str(out / name / "labels.mkv")) as c:
                    got = [f.to_ndarray() for f in c.decode(video=0)]
            same, total = equal_share(got, expected)
            rows[f"{name}, labels as {labels}"] = {
                "equal_pixels": same,
                "pixels": total,
                "share": round(same / total, 6),
            }
    return rows


def memory(work: Path, model: Path, frames, long_seconds: float) -> dict:
    rows = {}
    for seconds in (10, long_seconds):
        n = int(seconds * RATE)
        repeated = [frames[i % len(frames)] for i in range(n)]
        clip = write_clip(work / f"mem-{n}.mp4", repeated, "libx264", "yuv420p", {"crf": "18"})
        del repeated
        t = infer(model, clip, work / f"mem-{n}", "--overlay", "--video-labels", "ffv1")
        rows[f"{seconds:g} s ({n} frames)"] = {
            "frames": t["frames"],
            "peak_rss_mb": round(t["rss_kb"] / 1024, 1),
        }
        print(f"  {seconds:g} s clip: peak RSS {t['rss_kb'] / 1024:.0f} MB", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-seconds", type=float, default=100.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "video_cpu.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        work = Path(tmp)
        nets = models(work)
        frames = camvid_frames()
        clip = write_clip(work / "camvid.mp4", frames, "libx264", "yuv420p", {"crf": "18"})
        jpegs = save_frames(decoded(clip), work / "camvid-jpeg", ".jpg")
        print("speed (clip vs the same frames as JPEGs):", flush=True)
        table = speed(work, nets, clip, jpegs, args.rounds)
        print("lossless clips vs PNG frames:", flush=True)
        exact = lossless(work, nets["tiny-64"], frames)
        print("memory over clip length:", flush=True)
        mem = memory(work, nets["tiny-64"], frames, args.long_seconds)
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "frames": f"CamVid {' + '.join(SPLITS)}, {len(frames)} frames of 480x360, "
        f"H.264 4:2:0 crf 18 at {RATE} fps",
        "earlier_run": EARLIER,
        "speed": table,
        "lossless": exact,
        "memory": mem,
        "targets": {
            "clip_vs_jpeg_at_least_0.9x": {k: v["ratio_median"] >= 0.9 for k, v in table.items()},
            "lossless_100_percent": all(v["share"] == 1.0 for v in exact.values()),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    args.output.with_suffix(".md").write_text(md)
    print(md)
    return 0


def machine() -> str:
    """The CPU's model name, its core count, and whether it has AVX-512 or VNNI."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    vnni = ", VNNI" if flags & {"avx512_vnni", "avx_vnni"} else ", no VNNI"
    return f"{model}, {os.cpu_count()} cores, {isa}{vnni}"


def render(r: dict) -> str:
    lines = [
        "# `segdeploy infer` on video (issue 26)",
        "",
        f"{r['date']}, {r['machine']}. {r['frames']}; the JPEGs are the clip's decoded frames "
        "(quality 95). Fresh `segdeploy infer` processes, default threads and workers, rounds "
        "interleaved; rates from summary.json.",
        "",
        "| model | clip frames/s | JPEG images/s | clip / JPEG (median) | target >= 0.9 |",
        "|---|---|---|---|---|",
    ]
    footnote = (
        "",
        f"Earlier run: {r['earlier_run']}. The clip is longer now (CamVid's two splits, not val "
        "alone) because on 101 frames a run of the tiny model lasted 0.5-1 s and fixed "
        "per-clip costs set the ratio.",
    )
    for name, row in r["speed"].items():
        clip = ", ".join(f"{x:.1f}" for x in row["clip_frames_per_s"])
        jpeg = ", ".join(f"{x:.1f}" for x in row["jpeg_images_per_s"])
        ok = "met" if row["ratio_median"] >= 0.9 else "NOT met"
        lines.append(f"| {name} | {clip} | {jpeg} | {row['ratio_median']:.2f}x | {ok} |")
    if r.get("earlier_run"):
        lines += footnote
    lines += ["", "| lossless clip, labels as | equal pixels | share |", "|---|---|---|"]
    for name, row in r["lossless"].items():
        lines.append(f"| {name} | {row['equal_pixels']} / {row['pixels']} | {row['share']:.4%} |")
    lines += [
        "",
        "| clip (tiny model, --overlay, FFV1 labels) | frames | peak RSS |",
        "|---|---|---|",
    ]
    for name, row in r["memory"].items():
        lines.append(f"| {name} | {row['frames']} | {row['peak_rss_mb']} MB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
