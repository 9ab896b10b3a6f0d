"""What `segdeploy train` runs with: TrainConfig (the one source of its defaults), the
result, and the checks of its numbers that need no torch."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segdeploy.data import DatasetSpec
from segdeploy.errors import SegdeployError
from segdeploy.folders import MODELS_ROOT
from segdeploy.train.models import is_pretrained

# The guide's learning rate, for pretrained encoders; random weights need far more.
PRETRAINED_LR = 6e-5
SCRATCH_LR = 2e-3
#: TrainConfig fields recorded in run.json as they are given (besides model, dataset,
#: image size and the resolved lr).
RECORDED_CONFIG = ("epochs", "max_steps", "batch_size", "eval_steps", "seed", "augment")
#: What run.json records that --resume must repeat, and the options that set it.
RUN_OPTIONS = {
    "model": "--model",
    "dataset": "the dataset options (--dataset, --split, --eval-split, ...)",
    "image_size": "--image-size",
    "epochs": "--epochs",
    "max_steps": "--max-steps",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "eval_steps": "--eval-steps",
    "seed": "--seed",
    "augment": "--augment/--no-augment",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything `segdeploy train` does, as explicit values (the CLI options one to one).

    lr=None picks PRETRAINED_LR for a Hub or local model and SCRATCH_LR for
    scratch:*; image_size=None takes the processor's (512 for SegFormer, a BEiT's config size);
    max_steps=None trains for `epochs`. output_dir=None is
    models/<model-name>-<dataset-name>.
    """

    model: str = "nvidia/mit-b0"
    dataset: DatasetSpec = field(
        default_factory=lambda: DatasetSpec("scene_parse_150", split="train[:50]")
    )
    output_dir: str | None = None
    epochs: float = 50.0
    max_steps: int | None = None
    batch_size: int = 2
    lr: float | None = None
    eval_steps: int = 20
    image_size: int | None = None
    seed: int = 42
    resume: bool = False
    overwrite: bool = False
    augment: bool = True
    push_to_hub: bool = False
    hub_model_id: str | None = None
    save_total_limit: int = 3
    workers: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "dataset": self.dataset.to_dict()}


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]  # the final evaluation, as written to metrics.json
    steps: int
    seconds: float
    best_mean_iou: float | None
    best_step: int | None
    log_history: list[dict[str, Any]]
    is_main_process: bool  # False on the other ranks of a distributed run
    resumed_from: str | None = None
    pushed_to: str | None = None


def default_output_dir(model: str, dataset: str) -> Path:
    """models/<model-name>-<dataset-name>, e.g. models/mit-b0-scene_parse_150."""

    def short(name: str) -> str:
        name = name.rstrip("/\\").replace("scratch:", "scratch-")
        name = re.split(r"[/\\]", name)[-1] or "model"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name)

    return Path(MODELS_ROOT) / f"{short(model)}-{short(dataset)}"


def resolve_lr(config: TrainConfig) -> float:
    if config.lr is not None:
        return config.lr
    return PRETRAINED_LR if is_pretrained(config.model) else SCRATCH_LR


def check_numbers(c: TrainConfig) -> None:
    checks = [
        ("--batch-size", c.batch_size, c.batch_size >= 1, "a positive integer"),
        ("--eval-steps", c.eval_steps, c.eval_steps >= 1, "a positive integer"),
        ("--epochs", c.epochs, c.epochs > 0, "a positive number"),
        (
            "--max-steps",
            c.max_steps,
            c.max_steps is None or c.max_steps >= 1,
            "a positive integer",
        ),
        ("--lr", c.lr, c.lr is None or (0 < c.lr < 1), "a learning rate in (0, 1)"),
        (
            "--image-size",
            c.image_size,
            c.image_size is None or 32 <= c.image_size <= 4096,
            "a side length in pixels, 32..4096",
        ),
        ("--workers", c.workers, c.workers >= 0, "0 or more"),
    ]
    for option, value, ok, want in checks:
        if not ok:
            raise SegdeployError(option, f"must be {want}, got {value}")
