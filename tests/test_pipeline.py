"""The worker-process engine of `segdeploy infer` (segdeploy/runtime/pipeline.py).

Same bytes as the in-process reference path; a bad image or a dying worker is a
failure row and the run goes on; Ctrl-C, SIGTERM and a full disk leave only
complete files and a summary, and no process outlives the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdeploy.atomic import TMP_MARKER
from segdeploy.data.synthetic import synthetic_sample

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]


def _photos(root: Path, n: int, size=(120, 160), distinct: int = 6) -> Path:
    """`n` JPEG photos (copies of a few synthetic scenes, so that writing them is quick)."""
    root.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in range(distinct):
        path = root / f"scene{i:03d}.jpg"
        Image.fromarray(synthetic_sample(i, seed=3, size=size)[0]).save(path, quality=90)
        scenes.append(path.read_bytes())
    for i in range(distinct, n):
        (root / f"scene{i:03d}.jpg").write_bytes(scenes[i % distinct])
    return root


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "summary.json"
    }


def _records(out: Path) -> list[dict]:
    summary = json.loads((out / "summary.json").read_text())
    return [{k: v for k, v in r.items() if k != "time_s"} for r in summary["images"]]


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*extra.pop("prepend", []), str(ROOT), env.get("PYTHONPATH", "")]
    )
    return {**env, "PYTHONFAULTHANDLER": "1", **extra}


def _infer_cmd(model: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "segdeploy",
        "-q",
        "infer",
        "--model",
        str(model),
        "--provider",
        "cpu",
        "--threads",
        "1",
        str(inputs),
        "-o",
        str(out),
        *extra,
    ]


class Watched:
    """A subprocess whose descendants are recorded while it runs, so that the test can
    check afterwards that none of them outlived it."""

    def __init__(self, cmd: list[str], **kw):
        # Files, not pipes: a pipe stays open as long as any descendant lives. They live
        # as long as this object, hence no `with`.
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, text=True, **kw
        )
        self.seen: set[int] = set()

    def look(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen.update(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.look()
            time.sleep(0.02)
        if self.proc.poll() is None:  # hung: dump its threads' stacks (faulthandler) and fail
            self.proc.send_signal(signal.SIGABRT)
        self.proc.wait(timeout=30)
        self._out.seek(0)
        self._err.seek(0)
        return self.proc.returncode, self._out.read(), self._err.read()

    def survivors(self, grace: float = 5.0) -> list[str]:
        """Descendants still alive `grace` seconds after the process ended (the fork server
        and resource tracker exit when they see their parent's pipe close)."""
        deadline = time.monotonic() + grace
        while True:
            alive = []
            for pid in self.seen:
                try:
                    p = psutil.Process(pid)
                    if p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
                except psutil.NoSuchProcess:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.05)


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    """Enough 480x360 photos that a run lasts a few seconds: time to interrupt it."""
    return _photos(tmp_path_factory.mktemp("many") / "photos", 500, size=(360, 480))


def test_worker_processes_write_the_same_bytes_as_the_serial_path(tiny_onnx_dir, tmp_path):
    from segdeploy.runtime.infer import run_infer

    root = _photos(tmp_path / "photos", 14, size=(90, 130))
    Image.fromarray(synthetic_sample(9, size=(50, 70))[0]).convert("L").save(root / "gray.png")
    kwargs = dict(provider="cpu", batch_size=3, threads=1, overlay=True, progress=False)
    serial = run_infer([root], tiny_onnx_dir, tmp_path / "serial", workers=0, **kwargs)
    pooled = run_infer([root], tiny_onnx_dir, tmp_path / "pooled", workers=2, **kwargs)
    a, b = _files(tmp_path / "serial"), _files(tmp_path / "pooled")
    assert len(a) == 2 * 15 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert _records(tmp_path / "serial") == _records(tmp_path / "pooled")
    for result, workers in ((serial, 0), (pooled, 2)):
        totals = result["totals"]
        assert totals["images"] == 15 and totals["workers"] == workers
        stages = totals["stage_ms_per_image"]
        assert {"decode", "preprocess", "model", "upsample_argmax", "png_encode"} <= stages.keys()
        assert all(v > 0 for k, v in stages.items() if k != "class_shares")
        assert totals["bound_by"] in stages


