"""Run the benchmark: one worker process per backend and batch size, then score and report.

The parent process never loads a model. It lays out the inputs, starts
`python -m segdeploy.bench.worker` for each row (see worker.py for why a
process each), reads back raw timings and the label maps each worker left, and
computes the figures: end-to-end images/s from the median of the repeated
runs, model-only latency p50/p95, peak memory, mean IoU against the reference
labels and pixel agreement with the `torch` backend.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.bench.backends import (
    REFERENCE,
    Backend,
    check_backend,
    default_backends,
    parse_backend,
)
from segdeploy.bench.inputs import (
    BenchInputs,
    link_or_copy,
    read_reference,
    reference_label_path,
    relative_file,
)
from segdeploy.errors import SegdeployError
from segdeploy.folders import (
    CONFIG_FILE,
    VARIANT_FILES,
    default_onnx_dir,
    id2label_of,
    read_config,
)

log = logging.getLogger(__name__)

#: Row groups a target may name instead of a row: at each batch size, the fastest ok row
#: that the group's test accepts. segdeploy's CPU rows are those of `segdeploy infer` on
#: onnxruntime's CPU provider or OpenVINO; "validated" is set by `mark_validated`.
SEGDEPLOY_FP32 = "segdeploy infer fp32 (fastest CPU row)"
FASTEST_VALIDATED = "segdeploy infer (fastest validated CPU row)"
OPENVINO_FASTEST = "OpenVINO's own pipeline (fastest row)"
GROUPS: dict[str, Callable[[dict[str, Any]], bool]] = {
    SEGDEPLOY_FP32: lambda r: _segdeploy_cpu(r) and r.get("precision") == "fp32",
    FASTEST_VALIDATED: lambda r: _segdeploy_cpu(r) and bool(r.get("validated")),
    OPENVINO_FASTEST: lambda r: r.get("kind") in ("openvino", "openvino-int8"),
}

#: (name, backend, compared with, what, target): the issues' targets, judged per batch size.
#: A backend (or compared-with) is a row's name or a GROUPS name.
#: "ratio" divides end-to-end images/s, "vs_model" a row's end-to-end rate by its
#: own model-only rate, both paired by round (see `summarize`); "model_ratio" divides
#: model-only latencies (base's p50 over the row's); "agreement" is pixel agreement
#: with torch; "miou_drop" is the mean IoU of `compared with` minus the backend's.
#: The OpenVINO ones (issues 16, 27) are judged only where the openvino rows ran; the
#: fp32 ratios (issue 29) compare rows that do the same job (files in, label PNGs out).
TARGETS = (
    ("infer fp32 end to end vs torch", SEGDEPLOY_FP32, "torch", "ratio", 1.1),
    ("infer fp32 end to end vs hf-pipeline", SEGDEPLOY_FP32, "hf-pipeline", "ratio", 2.0),
    ("infer fp32 end to end vs optimum", SEGDEPLOY_FP32, "optimum", "ratio", 1.1),
    ("infer fp32 end to end vs OpenVINO fp32", SEGDEPLOY_FP32, "openvino", "ratio", 1.1),
    ("infer fp32 end to end vs its model-only rate", "onnx-cpu", None, "vs_model", 0.9),
    ("infer fp32 masks equal to torch", "onnx-cpu", REFERENCE, "agreement", 0.999),
    ("int8 end to end vs fp32", "onnx-cpu-int8", "onnx-cpu", "ratio", 1.6),
    ("int8 mean IoU drop vs torch", "onnx-cpu-int8", REFERENCE, "miou_drop", 0.01),
    ("int8 end to end vs OpenVINO NNCF int8", "onnx-cpu-int8", "openvino-int8", "ratio", 1.25),
    ("int8 end to end vs OpenVINO fp32", "onnx-cpu-int8", "openvino", "ratio", 1.25),
    ("ORT fp32 model only vs OpenVINO fp32", "onnx-cpu", "openvino", "model_ratio", 0.9),
    ("fastest validated CPU row vs OpenVINO's fastest", FASTEST_VALIDATED, OPENVINO_FASTEST,
     "ratio", 1.15),
    ("fastest validated CPU row masks equal to torch", FASTEST_VALIDATED, REFERENCE,
     "agreement", 0.995),
    ("fastest validated CPU row mean IoU drop vs torch", FASTEST_VALIDATED, REFERENCE,
     "miou_drop", 0.01),
)  # fmt: skip


def _segdeploy_cpu(row: dict[str, Any]) -> bool:
    return row.get("kind") == "segdeploy" and row.get("provider") in ("cpu", "openvino")


@dataclass(frozen=True)
class InputOptions:
    """Which images a benchmark runs on: a folder (--images, --labels), else the evaluation
    split of --dataset or of the dataset `segdeploy train` recorded."""

    images: str | None = None
    labels: str | None = None
    dataset: str | None = None
    split: str | None = None
    reduce_labels: bool | None = None
    ignore_index: int | None = None
    max_images: int | None = None


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    runs: int = 3  # rounds: each a timed end-to-end pass over all images per row
    model_runs: int = 20  # timed forward calls per row, spread over the rounds
    threads: int | None = None  # None: each library's default (all cores)
    timeout_s: float | None = None  # per worker
    #: Judge TARGETS (set for a CamVid-trained b0 at 512x512, where the figures were
    #: measured); off for models they mean nothing for, such as the 64-px demo model.
    targets: bool = True
    #: The other rows keep their label maps in memory instead of writing label PNGs
    #: (segdeploy infer's rows always write): the older, unequal comparison, on request.
    in_memory: bool = False
    inputs: InputOptions = field(default_factory=InputOptions)
    #: Sliding windows (--tile, --stride, --overlap, --blend; segdeploy.runtime.tiles): the
    #: onnx-* rows run `segdeploy infer --tile`, the torch row the same windows in PyTorch,
    #: model-only batches are batches of windows; rows with no tiled mode are skipped.
    tile: str | None = None
    stride: str | None = None
    overlap: float | None = None
    blend: str = "mean"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tiling(self):
        from segdeploy.runtime.tiles import TileOptions

        return TileOptions.from_text(self.tile, self.stride, self.overlap, self.blend)

    def check(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise SegdeployError("--batch-sizes", "give positive integers, e.g. 1,8")
        if self.runs < 1:
            raise SegdeployError("--runs", f"must be at least 1, got {self.runs}")
        if self.model_runs < 1:
            raise SegdeployError("--model-runs", f"must be at least 1, got {self.model_runs}")
        if self.threads is not None and self.threads < 1:
            raise SegdeployError("--threads", f"must be at least 1, got {self.threads}")
        self.tiling  # noqa: B018 (parses the tile options: a bad one is refused here)
        # NaN passes every range check (all its comparisons are false) and is not JSON.
        if self.timeout_s is not None and not (
            math.isfinite(self.timeout_s) and self.timeout_s > 0
        ):
            raise SegdeployError("--timeout", f"must be a number of seconds, got {self.timeout_s}")


def resolve_dirs(
    model: str | os.PathLike, onnx: str | os.PathLike | None
) -> tuple[Path | None, Path | None]:
    """(PyTorch model folder or None, ONNX folder or None) from --model and --onnx.

    --model may be a trained model folder (its export in onnx/) or an ONNX folder
    itself; then only the ONNX backends can run.
    """
    model = Path(model)
    if not model.is_dir():
        raise SegdeployError(model, "model folder not found (give --model a trained model folder)")
    if onnx is not None:
        onnx_dir = Path(onnx)
        if not onnx_dir.is_dir():
            raise SegdeployError(onnx_dir, "--onnx folder not found")
    else:
        onnx_dir = next(
            (d for d in (default_onnx_dir(model), model) if (d / VARIANT_FILES["fp32"]).is_file()),
            None,
        )
    if not (model / CONFIG_FILE).is_file() and onnx_dir is None:
        raise SegdeployError(model, "neither a model folder (config.json) nor an ONNX export")
    return model, onnx_dir


def model_facts(model_dir: Path | None, onnx_dir: Path | None) -> dict[str, Any]:
    """Classes and input size, from whichever folder has them."""
    from segdeploy.runtime.providers import read_image_size

    for folder in (onnx_dir, model_dir):
        if folder is None or not (folder / CONFIG_FILE).is_file():
            continue
        cfg = read_config(folder)
        id2label = id2label_of(cfg)
        size = read_image_size(folder)
        return {
            "num_labels": len(id2label),
            "id2label": {str(k): v for k, v in id2label.items()},
            "image_size": list(size) if size else None,
            "hidden_sizes": cfg.get("hidden_sizes"),
        }
    raise SegdeployError(model_dir or onnx_dir, "no config.json: cannot tell the classes")


# ------------------------------------------------------------------ workers


class Worker:
    """A row's worker process, driven one JSON-line command at a time.

    Any way a worker can fail (an exception it reports, a crash, a hang past the
    timeout) comes back as {"event": "result", "status": "failed", "reason": ...}.
    """

    def __init__(self, job: dict[str, Any], work: Path, timeout_s: float | None):
        tag = f"{job['backend']}-b{job['batch_size']}"
        job_path = work / "jobs" / f"{tag}.json"
        self.log_path = work / "logs" / f"{tag}.log"
        job_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        job_path.write_text(json.dumps(job), encoding="utf-8")
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self._log = self.log_path.open("wb")
        self._buffer = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segdeploy.bench.worker", str(job_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )

    def request(self, command: dict[str, Any] | None) -> dict[str, Any]:
        """Send `command` (None: just wait for the next message) and return the reply."""
        if command is not None:
            try:
                self.proc.stdin.write((json.dumps(command) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                return self._died()
        line = self._readline()
        if line is None:
            return self._died()
        if line == "timeout":
            self.close()
            return _failed(f"timed out after {self.timeout_s:g} s")
        return json.loads(line)

    def _readline(self) -> str | None:
        # Our own line buffer over os.read, so that select() sees every byte not yet read.
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
                if not ready:
                    return "timeout"
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _died(self) -> dict[str, Any]:
        code = self.proc.wait()
        self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return _failed(f"worker exited with status {code}: {lines[-1] if lines else 'no output'}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()
        self._log.close()


def _failed(reason: str) -> dict[str, Any]:
    return {"event": "result", "status": "failed", "reason": reason}


def measure_batch_size(
    jobs: list[dict[str, Any]], settings: BenchSettings, work: Path, console=None
) -> list[dict[str, Any]]:
    """Raw results of `jobs` (one per backend, same batch size), measured round by round.

    Workers start one after another (set-up and warm-up are not timed); then
    each round asks every live worker, in turn, for one end-to-end pass and its
    share of the forward calls, starting one place further each round so that no
    row always runs first. Only one worker is busy at any moment; the others
    wait, idle, with their model loaded.
    """
    workers: dict[int, Worker] = {}
    raw: list[dict[str, Any]] = [
        {"end_to_end_s": [], "short_s": [], "model_latency_s": [], "model_latency_s_by_round": []}
        for _ in jobs
    ]
    try:
        for i, job in enumerate(jobs):
            _status(console, f"{job['backend']}, batch {job['batch_size']}: loading, warming up")
            w = Worker(job, work, settings.timeout_s)
            reply = w.request(None)
            if reply.get("event") == "ready":
                workers[i] = w
            else:
                w.close()
                raw[i] = reply
        # The forward calls spread over the rounds as evenly as they go.
        calls = [
            settings.model_runs // settings.runs + (r < settings.model_runs % settings.runs)
            for r in range(settings.runs)
        ]
        for r in range(settings.runs):
            live = sorted(workers)
            order = live[r % len(live) :] + live[: r % len(live)] if live else []
            for i in order:
                _status(
                    console,
                    f"round {r + 1}/{settings.runs}: {jobs[i]['backend']}, batch {jobs[i]['batch_size']}",
                )
                reply = workers[i].request({"do": "round", "calls": calls[r]})
                if reply.get("event") != "round":
                    workers.pop(i).close()
                    raw[i] = reply
                    continue
                raw[i]["end_to_end_s"].append(reply["end_to_end_s"])
                raw[i]["short_s"].append(reply.get("short_s"))
                raw[i]["model_latency_s"].extend(reply["model_latency_s"])
                raw[i]["model_latency_s_by_round"].append(reply["model_latency_s"])
        for i in sorted(workers):
            reply = workers[i].request({"do": "finish"})
            raw[i] = {**raw[i], **reply} if reply.get("status") == "ok" else reply
    finally:
        for w in workers.values():
            w.close()
    return raw


def _status(console, text: str) -> None:
    if console is not None:
        console.print(f"[dim]{text}[/]", highlight=False)


def summarize(raw: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Medians and percentiles from a worker's raw timings.

    The speed of a shared (or virtual) machine drifts by 10-30% over minutes, so a
    ratio of two rates is taken per round, from measurements made minutes apart
    at most, and the median of those is reported ("paired"); the ratio of the
    overall medians is kept beside it.
    """
    e2e = np.asarray(raw["end_to_end_s"], dtype=np.float64)
    lat = np.asarray(raw["model_latency_s"], dtype=np.float64) * 1000
    e2e_rate = raw["images"] / float(np.median(e2e))
    p50 = float(np.percentile(lat, 50))
    model_rate = batch_size / (p50 / 1000)
    by_round = [raw["images"] / float(t) for t in e2e]
    per_round = [
        rate / (batch_size / float(np.median(calls)))
        for rate, calls in zip(by_round, raw.get("model_latency_s_by_round", []), strict=False)
        if calls
    ]
    return {
        "end_to_end_images_per_s": e2e_rate,
        **startup_and_steady(raw),
        "end_to_end_images_per_s_by_round": by_round,
        "end_to_end_s_median": float(np.median(e2e)),
        "end_to_end_s": [round(float(x), 6) for x in e2e],
        "model_p50_ms": p50,
        "model_p95_ms": float(np.percentile(lat, 95)),
        "model_ms_per_image": p50 / batch_size,
        "model_images_per_s": model_rate,
        "end_to_end_vs_model": float(np.median(per_round)) if per_round else e2e_rate / model_rate,
        "end_to_end_vs_model_of_medians": e2e_rate / model_rate,
        "model_latency_ms": [round(float(x), 3) for x in lat],
    }


