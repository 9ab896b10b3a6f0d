"""The model folder that `segdeploy train` writes, and its checkpoint rules.

The output folder only becomes a model folder at the very end: the final files
are moved in one by one, config.json and then metrics.json last, so a crash
leaves checkpoints to `--resume` from but nothing that `export` would take for a
finished model. Runs never mix in one folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segdeploy.atomic import TMP_MARKER, default_mode, write_json
from segdeploy.errors import SegdeployError
from segdeploy.folders import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    RUN_RECORD_FILE,
    TRAIN_ARGS_FILE,
    is_trained_folder,
)
from segdeploy.train.config import RUN_OPTIONS, TrainConfig
from segdeploy.train.models import check_weight_file
from segdeploy.train.plots import plot_training_curves

CHECKPOINTS = CHECKPOINTS_DIR
RUN_RECORD = RUN_RECORD_FILE  # in checkpoints/: what the checkpoints were made with, for --resume
FINAL_LAST = (CONFIG_FILE, METRICS_FILE)  # moved in last, in this order


def is_finished_model(folder: str | os.PathLike) -> bool:
    """A folder that `segdeploy train` completed: metrics.json is written last."""
    return is_trained_folder(Path(folder))


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint-N with the highest N (trainer_state.json is saved last)."""
    if not checkpoints.is_dir():
        return None
    found = []
    for p in checkpoints.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def write_model_folder(
    out: Path,
    model,
    processor,
    metrics: dict[str, Any],
    train_args: dict[str, Any],
    log_history: list[dict[str, Any]],
) -> None:
    """Write the final files into `out` so that it is a model folder only once all are there.

    Everything is written into a staging folder beside the checkpoints first;
    the old config.json and metrics.json go, then the files move in, config.json
    and metrics.json last. At any moment `out` is either the previous complete
    model, a folder without config.json (not loadable), or the new complete model.
    """
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".final{TMP_MARKER}", dir=out))
    try:
        model.save_pretrained(stage, safe_serialization=True)
        processor.save_pretrained(stage)
        plot_training_curves(log_history, stage / CURVES_FILE)
        write_json(stage / TRAIN_ARGS_FILE, train_args)
        write_json(stage / METRICS_FILE, metrics)
        for name in reversed(FINAL_LAST):
            (out / name).unlink(missing_ok=True)
        names = sorted(p.name for p in stage.iterdir() if p.name not in FINAL_LAST)
        for name in [*names, *FINAL_LAST]:
            # safetensors writes the weights private (0600); a model folder is for sharing.
            os.chmod(stage / name, default_mode("file"))
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def check_checkpoint(checkpoint: Path) -> None:
    """SegdeployError naming the first corrupt file of the checkpoint --resume would load."""
    for path in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        if path.suffix in (".safetensors", ".json", ".bin", ".pt", ".pth"):
            check_weight_file(path)


def check_output_dir(out: Path, config: TrainConfig) -> Path | None:
    """Refuse to mix runs in one folder; return the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise SegdeployError(out, "exists and is not a folder; choose another --output-dir")
    checkpoints = out / CHECKPOINTS
    newest = newest_checkpoint(checkpoints)
    if config.resume:
        if config.overwrite:
            raise SegdeployError("--resume", "cannot be combined with --overwrite")
        if newest is None:
            raise SegdeployError(
                "--resume", f"no checkpoint to resume from under {checkpoints} (start without it)"
            )
        return newest
    if config.overwrite:
        return None
    if is_finished_model(out):
        raise SegdeployError(
            out,
            "already holds a trained model; pass --overwrite to replace it, "
            "or choose another --output-dir",
        )
    if newest is not None:
        raise SegdeployError(
            out,
            f"holds checkpoints of an unfinished run (newest {newest.name}); "
            "pass --resume to continue it or --overwrite to start afresh",
        )
    return None


def check_outside_dataset(out: Path, dataset: str) -> None:
    """Refuse an output folder in (or at) a local dataset folder: checkpoints, plots and
    weights would land among its images and annotations, and the next training on it
    would read them as data."""
    data = Path(dataset).expanduser()
    if not data.is_dir():
        return  # synthetic, a Hub id, or not found (load_splits says so)
    data, target = data.resolve(), out.resolve()
    if target == data or data in target.parents:
        raise SegdeployError(
            "--output-dir",
            f"{out} is inside the dataset folder {data}; choose a folder outside it",
        )


def clear_previous_run(out: Path) -> None:
    # The old final files stay until the new ones replace them (write_model_folder);
    # old checkpoints would be mistaken for this run's by --resume and by rotation.
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def check_same_run(out: Path, record: dict[str, Any]) -> None:
    """Refuse --resume with options that contradict the recorded run, naming each one.

    Any contradiction is refused (none is allowed to change on resume): otherwise
    train_args.json would record options the model was not trained with. Records
    written before an option was recorded are not held to it.
    """
    path = out / CHECKPOINTS / RUN_RECORD
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # checkpoints from elsewhere: the Trainer's own checks still apply
    differ = [
        f"{RUN_OPTIONS.get(key, key)} (made with {key}={saved[key]!r}, given {value!r})"
        for key, value in record.items()
        if key in saved and saved[key] != value
    ]
    if differ:
        raise SegdeployError(
            "--resume",
            f"the checkpoints in {out / CHECKPOINTS} were made with other options: "
            + "; ".join(differ)
            + ". Repeat the original options, or start afresh with --overwrite",
        )
