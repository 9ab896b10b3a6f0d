"""`segdeploy infer --engine ray` against `--engine local` on one machine: the price of Ray.

Both run as the real command in a fresh process on the same folder of photos,
interleaved round by round (the machine's speed drifts), with the same model,
provider and batch size; `--engine ray` starts its own single-machine Ray (no
--ray-address), as a user on one machine would. Per round and engine, two
runs: on N images and on 1 image. From them:

- images/s = N / wall time of the command (start-up included);
- per image = (wall(N) - wall(1)) / (N - 1): the steady cost of one image;
- start-up = wall(1) - per image: process, model and (for Ray) cluster start;
- ratio ray/local of each, median over rounds of the ratio within a round.

The outputs of both engines are compared (every label PNG byte-identical).
On one machine Ray can only add overhead: it exists to go past one machine.

    .venv/bin/python benchmarks/bench_ray.py --model models/camvid-b0-512 \\
        [--images ../shared/data/camvid/images/val] [--limit 40] [--rounds 3]

Writes benchmarks/results/ray_<provider>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "camvid" / "images" / "val"
ENGINES = ("local", "ray")


def run_command(engine: str, args, folder: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "segdeploy", "-q", "infer", "--engine", engine]
    cmd += ["--model", str(args.model), "--provider", args.provider, str(folder), "-o", str(out)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*.png"))
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, type=Path, help="ONNX folder, or one with onnx/")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--limit", type=int, default=40, help="N: images per timed run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--output", type=Path, default=None, help="JSON path (.md beside it)")
    args = ap.parse_args(argv)

    from segdeploy.atomic import write_json
    from segdeploy.runtime.image_io import is_image_name

    files = sorted(p for p in args.images.rglob("*") if p.is_file() and is_image_name(p))
    files = files[: args.limit]
    if len(files) < 2:
        print(f"need at least 2 images under {args.images}", file=sys.stderr)
        return 2
    n = len(files)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    load_before = os.getloadavg()
    rounds = []
    try:
        folders = {"n": work / "images", "1": work / "one"}
        for key, subset in (("n", files), ("1", files[:1])):
            folders[key].mkdir()
            for f in subset:
                os.symlink(f.resolve(), folders[key] / f.name)
        for r in range(args.rounds):
            order = ENGINES if r % 2 == 0 else ENGINES[::-1]
            walls: dict[str, dict[str, float]] = {e: {} for e in ENGINES}
            for engine in order:
                for key in ("n", "1"):
                    out = work / f"out-{engine}-{key}-{r}"
                    walls[engine][key] = run_command(engine, args, folders[key], out)
            if r == 0:
                same = digests(work / "out-local-n-0") == digests(work / "out-ray-n-0")
                if not same:
                    raise SystemExit("the engines' label PNGs differ")
            row = {}
            for e in ENGINES:
                per_image = (walls[e]["n"] - walls[e]["1"]) / (n - 1)
                row[e] = {
                    "wall_s": round(walls[e]["n"], 3),
                    "wall_1_image_s": round(walls[e]["1"], 3),
                    "images_per_s": round(n / walls[e]["n"], 3),
                    "per_image_s": round(per_image, 4),
                    "startup_s": round(walls[e]["1"] - per_image, 3),
                }
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{e} {row[e]}" for e in ENGINES), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(key: str, engine: str) -> float:
        return statistics.median(rw[engine][key] for rw in rounds)

    def ratio(key: str) -> float:
        return statistics.median(rw["ray"][key] / rw["local"][key] for rw in rounds)

    summary = {
        e: {k: median(k, e) for k in ("images_per_s", "per_image_s", "startup_s", "wall_s")}
        for e in ENGINES
    }
    ratios = {
        "images_per_s_ray_over_local": round(ratio("images_per_s"), 3),
        "per_image_ray_over_local": round(ratio("per_image_s"), 3),
        "extra_s_per_image": round(
            statistics.median(
                rw["ray"]["per_image_s"] - rw["local"]["per_image_s"] for rw in rounds
            ),
            4,
        ),
        "extra_startup_s": round(
            statistics.median(rw["ray"]["startup_s"] - rw["local"]["startup_s"] for rw in rounds), 3
        ),
    }
    import onnxruntime
    import ray

    command = ".venv/bin/python benchmarks/bench_ray.py " + (
        shlex.join(argv if argv is not None else sys.argv[1:])
    )
    result = {
        "benchmark": "ray_vs_local",
        "command": command,
        "images": n,
        "image_folder": str(args.images),
        "model": str(args.model),
        "provider": args.provider,
        "batch_size": args.batch_size,
        "rounds": rounds,
        "median": summary,
        "ratios": ratios,
        "identical_outputs": True,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_before_after": [list(load_before), list(os.getloadavg())],
            "platform": platform.platform(),
        },
        "versions": {
            "ray": ray.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    dest = args.output or ROOT / "benchmarks" / "results" / f"ray_{args.provider}.json"
    write_json(dest, result)
    md = [
        "# segdeploy infer: --engine ray vs --engine local on one machine",
        "",
        f"- date: {result['date']}",
        f"- command: `{command}`",
        f"- machine: {os.cpu_count()} cores, {platform.platform()}; load average before/after: "
        f"{[round(x, 2) for x in load_before]} / {[round(x, 2) for x in os.getloadavg()]}",
        f"- model: {args.model}, provider {args.provider}, batch size {args.batch_size or 'default'}",
        f"- data: {n} images of {args.images}; {args.rounds} interleaved rounds, medians below",
        f"- versions: ray {ray.__version__}, onnxruntime {onnxruntime.__version__}",
        "",
        "| engine | images/s (N, start-up incl.) | per image s | start-up s | wall N s |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in ENGINES:
        s = summary[e]
        md.append(
            f"| {e} | {s['images_per_s']:.2f} | {s['per_image_s']:.3f} | {s['startup_s']:.1f} "
            f"| {s['wall_s']:.1f} |"
        )
    md += [
        "",
        f"ray/local images/s: {ratios['images_per_s_ray_over_local']:.2f}x; per image: "
        f"{ratios['per_image_ray_over_local']:.2f}x ({ratios['extra_s_per_image'] * 1e3:+.0f} ms "
        f"per image); start-up: {ratios['extra_startup_s']:+.1f} s. Ratios are medians over "
        "rounds of the ratio within a round. Label PNGs of both engines byte-identical.",
        "",
    ]
    dest.with_suffix(".md").write_text("\n".join(md), encoding="utf-8")
    print("\n".join(md))
    print(f"wrote {dest} and {dest.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
