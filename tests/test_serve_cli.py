"""The `segdeploy serve` command as a user runs it: refusals before Ray starts (exit 2),
overload (503 + Retry-After), and Ctrl-C / SIGTERM: the requests inside are answered,
then the command exits 0 and no Ray process outlives it."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from serve_helpers import ROOT, free_port, photo_bytes, ray_environment, wait_gone

httpx = pytest.importorskip("httpx")


def run_cli(*args: str, code: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """`segdeploy ARGS` in a fresh interpreter, after running `code` there."""
    script = code + "\nimport sys\nfrom segdeploy.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


#: Makes every `import ray...` fail, as on a machine without the serve extra.
NO_RAY = textwrap.dedent(
    """
    import importlib.abc, sys
    class _NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _NoRay())
    """
)


def test_without_the_extra_it_exits_2_with_the_install_line(tiny_onnx_dir):
    proc = run_cli("serve", "--model", str(tiny_onnx_dir), "--port", str(free_port()), code=NO_RAY)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'segdeploy[serve]'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "no/such/folder"], "model folder not found"),
        (["--replicas", "3-1"], "--replicas"),
        (["--replicas", "two"], "--replicas"),
        (["--variant", "int8"], "no model_int8.onnx"),
    ],
)
def test_refusals_exit_2_before_ray_starts(tiny_onnx_dir, args, words):
    model = [] if "--model" in args else ["--model", str(tiny_onnx_dir)]
    proc = run_cli("serve", *model, "--port", str(free_port()), *args)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_a_port_in_use_is_refused(tiny_onnx_dir):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = run_cli("serve", "--model", str(tiny_onnx_dir), "--port", str(port))
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def _start(tiny_onnx_dir, port: int, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "segdeploy", "serve", "--model", str(tiny_onnx_dir)]
    cmd += ["--port", str(port), "--provider", "cpu", *args]
    # Its own session: a signal to the group reaches it and every child, as Ctrl-C does.
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("the service did not start")


def _queue_length(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^segdeploy_queue_length ([0-9.]+)", text, re.M).group(1))


def _segment(url: str) -> httpx.Response:
    data = photo_bytes("jpeg")
    return httpx.post(
        f"{url}/v1/segment", content=data, headers={"Content-Type": "image/jpeg"}, timeout=120
    )


def _overload(url: str) -> None:
    """Five requests at once to a service that holds two: three are refused at once."""
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: _segment(url), range(5)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 503, 503, 503], [r.text for r in answers]
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "--max-queue 2" in r.json()["error"]
    assert _segment(url).status_code == 200  # and the service goes on


# Ctrl-C takes the path SIGTERM takes (both set the stop event): slow, so the default
# run starts the service once here.
@pytest.mark.parametrize("how", ["SIGTERM", pytest.param("Ctrl-C", marks=pytest.mark.slow)])
def test_stop_answers_the_requests_inside_and_leaves_no_ray(tiny_onnx_dir, how):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ray_environment() as ray_dir:
        # Each batch waits 1.5 s for company: requests stay inside long enough to see.
        proc = _start(tiny_onnx_dir, port, "--batch-wait-ms", "1500", "--max-queue", "2")
        try:
            _wait_ready(proc, url)
            if how == "SIGTERM":
                _overload(url)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                inside = pool.submit(_segment, url)
                deadline = time.monotonic() + 30
                while _queue_length(url) < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _queue_length(url) == 1
                if how == "SIGTERM":
                    proc.send_signal(signal.SIGTERM)
                else:  # Ctrl-C in a terminal: SIGINT to the whole process group
                    os.killpg(proc.pid, signal.SIGINT)
                answer = inside.result(timeout=60)
            assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
            _, stderr = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, stderr[-3000:]
        assert f"(fp32) at {url} with 1 replicas" in stderr and "stopping" in stderr
        assert "Traceback" not in stderr, stderr[-3000:]
        assert not wait_gone(ray_dir), "Ray processes outlived the command"
