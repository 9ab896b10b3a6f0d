"""`segdeploy demo`: the whole path in its reduced (--quick) mode, and what it leaves behind."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from segdeploy.cli import main
from segdeploy.demo import DemoSettings


def test_quick_demo_leaves_every_output_and_replaces_an_old_run(tmp_path):
    out = tmp_path / "demo"
    # Leftovers of an earlier, larger run must not survive into this one.
    stale = [out / "infer" / "images" / "old.png", out / "data" / "images" / "old.png"]
    for path in stale:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"old")

    result = CliRunner().invoke(main, ["demo", "--quick", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    settings = DemoSettings.quick()

    model = out / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    train_args = json.loads((model / "train_args.json").read_text())
    assert train_args["steps"] == settings.steps and train_args["image_size"] == 32

    assert (model / "onnx" / "model.onnx").is_file()
    validation = json.loads((model / "onnx" / "validation.json").read_text())
    assert validation["opset"] == 17 and validation["mode"] == "dataset"
    assert validation["passed"] is True and validation["images"] == settings.val_images

    images = sorted((out / "data" / "images").iterdir())
    assert len(images) == settings.val_images and not any(p.exists() for p in stale)
    for image in images:
        label = out / "infer" / "images" / image.name
        with Image.open(label) as im:
            assert im.mode == "L" and im.size == (32, 32)
        assert (out / "infer" / "images" / f"{image.stem}_overlay.jpg").is_file()
        assert (out / "data" / "labels" / image.name).is_file()
    summary = json.loads((out / "infer" / "summary.json").read_text())
    assert summary["totals"]["images"] == settings.val_images and summary["totals"]["failed"] == 0

    bench = json.loads((out / "bench" / "bench.json").read_text())
    status = {r["backend"]: r["status"] for r in bench["results"]}
    assert status["torch"] == status["onnx-cpu"] == "ok"
    assert status["onnx-cuda"] in ("ok", "skipped")
    assert all(r["mean_iou"] is not None for r in bench["results"] if r["status"] == "ok")
    assert (out / "bench" / "bench.md").is_file() and (out / "bench" / "bench.png").is_file()
    # The bench targets were set for a trained CamVid model at 512 px: the demo's tiny
    # model is not judged by them, and no "needs >= ...: not met" line is printed.
    assert bench["targets"] == [] and bench["settings"]["targets"] is False
    assert "target " not in result.output and "needs" not in result.output

    # The closing summary says where each output is.
    for where in (
        "model.onnx",
        "validation.json",
        "summary.json",
        "bench.md",
        "training_curves.png",
    ):
        assert where in result.output


def test_demo_bench_gets_as_many_image_files_as_asked(tmp_path):
    """The synthetic validation split has 60 images; the demo's bench asks for 400 so that
    the steady rate is what it reports. It got 60 (infer's fixed start-up was half its
    time); now the split's files are repeated, each with its label, under new names."""
    from segdeploy.bench import from_folders
    from segdeploy.bench.inputs import reference_label_path
    from segdeploy.data import DatasetSpec
    from segdeploy.data.builtin import VALIDATION_SIZE
    from segdeploy.demo import _bench_inputs
    from segdeploy.runtime.infer import Planner

    n = VALIDATION_SIZE + 15
    spec = DatasetSpec("synthetic:32", split="train[:8]", eval_split="validation[:8]")
    inputs = _bench_inputs(spec, tmp_path / "data", n, num_labels=5)
    images = sorted(inputs.images.iterdir())
    assert len(images) == n and len({p.name for p in images}) == n
    work = tmp_path / "work"
    work.mkdir()
    inputs = from_folders(inputs.images, inputs.labels, work)
    items = list(Planner(tmp_path / "out").items([inputs.images]))
    assert len(items) == n
    for item in items:  # every copy pairs with its label, the same as its original's
        label = reference_label_path(inputs.labels, item.out)
        assert label.is_file(), label
