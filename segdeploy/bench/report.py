"""The benchmark report: machine facts, then the same figures as JSON, Markdown, a PNG chart and a table."""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from segdeploy.atomic import write_json, write_text

PACKAGES = (
    "segdeploy",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "numpy",
    "pillow",
)


#: What the targets are, printed above them: figures to reach on a real model, not checks
#: of every model (`segdeploy bench --no-targets` leaves them out).
TARGETS_NOTE = (
    "targets: segdeploy's goals for a trained SegFormer at its deployment size (set and "
    "measured on CamVid b0, 512x512); on a tiny or untrained model they say little"
)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The CPU features that decide which int8 and fp32 kernels ONNX Runtime and OpenVINO
#: pick (VNNI: int8 dot products; AMX: int8/bf16 tiles): a "2-core AMD EPYC" was once
#: AVX-512 VNNI and once AVX2 only, and the OpenVINO-vs-ORT ratios differ between them.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_features() -> list[str]:
    """Which of CPU_FEATURES /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in CPU_FEATURES if name in flags]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        memory_gb = None
    return {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": memory_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# ------------------------------------------------------------------ formatting


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.3f}%"


def _name(r) -> str:
    """The row's name; "(in memory)" when its end-to-end pass wrote no label files."""
    return r["backend"] + ("" if r.get("writes_label_files", True) else " (in memory)")


def _start_up(r) -> str:
    # A start-up solved from two noisy passes can come out a little below zero: it is nil.
    x = r.get("start_up_s")
    return "-" if x is None else f"{max(x, 0.0):.2f}"


COLUMNS = (
    ("backend", _name),
    ("batch", lambda r: str(r["batch_size"])),
    ("e2e img/s", lambda r: _num(r.get("end_to_end_images_per_s"), ".2f")),
    ("steady img/s", lambda r: _num(r.get("steady_images_per_s"), ".2f")),
    ("start-up s", _start_up),
    ("load s", lambda r: _num(r.get("setup_s"), ".2f")),
    ("model p50 ms", lambda r: _num(r.get("model_p50_ms"), ".1f")),
    ("p95 ms", lambda r: _num(r.get("model_p95_ms"), ".1f")),
    ("model img/s", lambda r: _num(r.get("model_images_per_s"), ".2f")),
    ("e2e/model", lambda r: _num(r.get("end_to_end_vs_model"), ".2f")),
    ("peak MiB", lambda r: _num(r.get("peak_rss_mb"), ".0f")),
    ("mIoU", lambda r: _num(r.get("mean_iou"), ".4f")),
    ("= torch", lambda r: _pct(r.get("pixel_agreement_with_torch"))),
)


def _ok(report) -> list[dict[str, Any]]:
    return [r for r in report["results"] if r["status"] == "ok"]


def _not_ok(report) -> list[dict[str, Any]]:
    seen, out = set(), []
    for r in report["results"]:  # one line per backend, not per batch size
        if r["status"] != "ok" and (r["backend"], r["reason"]) not in seen:
            seen.add((r["backend"], r["reason"]))
            out.append(r)
    return out


def _describe_inputs(report) -> str:
    inputs = report["inputs"]
    if inputs.get("kind") == "dataset":
        where = f"{inputs['dataset']['name']} split {inputs.get('split')}"
    else:
        where = inputs.get("folder", "?")
    labels = "with labels" if inputs.get("labels") else "no labels"
    return f"{inputs['images']} images of {where} ({labels})"


