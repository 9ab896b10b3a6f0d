"""`segdeploy train` under torchrun: two CPU processes (gloo DDP) train one model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import evaluate_saved_model

from segdeploy.train import is_finished_model

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun not installed beside python")
def test_torchrun_two_cpu_processes_train_one_model(tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_free_port()), str(BIN / "segdeploy"), "train"]
    cmd += ["--model", "scratch:tiny", "--dataset", "synthetic:32", "--split", "train[:16]"]
    # 15 eval images over 2 ranks: the sampler pads one; the metric must not count it twice.
    cmd += ["--eval-split", "validation[:15]", "--image-size", "32", "--max-steps", "4"]
    cmd += ["--eval-steps", "2", "--batch-size", "2", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert is_finished_model(out)
    args = json.loads((out / "train_args.json").read_text())
    assert args["world_size"] == 2
    # 16 rows, 2 per process per step on 2 processes: 4 steps are exactly one epoch.
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(1.0)
    # Only rank 0 writes and prints the summary.
    assert proc.stdout.count("final mean IoU") == 1
    # The metric gathered both ranks' predictions: it equals a one-process evaluation.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_samples"] == 15
    assert evaluate_saved_model(out) == pytest.approx(metrics["mean_iou"], abs=1e-9)
