"""`segdeploy serve` under load on loopback, beside `segdeploy infer` and a hand-written
FastAPI + transformers pipeline endpoint: benchmarks/results/serve_cpu.{json,md}.

Per round (rounds interleave them, as the machine's speed drifts), for each graph
variant asked (`--variants`, default fp32 and int8; serve and infer run the same one):

1. `segdeploy infer --variant V` on the photos (a fresh process, default settings): its
   images/s from summary.json (the run, model load excluded);
2. `segdeploy serve --variant V` (a fresh process, its private Ray): after a warm-up, 1,
   4 and 16 clients on loopback, each sending the photos' files one request at a time
   (keep-alive); images/s, p50/p95 latency, mean batch size (from /metrics), RSS of the
   whole process tree (Ray included) after warm-up, peak and after the load. At 16
   clients every 25th request is a deliberately truncated file (it must get 400);
3. in process, right before and right after the 1-client load (the service up and
   idle): decode + preprocess + model (batch 1) + upsample of each photo with a
   Segmenter opened as the replica opens its own (variant, threads, no spinning, no
   memory patterns): the floor of one request's latency, the median of both blocks;

and once per round the hand-written endpoint (serve_baseline_app.py, uvicorn: the
user's fp32 PyTorch pipeline, whatever the variant) under the same clients.

Targets (issue 24), judged per variant on the medians over rounds of each ratio
within a round.

    flock /tmp/segdeploy-cpu.lock .venv/bin/python benchmarks/bench_serve.py \\
        [--model models/camvid-b0-512] [--images ../shared/data/camvid/images/val] \\
        [--rounds 2] [--variants fp32,int8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tree_memory import TreeMemory, tree_rss_mib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "camvid" / "images" / "val"
DEFAULT_MODEL = ROOT / "models" / "camvid-b0-512"
CLIENTS = (1, 4, 16)
#: Requests per client count (enough for a stable rate, a few seconds each).
REQUESTS = {1: 30, 4: 64, 16: 160}
BAD_EVERY = 25
#: Photos per in-process block (one block right before, one right after the 1-client load).
IN_PROCESS_PHOTOS = 12
VARIANTS = ("fp32", "int8")
TARGETS = {
    "serve_16_vs_infer": 0.9,
    "serve_16_vs_handwritten_16": 2.0,
    "p50_1_client_vs_in_process": 1.2,
    "rss_after_load_vs_warm": 1.2,
}


def cpu_info() -> dict:
    """The CPU's model name and its vector extensions that matter to int8 (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": "unknown", "cpu_flags": "unknown"}
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", text, re.M) or [None, ""])[1].split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    have = [f for f in wanted if f in flags]
    return {
        "cpu_model": model.group(1).strip() if model else "unknown",
        "cpu_flags": " ".join(have) or "no AVX2",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shown_path(path: Path) -> str:
    """`path` from its data/ folder on (as the docs' tables show data), else as given."""
    parts = path.resolve().parts
    return "/".join(parts[parts.index("data") :]) if "data" in parts else str(path)


def replica_segmenter(model: Path, variant: str, threads: int):
    """A Segmenter opened as a serve replica opens its own (serve.model.ReplicaModel)."""
    from segdeploy.runtime.segmenter import Segmenter

    return Segmenter(
        model, "cpu", variant, threads=threads, batch_size=1, spin=False, mem_pattern=False
    )


def in_process_ms(seg, photos: list[Path], n: int = IN_PROCESS_PHOTOS) -> list[float]:
    """ms of decode + preprocess + model (batch 1) + upsample, one photo at a time: the
    work of one request in a replica but the label PNG's encoding and the class shares
    (under 1 ms together, the replica's own timings say). The first two calls warm up."""
    times = []
    for i, path in enumerate(photos[: n + 2]):
        data = path.read_bytes()
        t = time.perf_counter()
        image = seg.load(data)
        seg.forward([seg.prepare(image)], [(image.height, image.width)])[0]()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return times


def run_infer(model: Path, variant: str, folder: Path, out: Path) -> tuple[float, float]:
    """(images/s of the run from summary.json, peak RSS MiB) of `segdeploy infer`."""
    cmd = [sys.executable, "-m", "segdeploy", "-q", "infer", "--model", str(model)]
    cmd += ["--variant", variant]
    proc = subprocess.Popen([*cmd, str(folder), "-o", str(out)], cwd=out.parent)
    with TreeMemory(proc.pid, interval=0.25) as rss:
        if proc.wait() != 0:
            raise SystemExit("segdeploy infer failed")
    summary = json.loads((out / "summary.json").read_text())
    return summary["totals"]["images_per_s"], rss.peak_mib


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: not ready after {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def load(url: str, photos: list[bytes], clients: int, n: int, bad_every: int = 0) -> dict:
    """`n` requests from `clients` threads, each with its own keep-alive connection."""
    counter = iter(range(n))
    lock = threading.Lock()
    latencies, failures, bad = [], 0, 0

    def client() -> None:
        nonlocal failures, bad
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                deliberate = bad_every and i % bad_every == bad_every - 1
                data = photos[i % len(photos)]
                data = data[: len(data) // 3] if deliberate else data
                t = time.perf_counter()
                r = http.post(url, content=data, headers={"Content-Type": "image/jpeg"})
                ms = (time.perf_counter() - t) * 1e3
                with lock:
                    if deliberate:
                        bad += 1
                        failures += r.status_code != 400
                    else:
                        failures += r.status_code != 200
                        latencies.append(ms)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    return {
        "clients": clients,
        "requests": n,
        "deliberately_bad": bad,
        "failed": failures,
        "images_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(q[18], 1),
        "latencies_ms": latencies,
    }


def batch_counts(base: str) -> tuple[float, float]:
    """(model calls, images) from the service's batch-size histogram."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    count = re.search(r"^segdeploy_batch_size_count ([0-9.e+]+)", text, re.M)
    total = re.search(r"^segdeploy_batch_size_sum ([0-9.e+]+)", text, re.M)
    return float(count.group(1)), float(total.group(1))


def bench_serve(args, photos: list[bytes], variant: str) -> dict:
    from segdeploy.runtime.pipeline import default_threads

    # One replica on a private Ray gets every core (serve.service._resources).
    seg = replica_segmenter(args.model, variant, default_threads())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "segdeploy", "-q", "serve", "--model", str(args.model)]
    cmd += ["--port", str(port), "--provider", "cpu", "--variant", variant]
    cmd += shlex.split(args.serve_args)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="bsr-", dir="/tmp")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    in_process: list[list[float]] = []
    try:
        wait_ready(proc, f"{base}/v2/health/ready")
        load(f"{base}/v1/segment", photos, 4, 16)  # warm-up: sessions, threads, connections
        warm = tree_rss_mib(proc.pid)
        rows = []
        with TreeMemory(proc.pid, interval=0.25) as peak:
            for c in CLIENTS:
                if c == 1:
                    in_process.append(in_process_ms(seg, args.files))
                before = batch_counts(base)
                row = load(
                    f"{base}/v1/segment", photos, c, REQUESTS[c], BAD_EVERY if c == 16 else 0
                )
                after = batch_counts(base)
                if c == 1:
                    in_process.append(in_process_ms(seg, args.files[IN_PROCESS_PHOTOS:]))
                calls, images = after[0] - before[0], after[1] - before[1]
                row["mean_batch_size"] = round(images / calls, 2) if calls else None
                del row["latencies_ms"]
                rows.append(row)
                print(f"  serve {variant} {row}", flush=True)
        after_load = tree_rss_mib(proc.pid)
        timings = replica_timings(base, photos[:8])
    finally:
        stop(proc)
    return {
        "loads": rows,
        "in_process_ms": {
            "median": round(statistics.median(in_process[0] + in_process[1]), 1),
            "before_1_client": round(statistics.median(in_process[0]), 1),
            "after_1_client": round(statistics.median(in_process[1]), 1),
            "threads": default_threads(),
        },
        "replica_timings_ms": timings,
        "rss_mib": {
            "after_warm_up": round(warm, 1),
            "peak": round(peak.peak_mib, 1),
            "after_load": round(after_load, 1),
        },
    }


def replica_timings(base: str, photos: list[bytes]) -> dict:
    """Median of the replica's own stage timings (JSON answers' `timings`) for one client,
    beside the client's latency: where a lone request's time goes."""
    stages: dict[str, list[float]] = {}
    with httpx.Client(timeout=120) as http:
        for data in photos:
            t = time.perf_counter()
            r = http.post(
                f"{base}/v1/segment",
                content=data,
                headers={"Content-Type": "image/jpeg", "Accept": "application/json"},
            )
            ms = (time.perf_counter() - t) * 1e3
            for k, v in {**r.json()["timings"], "client": ms}.items():
                if isinstance(v, int | float):
                    stages.setdefault(k, []).append(v)
    return {k: round(statistics.median(v[2:]), 1) for k, v in stages.items()}


def bench_handwritten(args, photos: list[bytes]) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "serve_baseline_app:app",
        "--app-dir",
        str(ROOT / "benchmarks"),
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "SEGDEPLOY_BASELINE_MODEL": str(args.model), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_ready(proc, f"{base}/health")
        load(f"{base}/segment", photos, 4, 8)  # warm-up
        rows = []
        with TreeMemory(proc.pid, interval=0.25) as peak:
            for c in CLIENTS:
                row = load(f"{base}/segment", photos, c, max(c * 2, REQUESTS[c] // 3))
                del row["latencies_ms"]
                rows.append(row)
                print(f"  hand-written {row}", flush=True)
    finally:
        stop(proc)
    return {"loads": rows, "rss_mib": {"peak": round(peak.peak_mib, 1)}}


def one_round(args, photos: list[bytes], folder: Path, work: Path, r: int) -> dict:
    """infer and serve at each variant, and the hand-written endpoint once; odd rounds
    run them in the reverse order."""
    steps = [("infer", v) for v in args.variants] + [("serve", v) for v in args.variants]
    steps.append(("handwritten", None))
    row: dict = {"variants": {v: {} for v in args.variants}}
    for who, variant in steps if r % 2 == 0 else steps[::-1]:
        if who == "handwritten":
            row["handwritten"] = bench_handwritten(args, photos)
        elif who == "infer":
            out = work / f"infer-{r}-{variant}"
            ips, peak = run_infer(args.model, variant, folder, out)
            row["variants"][variant]["infer"] = {
                "images_per_s": ips,
                "peak_rss_mib": round(peak, 1),
            }
            print(f"round {r + 1}: infer {variant} {ips} images/s", flush=True)
        else:
            row["variants"][variant]["serve"] = bench_serve(args, photos, variant)
    return row


def judge(rounds: list[dict], variant: str) -> list[dict]:
    """Each target at `variant` from the median over rounds of its ratio within a round
    (the hand-written endpoint is the same fp32 PyTorch pipeline for every variant)."""

    def at(loads: list[dict], clients: int) -> dict:
        return next(x for x in loads if x["clients"] == clients)

    def med(values) -> float:
        return round(statistics.median(values), 3)

    runs = [(rw["variants"][variant], rw["handwritten"]) for rw in rounds]
    values = {
        "serve_16_vs_infer": med(
            at(v["serve"]["loads"], 16)["images_per_s"] / v["infer"]["images_per_s"]
            for v, _ in runs
        ),
        "serve_16_vs_handwritten_16": med(
            at(v["serve"]["loads"], 16)["images_per_s"] / at(h["loads"], 16)["images_per_s"]
            for v, h in runs
        ),
        "p50_1_client_vs_in_process": med(
            at(v["serve"]["loads"], 1)["p50_ms"] / v["serve"]["in_process_ms"]["median"]
            for v, _ in runs
        ),
        "rss_after_load_vs_warm": med(
            v["serve"]["rss_mib"]["after_load"] / v["serve"]["rss_mib"]["after_warm_up"]
            for v, _ in runs
        ),
    }
    names = {
        "serve_16_vs_infer": ("16 clients: serve images/s vs segdeploy infer", ">= 0.9x"),
        "serve_16_vs_handwritten_16": (
            "16 clients: serve vs hand-written FastAPI + pipeline (fp32 PyTorch)",
            ">= 2.0x",
        ),
        "p50_1_client_vs_in_process": (
            "1 client: serve p50 vs in-process decode+model+upsample",
            "<= 1.2x",
        ),
        "rss_after_load_vs_warm": ("RSS after the load vs after warm-up", "<= 1.2x"),
    }
    rows = []
    for key, value in values.items():
        limit = TARGETS[key]
        met = value >= limit if key.startswith("serve_16") else value <= limit
        rows.append({"target": names[key][0], "value": value, "needs": names[key][1], "met": met})
    batch = min(at(v["serve"]["loads"], 16)["mean_batch_size"] or 0 for v, _ in runs)
    rows.append(
        {
            "target": "16 clients: mean batch size (lowest round)",
            "value": batch,
            "needs": "> 1",
            "met": batch > 1,
        }
    )
    failed = sum(x["failed"] for v, _ in runs for x in v["serve"]["loads"])
    rows.append(
        {
            "target": "serve: failed requests (deliberately bad ones aside)",
            "value": failed,
            "needs": "0",
            "met": failed == 0,
        }
    )
    return [{"variant": variant, **row} for row in rows]


def graph_name(variant: str) -> str:
    return "model.onnx" if variant == "fp32" else f"model_{variant}.onnx"


def validation_of(model: Path, variant: str) -> float | None:
    """The variant's pixel agreement with the PyTorch model, from its validation report."""
    name = "validation.json" if variant == "fp32" else f"validation_{variant}.json"
    try:
        return json.loads((model / "onnx" / name).read_text())["pixel_agreement"]
    except (OSError, ValueError, KeyError):
        return None


def verdict(result: dict) -> list[str]:
    """Which variant meets which target, in words."""
    lines = []
    by_target: dict[str, dict[str, dict]] = {}
    for t in result["targets"]:
        by_target.setdefault(t["target"], {})[t["variant"]] = t
    for target, per in by_target.items():
        met = [v for v, t in per.items() if t["met"]]
        values = ", ".join(f"{v} {t['value']}" for v, t in per.items())
        who = (
            "every variant"
            if len(met) == len(per)
            else ("no variant" if not met else " and ".join(met) + " only")
        )
        lines.append(
            f"- {target} (needs {next(iter(per.values()))['needs']}): met by {who} ({values})"
        )
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    agreement = ", ".join(
        f"{v} {a:.2%}" if a is not None else f"{v} not validated"
        for v, a in result["pixel_agreement"].items()
    )
    lines = [
        "# segdeploy serve on CPU: loopback clients, beside infer and a hand-written endpoint",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cpu_model']}; {m['cpu_flags']}), "
        f"{m['platform']}; load average before/after: {m['load_before']} / {m['load_after']}",
        f"- model: {result['model']}; {result['images']} photos of {result['image_folder']}; "
        f"graph variants (serve and infer run the same one): {', '.join(result['variants'])}; "
        f"pixel agreement with the PyTorch model on CamVid (validate): {agreement}",
        f"- serve: `segdeploy serve --provider cpu --variant V {result['serve_args']}` (its "
        "private Ray); hand-written: benchmarks/serve_baseline_app.py (FastAPI + transformers "
        "pipeline, uvicorn): the user's fp32 PyTorch model for every row",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- {len(result['rounds'])} rounds, interleaved; ratios are medians over rounds of the "
        "ratio within a round",
        "",
        "## Verdict",
        "",
        *verdict(result),
        "",
        "| round | who | variant | clients | images/s | p50 ms | p95 ms | mean batch | failed |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r, rw in enumerate(result["rounds"], 1):
        runs = [("serve", v, rw["variants"][v]["serve"]) for v in result["variants"]]
        for who, variant, run in [*runs, ("handwritten", "fp32 (PyTorch)", rw["handwritten"])]:
            for x in run["loads"]:
                lines.append(
                    f"| {r} | {who} | {variant} | {x['clients']} | {x['images_per_s']:.2f} | "
                    f"{x['p50_ms']:.0f} | {x['p95_ms']:.0f} | {x.get('mean_batch_size') or '-'} "
                    f"| {x['failed']} |"
                )
    lines += [
        "",
        "| round | variant | in-process ms before / after 1 client (median) | serve 1-client "
        "p50 ms | replica ms: decode / preprocess / wait / model / upsample / encode, client "
        "| infer images/s | infer peak RSS MiB | serve RSS MiB warm / peak / after |",
        "|---:|---|---|---:|---|---:|---:|---|",
    ]
    for r, rw in enumerate(result["rounds"], 1):
        for v in result["variants"]:
            sv, inf = rw["variants"][v]["serve"], rw["variants"][v]["infer"]
            ip, s, t = sv["in_process_ms"], sv["rss_mib"], sv["replica_timings_ms"]
            stages = " / ".join(
                f"{t.get(k, 0):.1f}"
                for k in ("decode", "preprocess", "wait", "model", "upsample", "encode")
            )
            lines.append(
                f"| {r} | {v} | {ip['before_1_client']:.0f} / {ip['after_1_client']:.0f} "
                f"({ip['median']:.0f}) | {sv['loads'][0]['p50_ms']:.0f} | {stages}, "
                f"{t.get('client', 0):.0f} | {inf['images_per_s']:.2f} | "
                f"{inf['peak_rss_mib']:.0f} | {s['after_warm_up']:.0f} / {s['peak']:.0f} / "
                f"{s['after_load']:.0f} |"
            )
    lines.append("")
    lines.append(
        "hand-written peak RSS MiB by round: "
        + ", ".join(f"{rw['handwritten']['rss_mib']['peak']:.0f}" for rw in result["rounds"])
    )
    lines += ["", "## Targets", "", "| variant | target | value | needs | met |"]
    lines.append("|---|---|---:|---:|:---:|")
    for t in result["targets"]:
        lines.append(
            f"| {t['variant']} | {t['target']} | {t['value']} | {t['needs']} | "
            f"{'yes' if t['met'] else '**no**'} |"
        )
    lines += [
        "",
        "RSS is the sum over the process tree (for serve: the command, its Ray's GCS, "
        "raylet, Serve controller, HTTP proxy and the replicas), so pages shared between "
        "processes count more than once. infer's images/s is summary.json's (the run, "
        "model load excluded), serve's the requests answered per second of the load. At "
        f"16 clients every {BAD_EVERY}th request is a truncated file: each got 400, and "
        "`failed` counts any other outcome. The in-process reference is decode + "
        "preprocess + model (batch 1) + upsample with a Segmenter opened as the replica "
        f"opens its own (the variant, {result['rounds'][0]['variants'][result['variants'][0]]['serve']['in_process_ms']['threads']} "
        "threads, no spinning, no memory patterns), "
        f"{IN_PROCESS_PHOTOS} photos right before and {IN_PROCESS_PHOTOS} right after the "
        "1-client load while the service is up and idle; the service also encodes the "
        "label PNG and counts the class shares (`encode` in the replica's timings, from 8 "
        "JSON requests after the load; `client` is those requests' latency).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--variants",
        default=None,
        help="graph variants to serve and infer with, comma-separated (default: fp32, and "
        "int8 where the export has it)",
    )
    ap.add_argument("--serve-args", default="", help="more options for segdeploy serve")
    ap.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "serve_cpu.json"
    )
    args = ap.parse_args(argv)
    args.model_given = args.model
    args.model = args.model.resolve()  # infer runs in its work folder
    if args.variants is None:
        args.variants = [v for v in VARIANTS if (args.model / "onnx" / graph_name(v)).is_file()]
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    from segdeploy.atomic import write_json, write_text
    from segdeploy.runtime.image_io import is_image_name

    args.files = sorted(p for p in args.images.rglob("*") if p.is_file() and is_image_name(p))
    if not args.files or not (args.model / "onnx" / "model.onnx").is_file():
        print(
            f"need photos under {args.images} and an export in {args.model}/onnx", file=sys.stderr
        )
        return 2
    photos = [p.read_bytes() for p in args.files]
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    folder = work / "photos"
    folder.mkdir()
    for p in args.files:
        os.symlink(p.resolve(), folder / p.name)
    rounds = [one_round(args, photos, folder, work, r) for r in range(args.rounds)]

    import fastapi
    import onnxruntime
    import ray
    import transformers

    result = {
        "benchmark": "serve_cpu",
        "command": "flock /tmp/segdeploy-cpu.lock .venv/bin/python benchmarks/bench_serve.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": os.path.relpath(args.model_given.absolute(), ROOT),
        "images": len(photos),
        "image_folder": shown_path(args.images),
        "serve_args": args.serve_args,
        "variants": args.variants,
        "pixel_agreement": {v: validation_of(args.model, v) for v in args.variants},
        "requests_per_client_count": REQUESTS,
        "rounds": rounds,
        "targets": [t for v in args.variants for t in judge(rounds, v)],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            **cpu_info(),
            "platform": platform.platform(),
            "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            "ray": ray.__version__,
            "onnxruntime": onnxruntime.__version__,
            "fastapi": fastapi.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(args.output, result)
    write_text(args.output.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
