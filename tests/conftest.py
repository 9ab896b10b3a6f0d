"""Shared fixtures. Tests never reach a hub: they make their own data and tiny models."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from pathlib import Path

import pytest

# One thread per test process: with OpenMP spin-waits, 2 threads on a busy 2-core
# machine made training 10-25x slower than 1. And make sure no
# test can wait on a network that is not there.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The test process ends with os._exit once pytest has reported, keeping its status.
# Why: CI's run of 2026-12-07 reported "881 passed", then the process died of SIGSEGV
# in interpreter teardown (make: "Segmentation fault"; not reproduced here in repeated
# runs). This one process has started and stopped Ray several times, loaded
# onnxruntime, OpenVINO, torch and PyAV, and Ray names teardown segfaults from
# restarting it in one process (ray-project/ray#31145). Every user command runs in a
# process of its own, and tests run it that way too. Registered now, before any test
# imports those libraries, so their own atexit handlers (ray.shutdown,
# multiprocessing's children) still run first; only teardown after them is skipped.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _EXIT_STATUS[:] = [int(exitstatus)]


@atexit.register
def _exit_without_teardown() -> None:
    if not _EXIT_STATUS:  # pytest did not finish a session: the usual exit
        return
    logging.shutdown()  # registered before this handler (imported by pytest): would run after
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_EXIT_STATUS[0])


CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.fixture(scope="session")
def camvid() -> Path:
    """The real CamVid folder beside the repo; real-data tests are marked slow."""
    if not (CAMVID / "images").is_dir():
        pytest.skip(f"real data not present at {CAMVID}")
    return CAMVID


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the ADE20K folder layout."""
    from segdeploy.data.synthetic import write_synthetic_folder

    return write_synthetic_folder(
        tmp_path_factory.mktemp("synthetic"), n_train=24, n_val=8, seed=0, size=64
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model folder: `scratch:tiny` SegFormer, random weights, 5 classes, 64x64 input."""
    import torch
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from segdeploy.data.synthetic import ID2LABEL
    from segdeploy.train.models import scratch_config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_model")
    model = SegformerForSemanticSegmentation(scratch_config("tiny", ID2LABEL)).eval()
    model.save_pretrained(out)
    SegformerImageProcessor(
        size={"height": 64, "width": 64}, do_reduce_labels=False
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """`tiny_model_dir` exported by Optimum at opset 17: model.onnx, config.json, preprocessor_config.json."""
    from optimum.exporters.onnx import main_export

    out = tmp_path_factory.mktemp("tiny_onnx")
    main_export(str(tiny_model_dir), output=out, task="semantic-segmentation", opset=17)
    return out