def startup_and_steady(raw: dict[str, Any]) -> dict[str, Any]:
    """A pass's fixed start-up (s) and its steady rate (images/s), from the two passes of
    each round: the full one (n images, T_n s) and the short one (k images, T_k s), as
    T = start-up + images / rate. Medians over rounds; None without a short pass.

    The start-up is what a pass pays whatever its length (segdeploy's process pool,
    listing and summary.json; about nothing for the rows whose model is already loaded);
    the model's own load is the row's `setup_s`, paid once and not in any pass.
    """
    n, k = raw["images"], raw.get("short_images") or 0
    starts, rates = [], []
    for full, short in zip(raw["end_to_end_s"], raw.get("short_s") or [], strict=False):
        if short is None or not 0 < k < n or full <= short:
            continue  # no short pass, or one no faster than the full pass: nothing to solve
        starts.append((short * n - full * k) / (n - k))
        rates.append((n - k) / (full - short))
    if not rates:
        return {"start_up_s": None, "steady_images_per_s": None}
    return {
        "start_up_s": float(np.median(starts)),
        "steady_images_per_s": float(np.median(rates)),
        "short_pass_images": k,
        "short_pass_s": [round(float(x), 6) for x in raw["short_s"] if x is not None],
    }


def paired_ratio(row: dict[str, Any], base: dict[str, Any]) -> float:
    """Median over rounds of row's end-to-end rate over base's in the same round."""
    a = row.get("end_to_end_images_per_s_by_round")
    b = base.get("end_to_end_images_per_s_by_round")
    if a and b and len(a) == len(b):
        return float(np.median([x / y for x, y in zip(a, b, strict=True)]))
    return row["end_to_end_images_per_s"] / base["end_to_end_images_per_s"]


