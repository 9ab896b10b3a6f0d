"""`segdeploy bench`: rows per backend in fresh processes, reports, skipped and failed backends."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePath

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.bench import (
    check_backend,
    default_backends,
    judge_targets,
    parse_backend,
)
from segdeploy.bench.report import CPU_FEATURES
from segdeploy.cli import main
from segdeploy.data.synthetic import write_synthetic_folder
from segdeploy.errors import SegdeployError

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """4 labelled synthetic images at 48 px: the model (64 px input) resizes them."""
    root = write_synthetic_folder(
        tmp_path_factory.mktemp("bench_data"), n_train=0, n_val=4, seed=3, size=48
    )
    return root / "images" / "validation", root / "annotations" / "validation"


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tiny_onnx_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out") / "report.json"
    args = [
        "bench",
        "--model", str(tiny_model_dir),
        "--onnx", str(tiny_onnx_dir),
        "--images", str(images[0]),
        "--labels", str(images[1]),
        "--backends", "torch,onnx-cpu,onnx-cuda",
        "--batch-sizes", "2",
        "--runs", "2",
        "--model-runs", "3",
        "--output", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    return out, result


def _rows(report):
    return {r["backend"]: r for r in report["results"]}


def test_bench_writes_json_markdown_and_chart(cli_run):
    out, result = cli_run
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] and report["machine"]["cpu_count"] >= 1
    # The CPU features that decide the int8 kernels (AVX2 vs AVX-512 VNNI), as /proc says.
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert report["machine"]["cpu_features"] == [f for f in CPU_FEATURES if f in flags]
    assert {"torch", "onnxruntime", "transformers"} <= set(report["versions"])
    assert report["date"][:2] == "20" and "--backends torch,onnx-cpu,onnx-cuda" in report["command"]
    assert len(report["load_average"]["before"]) == 3
    assert report["inputs"]["images"] == 4 and report["inputs"]["labels"] is True
    assert report["settings"]["batch_sizes"] == [2] and report["settings"]["runs"] == 2

    md = out.with_suffix(".md").read_text()
    assert "| backend | batch | e2e img/s |" in md and "| onnx-cpu | 2 |" in md
    with Image.open(out.with_suffix(".png")) as chart:
        assert chart.format == "PNG" and chart.width > 500
    assert "onnx-cpu" in result.output and "written:" in result.output


def test_each_row_is_measured_in_its_own_process(cli_run):
    report = json.loads(cli_run[0].read_text())
    rows = _rows(report)
    for name in ("torch", "onnx-cpu"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["images"] == 4 and row["batch_size"] == 2
        assert len(row["end_to_end_s"]) == 2 and len(row["model_latency_ms"]) == 3  # 2 + 1
        assert row["end_to_end_images_per_s"] == pytest.approx(
            4 / np.median(row["end_to_end_s"]), rel=1e-3
        )
        assert 0 < row["model_p50_ms"] <= row["model_p95_ms"]
        assert row["model_images_per_s"] == pytest.approx(2000 / row["model_p50_ms"])
    # Every row does the same job, and each round times a short pass too (start-up, steady).
    assert rows["torch"]["end_to_end_includes"].endswith("writing label PNGs with Pillow")
    for name in ("torch", "onnx-cpu"):
        assert rows[name]["writes_label_files"] is True
        assert "start_up_s" in rows[name] and "steady_images_per_s" in rows[name]
    # segdeploy's path never loads torch, and its peak memory is its own, not torch's.
    assert rows["onnx-cpu"]["torch_imported"] is False and rows["torch"]["torch_imported"] is True
    assert 0 < rows["onnx-cpu"]["peak_rss_mb"] < rows["torch"]["peak_rss_mb"]


def test_unavailable_backend_is_listed_as_skipped_with_the_reason(cli_run):
    out, result = cli_run
    row = _rows(json.loads(out.read_text()))["onnx-cuda"]
    if HAS_CUDA:
        assert row["status"] == "ok"
    else:
        assert row["status"] == "skipped"
        assert "CUDAExecutionProvider" in row["reason"] and "onnxruntime-gpu" in row["reason"]
        assert "onnx-cuda" in out.with_suffix(".md").read_text().split("## Not run here")[1]
        assert "skipped" in result.output


def test_accuracy_figures_match_an_independent_evaluation(cli_run, tiny_model_dir, images):
    """mean IoU of the torch row equals the guide's own computation on the same files."""
    import torch
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from segdeploy.train.metrics import MeanIoU

    rows = _rows(json.loads(cli_run[0].read_text()))
    model = SegformerForSemanticSegmentation.from_pretrained(tiny_model_dir).eval()
    processor = SegformerImageProcessor.from_pretrained(tiny_model_dir)
    metric = MeanIoU(5)
    for path in sorted(images[0].iterdir()):
        image = Image.open(path).convert("RGB")
        with torch.inference_mode():
            logits = model(**processor(images=image, return_tensors="pt")).logits
        pred = torch.nn.functional.interpolate(
            logits, size=image.size[::-1], mode="bilinear", align_corners=False
        ).argmax(1)[0]
        metric.update(pred.numpy(), np.asarray(Image.open(images[1] / path.name)))
    assert rows["torch"]["mean_iou"] == pytest.approx(metric.compute()["mean_iou"], abs=1e-9)
    assert rows["torch"]["pixel_agreement_with_torch"] == 1.0
    assert rows["onnx-cpu"]["pixel_agreement_with_torch"] >= 0.99
    assert rows["onnx-cpu"]["mean_iou"] == pytest.approx(rows["torch"]["mean_iou"], abs=0.02)
    assert len(rows["onnx-cpu"]["per_category_iou"]) == 5


