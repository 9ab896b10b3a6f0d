"""mkdocs hook: tables built at build time from benchmarks/results/*.json and from the code.

A page asks for a table with a line `<!-- table: NAME -->`; the line is replaced
by the table RENDERERS[NAME] makes, so the site never shows a figure that a
results file does not hold, nor a file name or tolerance the code does not use.
Where a benchmark script already renders its own Markdown, that function is used
(one renderer per result); an unknown name or a missing file fails the build.
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
# A result records the absolute data path of the machine that ran it; the docs show it from
# its data/ folder on (data/camvid), the layout Getting started tells users to make.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+?(data/[\w.-]+)")
MARKER = re.compile(r"^<!-- table: ([\w-]+) -->$", re.MULTILINE)


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"docs: benchmark result {path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def _script(name: str):
    """A benchmark script as a module, for its Markdown renderer."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _demote(markdown: str) -> str:
    """A report's own headings under the page's: '# title' dropped, '## x' -> '### x'."""
    lines = [line for line in markdown.splitlines() if not line.startswith("# ")]
    return "\n".join("#" + line if line.startswith("## ") else line for line in lines)


def camvid_cpu() -> str:
    from segdeploy.bench.report import markdown

    return _demote(markdown(load("camvid_cpu")))


def cpu_peers() -> str:
    report = load("cpu_peers")
    sizes = sorted(int(b) for b in report["results"])
    m = report["machine"]
    load_avg = ", ".join(f"{x:.1f}" for x in m["loadavg"])
    head = f"- machine: {m['cpu']}, {m['cores']} cores; load average {load_avg}\n\n"
    return head + _script("bench_cpu_peers.py")._table(report, sizes)


def pipeline() -> str:
    return _demote(_script("bench_pipeline.py").render(load("pipeline_cpu")))


def ray() -> str:
    r = load("ray_cpu")
    m = r["machine"]
    before, after = (round(x[0], 1) for x in m["load_average_before_after"])
    lines = [
        f"- date: {r['date']}; {m['cpu_count']} cores, {m['platform']}; "
        f"load average {before} before, {after} after",
        f"- command: `{r['command']}`",
        f"- {r['images']} images, provider {r['provider']}, {len(r['rounds'])} interleaved "
        f"rounds (medians); ray {r['versions'].get('ray', '?')}",
        "",
        "| engine | images/s, start-up included | steady cost per image | start-up |",
        "|---|---:|---:|---:|",
    ]
    for engine, s in r["median"].items():
        lines.append(
            f"| {engine} | {s['images_per_s']:.2f} | {s['per_image_s']:.2f} s "
            f"| {s['startup_s']:.1f} s |"
        )
    q = r["ratios"]
    lines += [
        "",
        f"ray / local: {q['images_per_s_ray_over_local']:.2f}x the images/s, "
        f"{q['per_image_ray_over_local']:.2f}x the steady cost per image, "
        f"{q['extra_startup_s']:+.1f} s of start-up. Outputs byte-identical: "
        f"{'yes' if r['identical_outputs'] else 'NO'}.",
    ]
    return "\n".join(lines)


def families() -> str:
    r = load("families")
    meta = r["meta"]
    lines = [
        f"- date: {meta['date']}; {meta['machine']}; photos {meta['photo_size'][1]}x"
        f"{meta['photo_size'][0]}",
        "",
        "| family (tiny model) | route | opset | spatial axes | export s | max \\|Δ logit\\| "
        "traced / second size | processor bit-equal | photo masks = torch |",
        "|---|---|---:|---|---:|---|:---:|---:|",
    ]
    for row in r["rows"]:
        axes = "dynamic" if row["dynamic_spatial"] else "fixed"
        axes += ", square only" if row.get("square_only") else ""
        second = row.get("second") or {}
        if "max_abs_delta" in second:
            at_second = f"{second['max_abs_delta']:.1e}"
        else:  # a fixed-size graph refuses another size, as it should
            at_second = "refused (fixed size)" if "refused" in second else "n/a"
        deltas = f"{row['traced']['max_abs_delta']:.1e} / {at_second}"
        lines.append(
            f"| {row['scratch']} | {row['route']} | {row['opset']} | {axes} "
            f"| {row['export_seconds']:.1f} | {deltas} "
            f"| {'yes' if row['processor_bit_equal'] else 'NO'} "
            f"| {row['photo_mask_agreement_min']:.3%} |"
        )
    return "\n".join(lines)