SITECUSTOMIZE = """
# Test double: a worker process that opens an image named crash-me dies at once,
# as a decoder crash or the OOM killer would kill it.
import os
from PIL import Image

_open = Image.open


def _crashing_open(fp, *args, **kwargs):
    if "crash-me" in str(fp):
        os._exit(3)
    return _open(fp, *args, **kwargs)


Image.open = _crashing_open
"""


def test_a_bad_image_or_a_dying_worker_is_a_failure_row_and_the_run_goes_on(
    tiny_onnx_dir, tmp_path
):
    root = _photos(tmp_path / "photos", 24)
    shutil.copy(root / "scene001.jpg", root / "crash-me.jpg")
    (root / "cut.jpg").write_bytes((root / "scene002.jpg").read_bytes()[:500])
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"
    run = Watched(
        _infer_cmd(tiny_onnx_dir, root, out, "--workers", "2", "--batch-size", "4"),
        env=_env(prepend=[str(hook)]),
    )
    code, stdout, stderr = run.wait()
    assert code == 1, stderr
    summary = json.loads((out / "summary.json").read_text())
    reasons = {Path(f["input"]).name: f["reason"] for f in summary["failures"]}
    assert reasons.keys() == {"crash-me.jpg", "cut.jpg"}, reasons
    assert reasons["crash-me.jpg"] == "worker process died while processing this image"
    assert reasons["cut.jpg"].startswith("corrupt or truncated image")
    assert summary["totals"]["images"] == 24 and summary["totals"]["failed"] == 2
    assert len(list(out.rglob("*.png"))) == 24
    assert "crash-me.jpg" in stderr and "Traceback" not in stderr
    assert run.seen and not run.survivors()


def _run_until_labels(model: Path, photos: Path, out: Path) -> tuple[Watched, Path]:
    """`segdeploy infer` with two workers on `photos`, started in its own session and
    returned once its first label map is written (its workers are running)."""
    run = Watched(
        _infer_cmd(model, photos, out, "--workers", "2", "--batch-size", "2"),
        env=_env(),
        start_new_session=True,
    )
    labels = out / photos.name
    deadline = time.monotonic() + 60
    while not (labels.is_dir() and any(labels.glob("*.png"))) and time.monotonic() < deadline:
        run.look()
        time.sleep(0.01)
    run.look()
    return run, labels


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_leaves_complete_files_a_summary_and_no_process(
    how, tiny_onnx_dir, many_photos, tmp_path
):
    """Ctrl-C reaches the whole process group (workers too); `kill` only the parent."""
    from segdeploy.runtime.infer import run_infer

    out = tmp_path / "out"
    run, labels = _run_until_labels(tiny_onnx_dir, many_photos, out)
    if how == "ctrl-c":
        os.killpg(run.proc.pid, signal.SIGINT)
    else:
        os.kill(run.proc.pid, signal.SIGTERM)
    code, _, stderr = run.wait()
    assert code == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    written = sorted(labels.glob("*.png"))
    assert 0 < len(written) < 500, "the signal came after the run ended: make it longer"
    assert summary["totals"]["images"] == len(written)
    assert not list(out.rglob(f"*{TMP_MARKER}*"))
    for path in written:  # complete files only
        with Image.open(path) as im:
            assert np.asarray(im).shape == (360, 480)
    assert len(run.seen) >= 2  # the worker processes were there
    assert not run.survivors()

    # --skip-existing completes every output, identical to an uninterrupted run
    resumed = run_infer(
        [many_photos], tiny_onnx_dir, out, provider="cpu", threads=1, skip_existing=True
    )
    assert resumed["totals"]["skipped"] == len(written)
    assert resumed["totals"]["images"] == 500 - len(written)
    if how == "sigterm":  # one byte comparison is enough (the reference costs a full run)
        reference = tmp_path / "reference"
        run_infer([many_photos], tiny_onnx_dir, reference, provider="cpu", threads=1, workers=0)
        assert _files(out) == _files(reference)
    else:
        assert len(list(labels.glob("*.png"))) == 500