# ------------------------------------------------------------------ scoring


def score(rows: list[dict[str, Any]], items: list, inputs: BenchInputs, num_labels: int) -> None:
    """Add mean IoU (when labels exist) and pixel agreement with torch to the ok rows, in place.

    Streams image by image: each reference and torch mask is read once for all rows.
    """
    from PIL import Image

    from segdeploy.runtime.infer import label_path
    from segdeploy.runtime.large_image import read_labels, tiff_name
    from segdeploy.train.metrics import MeanIoU, finite

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    torch_out = {r["batch_size"]: Path(r["_out"]) for r in ok if r["backend"] == REFERENCE}

    def reference_for(batch_size: int) -> Path | None:
        return torch_out.get(batch_size) or next(iter(torch_out.values()), None)

    metrics = {id(r): MeanIoU(num_labels, inputs.ignore_index) for r in ok} if inputs.labels else {}
    agree = {id(r): 0 for r in ok}
    pixels = 0

    def read(path: Path) -> np.ndarray:
        if not path.exists() and tiff_name(path).exists():  # a large tiled output
            return read_labels(tiff_name(path))
        with Image.open(path) as im:
            return np.asarray(im)

    for item in items:
        ref = None
        if inputs.labels is not None:
            ref = read_reference(
                reference_label_path(inputs.labels, item.out),
                num_labels=num_labels,
                ignore_index=inputs.ignore_index,
                reduce_labels=inputs.reduce_labels,
            )
        torch_masks: dict[Path, np.ndarray] = {}
        for r in ok:
            pred = read(label_path(Path(r["_out"]), item))
            if ref is not None:
                if pred.shape != ref.shape:
                    raise SegdeployError(
                        item.path,
                        f"{r['backend']} gave a {pred.shape} mask for a {ref.shape} reference",
                    )
                metrics[id(r)].update(pred, ref)
            tpath = reference_for(r["batch_size"])
            if tpath is not None:
                if tpath not in torch_masks:
                    torch_masks[tpath] = read(label_path(tpath, item))
                agree[id(r)] += int((pred == torch_masks[tpath]).sum())
        pixels += int(np.prod(pred.shape))

    for r in ok:
        if metrics:
            result = metrics[id(r)].compute()
            r["mean_iou"] = finite(result["mean_iou"])
            r["per_category_iou"] = [finite(v) for v in result["per_category_iou"]]
        r["pixel_agreement_with_torch"] = agree[id(r)] / pixels if torch_out and pixels else None


