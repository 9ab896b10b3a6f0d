"""`infer --engine ray` the way a careless or unlucky user meets it (issue 22, items 7 and 9).

- An address where no Ray cluster answers (a closed port, an HTTP server) is one line
  and exit status 2 after `--ray-timeout`, not Ray's ten minutes of retries.
- Ctrl-C and SIGTERM stop a run as they stop the local engine's: exit status 130,
  summary.json marked interrupted and holding every complete output on disk (outputs
  whose records had not reached the driver too), no temporary left, no process left.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdeploy.atomic import TMP_MARKER
from segdeploy.data.synthetic import synthetic_sample

# Not imported here: a test module that imports Ray when collected decides Ray's
# settings for every module after it.
if importlib.util.find_spec("ray") is None:
    pytest.skip("the ray extra is not installed", allow_module_level=True)
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, "PYTHONFAULTHANDLER": "1"}


def _cmd(model: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "segdeploy", "infer", "--engine", "ray", "--model", str(model),
        "--provider", "cpu", "--threads", "1", str(inputs), "-o", str(out), *extra,
    ]  # fmt: skip


def _closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_port():
    """An HTTP server on the loopback: it answers, but not as Ray does."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("where", ["closed port", "http server"])
def test_an_address_where_no_ray_answers_is_one_line_after_the_timeout(
    where, request, tiny_onnx_dir, tmp_path
):
    from test_pipeline import Watched

    port = request.getfixturevalue("http_port") if where == "http server" else _closed_port()
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    start = time.monotonic()
    run = Watched(
        _cmd(tiny_onnx_dir, tmp_path / "a.png", out,
             "--ray-address", f"127.0.0.1:{port}", "--ray-timeout", "2"),
        env=_env(),
    )  # fmt: skip
    code, _, stderr = run.wait(timeout=60)  # before the fix: 10+ minutes
    took = time.monotonic() - start
    assert code == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: --ray-address: cannot join 127.0.0.1:{port}: "), lines
    assert "for 2 s" in lines[-1]
    reason = "not a Ray cluster" if where == "http server" else "nothing listens"
    assert reason in lines[-1]
    assert not [line for line in lines if line.startswith("[")], "Ray's C++ lines"
    assert took < 30 and not out.exists() and not run.survivors()


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory) -> Path:
    """60 photos of 600x800 (copies of a few scenes): a run of some seconds."""
    root = tmp_path_factory.mktemp("large") / "in"
    root.mkdir()
    scenes = []
    for i in range(4):
        path = root / f"p{i:03d}.jpg"
        Image.fromarray(synthetic_sample(i, seed=7, size=(600, 800))[0]).save(path, quality=90)
        scenes.append(path.read_bytes())
    for i in range(4, 60):
        (root / f"p{i:03d}.jpg").write_bytes(scenes[i % 4])
    return root


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_signal_leaves_every_complete_output_in_the_summary(
    how, tiny_onnx_dir, large_photos, tmp_path
):
    """Before: after Ctrl-C summary.json said `images: []`, `provider: auto` beside
    complete PNGs; after SIGTERM Ray's handler printed a traceback and exited 15."""
    from test_pipeline import Watched

    out = tmp_path / "out"
    run = Watched(
        _cmd(tiny_onnx_dir, large_photos, out, "--batch-size", "1"),
        env=_env(), start_new_session=True,
    )  # fmt: skip
    labels = out / large_photos.name
    deadline = time.monotonic() + 180  # a private Ray starts first
    while time.monotonic() < deadline and run.proc.poll() is None:
        run.look()
        if labels.is_dir() and len(list(labels.glob("*.png"))) >= 2:
            break
        time.sleep(0.02)
    if how == "ctrl-c":  # a terminal's Ctrl-C reaches the whole process group
        os.killpg(run.proc.pid, signal.SIGINT)
    else:
        os.kill(run.proc.pid, signal.SIGTERM)
    code, _, stderr = run.wait(timeout=120)
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted"
    summary = json.loads((out / "summary.json").read_text())
    written = sorted(labels.glob("*.png"))
    assert 2 <= len(written) < 60, "the signal came after the run ended: make it longer"
    assert summary["interrupted"] is True and summary["provider"] == "cpu"
    assert summary["totals"]["images"] == len(written)
    assert sorted(r["output"] for r in summary["images"]) == sorted(
        str(p.relative_to(out)) for p in written
    )
    for path in written:  # complete files only
        with Image.open(path) as im:
            assert np.asarray(im).shape == (600, 800)
    assert not list(out.rglob(f"*{TMP_MARKER}*"))
    assert not run.survivors(grace=15), "Ray processes outlived the command"
