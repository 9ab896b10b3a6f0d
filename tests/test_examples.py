"""examples/: each job's script runs as a user would run it, offline, in order
(train -> export -> validate -> infer -> bench -> Ray), on a scratch folder.

Slow: the chain trains for 200 steps and starts Ray (a few minutes on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
JOBS = ["train.py", "export.py", "validate.py", "infer.py", "bench.py", "ray_infer.py"]


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(JOBS)


@pytest.mark.slow
def test_the_examples_run_in_order(tmp_path):
    from segdeploy.data.synthetic import write_synthetic_folder

    data = write_synthetic_folder(tmp_path / "shapes", n_train=40, n_val=8, size=64)
    photos = data / "images" / "validation"
    labels = data / "annotations" / "validation"
    model = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    arguments = {
        "train.py": [model, data],
        "export.py": [model],
        "validate.py": [model],
        "infer.py": [model, photos, tmp_path / "masks"],
        "bench.py": [model, photos, labels],
        "ray_infer.py": [model, photos],
    }
    outputs = {}
    for job in JOBS:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / job), *map(str, arguments[job])],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, f"{job}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        outputs[job] = result.stdout
    assert "mean IoU" in outputs["train.py"] and "after 200 steps" in outputs["train.py"]
    assert "fp32:" in outputs["export.py"] and "fp16:" in outputs["export.py"]
    assert "rules: " in outputs["validate.py"]
    assert "8 images" in outputs["infer.py"] and len(list((tmp_path / "masks").rglob("*.png"))) == 8
    assert "torch:" in outputs["bench.py"] and "onnx-cpu:" in outputs["bench.py"]
    assert outputs["ray_infer.py"].count("(64, 64)") == 8
