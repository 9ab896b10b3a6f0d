"""`segdeploy demo`: the whole path, offline, on the built-in synthetic data, in a few minutes.

train scratch:tiny until it has clearly learned -> export to ONNX (opset 17) and
validate against PyTorch -> lay the validation images out as files -> `segdeploy
infer` with overlays -> a short `segdeploy bench`. Every step is the library
function the CLI command calls, so the demo shows exactly what the commands do.

Everything goes under one output folder (default models/demo), which the demo
owns: a rerun replaces its contents.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from segdeploy.errors import SegdeployError
from segdeploy.folders import ModelFolder

DEFAULT_OUTPUT = "models/demo"


@dataclass(frozen=True)
class DemoSettings:
    """How much the demo does. The defaults learn the synthetic data (mean IoU > 0.5)
    in about a minute of training on two CPU cores; `DemoSettings.quick()` is a smoke
    run that finishes in seconds and does not wait for the model to learn.
    """

    image_size: int = 64  # synthetic images and model input, pixels (square)
    train_images: int = 200
    val_images: int = 40
    steps: int = 200  # first training round
    batch_size: int = 8
    eval_steps: int = 50
    #: Keep training (resuming, `steps` more each round) until the validation mean
    #: IoU exceeds this; None: take the first round as it is.
    min_mean_iou: float | None = 0.5
    max_steps: int = 600  # give up (and say so) beyond this
    #: torch threads while training and validating. One, because scratch:tiny's
    #: operations are too small to split: with two threads OpenMP's spin-waiting
    #: cost 0.26 CPU s per step against 0.04 with one (measured on this 2-core
    #: machine), and on a busy machine a waiting thread stalls every operation.
    #: None keeps torch's default (all cores).
    train_threads: int | None = 1
    #: None: every default backend and OpenVINO's own pipeline (fp32), the peer a user on a
    #: CPU would otherwise pick; those that cannot run here are listed as skipped.
    bench_backends: tuple[str, ...] | None = None
    #: Images the bench runs on (more synthetic ones than the validation split, laid out
    #: as files): enough that a pass's fixed start-up (a process pool, listing) is a few
    #: percent of it and the figures are each row's steady rate. None: the validation images.
    bench_images: int | None = 400
    bench_batch_sizes: tuple[int, ...] = (4,)
    bench_runs: int = 2
    bench_model_runs: int = 10
    #: Threads for torch and onnxruntime in the bench, for the same reason as
    #: train_threads (torch's rows were 100x slower with two threads on a busy
    #: machine). None: each library's default.
    bench_threads: int | None = 1

    @classmethod
    def quick(cls) -> DemoSettings:
        """Seconds, not minutes: tiny images, a few steps, two backends and one that is skipped."""
        return cls(
            image_size=32,
            train_images=16,
            val_images=4,
            steps=4,
            batch_size=4,
            eval_steps=4,
            min_mean_iou=None,
            bench_backends=("torch", "onnx-cpu", "onnx-cuda"),
            bench_images=None,
            bench_batch_sizes=(2,),
            bench_runs=1,
            bench_model_runs=2,
        )


@dataclass
class DemoResult:
    output_dir: Path
    mean_iou: float | None
    learned: bool | None  # None when no target was set
    steps: int
    validation: dict[str, Any]
    infer: dict[str, Any]
    bench: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(
    output_dir: str | os.PathLike = DEFAULT_OUTPUT,
    settings: DemoSettings = DemoSettings(),
    *,
    console=None,
) -> DemoResult:
    """Train, export, validate, infer and bench under `output_dir`; return what was made.

    `console` (a rich Console) gets a line per step and the bench table; None is silent.
    """
    from segdeploy.bench import from_dataset
    from segdeploy.data import DatasetSpec
    from segdeploy.train import TrainConfig
    from segdeploy.validate import validation_path

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise SegdeployError(out, "--output-dir exists and is not a folder")
    say = console.print if console is not None else (lambda *a, **k: None)
    seconds: dict[str, float] = {}
    paths: dict[str, Path] = {}
    model_dir = out / "model"
    spec = DatasetSpec(
        f"synthetic:{settings.image_size}",
        split=f"train[:{settings.train_images}]",
        eval_split=f"validation[:{settings.val_images}]",
    )

    # 1. Train until learned: each further round resumes from the last checkpoint.
    say(f"[bold]1/5 train[/] scratch:tiny on {spec.name} ({settings.train_images} images) ...")
    t = time.perf_counter()
    config = TrainConfig(
        model="scratch:tiny",
        dataset=spec,
        output_dir=str(model_dir),
        max_steps=settings.steps,
        eval_steps=settings.eval_steps,
        batch_size=settings.batch_size,
        image_size=settings.image_size,
        overwrite=True,  # the demo owns its folder: a rerun starts afresh
    )
    result, mean_iou, learned = _train_until_learned(config, settings, say)
    seconds["train"] = time.perf_counter() - t
    paths["model"] = model_dir
    paths["training curves"] = ModelFolder(model_dir, {}).curves_path
    say(f"  {result.steps} steps, validation mean IoU {mean_iou:.3f} ({seconds['train']:.0f} s)")

    # 2. Export at opset 17 and validate against PyTorch on the same validation split.
    say("[bold]2/5 export[/] to ONNX (opset 17) and validate against PyTorch ...")
    t = time.perf_counter()
    exported = _export(model_dir, spec, len(result.metrics["id2label"]), settings)
    onnx_dir = exported.output
    validation = exported.reports["fp32"]
    seconds["export"] = time.perf_counter() - t
    paths["onnx graph"] = exported.graphs["fp32"]
    paths["validation"] = validation_path(exported.graphs["fp32"])
    say(
        f"  mean IoU torch {validation['mean_iou_torch']:.4f}, onnx {validation['mean_iou_onnx']:.4f}: "
        f"{'passed' if validation['passed'] else 'FAILED'} ({seconds['export']:.0f} s)"
    )

    # 3. The validation images as files, the way a user's photos arrive.
    say("[bold]3/5 images[/]: writing the validation split as PNG files ...")
    data_dir = out / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    inputs = from_dataset(spec, data_dir, num_labels=len(result.metrics["id2label"]))
    paths["images"], paths["labels"] = inputs.images, inputs.labels

    # 4. segdeploy infer with overlays.
    say("[bold]4/5 infer[/] with overlays ...")
    t = time.perf_counter()
    inferred = _infer(inputs.images, onnx_dir, out / "infer", paths, say)
    seconds["infer"] = time.perf_counter() - t

    # 5. A short benchmark against the pipelines users would otherwise use.
    say("[bold]5/5 bench[/] ...")
    t = time.perf_counter()
    bench_json = out / "bench" / "bench.json"
    if settings.bench_images is not None:
        say(f"  on {settings.bench_images} synthetic images, written as files ...")
        n_labels = len(result.metrics["id2label"])
        inputs = _bench_inputs(spec, out / "bench" / "data", settings.bench_images, n_labels)
    report = _bench(model_dir, onnx_dir, inputs, settings, bench_json, console)
    seconds["bench"] = time.perf_counter() - t
    paths["bench table"] = bench_json.with_suffix(".md")
    paths["bench report"] = bench_json
    paths["bench chart"] = bench_json.with_suffix(".png")
    return DemoResult(
        output_dir=out,
        mean_iou=mean_iou,
        learned=learned,
        steps=result.steps,
        validation=validation,
        infer=inferred,
        bench=report,
        paths=paths,
        seconds=seconds,
    )


def _infer(images: Path, onnx_dir: Path, infer_dir: Path, paths: dict, say) -> dict[str, Any]:
    """`segdeploy infer --overlay` on the images, into a fresh `infer_dir`."""
    from segdeploy.runtime.infer import run_infer

    shutil.rmtree(infer_dir, ignore_errors=True)
    inferred = run_infer([images], onnx_dir, infer_dir, overlay=True, progress=False)
    paths["label maps and overlays"] = infer_dir / images.name
    paths["infer summary"] = Path(inferred["summary"])
    totals = inferred["totals"]
    say(
        f"  {totals['images']} images, {totals['images_per_s']} images/s, {totals['failed']} failed"
    )
    return inferred


def _train_until_learned(config, settings: DemoSettings, say):
    """Train; while the mean IoU is not above the settings' floor, resume `steps` more.

    Returns (last TrainResult, its mean IoU, whether it learned: None without a floor).
    """
    from segdeploy.train import train
    from segdeploy.train.torch_ops import torch_threads

    with torch_threads(settings.train_threads):
        result = train(config)
    steps = config.max_steps
    mean_iou = result.metrics.get("mean_iou")
    while (
        settings.min_mean_iou is not None
        and (mean_iou is None or mean_iou <= settings.min_mean_iou)
        and steps < settings.max_steps
    ):
        steps = min(steps + settings.steps, settings.max_steps)
        say(
            f"  mean IoU {mean_iou:.3f} is not above {settings.min_mean_iou}: training to step {steps}"
        )
        with torch_threads(settings.train_threads):
            result = train(replace(config, max_steps=steps, overwrite=False, resume=True))
        mean_iou = result.metrics.get("mean_iou")
    learned = (
        None
        if settings.min_mean_iou is None
        else bool(mean_iou is not None and mean_iou > settings.min_mean_iou)
    )
    return result, mean_iou, learned


def _export(model_dir: Path, spec, num_labels: int, settings: DemoSettings):
    """Export at opset 17 and validate on the same validation split the model trained with."""
    from segdeploy.export import export_onnx
    from segdeploy.train.torch_ops import torch_threads
    from segdeploy.validate import load_validation_data

    data = load_validation_data(spec, num_labels=num_labels)
    with torch_threads(settings.train_threads):
        return export_onnx(model_dir, opset=17, data=data)


def _bench_inputs(spec, folder: Path, n: int, num_labels: int):
    """`n` image files of the synthetic validation split (and their labels) in `folder`.

    The split has fewer images (data.builtin.VALIDATION_SIZE) than a steady rate needs
    (asking it for more gave 60, and the fixed start-up of infer's pass was half of its
    time), so its files are repeated under new names up to `n`: the bench times decoding,
    the model and writing per file, which a copy costs as much as a new scene."""
    from segdeploy.bench import from_dataset

    shutil.rmtree(folder, ignore_errors=True)
    inputs = from_dataset(
        replace(spec, eval_split=f"validation[:{n}]"), folder, num_labels=num_labels
    )
    images = sorted(p for p in inputs.images.iterdir() if p.is_file())
    if len(images) < n:
        inputs.source["files"] = f"{n}: the {len(images)} images repeated under new names"
    labels = {p.stem: p for p in inputs.labels.iterdir()} if inputs.labels else {}
    for i in range(len(images), n):
        image = images[i % len(images)]
        shutil.copyfile(image, inputs.images / f"copy{i:05d}{image.suffix}")
        if image.stem in labels:
            label = labels[image.stem]
            shutil.copyfile(label, inputs.labels / f"copy{i:05d}{label.suffix}")
    return inputs


def _bench(model_dir: Path, onnx_dir: Path, inputs, settings: DemoSettings, output: Path, console):
    from segdeploy.bench import BenchSettings, default_backends, from_folders, run_bench

    backends = settings.bench_backends or (*default_backends(onnx_dir), "openvino")
    return run_bench(
        model_dir,
        lambda work, n: from_folders(inputs.images, inputs.labels, work),
        onnx=onnx_dir,
        backends=backends,
        settings=BenchSettings(
            batch_sizes=settings.bench_batch_sizes,
            runs=settings.bench_runs,
            model_runs=settings.bench_model_runs,
            threads=settings.bench_threads,
            # The targets were set for a trained CamVid model at 512 px; the demo's
            # 64-px model would only print figures that mean nothing for it.
            targets=False,
        ),
        output=output,
        command=f"segdeploy demo (bench of {model_dir})",
        console=console,
    )


def closing_line(result: DemoResult) -> str | None:
    """One line: the bench's fastest validated segdeploy row and its lead over the fastest
    other library's row (both end to end, files in, label files out), as bench words it."""
    from segdeploy.bench.report import fastest_line

    paths = result.bench.get("fastest_validated") or []
    if not paths:
        return None
    return fastest_line(max(paths, key=lambda p: p["end_to_end_images_per_s"]))


