"""`segdeploy serve` under load on loopback, beside `segdeploy infer` and a hand-written
FastAPI + transformers pipeline endpoint: benchmarks/results/serve_cpu.{json,md}.

Per round (rounds interleave the three, as the machine's speed drifts):

1. in process: decode + preprocess + model (batch 1) + upsample of each photo with a
   Segmenter of the replica's threads: the floor of one request's latency;
2. `segdeploy infer` on the photos (a fresh process, default settings): its images/s
   from summary.json (the run, model load excluded);
3. `segdeploy serve` (a fresh process, its private Ray): after a warm-up, 1, 4 and 16
   clients on loopback, each sending the photos' files one request at a time
   (keep-alive); images/s, p50/p95 latency, mean batch size (from /metrics), RSS of the
   whole process tree (Ray included) after warm-up, peak and after the load. At 16
   clients every 25th request is a deliberately truncated file (it must get 400);
4. the hand-written endpoint (serve_baseline_app.py, uvicorn) under the same clients.

Targets (issue 24), judged on the medians over rounds of each ratio within a round.

    flock /tmp/segdeploy-cpu.lock .venv/bin/python benchmarks/bench_serve.py \\
        [--model models/camvid-b0-512] [--images ../shared/data/camvid/images/val] [--rounds 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
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
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "camvid" / "images" / "val"
DEFAULT_MODEL = ROOT / "models" / "camvid-b0-512"
CLIENTS = (1, 4, 16)
#: Requests per client count (enough for a stable rate, a few seconds each).
REQUESTS = {1: 30, 4: 64, 16: 160}
BAD_EVERY = 25
TARGETS = {
    "serve_16_vs_infer": 0.9,
    "serve_16_vs_handwritten_16": 2.0,
    "p50_1_client_vs_in_process": 1.2,
    "rss_after_load_vs_warm": 1.2,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shown_path(path: Path) -> str:
    """`path` from its data/ folder on (as the docs' tables show data), else as given."""
    parts = path.resolve().parts
    return "/".join(parts[parts.index("data") :]) if "data" in parts else str(path)


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants (a Ray's raylet, workers...), MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


class PeakRss:
    """Samples a process tree's RSS every 0.25 s while in the block."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, tree_rss_mib(self.pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def in_process_ms(model: Path, photos: list[Path], threads: int) -> float:
    """Median ms of decode + preprocess + model (batch 1) + upsample, one photo at a time."""
    from segdeploy.runtime.segmenter import Segmenter

    seg = Segmenter(model, "cpu", threads=threads, batch_size=1)
    times = []
    for i, path in enumerate(photos[:30]):
        data = path.read_bytes()
        t = time.perf_counter()
        image = seg.load(data)
        seg.forward([seg.prepare(image)], [(image.height, image.width)])[0]()
        if i >= 3:  # the first calls warm the session up
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_infer(model: Path, folder: Path, out: Path) -> tuple[float, float]:
    """(images/s of the run from summary.json, peak RSS MiB) of `segdeploy infer`."""
    cmd = [sys.executable, "-m", "segdeploy", "-q", "infer", "--model", str(model)]
    proc = subprocess.Popen([*cmd, str(folder), "-o", str(out)], cwd=out.parent)
    with PeakRss(proc.pid) as rss:
        if proc.wait() != 0:
            raise SystemExit("segdeploy infer failed")
    summary = json.loads((out / "summary.json").read_text())
    return summary["totals"]["images_per_s"], rss.peak


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
    }


def batch_counts(base: str) -> tuple[float, float]:
    """(model calls, images) from the service's batch-size histogram."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    count = re.search(r"^segdeploy_batch_size_count ([0-9.e+]+)", text, re.M)
    total = re.search(r"^segdeploy_batch_size_sum ([0-9.e+]+)", text, re.M)
    return float(count.group(1)), float(total.group(1))


def bench_serve(args, photos: list[bytes]) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "segdeploy", "-q", "serve", "--model", str(args.model)]
    cmd += ["--port", str(port), "--provider", "cpu", *shlex.split(args.serve_args)]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="bsr-", dir="/tmp")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_ready(proc, f"{base}/v2/health/ready")
        load(f"{base}/v1/segment", photos, 4, 16)  # warm-up: sessions, threads, connections
        warm = tree_rss_mib(proc.pid)
        rows = []
        with PeakRss(proc.pid) as peak:
            for c in CLIENTS:
                before = batch_counts(base)
                row = load(
                    f"{base}/v1/segment", photos, c, REQUESTS[c], BAD_EVERY if c == 16 else 0
                )
                after = batch_counts(base)
                calls, images = after[0] - before[0], after[1] - before[1]
                row["mean_batch_size"] = round(images / calls, 2) if calls else None
                rows.append(row)
                print(f"  serve {row}", flush=True)
        after_load = tree_rss_mib(proc.pid)
    finally:
        stop(proc)
    return {
        "loads": rows,
        "rss_mib": {
            "after_warm_up": round(warm, 1),
            "peak": round(peak.peak, 1),
            "after_load": round(after_load, 1),
        },
    }


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
        with PeakRss(proc.pid) as peak:
            for c in CLIENTS:
                row = load(f"{base}/segment", photos, c, max(c * 2, REQUESTS[c] // 3))
                rows.append(row)
                print(f"  hand-written {row}", flush=True)
    finally:
        stop(proc)
    return {"loads": rows, "rss_mib": {"peak": round(peak.peak, 1)}}


def one_round(args, photos: list[bytes], folder: Path, work: Path, r: int) -> dict:
    from segdeploy.runtime.pipeline import default_threads

    row: dict = {
        "in_process_ms": round(in_process_ms(args.model, args.files, default_threads()), 1)
    }
    ips, peak = run_infer(args.model, folder, work / f"infer-{r}")
    row["infer"] = {"images_per_s": ips, "peak_rss_mib": round(peak, 1)}
    print(f"round {r + 1}: in process {row['in_process_ms']} ms, infer {row['infer']}", flush=True)
    order = (bench_serve, bench_handwritten) if r % 2 == 0 else (bench_handwritten, bench_serve)
    for fn in order:
        row["serve" if fn is bench_serve else "handwritten"] = fn(args, photos)
    return row


def judge(rounds: list[dict]) -> list[dict]:
    """Each target from the median over rounds of its ratio within a round."""

    def at(rw: dict, who: str, clients: int) -> dict:
        return next(x for x in rw[who]["loads"] if x["clients"] == clients)

    def med(values) -> float:
        return round(statistics.median(values), 3)

    values = {
        "serve_16_vs_infer": med(
            at(rw, "serve", 16)["images_per_s"] / rw["infer"]["images_per_s"] for rw in rounds
        ),
        "serve_16_vs_handwritten_16": med(
            at(rw, "serve", 16)["images_per_s"] / at(rw, "handwritten", 16)["images_per_s"]
            for rw in rounds
        ),
        "p50_1_client_vs_in_process": med(
            at(rw, "serve", 1)["p50_ms"] / rw["in_process_ms"] for rw in rounds
        ),
        "rss_after_load_vs_warm": med(
            rw["serve"]["rss_mib"]["after_load"] / rw["serve"]["rss_mib"]["after_warm_up"]
            for rw in rounds
        ),
    }
    rows = [
        {
            "target": "16 clients: serve images/s vs segdeploy infer",
            "value": values["serve_16_vs_infer"],
            "needs": ">= 0.9x",
            "met": values["serve_16_vs_infer"] >= 0.9,
        },
        {
            "target": "16 clients: serve vs hand-written FastAPI + pipeline",
            "value": values["serve_16_vs_handwritten_16"],
            "needs": ">= 2.0x",
            "met": values["serve_16_vs_handwritten_16"] >= 2.0,
        },
        {
            "target": "1 client: serve p50 vs in-process decode+model+upsample",
            "value": values["p50_1_client_vs_in_process"],
            "needs": "<= 1.2x",
            "met": values["p50_1_client_vs_in_process"] <= 1.2,
        },
        {
            "target": "RSS after the load vs after warm-up",
            "value": values["rss_after_load_vs_warm"],
            "needs": "<= 1.2x",
            "met": values["rss_after_load_vs_warm"] <= 1.2,
        },
    ]
    batch = min(at(rw, "serve", 16)["mean_batch_size"] or 0 for rw in rounds)
    rows.append(
        {
            "target": "16 clients: mean batch size (lowest round)",
            "value": batch,
            "needs": "> 1",
            "met": batch > 1,
        }
    )
    failed = sum(x["failed"] for rw in rounds for who in ("serve",) for x in rw[who]["loads"])
    rows.append(
        {
            "target": "serve: failed requests (deliberately bad ones aside)",
            "value": failed,
            "needs": "0",
            "met": failed == 0,
        }
    )
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# segdeploy serve on CPU: loopback clients, beside infer and a hand-written endpoint",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; load average "
        f"before/after: {m['load_before']} / {m['load_after']}",
        f"- model: {result['model']}; {result['images']} photos of {result['image_folder']}",
        f"- serve: `segdeploy serve --provider cpu {result['serve_args']}` (its private Ray); "
        "hand-written: benchmarks/serve_baseline_app.py (FastAPI + transformers pipeline, uvicorn)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- {len(result['rounds'])} rounds, interleaved; ratios are medians over rounds of the "
        "ratio within a round",
        "",
        "| round | who | clients | images/s | p50 ms | p95 ms | mean batch | failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r, rw in enumerate(result["rounds"], 1):
        for who in ("serve", "handwritten"):
            for x in rw[who]["loads"]:
                lines.append(
                    f"| {r} | {who} | {x['clients']} | {x['images_per_s']:.2f} | {x['p50_ms']:.0f} "
                    f"| {x['p95_ms']:.0f} | {x.get('mean_batch_size') or '-'} | {x['failed']} |"
                )
    lines += [
        "",
        "| round | in-process ms (decode+model+upsample) | infer images/s | infer peak RSS MiB | serve RSS MiB warm / peak / after | hand-written peak RSS MiB |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for r, rw in enumerate(result["rounds"], 1):
        s = rw["serve"]["rss_mib"]
        lines.append(
            f"| {r} | {rw['in_process_ms']:.1f} | {rw['infer']['images_per_s']:.2f} | "
            f"{rw['infer']['peak_rss_mib']:.0f} | {s['after_warm_up']:.0f} / {s['peak']:.0f} / "
            f"{s['after_load']:.0f} | {rw['handwritten']['rss_mib']['peak']:.0f} |"
        )
    lines += ["", "## Targets", "", "| target | value | needs | met |", "|---|---:|---:|:---:|"]
    for t in result["targets"]:
        lines.append(
            f"| {t['target']} | {t['value']} | {t['needs']} | {'yes' if t['met'] else '**no**'} |"
        )
    lines += [
        "",
        "RSS is the sum over the process tree (for serve: the command, its Ray's GCS, "
        "raylet, Serve controller, HTTP proxy and the replicas), so pages shared between "
        "processes count more than once. infer's images/s is summary.json's (the run, "
        "model load excluded), serve's the requests answered per second of the load. At "
        f"16 clients every {BAD_EVERY}th request is a truncated file: each got 400, and "
        "`failed` counts any other outcome.",
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
    ap.add_argument("--serve-args", default="", help="more options for segdeploy serve")
    ap.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "serve_cpu.json"
    )
    args = ap.parse_args(argv)
    args.model = args.model.resolve()  # infer runs in its work folder

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
        "model": os.path.relpath(args.model, ROOT),
        "images": len(photos),
        "image_folder": shown_path(args.images),
        "serve_args": args.serve_args,
        "requests_per_client_count": REQUESTS,
        "rounds": rounds,
        "targets": judge(rounds),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
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