def fastest(rows: list[dict[str, Any]], spec: str | None, batch_size: int):
    """The row `spec` names at `batch_size` (a row name, or the fastest ok row of a GROUPS
    entry), or None when it did not run."""
    ok = [r for r in rows if r["status"] == "ok" and r["batch_size"] == batch_size]
    if spec in GROUPS:
        members = [r for r in ok if GROUPS[spec](r)]
        return max(members, key=lambda r: r["end_to_end_images_per_s"], default=None)
    return next((r for r in ok if r["backend"] == spec), None)


def judge_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issues' targets, for every batch size where the rows they need ran."""
    out = []
    for batch_size in sorted({r["batch_size"] for r in rows}):
        for name, backend, other, what, target in TARGETS:
            row = fastest(rows, backend, batch_size)
            base = fastest(rows, other, batch_size) if other else row
            if row is None or base is None:
                continue
            judged = _judge(what, row, base, target)
            if judged is None:
                continue
            value, met, extra = judged
            out.append(
                {
                    "target": name,
                    "batch_size": batch_size,
                    "backend": row["backend"],
                    "compared_with": base["backend"] if other else None,
                    "kind": what,
                    "value": value,
                    "threshold": target,
                    "met": bool(met),
                    **({"group": backend} if backend in GROUPS else {}),
                    **({"compared_group": other} if other in GROUPS else {}),
                    **extra,
                }
            )
    return out