def test_dataset_input_without_torch_backend(tiny_model_dir, tiny_onnx_dir, tmp_path):
    """--dataset lays the split out as files; with no torch row there is no agreement figure."""
    out = tmp_path / "b.json"
    args = ["bench", "--model", str(tiny_model_dir), "--onnx", str(tiny_onnx_dir),
            "--dataset", "synthetic:40", "--split", "validation[:3]", "--backends", "onnx-cpu",
            "--batch-sizes", "1", "--runs", "1", "--model-runs", "2", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["inputs"]["kind"] == "dataset" and report["inputs"]["images"] == 3
    (row,) = report["results"]
    assert row["status"] == "ok" and 0 <= row["mean_iou"] <= 1
    assert row["pixel_agreement_with_torch"] is None
    assert not [t for t in report["targets"] if t["kind"] == "agreement"]


def test_dataset_rows_from_files_are_linked_with_their_own_labels(synthetic_dir, tmp_path):
    """A folder dataset's images are linked, not copied, and paired with their own masks
    (its "name" column names the mask file, which must not be taken for the image)."""
    from segdeploy.bench import from_dataset
    from segdeploy.data import DatasetSpec

    spec = DatasetSpec(
        str(synthetic_dir), split="validation", eval_split="validation[:3]", reduce_labels=False
    )
    inputs = from_dataset(spec, tmp_path, num_labels=5)
    linked = sorted(inputs.images.iterdir())
    originals = sorted((synthetic_dir / "images" / "validation").iterdir())[:3]
    assert [p.name for p in linked] == [p.name for p in originals]
    for link, original in zip(linked, originals, strict=True):
        assert link.is_symlink() and link.resolve() == original.resolve()
        mask = np.asarray(Image.open(synthetic_dir / "annotations" / "validation" / original.name))
        assert np.array_equal(np.asarray(Image.open(inputs.labels / original.name)), mask)
    assert inputs.ignore_index == 255 and inputs.source["rows"] == 3


def test_a_backend_that_fails_is_reported_and_the_exit_status_is_1(
    tiny_model_dir, tiny_onnx_dir, images, tmp_path
):
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, onnx_dir)
    (onnx_dir / "model_broken.onnx").write_bytes(b"not a graph")
    out = tmp_path / "b.json"
    args = ["bench", "--model", str(tiny_model_dir), "--onnx", str(onnx_dir),
            "--images", str(images[0]), "--batch-sizes", "1", "--runs", "1",
            "--model-runs", "1", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--backends", "onnx-cpu-broken,onnx-cpu"])
    assert result.exit_code == 1, result.output
    broken, fine = json.loads(out.read_text())["results"]
    assert broken["status"] == "failed" and "model_broken.onnx" in broken["reason"]
    assert fine["status"] == "ok"  # the other rows go on

    # A worker that does not answer in time is stopped and reported, not waited for.
    result = CliRunner().invoke(main, [*args, "--backends", "torch", "--timeout", "1"])
    assert result.exit_code == 1, result.output
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "failed" and row["reason"] == "timed out after 1 s"


@pytest.mark.parametrize(
    "extra, where",
    [
        (["--images", "{images}", "--backends", "tensorflow"], "--backends"),
        (["--images", "{images}", "--batch-sizes", "0"], "--batch-sizes"),
        (["--images", "{images}", "--batch-sizes", "1,x"], "--batch-sizes"),
        (["--labels", "{labels}"], "--labels"),
        (["--images", "{images}", "--labels", "{images}/missing"], "missing"),
        (["--images", "{images}", "--labels", "{empty}"], "no reference label"),
        (["--images", "{images}", "--dataset", "synthetic"], "--images"),
    ],
)
def test_bad_options_exit_2_before_any_work(tiny_model_dir, images, tmp_path, extra, where):
    extra = [e.format(images=images[0], labels=images[1], empty=tmp_path) for e in extra]
    out = tmp_path / "b.json"
    args = ["bench", "--model", str(tiny_model_dir), "--backends", "onnx-cpu", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert where in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_nothing_to_benchmark_on_names_the_options(tiny_onnx_dir):
    # An ONNX folder records no training dataset: the user must say what to run on.
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny_onnx_dir)])
    assert result.exit_code == 2 and "--images" in result.output and "--dataset" in result.output