def summary_table(result: DemoResult, settings: DemoSettings):
    """What the demo did and where each output is."""
    from rich.table import Table

    v, inf = result.validation, result.infer["totals"]
    target = (
        ""
        if settings.min_mean_iou is None
        else f" ({'above' if result.learned else '[red]not above[/]'} {settings.min_mean_iou})"
    )
    ok = [r for r in result.bench["results"] if r["status"] == "ok"]
    rows = [
        (
            "train",
            f"scratch:tiny, {result.steps} steps, validation mean IoU {result.mean_iou:.3f}{target}",
            result.paths["model"],
        ),
        ("", "training curves", result.paths["training curves"]),
        ("export", "ONNX, opset 17 (Optimum)", result.paths["onnx graph"]),
        (
            "validate",
            f"mean IoU torch {v['mean_iou_torch']:.4f} vs onnx {v['mean_iou_onnx']:.4f}, "
            f"pixels equal {100 * v['pixel_agreement']:.3f}%: "
            + ("[green]passed[/]" if v["passed"] else "[red]failed[/]"),
            result.paths["validation"],
        ),
        ("images", "validation images as PNG files", result.paths["images"]),
        ("", "their reference labels", result.paths["labels"]),
        (
            "infer",
            f"{inf['images']} images at {inf['images_per_s']} images/s, with overlays",
            result.paths["label maps and overlays"],
        ),
        ("", "per-image summary", result.paths["infer summary"]),
        (
            "bench",
            f"{len(ok)} rows measured, image files in, label files out",
            result.paths["bench table"],
        ),
        ("", "JSON report", result.paths["bench report"]),
        ("", "bar chart", result.paths["bench chart"]),
    ]
    out = result.output_dir
    table = Table(
        title=f"segdeploy demo: done in {sum(result.seconds.values()):.0f} s; outputs under {out}/",
        title_justify="left",
    )
    table.add_column("step")
    table.add_column("what")
    table.add_column("where", no_wrap=True)  # paths stay whole, to be copied
    for step, what, where in rows:
        where = Path(where)
        table.add_row(
            step, what, str(where.relative_to(out) if where.is_relative_to(out) else where)
        )
    return table
