"""Hostile inputs to train, export, validate and bench (issue 12): each is refused by
name or reported, and nothing the user owns is lost."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.cli import main

# ------------------------------------------------------------------ bench


def _mode_images(folder):
    """One small image per mode infer converts (L, LA, P, RGBA, I;16), plus RGB."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    folder.mkdir(parents=True)
    Image.fromarray(np.stack([gray] * 3, -1), "RGB").save(folder / "rgb.png")
    Image.fromarray(gray, "L").save(folder / "gray.png")
    Image.fromarray(gray, "L").convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(gray, "L").convert("P").save(folder / "palette.png")
    Image.fromarray(np.stack([gray] * 4, -1), "RGBA").save(folder / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "deep.png")  # I;16
    assert Image.open(folder / "deep.png").mode.startswith("I;16")


@pytest.fixture(scope="module")
def bench_bad_and_gray(tiny_model_dir, tiny_onnx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_hostile")
    _mode_images(root / "images")
    (root / "images" / "empty.jpg").write_bytes(b"")
    out = root / "report.json"
    args = ["bench", "--model", str(tiny_model_dir), "--onnx", str(tiny_onnx_dir),
            "--images", str(root / "images"), "--backends", "torch,hf-pipeline,onnx-cpu",
            "--batch-sizes", "2", "--runs", "1", "--model-runs", "1", "-o", str(out)]  # fmt: skip
    return out, CliRunner().invoke(main, args)


def test_bench_lists_a_bad_image_writes_the_report_and_exits_1(bench_bad_and_gray):
    out, result = bench_bad_and_gray
    assert result.exit_code == 1, result.output
    assert "unexpected" not in result.output
    report = json.loads(out.read_text())
    (bad,) = report["failed_images"]
    assert bad["path"].endswith("empty.jpg") and "empty file" in bad["reason"]
    assert "empty.jpg" in out.with_suffix(".md").read_text()
    assert report["inputs"]["images"] == 6  # the decodable ones, in every row


@pytest.mark.parametrize("backend", ["torch", "hf-pipeline"])
def test_bench_torch_and_pipeline_rows_take_every_image_mode_as_infer_does(
    backend, tiny_model_dir, tiny_onnx_dir, tmp_path
):
    from segdeploy.bench.backends import make_runner, parse_backend
    from segdeploy.bench.worker import list_items

    _mode_images(tmp_path / "images")
    items = list_items(tmp_path / "images")
    ours = make_runner(parse_backend("onnx-cpu"), None, tiny_onnx_dir, 2, 1)
    ours.end_to_end(items, tmp_path / "out", [str(tmp_path / "images")])
    runner = make_runner(parse_backend(backend), tiny_model_dir, tiny_onnx_dir, 2, 1)
    labels = runner.end_to_end(items, tmp_path / "unused", [])
    assert len(labels) == len(items) == 6
    for item, got in zip(items, labels, strict=True):
        want = np.asarray(Image.open(tmp_path / "out" / item.out.with_name(item.out.name + ".png")))
        assert got.shape == want.shape == (40, 48)
        assert (got == want).mean() > 0.999, item.path.name  # the same RGB pixels as infer
    assert len(runner.model_inputs(items, 1)) == 1


# ------------------------------------------------------------------ export / validate


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_export_of_truncated_safetensors_names_the_file(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = CliRunner().invoke(main, ["export", str(model), "--no-validate"])
    assert result.exit_code == 2, result.output
    assert f"error: {weights}: corrupt or truncated" in result.output
    assert "unexpected" not in result.output and not (model / "onnx").exists()


@pytest.mark.parametrize("garbage", [b"not a pickle" * 50, b"PK\x03\x04truncated zip"])
def test_unloadable_pickle_weights_are_named_by_export_and_validate(
    garbage, tiny_model_dir, tiny_onnx_dir, tmp_path
):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors").unlink()
    weights = model / "pytorch_model.bin"
    weights.write_bytes(garbage)
    runs = {
        "export": ["export", str(model), "--no-validate"],
        "validate": ["validate", str(tiny_onnx_dir), "--model", str(model)],
    }
    for name, args in runs.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (name, result.output)
        assert f"error: {weights}: " in result.output, (name, result.output)
        assert "unexpected" not in result.output


def test_export_output_under_a_file_is_refused_before_work(tiny_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    result = CliRunner().invoke(
        main, ["export", str(tiny_model_dir), "--output", str(blocker / "onnx"), "--no-validate"]
    )
    assert result.exit_code == 2, result.output
    assert f"error: {blocker}: is a file" in result.output
    assert blocker.read_text() == "mine"


# Read-only mounts and full disks need a mount namespace: root (as in CI) can make one.
NEED_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to mount a read-only or tiny tmpfs in a private "
    "mount namespace (chmod does not stop root from writing); CI runs as root",
)


def _in_mount(
    mount: str, command: list[str], size: str = "1m", ro: bool = False, seed=None, show=None
):
    """Run the CLI with a fresh tmpfs at `mount` (optionally holding `seed`, then read-only).

    Returns (exit status, stderr, names in `mount`, text of the file `show` afterwards).
    """
    steps = [f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(mount)}"]
    if seed is not None:
        steps.append(f"cp -r {shlex.quote(str(seed))} {shlex.quote(mount)}/")
    if ro:
        steps.append(f"mount -o remount,ro {shlex.quote(mount)}")
    cli = " ".join(shlex.quote(c) for c in [sys.executable, "-m", "segdeploy", *command])
    steps.append(f"{cli}; echo rc=$?; ls -A {shlex.quote(mount)} | sed 's/^/ls: /'")
    if show is not None:
        steps[-1] += f"; echo; echo show: $(cat {shlex.quote(str(show))})"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", " && ".join(steps[:-1]) + " && " + steps[-1]],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    if "rc=" not in done.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    rc = int(done.stdout.split("rc=")[1].split()[0])
    listing = [ln[4:] for ln in done.stdout.splitlines() if ln.startswith("ls: ")]
    shown = done.stdout.split("show: ", 1)[1].strip() if show is not None else None
    return rc, done.stderr, listing, shown


@NEED_ROOT
def test_export_to_a_read_only_folder_is_refused_before_work(tiny_model_dir, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    rc, err, _, _ = _in_mount(
        str(mount), ["export", str(tiny_model_dir), "--output", f"{mount}/onnx", "--no-validate"],
        ro=True,
    )  # fmt: skip
    assert rc == 2, err
    assert f"error: {mount}: cannot write --output here: Read-only file system" in err


@NEED_ROOT
def test_export_onto_a_full_disk_names_it_and_keeps_the_previous_export(tiny_model_dir, tmp_path):
    mount, previous = tmp_path / "full", tmp_path / "onnx"
    mount.mkdir()
    previous.mkdir()
    (previous / "model.onnx").write_bytes(b"the previous export")
    rc, err, listing, kept = _in_mount(
        str(mount), ["export", str(tiny_model_dir), "--output", f"{mount}/onnx", "--no-validate"],
        size="300k", seed=previous, show=f"{mount}/onnx/model.onnx",
    )  # fmt: skip
    assert rc == 2, err
    assert "No space left on device" in err and f"{mount}/onnx" in err
    assert "unexpected" not in err and "Traceback" not in err
    assert listing == ["onnx"]  # no temporary folder left beside it
    assert kept == "the previous export"


# ------------------------------------------------------------------ train

# The CLI spelling of test_train.small_config: scratch:tiny, 2 steps on 32 px synthetic images.
TRAIN = ["train", "--model", "scratch:tiny", "--dataset", "synthetic:32", "--split", "train[:16]",
         "--eval-split", "validation[:6]", "--max-steps", "2", "--eval-steps", "2",
         "--batch-size", "2", "--image-size", "32"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    result = CliRunner().invoke(main, [*TRAIN, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_deletes_nothing_when_the_new_run_fails_its_checks(finished_run, tmp_path):
    from segdeploy.data.synthetic import write_synthetic_folder

    out = shutil.copytree(finished_run, tmp_path / "run")
    before = _snapshot(out)
    assert any(p.parts[0] == "checkpoints" for p in before)
    data = write_synthetic_folder(tmp_path / "data", n_train=4, n_val=2, seed=0, size=32)
    broken = sorted((data / "images" / "train").iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:40])
    args = [*TRAIN[:4], str(data), "--split", "train", "--eval-split", "validation",
            "--no-reduce-labels", *TRAIN[9:], "-o", str(out), "--overwrite"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert broken.name in result.output
    assert _snapshot(out) == before  # the old checkpoints and model, byte for byte


def test_resume_refuses_options_that_contradict_the_recorded_run(finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = _snapshot(out)
    args = [*TRAIN, "-o", str(out), "--resume", "--max-steps", "4", "--batch-size", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "--max-steps (made with max_steps=2, given 4)" in result.output
    assert "--batch-size (made with batch_size=2, given 4)" in result.output
    assert "--image-size" not in result.output  # only what differs is named
    assert _snapshot(out) == before  # train_args.json still says how the model was made
    # The same options resume (nothing left to train: it re-evaluates and rewrites).
    result = CliRunner().invoke(main, [*TRAIN, "-o", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_args.json").read_text())["max_steps"] == 2


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_from_a_corrupt_checkpoint_names_the_file(name, finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "run")
    bad = out / "checkpoints" / "checkpoint-2" / name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    result = CliRunner().invoke(main, [*TRAIN, "-o", str(out), "--resume"])
    assert result.exit_code == 2, result.output
    assert f"error: {bad}: " in result.output and "unexpected" not in result.output


@pytest.mark.parametrize("inside", [".", "images", "runs/model"])
def test_train_output_inside_the_dataset_folder_is_refused_before_work(inside, tmp_path):
    """Issue 22, item 5: checkpoints and plots among the dataset's images broke the next
    training on it."""
    from segdeploy.data.synthetic import write_synthetic_folder

    data = write_synthetic_folder(tmp_path / "data", n_train=4, n_val=2, seed=0, size=32)
    before = _snapshot(data)
    args = [*TRAIN[:4], str(data), "--split", "train", "--eval-split", "validation",
            "--no-reduce-labels", *TRAIN[9:], "-o", str(data / inside)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "--output-dir" in result.output and "inside the dataset folder" in result.output
    assert _snapshot(data) == before and not (data / "runs").exists()


def test_train_output_under_a_file_is_refused_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    result = CliRunner().invoke(main, [*TRAIN, "-o", str(blocker / "run")])
    assert result.exit_code == 2, result.output
    assert f"error: {blocker}: is a file" in result.output and blocker.read_text() == "mine"


@NEED_ROOT
def test_train_into_a_read_only_folder_is_refused_before_work(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    rc, err, _, _ = _in_mount(str(mount), [*TRAIN, "-o", f"{mount}/run"], ro=True)
    assert rc == 2, err
    assert f"error: {mount}: cannot write --output-dir here: Read-only file system" in err
    assert "eval_loss" not in err  # refused before training


@NEED_ROOT
def test_a_full_disk_at_a_checkpoint_names_the_folder_and_the_reason(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    # 2 MB: room for the probe and the weights, not for the optimizer state.
    rc, err, _, _ = _in_mount(str(mount), [*TRAIN, "-o", f"{mount}/run"], size="2m")
    assert rc == 2, err
    assert f"error: {mount}/run/checkpoints: No space left on device" in err
    assert "error: unexpected" not in err
