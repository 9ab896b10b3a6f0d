"""Fine-tune a SegFormer with the Hugging Face Trainer: the library behind `segdeploy train`.

The recipe is the Hugging Face semantic-segmentation guide's (SegFormer, AdamW,
linear decay, evaluation and checkpoints every N steps, colour jitter on the
training images), with what a robust tool adds around it:

* labels are checked and reduced by `segdeploy.data`, never by the processor;
* evaluation streams: `batch_eval_metrics=True` hands each batch to a
  confusion-matrix metric, so predictions are never accumulated in memory;
* the output folder only becomes a model folder at the very end: the final
  files are moved in one by one, config.json and then metrics.json last, so a
  crash leaves checkpoints to `--resume` from but nothing that `export` would
  take for a finished model;
* the same code runs under `torchrun` and `accelerate launch` (the Trainer
  does DDP); only the main process writes the final folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy import __version__
from segdeploy.atomic import TMP_MARKER, default_mode, write_json
from segdeploy.augment import AugmentParams, augment_pair, labels_to_image, resize_pair
from segdeploy.data import DatasetSpec, check_dataset, label_array, load_splits
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
from segdeploy.metrics import MeanIoU, finite
from segdeploy.models import (
    check_model_source,
    check_weight_file,
    hub_reachable,
    is_pretrained,
    load_model,
    load_processor,
    processor_image_size,
)
from segdeploy.plots import plot_training_curves
from segdeploy.torch_ops import upsample_bilinear
from segdeploy.writable import check_writable, environment_errors_as_input

log = logging.getLogger(__name__)

# The guide's learning rate, for pretrained encoders; random weights need far more.
PRETRAINED_LR = 6e-5
SCRATCH_LR = 2e-3
CHECKPOINTS = CHECKPOINTS_DIR
RUN_RECORD = RUN_RECORD_FILE  # in checkpoints/: what the checkpoints were made with, for --resume
FINAL_LAST = (CONFIG_FILE, METRICS_FILE)  # moved in last, in this order
SUMMARY_METRICS = ("mean_iou", "mean_accuracy", "overall_accuracy")
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
    scratch:*; image_size=None takes the processor's (512 for SegFormer);
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

    return Path("models") / f"{short(model)}-{short(dataset)}"


def resolve_lr(config: TrainConfig) -> float:
    if config.lr is not None:
        return config.lr
    return PRETRAINED_LR if is_pretrained(config.model) else SCRATCH_LR


def train(config: TrainConfig, *, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune `config.model` on `config.dataset` and write the model folder.

    `callbacks` are extra `transformers.TrainerCallback`s (tests use them to
    interrupt a run). Raises SegdeployError for bad input, before training
    starts wherever it can be known then.
    """
    # Everything that can be checked without torch is checked before importing it
    # (seconds on a busy machine), so that bad options fail at once.
    _check_numbers(config)
    out = Path(config.output_dir or default_output_dir(config.model, config.dataset.name))
    check_model_source(config.model)  # a Hub id offline fails here, before any data is read
    if config.push_to_hub:
        hub_repo = _check_can_push(config.hub_model_id or out.name)
    resume_from = _check_output_dir(out, config)
    # Read-only, full, or under a file: found now, not at the first checkpoint.
    check_writable(out, "--output-dir")
    if resume_from is not None:
        check_checkpoint(resume_from)

    import torch
    import transformers
    from transformers import Trainer, TrainerState, TrainingArguments

    from segdeploy.callbacks import EvaluateAtEnd, SyncBuffers

    lr = resolve_lr(config)
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        learning_rate=lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=max(1, config.eval_steps // 4),
        # Our transform needs the raw "image"/"annotation"/"name" columns.
        remove_unused_columns=False,
        batch_eval_metrics=True,
        report_to="none",
        seed=config.seed,
        dataloader_num_workers=config.workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=_cpu_distributed(),
        ddp_find_unused_parameters=False,  # every SegFormer parameter is used; skip the graph walk
        save_safetensors=True,
    )
    transformers.set_seed(config.seed)  # the scratch weights are drawn before the Trainer seeds

    with args.main_process_first(desc="loading the dataset"):
        data = load_splits(config.dataset)
        if len(data.train) == 0 or len(data.eval) == 0:
            raise SegdeployError(
                "--split", f"selects {len(data.train)} training and {len(data.eval)} eval rows"
            )
        # Decode everything once: a bad file fails here by name, not in a DataLoader.
        check_dataset(data)

    num_labels = len(data.id2label)
    ignore_index = data.spec.ignore_index
    processor = load_processor(config.model, config.image_size)
    image_size = processor_image_size(processor)
    # A checkpoint at or past --max-steps means training had finished (the run
    # died writing the folder): the Trainer would still run one more step.
    done = resume_from is not None and config.max_steps is not None
    done = done and _checkpoint_step(resume_from) >= config.max_steps
    source = str(resume_from) if done else config.model
    model = load_model(source, data.id2label, ignore_index=ignore_index)

    label_args = {
        "reduce_labels": bool(data.spec.reduce_labels),
        "ignore_index": ignore_index,
        "num_labels": num_labels,
    }
    train_ds = data.train.with_transform(
        make_transform(
            processor, image_size, augment=AugmentParams() if config.augment else None, **label_args
        )
    )
    eval_ds = data.eval.with_transform(
        make_transform(processor, image_size, augment=None, **label_args)
    )
    metric = StreamingMeanIoU(num_labels, ignore_index)

    record = {
        "model": config.model,
        "dataset": data.spec.to_dict(),
        "image_size": image_size,
        **{key: getattr(config, key) for key in RECORDED_CONFIG},
        "lr": lr,
    }
    if resume_from is not None:
        _check_same_run(out, record)
    else:
        # Every check has passed: only now may --overwrite remove the old checkpoints
        # (the old final files stay until complete new ones replace them).
        with args.main_process_first(desc="clearing the previous run"):
            if args.process_index == 0:
                if config.overwrite:
                    _clear_previous_run(out)
                write_json(out / CHECKPOINTS / RUN_RECORD, record)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        compute_metrics=metric,
        preprocess_logits_for_metrics=upsample_argmax,
        callbacks=[EvaluateAtEnd(), SyncBuffers(), *callbacks],
    )
    start = time.monotonic()
    if done:
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
    else:
        # A disk that fills up at a checkpoint: one line naming the file, exit 2; the
        # checkpoints saved before it stay for --resume.
        with environment_errors_as_input(out / CHECKPOINTS, "checkpoints saved before it are kept"):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if metric.last_result is None:
        trainer.evaluate()  # nothing was trained in this run: evaluate the checkpoint
    seconds = time.monotonic() - start

    history = list(trainer.state.log_history)
    metrics = _final_metrics(metric, history, data, trainer.state.global_step)
    best_iou, best_step = _best(history)
    result = TrainResult(
        output_dir=out,
        metrics=metrics,
        steps=trainer.state.global_step,
        seconds=seconds,
        best_mean_iou=best_iou,
        best_step=best_step,
        log_history=history,
        is_main_process=trainer.is_world_process_zero(),
        resumed_from=str(resume_from) if resume_from else None,
    )
    if result.is_main_process:
        train_args = {
            **record,
            "epochs": config.epochs,
            "max_steps": config.max_steps,
            "batch_size": config.batch_size,
            "world_size": args.world_size,
            "lr": lr,
            "eval_steps": config.eval_steps,
            "seed": config.seed,
            "augment": config.augment,
            "resume": config.resume,
            "push_to_hub": config.push_to_hub,
            "hub_model_id": config.hub_model_id,
            "output_dir": str(out),
            "steps": result.steps,
            "train_seconds": round(seconds, 1),
            "segdeploy_version": __version__,
            "transformers_version": transformers.__version__,
        }
        with environment_errors_as_input(out, "the previous model files, if any, are kept"):
            write_model_folder(out, trainer.model, processor, metrics, train_args, history)
        if config.push_to_hub:
            result.pushed_to = _push(out, hub_repo)
    _close_process_group()
    return result


