"""`segdeploy infer` on a clip against the same frames as JPEGs (issue 26): one command, in `make bench`.

The frames: every CamVid frame, train then val, each split in file-name order
(468 photos of driving sequences, 480x360), encoded as one clip, H.264 4:2:0
(MP4, 30 fps) at x264's default quality, crf 23: what `ffmpeg -i IN -c:v
libx264 OUT.mp4` writes, 10.8 kB a frame here. The tiny model also runs on the
frames at crf 18 ("visually lossless", 19.5 kB a frame), an extra row: H.264's
decoding costs more the more bits a frame has (one thread: 2.34 ms a frame at
crf 18, 1.39 at crf 23, 0.90 at crf 28; a JPEG of quality 95, 1.27 ms), so
that row measures the decoder at twice the bitrate. The val split alone (101
frames) made a run of the tiny model last 0.5-1 s, so fixed per-clip costs
(opening the clip, its plot) set the ratio more than the per-frame work does;
468 frames are a run of a few seconds. "The same frames as JPEGs" are the frames
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
3. memory: peak RSS of `segdeploy infer --overlay --video-labels ffv1` on clips of
   10 s, 100 s and 10 minutes (18000 frames; the CamVid frames repeated, encoded
   as they are generated; tiny model), of the run's process and of its whole
   process tree (TreeMemory). Target: flat, each <= FLAT x the 10 s clip's.

Parts not run (`--parts`) keep their earlier results from --output, each with
its date, and so do clip lengths not run: the whole bench holds the CPU for
~25 minutes (the 10-minute clip ~10 of them), so it can be run in parts.

    .venv/bin/python benchmarks/bench_video.py [--rounds 3] [--parts speed,lossless,memory]
        [--models b0-512,tiny-64] [--lengths 10,100,600]

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
import time
from pathlib import Path

from tree_memory import SAMPLE_S, TreeMemory

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
RESULTS = ROOT / "benchmarks" / "results"
RATE = 30


def models(work: Path, speed: set[str]) -> dict[str, Path]:
    """The tiny model, and b0 when the speed part runs it."""
    from random_segformer import random_segformer

    from segdeploy.data.synthetic import ID2LABEL

    nets = {"tiny-64": random_segformer(work / "tiny", work / "tiny-onnx", "tiny", ID2LABEL, 64)}
    if "b0-512" in speed:
        id2label = json.loads((CAMVID / "id2label.json").read_text())
        id2label = {int(k): v for k, v in id2label.items() if int(k) < 11}
        b0 = random_segformer(work / "b0", work / "b0-onnx", "b0", id2label, 512)
        nets = {"b0-512": b0, **nets}
    return nets


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
    """`frames` (any iterable of RGB arrays, so a 10-minute clip is never held whole)
    encoded as one clip at RATE fps."""
    import av

    with av.open(str(path), "w") as c:
        s = None
        for a in frames:
            if s is None:
                s = c.add_stream(codec, rate=RATE)
                s.height, s.width = a.shape[:2]
                s.pix_fmt, s.options = fmt, options or {}
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode(None))
    return path


def clip_and_jpegs(work: Path, name: str, frames, crf: int) -> tuple[Path, Path]:
    """`frames` as an H.264 clip at `crf`, and the frames PyAV decodes from it as JPEGs."""
    clip = write_clip(work / f"{name}.mp4", frames, "libx264", "yuv420p", {"crf": str(crf)})
    return clip, save_frames(decoded(clip), work / f"{name}-jpeg", ".jpg")


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


#: The run process's own peak RSS: VmHWM belongs to its address space, new at exec
#: (ru_maxrss would carry over the forking parent's, this script's, which holds every frame).
_RSS = (
    "print('RSS_KB', next(int(x.split()[1]) for x in open('/proc/self/status') "
    "if x.startswith('VmHWM')))"
)


def infer(model: Path, src: Path, out: Path, *extra: str, tree: bool = False) -> dict:
    """`segdeploy infer` in a fresh process: summary.json's totals, its peak RSS (kB), and
    with `tree` its process tree's (TreeMemory)."""
    args = ["infer", "--model", str(model), str(src), "-o", str(out), *extra]
    code = (
        "import sys\nfrom segdeploy.cli import main\n"
        f"rc = main({args!r}, standalone_mode=False)\n{_RSS}\nsys.exit(rc or 0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watch = TreeMemory(proc.pid) if tree else None
    stdout, stderr = proc.communicate()
    memory = watch.stop() if watch else {}
    if proc.returncode != 0:
        raise SystemExit(f"infer failed ({proc.returncode}): {stderr[-2000:]}")
    totals = json.loads((out / "summary.json").read_text())["totals"]
    totals["rss_kb"] = int(stdout.split("RSS_KB")[-1])
    return {**totals, **memory}


def equal_share(a: list, b: list) -> tuple[int, int]:

    if len(a) != len(b):
        return 0, max(sum(x.size for x in a), sum(x.size for x in b), 1)
    same = sum(int((x == y).sum()) if x.shape == y.shape else 0 for x, y in zip(a, b, strict=True))
    return same, sum(int(x.size) for x in b)


def read_pngs(folder: Path) -> list:
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def speed(work: Path, jobs: dict[str, tuple[Path, Path, Path]], rounds: int) -> dict:
    """`jobs`: row name -> (model, clip, JPEG folder); every row's clip and JPEG runs in
    each round, the order turned every other round."""
    runs = {m: {"clip": [], "jpeg": [], "clip_s": [], "jpeg_s": []} for m in jobs}
    for r in range(rounds):
        for j, (name, (model, clip, jpegs)) in enumerate(jobs.items()):
            for kind, src in (("clip", clip), ("jpeg", jpegs)) if r % 2 == 0 else (
                ("jpeg", jpegs), ("clip", clip)):  # fmt: skip
                out = work / f"speed-{j}-{kind}-{r}"
                t = infer(model, src, out)
                rate = t["frames_per_s"] if kind == "clip" else t["images_per_s"]
                runs[name][kind].append(rate)
                runs[name][f"{kind}_s"].append(t["seconds"])
                print(f"  round {r + 1} {name} {kind}: {rate:.2f}/s", flush=True)
    table = {}
    for name, r in runs.items():
        ratios = [c / j for c, j in zip(r["clip"], r["jpeg"], strict=True)]
        table[name] = {
            "clip_frames_per_s": [round(x, 3) for x in r["clip"]],
            "jpeg_images_per_s": [round(x, 3) for x in r["jpeg"]],
            "clip_seconds": r["clip_s"],
            "jpeg_seconds": r["jpeg_s"],
            "ratio_per_round": [round(x, 3) for x in ratios],
            "ratio_median": round(statistics.median(ratios), 3),
        }
    return table


def per_frame(short: dict, long: dict, extra_frames: int) -> dict:
    """The frames a long run has beyond a short one, at the rate of the seconds it takes
    beyond the short run's (round by round): each run's fixed costs (opening, starting
    processes, the clip's plot, summary) cancel out. Also what those fixed costs were
    (the short run's seconds less its frames at that rate)."""
    row: dict = {"fixed_seconds": {}}
    for kind, key in (("clip", "clip_frames_per_s"), ("jpeg", "jpeg_images_per_s")):
        pairs = zip(short[f"{kind}_seconds"], long[f"{kind}_seconds"], strict=True)
        rates = [extra_frames / (s2 - s1) if s2 > s1 else float("nan") for s1, s2 in pairs]
        row[key] = [round(x, 3) for x in rates]
        row["fixed_seconds"][kind] = [
            round(s1 - extra_frames / x, 3)
            for s1, x in zip(short[f"{kind}_seconds"], rates, strict=True)
        ]
    ratios = [
        c / j for c, j in zip(row["clip_frames_per_s"], row["jpeg_images_per_s"], strict=True)
    ]
    row["ratio_per_round"] = [round(x, 3) for x in ratios]
    row["ratio_median"] = round(statistics.median(ratios), 3)
    return row


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


def memory(work: Path, model: Path, frames, lengths: list[float]) -> dict:
    rows = {}
    for seconds in lengths:
        n = int(seconds * RATE)
        clip = work / f"mem-{n}.mp4"
        t0 = time.perf_counter()
        write_clip(clip, (frames[i % len(frames)] for i in range(n)), "libx264", "yuv420p",
                   {"crf": "18"})  # fmt: skip
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        t = infer(model, clip, work / f"mem-{n}", "--overlay", "--video-labels", "ffv1", tree=True)
        rows[f"{seconds:g} s ({n} frames)"] = {
            "frames": t["frames"],
            "peak_rss_mb": round(t["rss_kb"] / 1024, 1),
            "tree_peak_rss_mb": round(t["tree_peak_kb"] / 1024, 1),
            "tree_hwm_sum_mb": round(t["tree_hwm_sum_kb"] / 1024, 1),
            "processes": t["processes"],
            "encode_clip_s": round(made, 1),
            "run_s": round(time.perf_counter() - t0, 1),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
        print(f"  {seconds:g} s clip: {rows[f'{seconds:g} s ({n} frames)']}", flush=True)
        clip.unlink()
    return rows


#: The ratio of a long clip's peak RSS to the 10 s clip's that still counts as flat: a
#: run's memory is its model, its libraries and its queues (a fixed ~0.5 GB here); what
#: grows with the clip is the per-frame record (timeline, journal line, shares) of a few
#: hundred bytes. 1.2x leaves room for the allocator's noise, and a leak of a frame's
#: pixels (518 kB at 480x360) per frame would pass it after ~200 frames and be 9 GB at
#: 10 minutes: anything that holds a frame per frame fails it by far.
FLAT = 1.2

PARTS = ("speed", "lossless", "memory")
#: The judged clip's quality: x264's default.
CRF = 23
#: The extra row at crf 18, with the tiny model (the judged rows are at CRF).
HIGH = "tiny-64, crf 18"
#: The speed part's extra rows with --twice (the 468-frame rows stay as they are).
TWICE = "tiny-64, 936 frames (the 468 twice)"
PER_FRAME = "tiny-64, per frame: the 936-frame run less the 468-frame one, round by round"
EXTRA = (HIGH, TWICE, PER_FRAME)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="which parts to run; the others are kept from --output",
    )
    parser.add_argument("--models", default="b0-512,tiny-64", help="the speed part's models")
    parser.add_argument(
        "--twice",
        action="store_true",
        help="also the tiny model on the frames twice over, and per frame",
    )
    parser.add_argument("--lengths", default="10,100,600", help="the memory part's clips, s")
    parser.add_argument("--output", type=Path, default=RESULTS / "video_cpu.json")
    args = parser.parse_args(argv)  # fmt: skip
    parts = set(args.parts.split(","))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = earlier(args.output)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        work = Path(tmp)
        nets = models(work, set(args.models.split(",")) if "speed" in parts else set())
        frames = camvid_frames()
        if "speed" in parts:
            chosen = set(args.models.split(","))
            clip, jpegs = clip_and_jpegs(work, "camvid", frames, CRF)
            jobs = {k: (v, clip, jpegs) for k, v in nets.items() if k in chosen}
            if "tiny-64" in chosen:
                jobs[HIGH] = (nets["tiny-64"], *clip_and_jpegs(work, "camvid-18", frames, 18))
            if args.twice:  # the tiny model on the frames twice over, both sides
                jobs[TWICE] = (nets["tiny-64"], *clip_and_jpegs(work, "camvid2", frames * 2, CRF))
            print("speed (clip vs the same frames as JPEGs):", flush=True)
            table = speed(work, jobs, args.rounds)
            if args.twice:
                table[PER_FRAME] = per_frame(table["tiny-64"], table[TWICE], len(frames))
            for name, row in table.items():
                row["date"] = now
                row["clip"] = f"H.264 crf {18 if name == HIGH else CRF}"
            # Rows not run are kept, but not the extra ones: they compare with this run's.
            kept = {k: v for k, v in result.get("speed", {}).items() if k not in EXTRA}
            result["speed"] = {**kept, **table}
        if "lossless" in parts:
            print("lossless clips vs PNG frames:", flush=True)
            result["lossless"] = lossless(work, nets["tiny-64"], frames)
        if "memory" in parts:
            print("memory over clip length:", flush=True)
            lengths = [float(x) for x in args.lengths.split(",")]
            rows = {**result.get("memory", {}), **memory(work, nets["tiny-64"], frames, lengths)}
            result["memory"] = dict(sorted(rows.items(), key=lambda kv: kv[1]["frames"]))
    result["dates"] = {**result.get("dates", {}), **{p: now for p in parts}}
    result.update(
        date=now,
        machine=machine(),
        frames=f"CamVid {' + '.join(SPLITS)}, {len(frames)} frames of 480x360, "
        f"H.264 4:2:0 at {RATE} fps, crf {CRF} (x264's default) unless the row says otherwise",
        earlier_run=EARLIER,
        targets=targets(result),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    args.output.with_suffix(".md").write_text(md)
    print(md)
    return 0


def earlier(path: Path) -> dict:
    """The results already at `path` (the parts not run this time are kept), or {}."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    old.setdefault("dates", dict.fromkeys(PARTS, old.get("date")))
    for row in old.get("speed", {}).values():
        row.setdefault("date", old["dates"].get("speed"))
    return old


def targets(r: dict) -> dict:
    verdict = {}
    if r.get("speed"):
        verdict["clip_vs_jpeg_at_least_0.9x"] = {
            k: v["ratio_median"] >= 0.9 for k, v in r["speed"].items() if k not in EXTRA
        }
    if r.get("lossless"):
        verdict["lossless_100_percent"] = all(v["share"] == 1.0 for v in r["lossless"].values())
    mem = list(r.get("memory", {}).values())
    if len(mem) > 1 and "tree_hwm_sum_mb" in mem[0]:
        verdict[f"memory_flat_at_most_{FLAT}x"] = all(
            m[k] <= FLAT * mem[0][k] for m in mem[1:] for k in ("peak_rss_mb", "tree_hwm_sum_mb")
        )
    return verdict


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
    dates = r.get("dates", {})
    lines = [
        "# `segdeploy infer` on video (issue 26)",
        "",
        f"{r['machine']}. {r['frames']}; the JPEGs are the clip's decoded frames "
        "(quality 95). Fresh `segdeploy infer` processes, default threads and workers, rounds "
        "interleaved; rates from summary.json.",
        "",
        "| model | clip | run | clip frames/s | JPEG images/s | clip / JPEG (median) "
        "| target >= 0.9 |",
        "|---|---|---|---|---|---|---|",
    ]
    footnote = (
        "",
        f"Earlier run: {r['earlier_run']}. The clip is longer now (CamVid's two splits, not val "
        "alone) because on 101 frames a run of the tiny model lasted 0.5-1 s and fixed "
        "per-clip costs set the ratio.",
    )
    for name, row in r.get("speed", {}).items():
        clip = ", ".join(f"{x:.1f}" for x in row["clip_frames_per_s"])
        jpeg = ", ".join(f"{x:.1f}" for x in row["jpeg_images_per_s"])
        ok = "met" if row["ratio_median"] >= 0.9 else "NOT met"
        ok = "(extra row, see below)" if name in EXTRA else ok
        lines.append(
            f"| {name} | {row.get('clip', 'H.264 crf 18')} | {row.get('date')} | {clip} | {jpeg} "
            f"| {row['ratio_median']:.2f}x | {ok} |"
        )
    if HIGH in r.get("speed", {}):
        lines += [
            "",
            f"The row `{HIGH}` is extra (the judged clips are at x264's default, crf {CRF}): "
            'the same frames at crf 18, "visually lossless", with twice the bytes a frame. '
            "H.264's decoding costs more the more bits a frame has: on one thread 2.34 ms a "
            "frame at crf 18, 1.39 ms at crf 23, against 1.27 ms for a JPEG of quality 95.",
        ]
    for row in r.get("speed", {}).values():
        if "fixed_seconds" in row:
            fixed = {k: ", ".join(f"{x:.2f}" for x in v) for k, v in row["fixed_seconds"].items()}
            lines += [
                "",
                f"The last two rows are extra (the 468-frame rows above are the target's): the "
                f"same model on CamVid's frames twice over (936 frames, a clip and their JPEGs), "
                f"and from both lengths, round by round, the rate of the frames alone (936 - 468 "
                f"frames over the seconds the longer run took beyond the shorter) and what each "
                f"468-frame run spent besides its frames at that rate, its fixed costs: clip "
                f"{fixed['clip']} s, JPEGs {fixed['jpeg']} s.",
            ]
    if r.get("earlier_run"):
        lines += footnote
    lines += [
        "",
        f"Lossless, {dates.get('lossless')}:",
        "",
        "| lossless clip, labels as | equal pixels | share |",
        "|---|---|---|",
    ]
    for name, row in r.get("lossless", {}).items():
        lines.append(f"| {name} | {row['equal_pixels']} / {row['pixels']} | {row['share']:.4%} |")
    lines += memory_table(r.get("memory", {}), dates.get("memory"))
    return "\n".join(lines) + "\n"


def memory_table(mem: dict, date: str | None) -> list[str]:
    """The memory part: each clip's peaks and their ratio to the first (shortest) clip's."""
    if not mem:
        return []
    lines = [
        "",
        "Memory over clip length (tiny model, `--overlay --video-labels ffv1`; the "
        "clips are CamVid's frames repeated, H.264 crf 18; run process: its VmHWM; "
        f"process tree: the run and all its descendants, the largest sum of their RSS seen "
        f"every {SAMPLE_S * 1000:g} ms, and the sum of each one's VmHWM, an upper bound). "
        f"Flat: a long clip's peak <= {FLAT}x the 10 s clip's.",
        "",
    ]
    rows = list(mem.values())
    if "tree_hwm_sum_mb" not in rows[0]:  # a run before the tree was measured
        lines[1] += f" ({date})"
        lines += ["| clip | frames | peak RSS |", "|---|---|---|"]
        lines += [f"| {k} | {v['frames']} | {v['peak_rss_mb']} MB |" for k, v in mem.items()]
        return lines
    first = rows[0]
    lines += [
        "| clip | run | frames | run process | process tree (sampled) | tree, sum of peaks "
        "| ratio to the first (run / tree sum) | flat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in mem.items():
        run = v["peak_rss_mb"] / first["peak_rss_mb"]
        tree = v["tree_hwm_sum_mb"] / first["tree_hwm_sum_mb"]
        flat = "yes" if max(run, tree) <= FLAT else "NO"
        lines.append(
            f"| {name} | {v.get('date')} | {v['frames']} | {v['peak_rss_mb']} MB | {v['tree_peak_rss_mb']} MB "
            f"| {v['tree_hwm_sum_mb']} MB ({v['processes']} processes) | {run:.3f}x / "
            f"{tree:.3f}x | {flat} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