def test_default_backends_follow_the_variants_in_the_onnx_folder(tmp_path):
    for name in ("model.onnx", "model_int8.onnx", "model_fp16.onnx"):
        (tmp_path / name).write_bytes(b"")
    names = default_backends(tmp_path)
    assert names[:4] == ["torch", "hf-pipeline", "optimum", "onnx-cpu"]
    assert {"onnx-cpu-int8", "onnx-cpu-fp16", "onnx-cuda-int8", "onnx-tensorrt-fp16"} <= set(names)
    assert "onnx-tensorrt-int8" not in names  # TensorRT takes its precision from a build flag
    assert "onnx-openvino-int8" in names and "onnx-openvino-fp16" not in names
    # segdeploy infer on OpenVINO is a default row (issue 27); OpenVINO's own pipeline,
    # the peers, run when asked for: `--help` says all but openvino.
    assert default_backends(None) == [
        "torch", "hf-pipeline", "optimum", "onnx-cpu", "onnx-cuda", "onnx-tensorrt",
        "onnx-openvino",
    ]  # fmt: skip
    # An OpenVINO IR variant is a row of the openvino provider only.
    (tmp_path / "model_openvino_int8.xml").write_bytes(b"")
    names = default_backends(tmp_path)
    assert "onnx-openvino-openvino_int8" in names
    assert not any(n.endswith("openvino_int8") for n in names if not n.startswith("onnx-openvino"))


def test_parse_and_check_backends(tiny_onnx_dir, tmp_path):
    assert parse_backend("ONNX-CPU-int8").variant == "int8"
    assert parse_backend("onnx-tensorrt").provider == "tensorrt"
    with pytest.raises(SegdeployError, match="unknown backend"):
        parse_backend("onnx-tpu")
    cpu_only = ["CPUExecutionProvider"]
    assert check_backend(parse_backend("onnx-cpu"), None, tiny_onnx_dir, cpu_only) is None
    assert "no model_int8.onnx" in check_backend(
        parse_backend("onnx-cpu-int8"), None, tiny_onnx_dir, cpu_only
    )
    assert "TensorrtExecutionProvider" in check_backend(
        parse_backend("onnx-tensorrt"), None, tiny_onnx_dir, cpu_only
    )
    assert "no PyTorch weights" in check_backend(parse_backend("torch"), tmp_path, None, cpu_only)
    assert "no ONNX export" in check_backend(parse_backend("optimum"), None, tmp_path, cpu_only)


def test_ratios_are_paired_by_round():
    """A round on a slow machine slows both sides of a ratio; medians taken apart would not."""
    from segdeploy.bench.run import paired_ratio, summarize

    raw = {
        "images": 10,
        "end_to_end_s": [1.0, 1.0, 2.0],
        "model_latency_s": [0.05, 0.1, 0.1],
        "model_latency_s_by_round": [[0.05], [0.1], [0.1]],
    }
    row = summarize(raw, 1)
    assert row["end_to_end_images_per_s_by_round"] == [10.0, 10.0, 5.0]
    assert row["end_to_end_vs_model"] == pytest.approx(0.5)  # rounds: 10/20, 10/10, 5/10
    assert row["end_to_end_vs_model_of_medians"] == pytest.approx(1.0)
    base = {"end_to_end_images_per_s": 8.0, "end_to_end_images_per_s_by_round": [5.0, 10.0, 2.5]}
    assert paired_ratio(row, base) == pytest.approx(2.0)  # 2, 1, 2
    assert paired_ratio(row, {"end_to_end_images_per_s": 4.0}) == pytest.approx(2.5)


