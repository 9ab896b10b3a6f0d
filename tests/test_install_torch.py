"""`make install`'s torch step (scripts/install_torch.sh): the CPU build without a GPU.

Run with a stand-in pip (it records its arguments and fails on the index it is
told to fail on) and a stand-in python, so the index choice and the fallback
are checked offline, without installing anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_torch.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _run(tmp_path: Path, *, fail_on: str = "", gpu: bool = False, **env: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    pip = bin_dir / "pip"
    pip.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        f'case "$*" in *"{fail_on or "@never@"}"*) exit 1;; esac\nexit 0\n'
    )
    python = bin_dir / "python"
    python.write_text("#!/bin/sh\necho '2.13.0+cpu (CPU build)'\n")
    for tool in (pip, python):
        tool.chmod(0o755)
    path = [str(bin_dir) if gpu else "", "/usr/bin", "/bin"]
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={
            "PATH": os.pathsep.join(p for p in path if p),
            "PIP": str(pip),
            "PYTHON": str(python),
            "TORCH": "torch==2.13.0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, lines


def test_without_a_gpu_torch_comes_from_the_cpu_index(tmp_path):
    result, calls = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls == [
        f"install --quiet --retries 1 --timeout 30 --index-url {CPU_INDEX} torch==2.13.0"
    ]
    assert f"torch: installed 2.13.0+cpu (CPU build) (pip index: {CPU_INDEX})" in result.stdout


def test_an_unreachable_cpu_index_falls_back_to_the_default_index(tmp_path):
    result, calls = _run(tmp_path, fail_on=CPU_INDEX)
    assert result.returncode == 0, result.stderr
    assert calls[-1] == "install --quiet torch==2.13.0" and len(calls) == 2
    assert "trying pip's default index" in result.stderr
    assert "(pip index: pip's default index (fallback))" in result.stdout


@pytest.mark.parametrize(
    ("env", "gpu", "index"),
    [
        ({}, True, None),  # nvidia-smi found: PyPI's (CUDA) build
        ({"TORCH_INDEX": "pypi"}, False, None),
        ({"TORCH_INDEX": "https://download.pytorch.org/whl/cu126"}, False, "whl/cu126"),
    ],
)
def test_the_index_can_be_chosen(tmp_path, env, gpu, index):
    result, calls = _run(tmp_path, gpu=gpu, **env)
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1
    if index is None:
        assert calls[0] == "install --quiet torch==2.13.0"
    else:
        assert calls[0].endswith(f"--index-url https://download.pytorch.org/{index} torch==2.13.0")


def test_a_failing_default_index_fails_the_install(tmp_path):
    result, _ = _run(tmp_path, fail_on="torch==", TORCH_INDEX="pypi")
    assert result.returncode != 0 and "installed" not in result.stdout