def _close_process_group() -> None:
    """Under torchrun: wait for rank 0's writes, then close the process group.

    Exiting with the gloo group still open let its threads abort a rank at
    interpreter shutdown ("terminate called without an active exception",
    SIGABRT) after a successful run, which failed the whole launch.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Data pipeline and metric
# ---------------------------------------------------------------------------


def make_transform(
    processor,
    image_size: int,
    *,
    reduce_labels: bool,
    ignore_index: int,
    num_labels: int,
    augment: AugmentParams | None,
):
    """A `datasets` batch transform: rows -> {"pixel_values", "labels"} at image_size.

    Applied lazily (with_transform), so every epoch draws new augmentations.
    Without `augment` (evaluation) the processor resizes the image exactly as
    deployment will, and the mask follows with nearest-neighbour.
    """

    def transform(batch: dict[str, list]) -> dict[str, list]:
        rng = _batch_rng() if augment is not None else None
        images, masks = [], []
        for image, annotation, name in zip(
            batch["image"], batch["annotation"], batch["name"], strict=True
        ):
            labels = label_array(
                annotation,
                reduce_labels=reduce_labels,
                ignore_index=ignore_index,
                num_labels=num_labels,
                where=name,
            )
            image = image.convert("RGB")
            mask = labels_to_image(labels)
            if rng is not None:
                image, mask = augment_pair(image, mask, image_size, rng, augment)
            else:
                _, mask = resize_pair(image, mask, image_size)
            images.append(image)
            masks.append(np.asarray(mask, dtype=np.int64))
        pixels = processor(images=images, return_tensors="np")["pixel_values"]
        return {"pixel_values": list(pixels), "labels": masks}

    return transform


def _batch_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's RNG.

    torch's RNG is what the Trainer seeds, restores on --resume, and re-seeds
    per DataLoader worker and epoch; drawing from it keeps augmentation
    reproducible and different in every worker (torchvision does the same).
    """
    import torch

    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


