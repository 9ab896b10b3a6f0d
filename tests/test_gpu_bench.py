"""The GPU benchmark script runs its full path on the CPU (`--device cpu`), so it cannot rot
on machines without a GPU; only its numbers need a GPU."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from segdeploy.data.synthetic import synthetic_samples

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


def test_gpu_bench_runs_on_cpu_and_reports_agreement(tiny_model_dir, tiny_onnx_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(tiny_onnx_dir, model / "onnx")
    images = tmp_path / "images"
    images.mkdir()
    for i, (img, _) in enumerate(synthetic_samples(3, seed=1, size=(70, 90))):
        Image.fromarray(img).save(images / f"{i}.jpg")

    cmd = [
        sys.executable,
        str(SCRIPT),
        "--model",
        str(model),
        "--images",
        str(images),
        "--device",
        "cpu",
        "--runs",
        "1",
        "--batch-sizes",
        "2",
        "--backends",
        "torch-fp32,ort-fp32,ort-fp16",
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    (report_file,) = (tmp_path / "out").glob("gpu-*.json")
    rows = {r["backend"]: r for r in json.loads(report_file.read_text())["rows"]}
    assert rows["torch-fp32"]["agreement_vs_torch_fp32"] == 1.0
    assert rows["ort-fp32"]["agreement_vs_torch_fp32"] > 0.999
    assert (
        rows["ort-fp32"]["images_per_s"] > 0
        and rows["ort-fp32"]["p95_ms"] >= rows["ort-fp32"]["p50_ms"]
    )
    assert "no model_fp16.onnx" in rows["ort-fp16"]["skipped"]
    assert (tmp_path / "out" / report_file.with_suffix(".md").name).is_file()