def test_targets_are_judged_from_one_run():
    def row(backend, e2e, model=None, agree=None, miou=None, **kw):
        ours = backend.startswith("onnx-")
        return {
            "backend": backend, "batch_size": 4, "status": "ok",
            "end_to_end_images_per_s": e2e, "model_images_per_s": model or e2e,
            "end_to_end_vs_model": e2e / (model or e2e),
            "pixel_agreement_with_torch": agree, "mean_iou": miou,
            "kind": "segdeploy" if ours else backend, "provider": "cpu",
            "precision": "int8" if "int8" in backend else "fp32", **kw,
        }  # fmt: skip

    rows = [
        row("torch", 1.0, agree=1.0, miou=0.40),
        row("hf-pipeline", 2.0),
        row("optimum", 4.5),
        row("onnx-cpu", 5.0, model=5.4, agree=0.9995, miou=0.40),
        row("onnx-cpu-int8", 7.0, agree=0.98, miou=0.385),
        {"backend": "onnx-cuda", "batch_size": 4, "status": "skipped", "reason": "no GPU"},
    ]
    got = {t["target"]: t for t in judge_targets(rows)}
    assert got["infer fp32 end to end vs hf-pipeline"]["value"] == pytest.approx(2.5)
    assert got["infer fp32 end to end vs hf-pipeline"]["met"] is True
    assert got["infer fp32 end to end vs optimum"]["value"] == pytest.approx(5 / 4.5)
    assert got["infer fp32 end to end vs optimum"]["met"] is True  # >= 1.1x (issue 29)
    assert got["infer fp32 end to end vs torch"]["backend"] == "onnx-cpu"  # the group's row
    assert got["infer fp32 end to end vs its model-only rate"]["value"] == pytest.approx(5 / 5.4)
    assert got["infer fp32 end to end vs its model-only rate"]["met"] is True
    assert got["infer fp32 masks equal to torch"]["met"] is True
    assert got["int8 end to end vs fp32"]["value"] == pytest.approx(1.4)
    assert got["int8 end to end vs fp32"]["met"] is False
    assert got["int8 mean IoU drop vs torch"]["value"] == pytest.approx(0.015)
    assert got["int8 mean IoU drop vs torch"]["met"] is False
    assert not any("OpenVINO" in name for name in got)  # their rows did not run
    # Issue 16: segdeploy's int8 against OpenVINO's rows, and ORT fp32 model-only latency.
    ov = {**row("openvino", 6.0), "model_p50_ms": 100.0}
    rows_ov = [*rows, ov, row("openvino-int8", 5.0)]
    rows_ov[3] = {**rows_ov[3], "model_p50_ms": 125.0}
    got = {t["target"]: t for t in judge_targets(rows_ov)}
    assert got["int8 end to end vs OpenVINO NNCF int8"]["value"] == pytest.approx(1.4)
    assert got["int8 end to end vs OpenVINO NNCF int8"]["met"] is True
    assert got["int8 end to end vs OpenVINO fp32"]["met"] is False  # 7 / 6 < 1.25
    assert got["ORT fp32 model only vs OpenVINO fp32"]["value"] == pytest.approx(0.8)
    assert got["ORT fp32 model only vs OpenVINO fp32"]["met"] is False
    assert got["infer fp32 end to end vs OpenVINO fp32"]["value"] == pytest.approx(5 / 6)
    assert not any("validated" in name for name in got)  # no row was marked validated
    # Issue 27: the fastest validated CPU row (here segdeploy infer on OpenVINO, NNCF int8)
    # against the fastest row of OpenVINO's own pipeline, with its fidelity.
    ov_ours = row("onnx-openvino-openvino_int8", 8.0, agree=0.997, miou=0.395, validated=True)
    ov_ours["provider"] = "openvino"
    slow = row("onnx-cpu-int8-x", 7.5, validated=True)
    got = {t["target"]: t for t in judge_targets([*rows_ov, ov_ours, slow])}
    fastest = got["fastest validated CPU row vs OpenVINO's fastest"]
    assert (fastest["backend"], fastest["compared_with"]) == (
        "onnx-openvino-openvino_int8",
        "openvino",
    )
    assert fastest["value"] == pytest.approx(8 / 6) and fastest["met"] is True
    assert got["fastest validated CPU row masks equal to torch"]["met"] is True
    assert got["fastest validated CPU row mean IoU drop vs torch"]["value"] == pytest.approx(0.005)
    # A target whose rows did not run is not judged at all, rather than judged failed.
    assert judge_targets([r for r in rows if r["backend"] != "hf-pipeline"]) and not any(
        t["compared_with"] == "hf-pipeline"
        for t in judge_targets([r for r in rows if r["backend"] != "hf-pipeline"])
    )