def markdown(report: dict[str, Any]) -> str:
    m, model = report["machine"], report["model"]
    size = model.get("image_size")
    lines = [
        "# segdeploy bench",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']} ({', '.join(m.get('cpu_features') or ['features unknown'])}), "
        f"{m['usable_cores']} usable cores of {m['cpu_count']}, "
        f"{m['memory_gb']} GB, {m['os']}; load average before/after: "
        f"{report['load_average']['before']} / {report['load_average']['after']}",
        f"- model: {model['model_dir']} (ONNX: {model['onnx_dir']}), {model['num_labels']} classes, "
        f"input {f'{size[0]}x{size[1]}' if size else 'at each image size'}",
        f"- data: {_describe_inputs(report)}",
        f"- settings: {report['settings']['runs']} rounds, each running every row once, one "
        f"row at a time: an end-to-end pass over all images (images/s from the median pass) and "
        f"its share of {report['settings']['model_runs']} timed forward calls; warm-up before timing",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| " + " | ".join(c for c, _ in COLUMNS) + " |",
        "|" + "|".join("---" if i < 1 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for r in _ok(report):
        lines.append("| " + " | ".join(f(r) for _, f in COLUMNS) + " |")
    lines += [
        "",
        "End to end = image files in, label PNG files out, images/s from the median pass: "
        "every row does the same job. For `onnx-*` it is `segdeploy infer` on the folder "
        "(decoding, preprocessing, model, upsampling, writing the label PNGs and summary.json); "
        "the other rows' label maps are written as PNG with Pillow in the same timed pass, "
        'under the same names (rows marked "(in memory)" keep them in memory instead: '
        "`--in-memory`). Steady img/s and start-up s split a pass's time into a rate per "
        "image and a fixed cost per pass (a process pool, listing, summary.json), solved from "
        "a full pass and a short one in each round; load s = the model's load, once per row, "
        "in no pass. Model = the forward pass alone on preprocessed batches. e2e/model and the "
        "ratios below are paired: the median over rounds of the ratio within a round (the "
        "machine's speed drifts between rounds). Peak RSS = the high-water mark of a fresh "
        "process per row. `= torch` = pixels whose label equals the `torch` backend's.",
    ]
    for f in report.get("fastest_validated") or []:
        lines += ["", fastest_line(f)]
    if report["targets"]:
        lines += [
            "",
            "## Targets",
            "",
            TARGETS_NOTE,
            "",
            "| target (rows) | batch | value | needs | met |",
            "|---|---:|---:|---:|:---:|",
        ]
        for t in report["targets"]:
            lines.append(
                f"| {_target_name(t)} | {t['batch_size']} | {_target_value(t)} | "
                f"{_target_threshold(t)} | {'yes' if t['met'] else '**no**'} |"
            )
    not_ok = _not_ok(report)
    if not_ok:
        lines += ["", "## Not run here", ""]
        lines += [f"- `{r['backend']}` ({r['status']}): {r['reason']}" for r in not_ok]
    bad = report.get("failed_images") or []
    if bad:
        lines += ["", "## Images that could not be decoded (left out of every row)", ""]
        lines += [f"- `{b['path']}`: {b['reason']}" for b in bad]
    return "\n".join(lines) + "\n"


def fastest_line(f: dict[str, Any]) -> str:
    """One line: the fastest validated path here, how to run it, and its lead."""
    line = (
        f"fastest validated path here at batch {f['batch_size']}: {f['backend']} "
        f"(`{f['command']}`), {f['end_to_end_images_per_s']:.2f} images/s end to end"
    )
    if f.get("vs_best_peer") is not None:
        line += f", {f['vs_best_peer']:.2f}x the fastest other library ({f['best_peer']})"
    return line


def _target_value(t) -> str:
    if t["kind"] == "agreement":
        return _pct(t["value"])
    if t["kind"] == "miou_drop":
        return f"{t['value']:+.4f}"
    return f"{t['value']:.3f}x"  # 3 decimals: 1.597 must not print as a failing 1.60


def _target_name(t) -> str:
    """The target and, where it names a group of rows, the rows that were compared."""
    if "group" not in t and "compared_group" not in t:
        return t["target"]
    rows = t["backend"] + (f" vs {t['compared_with']}" if t.get("compared_with") else "")
    return f"{t['target']} ({rows})"


def _target_threshold(t) -> str:
    if t["kind"] == "agreement":
        return f">= {100 * t['threshold']:.1f}%"
    if t["kind"] == "miou_drop":
        return f"<= {t['threshold']}"
    return f">= {t['threshold']}x"


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Horizontal bars: end-to-end and model-only images/s per backend, one colour per batch size."""
    import numpy as np

    from segdeploy.train.plots import figure, save_png

    ok = _ok(report)
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    batches = sorted({r["batch_size"] for r in ok})
    found = {(r["backend"], r["batch_size"]): r for r in ok}
    height = max(2.5, 0.45 * len(backends) * max(1, len(batches)) + 1.5)
    fig = figure((12, height))
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(backends))
    bar = 0.8 / max(1, len(batches))
    for ax, key, title in (
        (axes[0], "end_to_end_images_per_s", "end to end (files to label maps), images/s"),
        (axes[1], "model_images_per_s", "model only (forward pass), images/s"),
    ):
        for j, b in enumerate(batches):
            values = [found.get((name, b), {}).get(key) or 0.0 for name in backends]
            pos = y + (j - (len(batches) - 1) / 2) * bar
            bars = ax.barh(pos, values, height=bar, label=f"batch {b}")
            ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    axes[0].set_yticks(y, backends)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(batches), fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"segdeploy bench: {_describe_inputs(report)}\n{m['cpu']}, {m['usable_cores']} cores, "
        f"{report['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the panels
    save_png(fig, path, dpi=110)


def report_paths(output: str | os.PathLike) -> dict[str, Path]:
    """The JSON, Markdown and PNG files of `-o OUTPUT`: JSON at OUTPUT, the others beside it
    with .md and .png; `-o rep.md` and `-o rep.png` name rep.json, rep.md and rep.png (the
    JSON must not take the Markdown's or the chart's name)."""
    output = Path(output)
    if output.suffix.lower() in (".md", ".png"):
        output = output.with_suffix(".json")
    return {
        "json": output,
        "markdown": output.with_suffix(".md"),
        "chart": output.with_suffix(".png"),
    }


def write_reports(report: dict[str, Any], output: str | os.PathLike) -> dict[str, Path]:
    """JSON, Markdown and PNG (`report_paths`); each written atomically."""
    paths = report_paths(output)
    write_json(paths["json"], report)
    write_text(paths["markdown"], markdown(report))
    if _ok(report):
        plot(report, paths["chart"])
    return paths


def rich_table(report: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"segdeploy bench: {_describe_inputs(report)}", title_justify="left")
    for i, (name, _) in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for r in _ok(report):
        table.add_row(*[f(r) for _, f in COLUMNS])
    for r in _not_ok(report):
        colour = "yellow" if r["status"] == "skipped" else "red"
        table.add_row(r["backend"], "", f"[{colour}]{r['status']}[/]", *[""] * (len(COLUMNS) - 3))
    return table


def print_report(report: dict[str, Any], console, output: str | os.PathLike) -> None:
    from rich.markup import escape

    console.print(rich_table(report))
    for r in _not_ok(report):
        console.print(f"  [dim]{r['backend']}: {escape(r['reason'])}[/]")
    for b in report.get("failed_images") or []:
        console.print(f"[red]failed image[/] {escape(b['path'])}: {escape(b['reason'])}")
    for f in report.get("fastest_validated") or []:
        console.print(escape(fastest_line(f)))
    if report["targets"]:
        console.print(f"  [dim]{TARGETS_NOTE}[/]")
    for t in report["targets"]:
        mark = "[green]met[/]" if t["met"] else "[red]not met[/]"
        console.print(
            f"  target {escape(_target_name(t))} (batch {t['batch_size']}): {_target_value(t)}, "
            f"needs {_target_threshold(t)}: {mark}"
        )
    paths = report_paths(output)
    console.print(
        f"written: {paths['json']}, {paths['markdown']}"
        + (f", {paths['chart']}" if _ok(report) else "")
    )
