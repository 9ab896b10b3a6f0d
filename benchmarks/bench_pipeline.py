"""How `segdeploy infer`'s host pipeline scales with cores (issue 18): one command, in `make bench`.

With the demo's kind of tiny model (scratch:tiny, 5 classes, 64 px; random
weights exported by Optimum) the model is nearly free, as on a GPU, so what is
measured is the host work around it. On the CamVid photos (train + val,
480x360 JPEG; generated photos of that size when CamVid is absent):

1. the stage table: ms per image of each stage on one core, serially, with the
   stage functions `segdeploy infer` runs (segdeploy/runtime/pipeline.py);
2. `segdeploy infer` (a fresh process per run; images/s from its summary.json,
   and from the whole command's wall time, setup included) pinned to one core
   (`taskset -c 0`) and on all cores, for today's code and for the baseline
   commit (the threaded pipeline before this engine), interleaved round by round
   so that load from other processes hits all of them alike. Every run has
   `--threads 1`: the model stands in for one on a GPU, where ONNX Runtime's CPU
   threads idle; on this CPU more intra-op threads only add synchronisation to a
   64-px model. It also keeps the baseline on its core: left to itself, ONNX
   Runtime pins a thread per physical core, outside `taskset`. Two reference
   runs per round show those defaults (today on all cores, the baseline pinned);
3. label maps identical: today's worker processes vs `--workers 0` (the
   in-process reference), byte for byte; today vs the baseline, as decoded class
   ids (the PNG encoder changed, see segdeploy/runtime/image_io.py `label_png`);
4. a projection for a 16-core GPU host from the measured costs (see `projection`).

    .venv/bin/python benchmarks/bench_pipeline.py [--rounds 3] [--baseline REF]

Writes benchmarks/results/pipeline_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Light imports only at the top: worker processes of the fork server import this
# script (as __mp_main__) when it is the main program.

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "images"
#: The last commit before the worker-process engine: the threaded pipeline of issue 18.
BASELINE = "840dd85"
STAGE_ROWS = [
    ("decode", "decode (Pillow)"),
    ("preprocess", "preprocess (resize, normalise)"),
    ("model", "model (tiny, batch 4, 1 thread)"),
    ("upsample_argmax", "upsample + argmax"),
    ("class_shares", "class shares (bincount)"),
    ("png_encode", "PNG encode + write of the label map"),
]


def tiny_model(work: Path) -> Path:
    """scratch:tiny, random init (seed 0), exported at opset 17, as tests/conftest.py does."""
    from random_segformer import random_segformer

    from segdeploy.data.synthetic import ID2LABEL

    return random_segformer(work / "tiny", work / "onnx", "tiny", ID2LABEL, 64)


def photos(work: Path, n_generated: int = 466) -> tuple[Path, str]:
    """A folder of the photos (symlinks), and where they came from."""
    folder = work / "photos"
    folder.mkdir()
    splits = [CAMVID / s for s in ("train", "val", "test") if (CAMVID / s).is_dir()]
    files = sorted(p for s in splits for p in s.glob("*.jpg"))
    if files:
        for p in files:
            os.symlink(p, folder / f"{p.parent.name}_{p.name}")
        return folder, f"CamVid {'+'.join(s.name for s in splits)} ({len(files)} photos, {CAMVID})"
    import numpy as np
    from PIL import Image

    from segdeploy.data.synthetic import synthetic_sample

    print(f"CamVid not found at {CAMVID}: using {n_generated} generated 480x360 photos")
    for i in range(n_generated):
        rgb = synthetic_sample(i, seed=1, size=(360, 480))[0]
        Image.fromarray(np.asarray(rgb)).save(folder / f"gen{i:04d}.jpg", quality=90)
    return folder, f"generated ({n_generated} synthetic 480x360 JPEG; CamVid absent)"


def stage_table(model: Path, folder: Path) -> dict[str, float]:
    """ms per image of each stage, serially, on the first core this process may use."""
    from segdeploy.runtime import pipeline
    from segdeploy.runtime.segmenter import Segmenter

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})
    try:
        seg = Segmenter(model, "cpu", threads=1, batch_size=4)
        cfg = pipeline.StageConfig.for_segmenter(seg)
        files = sorted(folder.iterdir())
        cpu = dict.fromkeys((k for k, _ in STAGE_ROWS), 0.0)
        with tempfile.TemporaryDirectory() as out:
            for start in range(0, len(files), seg.batch_size):
                batch = [pipeline.prepare_image(f, cfg) for f in files[start : start + 4]]
                t = time.perf_counter()
                raws = pipeline.model_batch(seg, [p.x for p in batch], [p.size for p in batch])
                cpu["model"] += time.perf_counter() - t
                for i, (p, raw) in enumerate(zip(batch, raws, strict=True)):
                    done = pipeline.finish_image(raw, p.size, Path(out) / f"{i}.png", cfg)
                    for k, v in (*p.cpu.items(), *done.cpu.items()):
                        cpu[k] += v
        return {k: round(v * 1e3 / len(files), 3) for k, v in cpu.items()}
    finally:
        os.sched_setaffinity(0, set(cores))


def infer(python_path: Path, model: Path, folder: Path, out: Path, cores: str | None, *extra):
    """`segdeploy infer` in a fresh process; its summary's totals."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "segdeploy", "-q", "infer", "--model", str(model)]
    cmd += ["--provider", "cpu", str(folder), "-o", str(out), *extra]
    if cores is not None:
        cmd = ["taskset", "-c", cores, *cmd]
    env = {**os.environ, "PYTHONPATH": str(python_path)}
    start = time.perf_counter()
    # Run from the scratch folder: `python -m` puts the working directory first on
    # sys.path, before PYTHONPATH, so from the repository root every run would import
    # today's segdeploy, the baseline's too.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    command_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    totals = json.loads((out / "summary.json").read_text())["totals"]
    return {**totals, "command_s": round(command_s, 3)}