def test_optimum_backend_runs_with_a_thread_count(tiny_model_dir, tiny_onnx_dir, images, tmp_path):
    """--threads reaches optimum's session; the pipeline once failed copying its SessionOptions."""
    out = tmp_path / "b.json"
    args = ["bench", "--model", str(tiny_model_dir), "--onnx", str(tiny_onnx_dir),
            "--images", str(images[0]), "--labels", str(images[1]), "--backends", "optimum",
            "--threads", "1", "--batch-sizes", "2", "--runs", "1", "--model-runs", "2",
            "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "ok", row.get("reason")
    assert row["threads"] == 1 and 0 <= row["mean_iou"] <= 1


def test_a_new_backend_is_one_registered_class(monkeypatch, tiny_onnx_dir):
    """Parsing, the default list, the availability check, the report's texts and the
    worker's runner all come from the runner class: nothing else dispatches on names."""
    from segdeploy.bench import backends as bk

    made = []

    class EchoRunner(bk.Runner):
        kind = "echo"
        description = "echo: a test backend"
        end_to_end_includes = "nothing at all"

        @classmethod
        def unavailable(cls, backend, model_dir, onnx_dir, available):
            return None if onnx_dir is not None else "needs an ONNX folder"

        @classmethod
        def create(cls, backend, model_dir, onnx_dir, batch_size, threads):
            made.append((backend.name, batch_size))
            return cls()

    monkeypatch.setattr(bk, "RUNNERS", dict(bk.RUNNERS))
    bk.register(EchoRunner)
    backend = parse_backend("echo")
    assert backend.kind == "echo" and backend.description == "echo: a test backend"
    assert backend.end_to_end_includes == "nothing at all"
    assert "echo" in default_backends(tiny_onnx_dir)
    assert check_backend(backend, None, tiny_onnx_dir, []) is None
    assert check_backend(backend, None, None, []) == "needs an ONNX folder"
    assert isinstance(bk.make_runner(backend, None, tiny_onnx_dir, 3), EchoRunner)
    assert made == [("echo", 3)]
    # every built-in runner says what it is and what its end-to-end figure includes
    for runner in bk.RUNNERS.values():
        assert runner.kind and runner.end_to_end_includes
        assert runner.describe(bk.Backend(runner.kind, runner.kind))


def test_bench_model_defaults_to_the_newest_export(tmp_path, monkeypatch, tiny_onnx_dir):
    """`segdeploy bench` without --model takes the newest export under models/, as infer does."""
    import shutil

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["bench", "--backends", "onnx-cpu"])
    assert result.exit_code == 2 and "no exported model here" in result.output

    for name in ("old", "new"):
        shutil.copytree(tiny_onnx_dir, tmp_path / "models" / name / "onnx")
    os.utime(tmp_path / "models" / "old" / "onnx" / "model.onnx", (1, 1))
    # An ONNX folder records no dataset: the run stops at the inputs, after naming the model.
    result = CliRunner().invoke(main, ["bench", "--backends", "onnx-cpu"])
    assert "model: models/new (the newest export under models/)" in result.output


@pytest.mark.parametrize("model_type", ["mobilenet_v2", "dpt"])
def test_bench_runs_other_families(model_type, images, tmp_path):
    """bench's torch, transformers-pipeline and segdeploy rows on a MobileNetV2 (center
    crop, fixed-size graph) and a DPT (square only): every row runs and agrees with torch."""
    from family_models import save_model_folder

    from segdeploy.export.routes import export_fp32

    model = save_model_folder(tmp_path / "model", model_type, "tiny")
    export_fp32(model, model / "onnx")
    out = tmp_path / "b.json"
    args = ["bench", "--model", str(model), "--images", str(images[0]), "--labels",
            str(images[1]), "--backends", "torch,hf-pipeline,onnx-cpu", "--batch-sizes", "2",
            "--runs", "1", "--model-runs", "2", "--no-targets", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = _rows(json.loads(out.read_text()))
    assert set(rows) == {"torch", "hf-pipeline", "onnx-cpu"}
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("reason"))
        assert row["pixel_agreement_with_torch"] >= 0.999, (name, row["pixel_agreement_with_torch"])