def test_a_killed_run_leaves_no_process(tiny_onnx_dir, many_photos, tmp_path):
    """SIGKILL (or the OOM killer) gives the run no chance to stop its workers, whose
    parent is the fork server: they end by themselves (runtime/lifeline.py), and with
    them the fork server and the resource tracker. Before, all three ran on forever."""
    from segdeploy.runtime.lifeline import GRACE_S

    run, labels = _run_until_labels(tiny_onnx_dir, many_photos, tmp_path / "out")
    try:
        os.kill(run.proc.pid, signal.SIGKILL)
        code, _, _ = run.wait()
        assert code == -signal.SIGKILL
        assert len(list(labels.glob("*.png"))) < 500, "killed after the end: make it longer"
        assert len(run.seen) >= 3  # the fork server and two workers were there
        assert not run.survivors(grace=GRACE_S + 5)
    finally:  # a failure must not leave them running either
        for pid in run.seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _can_mount_tmpfs(where: Path) -> str | None:
    """Why a private tmpfs cannot be mounted here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mount a tmpfs in a private mount namespace); CI runs as root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", str(where)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs here: {probe.stderr.strip()}"
    return None


def test_a_full_disk_stops_the_run(tiny_onnx_dir, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    reason = _can_mount_tmpfs(mnt)
    if reason:
        pytest.skip(reason)
    root = _photos(tmp_path / "photos", 120, size=(360, 480), distinct=12)
    kept = tmp_path / "kept"
    script = textwrap.dedent(
        """
        mount -t tmpfs -o size=200k tmpfs "$1" || exit 99
        out="$2"
        kept="$3"
        shift 3
        "$@"
        rc=$?
        cp -a "$out" "$kept" 2>/dev/null
        exit $rc
        """
    )
    out = mnt / "out"
    cmd = _infer_cmd(tiny_onnx_dir, root, out, "--workers", "2")
    run = Watched(
        ["unshare", "-m", "sh", "-c", script, "sh", str(mnt), str(out), str(kept), *cmd],
        env=_env(),
    )
    code, _, stderr = run.wait()
    assert code == 1, stderr
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert str(out) in lines[0] and "No space left on device" in lines[0]
    assert "the run stopped after" in lines[0]
    # at most the one image that hit the full disk is a failure, not one per image
    assert sum("No space left on device" in x for x in stderr.splitlines()) <= 3, stderr
    assert not list(kept.rglob(f"*{TMP_MARKER}*"))
    labels = list(kept.rglob("*.png"))
    assert 0 < len(labels) < 120
    for path in labels:
        with Image.open(path) as im:
            assert np.asarray(im).shape == (360, 480)
    if (kept / "summary.json").is_file():  # written when it fits
        summary = json.loads((kept / "summary.json").read_text())
        assert "No space left on device" in summary["stopped"]
        assert summary["totals"]["images"] == len(labels)
    else:
        assert "summary.json" in lines[0]
    assert not run.survivors()


def test_small_inputs_go_to_the_workers_in_larger_tasks_and_large_ones_do_not():
    """Tasks carry up to CHUNK_BYTES of model input: a 64-px input (48 KiB) goes 32 images
    at a time, a 512-px one (3 MiB) stays at MIN_CHUNK so memory does not grow; a batch is
    never split; in-process, a task is one batch."""
    from segdeploy.runtime.pipeline import CHUNK_BYTES, MAX_CHUNK, MIN_CHUNK, chunk_size

    small, large = 3 * 64 * 64 * 4, 3 * 512 * 512 * 4
    assert chunk_size(4, 2, small) == MAX_CHUNK
    assert chunk_size(4, 2, large) == MIN_CHUNK and MIN_CHUNK * large > CHUNK_BYTES
    assert chunk_size(4, 2, 3 * 128 * 128 * 4) == 21  # 4 MiB of 192-KiB inputs
    assert chunk_size(4, 2, None) == MIN_CHUNK  # inputs that follow each image's size
    assert chunk_size(64, 2, small) == 64
    assert chunk_size(4, 0, small) == 4