def _judge(what: str, row, base, target: float):
    """(value, met, extra) of one target on its rows, or None when a figure is missing."""
    extra: dict[str, Any] = {}
    if what == "ratio":
        value = paired_ratio(row, base)
        extra["ratio_of_medians"] = row["end_to_end_images_per_s"] / base["end_to_end_images_per_s"]
        return value, value >= target, extra
    if what == "model_ratio":
        value = base["model_p50_ms"] / row["model_p50_ms"]
        return value, value >= target, extra
    if what == "vs_model":
        extra["ratio_of_medians"] = row.get("end_to_end_vs_model_of_medians")
        value = row["end_to_end_vs_model"]
        return value, value >= target, extra
    if what == "agreement":
        value = row.get("pixel_agreement_with_torch")
        return None if value is None else (value, value >= target, extra)
    if row.get("mean_iou") is None or base.get("mean_iou") is None:  # miou_drop
        return None
    value = base["mean_iou"] - row["mean_iou"]
    return value, value <= target, extra


def mark_validated(rows: list[dict[str, Any]], onnx_dir: Path | None) -> None:
    """Set `validated` on segdeploy's ok rows, in place: the graph it ran passed its
    validation against PyTorch (the report export or validate wrote beside it), and, where
    the torch row ran, its label maps here agree with torch's as that precision's floor
    requires (the graph may have been validated on another runtime than this row's)."""
    from segdeploy.folders import validation_report_name
    from segdeploy.validate.verdicts import MIN_AGREEMENT

    for r in rows:
        if r["status"] != "ok" or not r.get("graph") or onnx_dir is None:
            continue
        report = read_json_or_none(onnx_dir / validation_report_name(r["graph"]))
        passed = isinstance(report, dict) and report.get("passed") is True
        agree = r.get("pixel_agreement_with_torch")
        floor = MIN_AGREEMENT.get(r.get("precision") or "fp32", 1.0)
        r["validation_passed"] = passed
        r["validated"] = passed and (agree is None or agree >= floor)


