"""A load test of `segdeploy serve` with a real load tool: locust, headless, 8 users for 30 s,
on CamVid photos (slow: real data). No request fails but the deliberately bad ones (which
get their 400), requests share model calls, and the queue is empty afterwards."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
from serve_helpers import ROOT, free_port, ray_environment, wait_gone

pytest.importorskip("ray.serve", reason="the serve extra is not installed")
# Found, not imported: locust monkey-patches ssl with gevent on import, which breaks the
# ssl already imported here (a RecursionError); it runs in a process of its own below.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (the serve-test extra)", allow_module_level=True)
httpx = pytest.importorskip("httpx")

from segdeploy.serve.service import serving  # noqa: E402
from segdeploy.serve.settings import ServeSettings  # noqa: E402

USERS, SECONDS = 8, 30


@pytest.mark.slow
def test_locust_load(camvid, tiny_onnx_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted((camvid / "images" / "val").glob("*.jpg"))[:20]:
        shutil.copy(src, photos / src.name)
    settings = ServeSettings(model_dir=str(tiny_onnx_dir), port=free_port(), provider="cpu")
    with ray_environment() as ray_dir:
        with serving(settings) as running:
            cmd = [
                sys.executable, "-m", "locust", "-f", str(ROOT / "tests" / "serve_locustfile.py"),
                "--headless", "-u", str(USERS), "-r", str(USERS), "--run-time", f"{SECONDS}s",
                "--stop-timeout", "10", "--host", running.url, "--csv", str(tmp_path / "load"),
                "--only-summary", "--exit-code-on-error", "1",
            ]  # fmt: skip
            env = {"SERVE_PHOTOS": str(photos)}
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=SECONDS + 120,
                env={**os.environ, **env},
            )  # fmt: skip
            metrics = httpx.get(f"{running.url}/metrics").text
        assert not wait_gone(ray_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "load_stats.csv", newline="") as f:
        stats = {row["Name"]: row for row in csv.DictReader(f)}
    total = stats["Aggregated"]
    assert int(total["Failure Count"]) == 0
    good = int(stats["/v1/segment"]["Request Count"])
    bad = int(stats["/v1/segment (truncated, 400 expected)"]["Request Count"])
    assert good >= 50 and bad >= 1
    calls = float(re.search(r"^segdeploy_batch_size_count (\S+)", metrics, re.M).group(1))
    images = float(re.search(r"^segdeploy_batch_size_sum (\S+)", metrics, re.M).group(1))
    assert images >= good and images / calls > 1, (calls, images)  # batches formed under load
    assert re.search(r"^segdeploy_queue_length 0\.0$", metrics, re.M)
