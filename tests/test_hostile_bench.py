"""Hostile inputs to bench, second round (issue 22): reports keep their own names, labels
pair with their images and are checked before any row runs, defaults match the help,
rows that cannot run a graph are skipped, caches stay out of folders that are not ours."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePath

import numpy as np
import pytest
from cli_checks import one_line_error
from click.testing import CliRunner
from PIL import Image
from test_hostile_train_export import NEED_ROOT, _in_mount

from segdeploy.bench import check_backend, default_backends, parse_backend
from segdeploy.cli import main
from segdeploy.data.synthetic import write_synthetic_folder

CPU = ["CPUExecutionProvider"]
QUICK = ["--backends", "onnx-cpu", "--batch-sizes", "1", "--runs", "1", "--model-runs", "1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """3 labelled synthetic images at 48 px and their label PNGs (5 classes)."""
    root = write_synthetic_folder(
        tmp_path_factory.mktemp("hostile_bench"), n_train=0, n_val=3, seed=4, size=48
    )
    return root / "images" / "validation", root / "annotations" / "validation"


def _bench(tiny_model_dir, tiny_onnx_dir, *args):
    base = ["bench", "--model", str(tiny_model_dir), "--onnx", str(tiny_onnx_dir)]
    return CliRunner().invoke(main, [*base, *map(str, args)])


# ------------------------------------------------------------------ -o rep.md (item 4)


@pytest.mark.parametrize("name", ["rep.md", "rep.png"])
def test_a_report_named_md_or_png_keeps_json_markdown_and_chart_apart(
    name, tiny_model_dir, tiny_onnx_dir, photos, tmp_path
):
    result = _bench(
        tiny_model_dir, tiny_onnx_dir, "--images", photos[0], *QUICK, "-o", tmp_path / name
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep.json").read_text())  # the JSON, under its own name
    assert report["results"][0]["status"] == "ok"
    assert (tmp_path / "rep.md").read_text().startswith("# segdeploy bench")
    assert (tmp_path / "rep.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------ labels (items 10, 11)


def test_labels_pair_with_the_whole_stem(tiny_model_dir, tiny_onnx_dir, photos, tmp_path):
    from segdeploy.bench.inputs import reference_label_path

    assert (
        reference_label_path(tmp_path, PurePath("in/a/frame.000")) == tmp_path / "a/frame.000.png"
    )
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i, src in enumerate(sorted(photos[0].iterdir())):
        shutil.copy(src, images / f"frame.{i:03d}{src.suffix}")
        shutil.copy(photos[1] / f"{src.stem}.png", labels / f"frame.{i:03d}.png")
    # What `with_suffix` made of both names: a label for neither image, of another size.
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(labels / "frame.png")
    result = _bench(
        tiny_model_dir, tiny_onnx_dir, "--images", images, "--labels", labels,
        "--max-images", "2", *QUICK, "-o", tmp_path / "b.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["inputs"]["images"] == 2 and report["results"][0]["mean_iou"] is not None


@pytest.fixture(scope="module")
def model_ignoring_11(tiny_model_dir, tmp_path_factory):
    """The tiny model, trained (as train records it) on data whose ignore index is 11."""
    from segdeploy.data import DatasetSpec

    model = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("ign") / "model")
    spec = DatasetSpec("synthetic:64", ignore_index=11, reduce_labels=False)
    (model / "train_args.json").write_text(json.dumps({"dataset": spec.to_dict()}))
    return model


def test_images_and_labels_are_read_with_the_recorded_ignore_index(
    model_ignoring_11, tiny_onnx_dir, photos, tmp_path
):
    labels = shutil.copytree(photos[1], tmp_path / "labels")
    first = sorted(labels.iterdir())[0]
    mask = np.asarray(Image.open(first)).copy()
    mask[:8] = 11  # void, as CamVid marks it
    Image.fromarray(mask).save(first)
    out = tmp_path / "b.json"
    result = _bench(
        model_ignoring_11, tiny_onnx_dir, "--images", photos[0], "--labels", labels, *QUICK,
        "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["inputs"]["ignore_index"] == 11
    assert report["results"][0]["mean_iou"] is not None


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda m: np.full_like(m, 200), "mask values 200 fall outside the 5 classes"),
        (lambda m: m[:10, :10], "is 10x10 but its image"),  # another size
    ],
)
def test_labels_are_checked_before_any_row_runs(
    damage, needle, tiny_model_dir, tiny_onnx_dir, photos, tmp_path
):
    labels = shutil.copytree(photos[1], tmp_path / "labels")
    last = sorted(labels.iterdir())[-1]
    Image.fromarray(np.ascontiguousarray(damage(np.asarray(Image.open(last))))).save(last)
    out = tmp_path / "b.json"
    result = _bench(
        tiny_model_dir, tiny_onnx_dir, "--images", photos[0], "--labels", labels, *QUICK,
        "-o", out,
    )  # fmt: skip
    one_line_error(result, str(last), needle)
    assert "done" not in result.output and "loading" not in result.output  # no row started
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--split", "val"], "--split"),
        (["--reduce-labels"], "--reduce-labels"),
        (["--no-reduce-labels"], "--no-reduce-labels"),
    ],
)
def test_dataset_options_with_images_are_named_for_what_they_are(
    extra, option, tiny_model_dir, tiny_onnx_dir, photos, tmp_path
):
    result = _bench(tiny_model_dir, tiny_onnx_dir, "--images", photos[0], *extra, *QUICK)
    one_line_error(result, f"error: {option}:")
    assert "--dataset/--split" not in result.output


def test_reduce_labels_reads_label_files_ade20k_style(
    tiny_model_dir, tiny_onnx_dir, photos, tmp_path
):
    labels = tmp_path / "labels"
    labels.mkdir()
    for path in sorted(photos[1].iterdir()):  # 0 = other, v = class v - 1
        Image.fromarray((np.asarray(Image.open(path)) + 1).astype(np.uint8)).save(
            labels / path.name
        )
    out = tmp_path / "b.json"
    args = ["--images", photos[0], "--labels", labels, *QUICK, "-o", out]
    plain = _bench(tiny_model_dir, tiny_onnx_dir, *args)
    one_line_error(plain, "mask values 5 fall outside")  # unless reduced
    result = _bench(tiny_model_dir, tiny_onnx_dir, *args, "--reduce-labels")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["inputs"]["reduce_labels"] is True


# ------------------------------------------------------------------ --timeout nan (item 19)


def test_a_nan_timeout_is_refused(tiny_model_dir, tiny_onnx_dir, photos, tmp_path):
    out = tmp_path / "b.json"
    result = _bench(
        tiny_model_dir, tiny_onnx_dir, "--images", photos[0], *QUICK, "--timeout", "nan", "-o", out
    )
    one_line_error(result, "--timeout", "nan")
    assert not out.exists()


def test_openvino_failures_keep_the_reason_after_the_locations():
    from segdeploy.bench.worker import failure_reason

    err = RuntimeError(
        "Exception from src/inference/src/cpp/core.cpp:84:\n"
        "Exception from src/inference/src/model_reader.cpp:148:\n"
        'Unable to read the model: "bad.onnx" Please check that model format: ".onnx" is '
        "supported and the model is correct.\n\n"
    )
    assert failure_reason(err) == (
        'RuntimeError: Unable to read the model: "bad.onnx" Please check that model format: '
        '".onnx" is supported and the model is correct.'
    )


# ------------------------------------------------------------------ defaults (item 25)


def test_default_backends_leave_openvino_out_as_the_help_says(tiny_onnx_dir):
    names = default_backends(tiny_onnx_dir)
    assert not [n for n in names if n.startswith("openvino")], names
    assert "[default: all but openvino" in " ".join(
        CliRunner().invoke(main, ["bench", "--help"]).output.split()
    )
    assert parse_backend("openvino").name == "openvino"  # still there when asked for


@pytest.fixture(scope="module")
def gpu_export(tiny_model_dir, tmp_path_factory):
    """An export made for the GPU: fp16 and fused argmax graphs beside model.onnx."""
    out = tmp_path_factory.mktemp("gpu") / "onnx"
    result = CliRunner().invoke(
        main,
        ["export", str(tiny_model_dir), "--output", str(out), "--fp16", "--fuse-argmax",
         "--no-validate"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_fused_graphs_are_skipped_with_the_reason_not_failed(
    gpu_export, tiny_model_dir, photos, tmp_path
):
    for variant in ("fused", "fp16_fused"):
        why = check_backend(parse_backend(f"onnx-cpu-{variant}"), None, gpu_export, CPU)
        assert why and "argmax fused in" in why and f"--variant {variant}" in why
    out = tmp_path / "b.json"
    result = _bench(
        tiny_model_dir, gpu_export, "--images", photos[0], "--backends", "onnx-cpu,onnx-cpu-fused",
        "--batch-sizes", "1", "--runs", "1", "--model-runs", "1", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["onnx-cpu"]["status"] == "ok"
    assert rows["onnx-cpu-fused"]["status"] == "skipped"


# ------------------------------------------------------------------ not ours (item 17)


def test_openvino_cache_goes_to_the_user_cache_for_a_folder_not_ours(
    tiny_onnx_dir, tmp_path, monkeypatch
):
    from segdeploy.bench.openvino import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ours = shutil.copytree(tiny_onnx_dir, tmp_path / "ours")
    assert cache_dir(ours) == ours / "openvino"
    theirs = shutil.copytree(tiny_onnx_dir, tmp_path / "theirs")
    (theirs / "README.txt").write_text("the user's own notes")
    assert cache_dir(theirs) == tmp_path / "xdg" / "segdeploy" / "openvino"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir(theirs) == Path.home() / ".cache" / "segdeploy" / "openvino"


@NEED_ROOT
def test_bench_of_a_read_only_model_folder_is_refused_before_any_row(
    tiny_model_dir, tiny_onnx_dir, photos, tmp_path
):
    model = shutil.copytree(tiny_model_dir, tmp_path / "seed" / "model")
    shutil.copytree(tiny_onnx_dir, model / "onnx")
    mount = tmp_path / "ro"
    mount.mkdir()
    rc, err, _, _ = _in_mount(
        str(mount), ["bench", "--model", f"{mount}/model", "--images", str(photos[0]), *QUICK],
        size="20m", seed=model, ro=True,
    )  # fmt: skip
    assert rc == 2, err
    assert f"error: {mount}/model: cannot write the report (--output) here: Read-only" in err
    assert "loading" not in err and "unexpected" not in err


@NEED_ROOT
def test_openvino_cache_of_a_read_only_export_goes_to_the_user_cache(tiny_onnx_dir, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    code = (
        "from pathlib import Path; from segdeploy.bench.openvino import cache_dir; "
        f"print('cache:', cache_dir(Path('{mount}/{tiny_onnx_dir.name}')))"
    )
    steps = (
        f"mount -t tmpfs -o size=20m tmpfs {mount} && cp -r {tiny_onnx_dir} {mount}/ && "
        f'mount -o remount,ro {mount} && echo mounted && {sys.executable} -c "{code}"'
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(["unshare", "-m", "sh", "-c", steps], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    if "mounted" not in done.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert "cache:" in done.stdout, done.stderr
    assert done.stdout.split("cache:")[1].strip() == f"{tmp_path}/xdg/segdeploy/openvino"