def upsample_argmax(logits, labels):
    """Trainer's preprocess_logits_for_metrics: logits (N,C,h,w) -> class ids at the label size.

    Done on the device, per batch, before the Trainer gathers across processes,
    so only int class maps travel (bilinear, as in the guide and the runtime).
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    return upsample_bilinear(logits, labels.shape[-2:]).argmax(dim=1)


class StreamingMeanIoU:
    """`compute_metrics` for `batch_eval_metrics=True`.

    The Trainer calls it once per eval batch with that batch's predictions
    (already argmax'd by `upsample_argmax`); it folds them into a confusion
    matrix and answers on the last batch, then starts afresh for the next
    evaluation. A class rather than a closure because the Trainer's API is a
    callable with state across calls; `last_result` keeps the full answer
    (per-category values) that the logs only show in summary.
    """

    def __init__(self, num_labels: int, ignore_index: int):
        self._metric = MeanIoU(num_labels, ignore_index)
        self.last_result: dict[str, Any] | None = None

    def __call__(self, eval_pred, compute_result: bool) -> dict[str, float]:
        preds, refs = eval_pred.predictions, eval_pred.label_ids
        self._metric.update(_numpy(preds), _numpy(refs))
        if not compute_result:
            return {}
        result = self._metric.compute()
        self._metric.reset()
        self.last_result = result
        return {k: float(result[k]) for k in SUMMARY_METRICS}


def _cpu_distributed() -> bool:
    """Launched by torchrun/accelerate on a machine without CUDA.

    Accelerate only picks CPU DDP (gloo) when told the run is on CPU; otherwise
    it silently trains N independent copies. A single process is left to the
    Trainer's own device choice (CUDA, MPS or CPU).
    """
    import torch

    launched = (
        int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
    )
    return launched and not torch.cuda.is_available()


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


# ---------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------


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


def _final_metrics(metric: StreamingMeanIoU, history, data, step: int) -> dict[str, Any]:
    result = metric.last_result or {}
    eval_loss = next(
        (h["eval_loss"] for h in reversed(history) if "eval_loss" in h and h.get("step") == step),
        None,
    )
    return {
        **{k: finite(result.get(k)) for k in SUMMARY_METRICS},
        "per_category_iou": [finite(v) for v in result.get("per_category_iou", [])],
        "per_category_accuracy": [finite(v) for v in result.get("per_category_accuracy", [])],
        "id2label": {str(k): v for k, v in data.id2label.items()},
        "eval_loss": eval_loss,
        "eval_split": data.spec.eval_split or f"{data.spec.test_size} of {data.spec.split}",
        "eval_samples": len(data.eval),
        "step": step,
    }


def _best(history) -> tuple[float | None, int | None]:
    evals = [(h["eval_mean_iou"], h["step"]) for h in history if "eval_mean_iou" in h]
    evals = [(v, s) for v, s in evals if v is not None and math.isfinite(v)]
    if not evals:
        return None, None
    best = max(evals, key=lambda e: (e[0], -e[1]))
    return float(best[0]), int(best[1])


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def check_checkpoint(checkpoint: Path) -> None:
    """SegdeployError naming the first corrupt file of the checkpoint --resume would load."""
    for path in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        if path.suffix in (".safetensors", ".json", ".bin", ".pt", ".pth"):
            check_weight_file(path)


def _check_numbers(c: TrainConfig) -> None:
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


def _check_output_dir(out: Path, config: TrainConfig) -> Path | None:
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


def _clear_previous_run(out: Path) -> None:
    # The old final files stay until the new ones replace them (write_model_folder);
    # old checkpoints would be mistaken for this run's by --resume and by rotation.
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def _check_same_run(out: Path, record: dict[str, Any]) -> None:
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


def _check_can_push(repo_id: str) -> str:
    """Fail before training, not after, when pushing cannot work."""
    from huggingface_hub import whoami

    if not hub_reachable():
        raise SegdeployError(
            "--push-to-hub",
            "the Hugging Face Hub cannot be reached (offline); train without it and "
            "upload the folder later with `hf upload`",
        )
    try:
        user = whoami()
    except Exception as err:  # huggingface_hub raises several types for a missing/bad token
        raise SegdeployError(
            "--push-to-hub", f"not logged in to the Hugging Face Hub ({err}); run `hf auth login`"
        ) from None
    return repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"


def _push(out: Path, repo_id: str) -> str:
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, exist_ok=True)
    upload_folder(
        folder_path=out,
        repo_id=repo_id,
        ignore_patterns=[f"{CHECKPOINTS}/**", ".*"],
        commit_message="segdeploy train",
    )
    return repo_id