def validation() -> str:
    lines = [
        "| graph | images | mean IoU PyTorch | mean IoU ONNX | drop | pixel agreement "
        "| max \\|Δ logit\\| | rules | passed |",
        "|---|---:|---:|---:|---:|---:|---:|---|:---:|",
    ]
    for name in (
        "camvid_validation_fp32",
        "camvid_validation_int8",
        "camvid_validation_openvino_int8",
    ):
        v = load(name)
        rules = ", ".join(k for k in v["rules"])
        lines.append(
            f"| {v['graph']} ({v['precision']}) | {v['images']} | {v['mean_iou_torch']:.4f} "
            f"| {v['mean_iou_onnx']:.4f} | {v['mean_iou_drop']:+.4f} | {v['pixel_agreement']:.3%} "
            f"| {v['max_abs_logit_diff']:.1e} | {rules} | {'yes' if v['passed'] else 'NO'} |"
        )
    q = load("camvid_quantization_int8")
    kept = ", ".join(f"{k} ({n})" for k, n in q["float_nodes"]["by_op_type"].items())
    lines += [
        "",
        f"int8 graph: {q['format']}, weights {q['weights']}, activations {q['activations']}, "
        f"{q['calibration_images']} calibration images; kept in float: {kept}; "
        f"{q['size_bytes']['fp32'] / 1e6:.1f} MB -> {q['size_bytes']['int8'] / 1e6:.1f} MB; "
        f"quantized in {q['seconds']['total']:.0f} s.",
    ]
    return "\n".join(lines)


def folder_variants() -> str:
    from segdeploy.folders import VARIANT_FILES, validation_report_name

    made_by = {
        "fp32": "always",
        "fp16": "`--fp16`",
        "optimized": "`--optimize`",
        "int8": "`--quantize int8`",
        "fused": "`--fuse-argmax`",
        "fp16_fused": "`--fp16 --fuse-argmax`",
    }
    lines = ["| variant | graph | validation report | made by `segdeploy export` |"]
    lines.append("|---|---|---|---|")
    for variant, graph in VARIANT_FILES.items():
        report = validation_report_name(graph)
        lines.append(f"| `{variant}` | `{graph}` | `{report}` | {made_by.get(variant, '')} |")
    return "\n".join(lines)


def folder_files() -> str:
    from segdeploy import folders as f

    rows = [
        ("model", f.CONFIG_FILE, "train", "id2label / label2id, the loss ignore index"),
        ("model", " or ".join(f"`{w}`" for w in f.WEIGHT_FILES), "train", "the weights"),
        ("model", f.PREPROCESSOR_FILE, "train", "the image processor at the trained size"),
        ("model", f.METRICS_FILE, "train", "final evaluation: mean IoU, accuracy, per class"),
        ("model", f.TRAIN_ARGS_FILE, "train", "every option, resolved; the dataset spec"),
        ("model", f.CURVES_FILE, "train", "loss and mean IoU over steps"),
        ("model", f"{f.CHECKPOINTS_DIR}/{f.RUN_RECORD_FILE}", "train", "what --resume holds to"),
        ("ONNX", f"{f.ONNX_SUBDIR}/ (default place)", "export", "the ONNX folder"),
        ("ONNX", " and ".join(f"`{c}`" for c in f.COPIED_FILES), "export", "copied from the model"),
        ("ONNX", f.QUANTIZATION_REPORT, "export --quantize int8", "the int8 recipe and search"),
    ]
    lines = ["| folder | file | written by | holds |", "|---|---|---|---|"]
    for folder, name, writer, holds in rows:
        shown = name if name.startswith("`") else f"`{name}`"
        lines.append(f"| {folder} | {shown} | {writer} | {holds} |")
    return "\n".join(lines)


def validation_floors() -> str:
    from segdeploy.validate import verdicts as v

    lines = [
        "| precision | `mean_iou`: within | `logits`: max \\|Δ logit\\| within | "
        "`pixel_agreement`: at least |",
        "|---|---:|---:|---:|",
    ]
    for precision in v.DEFAULT_TOLERANCE:
        lines.append(
            f"| {precision} | {v.DEFAULT_TOLERANCE[precision]:g} mean IoU "
            f"| {v.DEFAULT_LOGIT_TOLERANCE[precision]:g} x max(1, largest \\|logit\\|) "
            f"| {v.MIN_AGREEMENT[precision]:.2%} |"
        )
    lines.append(
        f"| `--fuse-argmax` graphs | | | {v.FUSED_MIN_AGREEMENT:.1%} (`fused_agreement`) |"
    )
    return "\n".join(lines)


def tiles() -> str:
    return _demote(_script("bench_tiles.py").render(load("tiles_cpu")))


RENDERERS = {
    "folder_variants": folder_variants,
    "folder_files": folder_files,
    "validation_floors": validation_floors,
    "camvid_cpu": camvid_cpu,
    "cpu_peers": cpu_peers,
    "pipeline": pipeline,
    "ray": ray,
    "families": families,
    "validation": validation,
    "tiles": tiles,
}


def render(name: str) -> str:
    if name not in RENDERERS:
        raise KeyError(f"docs: no table named {name!r}; known: {', '.join(RENDERERS)}")
    return MACHINE_PATH.sub(r"\1", RENDERERS[name]())


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: render(m.group(1)), markdown)
