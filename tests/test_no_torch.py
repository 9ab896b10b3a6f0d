"""Deployment machines have no torch: `import segdeploy`, `Segmenter` and `segdeploy infer`
must not import torch or transformers. Checked in fresh interpreters (this test
process has both loaded already)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from PIL import Image

HEAVY = ("torch", "transformers")

REPORT = textwrap.dedent(
    """
    import json, sys
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
    print("HEAVY=" + json.dumps(heavy))
    """
).format(heavy=set(HEAVY))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def heavy_modules(stdout: str) -> list[str]:
    line = [x for x in stdout.splitlines() if x.startswith("HEAVY=")][-1]
    return json.loads(line[len("HEAVY=") :])


def test_import_segdeploy_and_runtime_is_torch_free():
    code = (
        "import segdeploy\n"
        "segdeploy.Segmenter, segdeploy.upsample_argmax\n"
        "import segdeploy.runtime.image_io, segdeploy.runtime.preprocess, segdeploy.runtime.providers\n"
        "import segdeploy.runtime.upsample, segdeploy.runtime.segmenter, segdeploy.runtime.palette\n"
        "import segdeploy.runtime.infer, segdeploy.cli\n"
        "import segdeploy.runtime.video, segdeploy.runtime.video_out, segdeploy.runtime.clips\n"
        + REPORT
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert heavy_modules(proc.stdout) == []


def test_serve_is_torch_free():
    """`segdeploy serve` and its replicas' modules (the service runs beside no torch)."""
    code = (
        "import segdeploy.serve.settings, segdeploy.serve.model, segdeploy.serve.protocol\n"
        "import segdeploy.serve.service, segdeploy.cli.serve\n"
        "try:\n"
        "    import segdeploy.serve.app, segdeploy.serve.metrics, segdeploy.serve.deployments\n"
        "except ImportError as err:  # without the serve extra: what it needs is absent\n"
        "    assert err.name.split('.')[0] in {'ray', 'fastapi', 'prometheus_client'}, err\n"
        + REPORT
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert heavy_modules(proc.stdout) == []


def test_segmenter_predicts_without_torch(tiny_onnx_dir, tmp_path):
    Image.new("RGB", (30, 20), (90, 120, 30)).save(tmp_path / "a.png")
    code = (
        "from segdeploy import Segmenter\n"
        f"mask = Segmenter({str(tiny_onnx_dir)!r}, provider='cpu').predict({str(tmp_path / 'a.png')!r})\n"
        "assert mask.shape == (20, 30), mask.shape\n" + REPORT
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert heavy_modules(proc.stdout) == []


def test_segdeploy_infer_command_is_torch_free(tiny_onnx_dir, tmp_path):
    """The real command in a subprocess, with one bad file: its report goes to stderr."""
    (tmp_path / "in").mkdir()
    Image.new("RGB", (30, 20), (90, 120, 30)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    args = [
        "infer",
        "--model",
        str(tiny_onnx_dir),
        str(tmp_path / "in"),
        "-o",
        str(tmp_path / "out"),
    ]
    code = (
        "import sys\n"
        "from segdeploy.cli import main\n"
        f"code = main({args!r}, standalone_mode=False)\n" + REPORT + "sys.exit(code or 0)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 1, proc.stderr  # one failure
    assert heavy_modules(proc.stdout) == []
    assert "broken.jpg" in proc.stderr and "not an image" in proc.stderr
    assert (tmp_path / "out" / "in" / "a.png").is_file()