def test_start_up_and_steady_rate_are_solved_from_two_passes():
    from segdeploy.bench.run import startup_and_steady

    # A pass of n images takes 0.5 s + n / 100 s: start-up 0.5 s, steady 100 images/s.
    raw = {"images": 100, "short_images": 25, "end_to_end_s": [1.5, 1.5], "short_s": [0.75, 0.75]}
    got = startup_and_steady(raw)
    assert got["start_up_s"] == pytest.approx(0.5) and got["steady_images_per_s"] == pytest.approx(
        100
    )
    assert startup_and_steady({**raw, "short_s": [None, None]})["steady_images_per_s"] is None


def test_every_row_writes_its_label_files_in_the_timed_pass(tmp_path):
    """The peers' label maps become PNG files (Pillow, infer's names) inside the pass that
    is timed; with in_memory they are not written there."""
    from segdeploy.bench.backends import parse_backend
    from segdeploy.bench.worker import Row
    from segdeploy.runtime.infer import Item, label_path

    items = [Item(tmp_path / f"{i}.png", PurePath("in", f"{i}")) for i in range(3)]
    maps = [np.full((4, 5), i, np.uint8) for i in range(3)]

    class Peer:
        def end_to_end(self, items, out, inputs):
            assert not out.exists()  # every pass starts from an empty folder
            return maps

    for in_memory in (False, True):
        row = object.__new__(Row)
        row.runner = Peer()
        row.write = not in_memory and not parse_backend("torch").writes_labels
        out = tmp_path / f"out-{in_memory}"
        seconds, labels = row._pass(items, out, [])
        assert seconds > 0 and labels is maps
        written = [label_path(out, item) for item in items]
        if in_memory:
            assert not out.exists()
        else:
            for path, lab in zip(written, maps, strict=True):
                assert np.array_equal(np.asarray(Image.open(path)), lab)
    assert parse_backend("onnx-cpu").writes_labels  # infer writes its own


def test_the_report_names_the_fastest_validated_path_and_in_memory_rows(tmp_path):
    from segdeploy.bench.report import markdown
    from segdeploy.bench.run import fastest_paths, mark_validated

    (tmp_path / "validation.json").write_text(json.dumps({"passed": True}))
    (tmp_path / "validation_int8.json").write_text(json.dumps({"passed": False}))

    def row(name, e2e, by_round, **kw):
        return {"backend": name, "batch_size": 1, "status": "ok", "end_to_end_images_per_s": e2e,
                "end_to_end_images_per_s_by_round": by_round, "provider": "cpu", **kw}  # fmt: skip

    rows = [
        row("optimum", 4.0, [4.0, 4.0], kind="optimum", writes_label_files=False),
        row("onnx-cpu", 5.0, [5.0, 6.0], kind="segdeploy", graph="model.onnx", variant="fp32",
            precision="fp32", pixel_agreement_with_torch=1.0),
        row("onnx-cpu-int8", 9.0, [9.0, 9.0], kind="segdeploy", graph="model_int8.onnx",
            variant="int8", precision="int8", pixel_agreement_with_torch=0.999),
    ]  # fmt: skip
    mark_validated(rows, tmp_path)
    assert [r.get("validated") for r in rows] == [None, True, False]  # int8 failed validation
    (path,) = fastest_paths(rows)
    assert path["backend"] == "onnx-cpu" and path["best_peer"] == "optimum"
    assert path["command"] == "segdeploy infer --provider cpu --batch-size 1"
    assert path["vs_best_peer"] == pytest.approx(1.375)  # paired: 1.25 and 1.5
    report = {
        "machine": {"cpu": "x", "usable_cores": 2, "cpu_count": 2, "memory_gb": 1, "os": "y"},
        "model": {"model_dir": "m", "onnx_dir": "o", "num_labels": 2, "image_size": None},
        "date": "2026", "command": "c", "load_average": {"before": [], "after": []},
        "inputs": {"images": 1, "folder": "f"}, "settings": {"runs": 1, "model_runs": 1},
        "versions": {}, "results": rows, "targets": [], "fastest_validated": [path],
    }  # fmt: skip
    md = markdown(report)
    assert "| optimum (in memory) | 1 |" in md
    assert "fastest validated path here at batch 1: onnx-cpu" in md and "1.38x" in md