def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fastest_paths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: segdeploy's fastest validated CPU row, the command that runs it,
    and its end-to-end ratio (paired) to the fastest row of the other libraries."""
    out = []
    for batch_size in sorted({r["batch_size"] for r in rows}):
        best = fastest(rows, FASTEST_VALIDATED, batch_size)
        if best is None:
            continue
        peers = [
            r
            for r in rows
            if r["status"] == "ok"
            and r["batch_size"] == batch_size
            and r.get("kind") != "segdeploy"
        ]
        peer = max(peers, key=lambda r: r["end_to_end_images_per_s"], default=None)
        variant = "" if best["variant"] == "fp32" else f" --variant {best['variant']}"
        out.append(
            {
                "batch_size": batch_size,
                "backend": best["backend"],
                "command": f"segdeploy infer --provider {best['provider']}{variant} "
                f"--batch-size {batch_size}",
                "end_to_end_images_per_s": best["end_to_end_images_per_s"],
                "best_peer": peer["backend"] if peer else None,
                "vs_best_peer": paired_ratio(best, peer) if peer else None,
            }
        )
    return out


# ------------------------------------------------------------------ the whole run


def bench_model(
    model: str | os.PathLike | None,
    settings: BenchSettings,
    *,
    onnx: str | os.PathLike | None = None,
    backends: Sequence[str] | None = None,
    output: str | os.PathLike | None = None,
    command: str | None = None,
    console=None,
    keep_work: bool = False,
    announce: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """`segdeploy bench`: the model (None: the newest export under models/, `announce`d),
    its inputs checked now, then `run_bench`."""
    from segdeploy.bench.inputs import inputs_factory
    from segdeploy.folders import newest_export

    if backends is not None and not backends:
        raise SegdeployError("--backends", "name at least one backend")
    if model is None:
        model = newest_export()
        announce(f"model: {model} (the newest export under models/)")
    model_dir, _ = resolve_dirs(model, onnx)
    factory = inputs_factory(Path(model_dir), **asdict(settings.inputs))
    return run_bench(
        model,
        factory,
        onnx=onnx,
        backends=backends,
        settings=settings,
        output=output,
        command=command,
        console=console,
        keep_work=keep_work,
    )


def failed(report: dict[str, Any]) -> bool:
    """A backend failed, or an image could not be decoded: exit status 1."""
    return bool(report["failed_images"]) or any(r["status"] == "failed" for r in report["results"])


def run_bench(
    model: str | os.PathLike,
    inputs_factory: Callable[[Path, int], BenchInputs],
    *,
    onnx: str | os.PathLike | None = None,
    backends: Sequence[str] | None = None,
    settings: BenchSettings = BenchSettings(),
    output: str | os.PathLike | None = None,
    command: str | None = None,
    console=None,
    keep_work: bool = False,
) -> dict[str, Any]:
    """Benchmark the backends on the images `inputs_factory(work_dir, num_labels)` lays out.

    Writes the report as JSON to `output` (default MODEL/bench.json) with a
    Markdown table and a PNG chart beside it (same name, .md and .png), prints
    the table to `console` (a rich Console, or None for silence) and returns the
    report. Backends that cannot run here are rows with status "skipped" and a
    reason; backends that fail while running are "failed" with the reason.
    """

    from segdeploy.bench import report as rep
    from segdeploy.bench.worker import list_items
    from segdeploy.runtime.providers import available_providers

    settings.check()
    model_dir, onnx_dir = resolve_dirs(model, onnx)
    facts = model_facts(model_dir, onnx_dir)
    names = list(backends) if backends else default_backends(onnx_dir)
    parsed = list(dict.fromkeys(parse_backend(n) for n in names))  # unique, in order
    # torch first: its masks are what every other row is compared with.
    parsed.sort(key=lambda b: b.name != REFERENCE)
    output = Path(output) if output is not None else Path(model) / "bench.json"
    check_output(output)
    available = available_providers()
    tiling = settings.tiling
    skip = {b: check_backend(b, model_dir, onnx_dir, available, tiling) for b in parsed}

    work = Path(tempfile.mkdtemp(prefix="segdeploy-bench-"))
    load_before = _loadavg()
    started = time.time()
    try:
        inputs = inputs_factory(work, facts["num_labels"])
        inputs, items, bad_images = screen_images(
            inputs, list_items(inputs.images), work, facts["num_labels"]
        )
        rows = []
        for batch_size in settings.batch_sizes:
            rows += _measure_rows(
                parsed, skip, batch_size, model_dir, onnx_dir, inputs, settings, work, console
            )
        if console is not None:
            console.print("scoring the label maps ...")
        score(rows, items, inputs, facts["num_labels"])
        mark_validated(rows, onnx_dir)
        report = {
            "schema": 1,
            "date": rep.utc_now(),
            "command": command or " ".join(sys.argv),
            "duration_s": round(time.time() - started, 1),
            "machine": rep.machine_info(),
            "load_average": {"before": load_before, "after": _loadavg()},
            "versions": rep.package_versions(),
            "onnxruntime_providers": available,
            "environment": {
                k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
            },
            "model": {
                "model_dir": str(model_dir) if model_dir else None,
                "onnx_dir": str(onnx_dir) if onnx_dir else None,
                **facts,
            },
            "inputs": {
                **inputs.source,
                "images": len(items),
                "labels": inputs.labels is not None,
                "ignore_index": inputs.ignore_index,
                "reduce_labels": inputs.reduce_labels,
            },
            "settings": settings_record(settings),
            "failed_images": bad_images,
            "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
            # The targets were set for whole images resized to the model (not windows).
            "targets": judge_targets(rows) if settings.targets and not tiling.enabled else [],
            "fastest_validated": fastest_paths(rows),
        }
        rep.write_reports(report, output)
    finally:
        if keep_work:
            log.warning("benchmark work folder kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if console is not None:
        rep.print_report(report, console, output)
    return report


def settings_record(settings: BenchSettings) -> dict[str, Any]:
    """How the rows were measured, for the report."""
    tiling = settings.tiling
    return {
        "batch_sizes": list(settings.batch_sizes),
        "runs": settings.runs,
        "model_runs": settings.model_runs,
        "threads": settings.threads,
        "targets": settings.targets and not tiling.enabled,
        "tiles": tiling.to_json() if tiling.enabled else None,
        "in_memory": settings.in_memory,
        "warmup": "per row, before timing: one end-to-end pass over min(images, "
        "2 x batch) images and 2 forward calls",
        "order": "rows interleaved: each round runs every row once (a short end-to-end "
        "pass, a full one and its share of the forward calls), one row at a time, starting "
        "one row later each round",
    }


def check_output(output: Path) -> None:
    """Refuse, before any row runs, report files that cannot be written: a folder in the
    way, or a folder that takes no files (read-only, full: probed with a real file)."""
    from segdeploy.bench.report import report_paths
    from segdeploy.writable import check_writable

    for path in report_paths(output).values():
        if path.is_dir():
            raise SegdeployError(path, "is a folder; give --output a file name such as bench.json")
    check_writable(output.absolute().parent, "the report (--output)")


def screen_images(
    inputs: BenchInputs, items: list, work: Path, num_labels: int
) -> tuple[BenchInputs, list, list[dict[str, str]]]:
    """Decode every image once, as `segdeploy infer` does; bad ones become report entries.

    A file that cannot be decoded (empty, truncated, not an image) is a failure of
    the input, not of any backend: it is listed in the report and the rows run on
    the other images (linked into a folder of their own, so that every backend
    still takes one folder). A reference label that cannot score its image (unreadable,
    a value beyond the classes, another size) is bad input: refused now, before any row
    runs. Returns (inputs, items, [{"path", "reason"}]).
    """
    from dataclasses import replace

    from segdeploy.bench.worker import list_items
    from segdeploy.runtime.image_io import load_image

    bad = []
    for item in items:
        try:
            image = load_image(item.path)
        except SegdeployError as err:
            bad.append({"path": str(item.path), "reason": err.problem})
            continue
        if inputs.labels is not None:
            _check_reference(inputs, item, (image.height, image.width), num_labels)
    if not bad:
        return inputs, items, []
    good = [i for i in items if str(i.path) not in {b["path"] for b in bad}]
    if not good:
        raise SegdeployError(inputs.images, f"no image can be decoded ({bad[0]['reason']}, ...)")
    folder = work / "decodable-images"
    for item in good:
        dst = relative_file(folder, item.out, item.path.suffix)
        dst.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(item.path, dst)
    inputs = replace(inputs, images=folder)
    return inputs, list_items(folder), bad


def _check_reference(inputs: BenchInputs, item, size: tuple[int, int], num_labels: int) -> None:
    path = reference_label_path(inputs.labels, item.out)
    ref = read_reference(
        path,
        num_labels=num_labels,
        ignore_index=inputs.ignore_index,
        reduce_labels=inputs.reduce_labels,
    )
    if ref.shape != size:
        raise SegdeployError(
            path,
            f"is {ref.shape[1]}x{ref.shape[0]} but its image {item.path} is {size[1]}x{size[0]}",
        )


def _measure_rows(
    backends: list[Backend],
    skip: dict[Backend, str | None],
    batch_size: int,
    model_dir: Path | None,
    onnx_dir: Path | None,
    inputs: BenchInputs,
    settings: BenchSettings,
    work: Path,
    console,
) -> list[dict[str, Any]]:
    from rich.markup import escape

    rows: list[dict[str, Any]] = []
    jobs = []
    for backend in backends:
        row: dict[str, Any] = {
            "backend": backend.name,
            "batch_size": batch_size,
            "description": backend.description,
            "end_to_end_includes": end_to_end_includes(backend, settings.in_memory),
            "writes_label_files": backend.writes_labels or not settings.in_memory,
            "kind": backend.kind,
            "variant": backend.variant,
            "precision": backend.precision,
            "graph": backend.graph,
        }
        rows.append(row)
        if skip[backend] is not None:
            row.update(status="skipped", reason=skip[backend])
            if console is not None:
                console.print(f"[yellow]skipped[/] {backend.name}: {escape(skip[backend])}")
            continue
        row["_out"] = str(work / "out" / f"{backend.name}-b{batch_size}")
        jobs.append(
            {
                "backend": backend.name,
                "batch_size": batch_size,
                "model_dir": str(model_dir) if model_dir else None,
                "onnx_dir": str(onnx_dir) if onnx_dir else None,
                "images": str(inputs.images),
                "out": row["_out"],
                "model_runs": settings.model_runs,
                "threads": settings.threads,
                "tiling": settings.tiling.to_json() if settings.tiling.enabled else None,
                "in_memory": settings.in_memory,
            }
        )
    measured = iter(measure_batch_size(jobs, settings, work, console))
    for row in rows:
        if row.get("status") == "skipped":
            continue
        raw = next(measured)
        if raw.get("status") != "ok":
            row.update(status="failed", reason=raw.get("reason", "unknown"))
            row.pop("_out")
            if console is not None:
                console.print(
                    f"[red]failed[/] {row['backend']}, batch {batch_size}: "
                    f"{escape(str(row['reason']))}"
                )
            continue
        row.update(
            status="ok",
            provider=raw.get("provider"),
            threads=raw.get("threads"),
            images=raw["images"],
            setup_s=round(raw["setup_s"], 3),
            peak_rss_mb=raw.get("peak_rss_mb"),
            torch_imported=raw.get("torch_imported"),
            **summarize(raw, batch_size),
        )
        if console is not None:
            console.print(
                f"[green]done[/] {row['backend']}, batch {batch_size}: "
                f"{row['end_to_end_images_per_s']:.2f} img/s end to end, "
                f"model p50 {row['model_p50_ms']:.1f} ms"
            )
    return rows


def end_to_end_includes(backend: Backend, in_memory: bool) -> str:
    """What a row's end-to-end figure includes, as the report says it."""
    if backend.writes_labels:
        return backend.end_to_end_includes
    if in_memory:
        return f"{backend.end_to_end_includes}; label maps kept in memory (not written)"
    return f"{backend.end_to_end_includes}, writing label PNGs with Pillow"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