#: The reference runs' names: ONNX Runtime's own thread defaults.
DEFAULT_THREADS = "(ORT default threads)"


def run_configs(today: Path, baseline: Path | None, first_core: str) -> list[tuple]:
    """(name, tree, cores for taskset or None, extra args) of every run in a round."""
    one = ["--threads", "1"]
    configs = [
        ("today, one core", today, first_core, one),
        ("today, all cores", today, None, one),
        (f"today, all cores {DEFAULT_THREADS}", today, None, []),
    ]
    if baseline is not None:
        configs += [
            ("baseline, one core", baseline, first_core, one),
            ("baseline, all cores", baseline, None, one),
            (f"baseline, one core {DEFAULT_THREADS}", baseline, first_core, []),
        ]
    return configs


def same_labels(a: Path, b: Path, *, decoded: bool = False) -> tuple[int, list[str]]:
    """(files, names that differ): byte for byte, or as decoded arrays (ids and PNG mode)."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*.png"))
    other = sorted(str(p.relative_to(b)) for p in b.rglob("*.png"))
    if names != other:
        return len(names), ["file lists differ"]
    if not decoded:
        _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
        return len(names), mismatch + errors
    import numpy as np
    from PIL import Image

    def read(path: Path):
        with Image.open(path) as im:
            return im.mode, np.asarray(im)

    differ = []
    for name in names:
        (mode_a, ids_a), (mode_b, ids_b) = read(a / name), read(b / name)
        if mode_a != mode_b or not np.array_equal(ids_a, ids_b):
            differ.append(name)
    return len(names), differ


def projection(stages: dict[str, float], one_core_ips: float, cores: int = 16) -> dict:
    """Images/s on a `cores`-core GPU host, from the costs measured here.

    Per image, one core spends T = 1000 / (pinned one-core rate) ms. Of that,
    the stage table accounts for the host stages H (all but the model) and the
    model M; the rest, O = T - H - M, is the engine's own work (listing,
    batching, passing arrays, records), counted as the main process's, which
    is serial. On the GPU host the model leaves the CPU, the host stages spread
    over cores - 1 worker processes: rate = min((cores - 1) * 1000 / (H + O),
    1000 / O). O is an upper bound on the serial part (some of it is in the
    workers), so the cap is pessimistic.
    """
    t = 1000.0 / one_core_ips
    host = sum(v for k, v in stages.items() if k != "model")
    overhead = max(t - host - stages["model"], 0.01)
    workers_rate = (cores - 1) * 1000.0 / (host + overhead)
    main_rate = 1000.0 / overhead
    return {
        "cores": cores,
        "ms_per_image_one_core": round(t, 3),
        "host_stages_ms": round(host, 3),
        "engine_overhead_ms": round(overhead, 3),
        "worker_side_images_per_s": round(workers_rate, 1),
        "main_process_cap_images_per_s": round(main_rate, 1),
        "images_per_s": round(min(workers_rate, main_rate), 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default=BASELINE, help="git commit to compare with ('' = none)")
    ap.add_argument("--model", type=Path, default=None, help="ONNX folder (default: tiny, made)")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from segdeploy.atomic import write_json, write_text

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    all_cores = len(os.sched_getaffinity(0))
    first = str(min(os.sched_getaffinity(0)))
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        model = args.model or tiny_model(work)
        folder, source = photos(work)
        n = len(list(folder.iterdir()))
        base_tree = None
        if args.baseline:
            base_tree = work / "baseline"
            base_tree.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline, "segdeploy"],
                capture_output=True,
                check=True,
            )
            subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive.stdout, check=True)

        stages = stage_table(model, folder)
        runs: dict[str, list[float]] = {}
        command: dict[str, list[float]] = {}
        last: dict[str, dict] = {}
        configs = run_configs(ROOT, base_tree, first)
        for r in range(args.rounds):
            for key, tree, cores, extra in (
                configs[r % len(configs) :] + configs[: r % len(configs)]
            ):
                out = work / ("out-" + key.replace(", ", "-").replace(" ", ""))
                totals = infer(tree, model, folder, out, cores, *extra)
                runs.setdefault(key, []).append(totals["images_per_s"])
                command.setdefault(key, []).append(round(totals["images"] / totals["command_s"], 3))
                last[key] = totals
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()))
        reference = work / "out-serial"
        infer(ROOT, model, folder, reference, None, "--workers", "0", "--threads", "1")
        today_all = work / "out-today-allcores"
        checks = {"today workers vs --workers 0 (file bytes)": same_labels(today_all, reference)}
        if base_tree:
            checks["today vs baseline (decoded ids)"] = same_labels(
                today_all, work / "out-baseline-allcores", decoded=True
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    command_rate = {k: round(statistics.median(v), 1) for k, v in command.items()}
    scale = rate["today, all cores"] / rate["today, one core"]
    vs_base = rate["today, one core"] / rate["baseline, one core"] if base_tree else None
    proj = projection(stages, rate["today, one core"])
    identical = all(not bad for _, bad in checks.values())
    result = {
        "benchmark": "pipeline_cpu",
        "photos": source,
        "images": n,
        "model": "scratch:tiny, random init, 5 classes, 64x64 input, ONNX fp32, CPU",
        "stage_ms_per_image_one_core": stages,
        "stage_sum_ms": round(sum(stages.values()), 3),
        "infer_images_per_s_median": rate,
        "infer_images_per_s_runs": runs,
        "command_images_per_s_median": command_rate,
        "command_images_per_s_runs": command,
        "threads": "--threads 1 in every run but the two '(ORT default threads)' references",
        "today_all_cores_summary_totals": last["today, all cores"],
        "all_cores_vs_one_core": round(scale, 3),
        "one_core_vs_baseline": round(vs_base, 3) if vs_base else None,
        "label_maps_identical": identical,
        "label_checks": {k: {"files": c, "differing": bad[:10]} for k, (c, bad) in checks.items()},
        "projection_16_core_gpu_host": proj,
        "baseline_commit": args.baseline or None,
        "cores": all_cores,
        "rounds": args.rounds,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()),
    }
    md = render(result)
    print(md)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "pipeline_cpu.json", result)
    write_text(args.output / "pipeline_cpu.md", md)
    print(f"wrote {args.output / 'pipeline_cpu.json'} and .md")
    return 0 if identical else 1


def render(r: dict) -> str:
    s = r["stage_ms_per_image_one_core"]
    lines = [
        f"# `segdeploy infer` host pipeline on {r['cores']} cores ({r['date']})",
        "",
        f"{r['images']} photos: {r['photos']}; {r['model']}.",
        "",
        "| stage, one core, serial | ms per image |",
        "|---|---:|",
        *(f"| {label} | {s[k]:.2f} |" for k, label in STAGE_ROWS),
        f"| sum | {r['stage_sum_ms']:.2f} ({1000 / r['stage_sum_ms']:.0f} img/s on one core) |",
        "",
        f"`segdeploy infer --threads 1`, images/s (median of {r['rounds']} interleaved rounds; "
        "summary.json's rate, and in brackets the whole command's: setup included):",
        "",
        "| code | pinned to one core | all cores | all / one |",
        "|---|---:|---:|---:|",
    ]
    rate, command = r["infer_images_per_s_median"], r["command_images_per_s_median"]
    for name in ("today", "baseline"):
        if f"{name}, one core" in rate:
            one, allc = rate[f"{name}, one core"], rate[f"{name}, all cores"]
            cmd_one, cmd_all = command[f"{name}, one core"], command[f"{name}, all cores"]
            label = name if name == "today" else f"baseline ({r['baseline_commit']}, threads)"
            lines.append(
                f"| {label} | {one:.1f} ({cmd_one:.0f}) | {allc:.1f} ({cmd_all:.0f}) | "
                f"{allc / one:.2f}x ({cmd_all / cmd_one:.2f}x) |"
            )
    references = [k for k in rate if k.endswith(DEFAULT_THREADS)]
    if references:
        lines += [
            "",
            "With ONNX Runtime's default threads instead (one per physical core, each pinned "
            "to its core, so the baseline's second thread leaves `taskset -c 0`; today infer "
            "defaults to the cores of its affinity): "
            + "; ".join(f"{k} {rate[k]:.1f} ({command[k]:.0f})" for k in references)
            + ".",
        ]
    p = r["projection_16_core_gpu_host"]
    lines += [
        "",
        "| target (issue 18) | measured | needs |",
        "|---|---:|---:|",
        f"| all cores vs pinned one core | {r['all_cores_vs_one_core']:.2f}x | >= 1.7x |",
    ]
    if r["one_core_vs_baseline"]:
        lines.append(
            f"| pinned one core vs baseline | {r['one_core_vs_baseline']:.2f}x | >= 1.3x |"
        )
    checked = ", ".join(f"{k}: {c['files']} files" for k, c in r["label_checks"].items())
    lines += [
        f"| label maps identical | {'yes' if r['label_maps_identical'] else 'NO'} "
        f"({checked}) | yes |",
        "",
        f"Projection for a {p['cores']}-core GPU host: {p['images_per_s']:.0f} img/s. One core "
        f"spends {p['ms_per_image_one_core']:.2f} ms per image here; the host stages are "
        f"{p['host_stages_ms']:.2f} ms of it and the engine's own work (listing, batching, "
        f"passing arrays, records) the rest beyond the model, {p['engine_overhead_ms']:.2f} ms. "
        f"With the model on the GPU, {p['cores'] - 1} workers give "
        f"{p['worker_side_images_per_s']:.0f} img/s and the main process, doing the engine's "
        f"work serially, caps it at {p['main_process_cap_images_per_s']:.0f} img/s "
        "(pessimistic: part of that work runs in the workers).",
        "",
        f"Load average before {r['load_average_before'][0]:.2f}, after "
        f"{r['load_average_after'][0]:.2f}; {r['seconds']} s; {r['machine']['platform']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
