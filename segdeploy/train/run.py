"""`train`: the Trainer run, from checked options to a written model folder.

The recipe is the Hugging Face semantic-segmentation guide's (SegFormer, AdamW,
linear decay, evaluation and checkpoints every N steps, colour jitter on the
training images). The same code runs under `torchrun` and `accelerate launch`
(the Trainer does DDP); only the main process writes the final folder.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segdeploy import __version__
from segdeploy.atomic import write_json
from segdeploy.data import check_dataset, load_splits
from segdeploy.errors import SegdeployError
from segdeploy.train.augment import AugmentParams
from segdeploy.train.config import (
    RECORDED_CONFIG,
    TrainConfig,
    TrainResult,
    check_numbers,
    default_output_dir,
    resolve_lr,
)
from segdeploy.train.ddp import close_process_group, cpu_distributed
from segdeploy.train.evaluation import (
    StreamingMeanIoU,
    best_mean_iou,
    final_metrics,
    upsample_argmax,
)
from segdeploy.train.models import (
    check_model_source,
    load_model,
    load_processor,
    processor_image_size,
    train_image_size,
)
from segdeploy.train.output import (
    CHECKPOINTS,
    RUN_RECORD,
    check_checkpoint,
    check_output_dir,
    check_outside_dataset,
    check_same_run,
    checkpoint_step,
    clear_previous_run,
    write_model_folder,
)
from segdeploy.train.push import check_can_push, push
from segdeploy.train.transform import make_transform
from segdeploy.writable import check_writable, environment_errors_as_input


def train(config: TrainConfig, *, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune `config.model` on `config.dataset` and write the model folder.

    `callbacks` are extra `transformers.TrainerCallback`s (tests use them to
    interrupt a run). Raises SegdeployError for bad input, before training
    starts wherever it can be known then.
    """
    # Everything that can be checked without torch is checked before importing it
    # (seconds on a busy machine), so that bad options fail at once.
    check_numbers(config)
    out = Path(config.output_dir or default_output_dir(config.model, config.dataset.name))
    family = check_model_source(config.model)  # a Hub id offline fails here, before any data
    # is read; the family found is handed on, so the model's config is not fetched again
    hub_repo = check_can_push(config.hub_model_id or out.name) if config.push_to_hub else None
    check_outside_dataset(out, config.dataset.name)
    resume_from = check_output_dir(out, config)
    # Read-only, full, or under a file: found now, not at the first checkpoint.
    check_writable(out, "--output-dir")
    if resume_from is not None:
        check_checkpoint(resume_from)

    import transformers
    from transformers import Trainer, TrainerState

    from segdeploy.train.callbacks import EvaluateAtEnd, SyncBuffers

    lr = resolve_lr(config)
    args = _training_arguments(config, out, lr)
    transformers.set_seed(config.seed)  # the scratch weights are drawn before the Trainer seeds
    data = _load_data(config, args)
    side = train_image_size(config.model, family, config.image_size)
    processor = load_processor(config.model, family, side)
    image_size = processor_image_size(processor)
    # A checkpoint at or past --max-steps means training had finished (the run
    # died writing the folder): the Trainer would still run one more step.
    done = resume_from is not None and config.max_steps is not None
    done = done and checkpoint_step(resume_from) >= config.max_steps
    model = load_model(
        str(resume_from) if done else config.model,
        data.id2label,
        ignore_index=data.spec.ignore_index,
        image_size=image_size,
    )
    train_ds, eval_ds = _datasets(config, data, processor, image_size)
    metric = StreamingMeanIoU(len(data.id2label), data.spec.ignore_index)

    record = {
        "model": config.model,
        "dataset": data.spec.to_dict(),
        "image_size": image_size,
        **{key: getattr(config, key) for key in RECORDED_CONFIG},
        "lr": lr,
    }
    _start_or_resume(out, config, args, record, resume_from)

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
    metrics = final_metrics(metric, history, data, trainer.state.global_step)
    best_iou, best_step = best_mean_iou(history)
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
    # The last collective is behind us: close the group now, while the ranks are
    # together, not after rank 0's writes and upload (see close_process_group).
    close_process_group()
    if result.is_main_process:
        train_args = _train_args(config, record, args, out, result)
        train_args["dataset_choices"] = data.choices  # what the data decided, and why
        with environment_errors_as_input(out, "the previous model files, if any, are kept"):
            write_model_folder(out, trainer.model, processor, metrics, train_args, history)
        if hub_repo is not None:
            result.pushed_to = push(out, hub_repo)
    return result


def _training_arguments(config: TrainConfig, out: Path, lr: float):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
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
        use_cpu=cpu_distributed(),
        ddp_find_unused_parameters=False,  # every SegFormer parameter is used; skip the graph walk
        save_safetensors=True,
    )


def _load_data(config: TrainConfig, args):
    with args.main_process_first(desc="loading the dataset"):
        data = load_splits(config.dataset)
        if len(data.train) == 0 or len(data.eval) == 0:
            raise SegdeployError(
                "--split", f"selects {len(data.train)} training and {len(data.eval)} eval rows"
            )
        # Decode everything once: a bad file fails here by name, not in a DataLoader.
        check_dataset(data)
    return data


def _datasets(config: TrainConfig, data, processor, image_size: int):
    """(training, evaluation) datasets with their lazy batch transforms."""
    label_args = {
        "reduce_labels": bool(data.spec.reduce_labels),
        "ignore_index": data.spec.ignore_index,
        "num_labels": len(data.id2label),
    }
    augment = AugmentParams() if config.augment else None
    train_ds = data.train.with_transform(
        make_transform(processor, image_size, augment=augment, **label_args)
    )
    eval_ds = data.eval.with_transform(
        make_transform(processor, image_size, augment=None, **label_args)
    )
    return train_ds, eval_ds


def _start_or_resume(out: Path, config: TrainConfig, args, record: dict, resume_from) -> None:
    if resume_from is not None:
        check_same_run(out, record)
        return
    # Every check has passed: only now may --overwrite remove the old checkpoints
    # (the old final files stay until complete new ones replace them).
    with args.main_process_first(desc="clearing the previous run"):
        if args.process_index == 0:
            if config.overwrite:
                clear_previous_run(out)
            write_json(out / CHECKPOINTS / RUN_RECORD, record)


def _train_args(config: TrainConfig, record: dict, args, out: Path, result: TrainResult) -> dict:
    """What train_args.json records: the run's options, resolved, and the versions."""
    import transformers

    return {
        **record,
        "epochs": config.epochs,
        "max_steps": config.max_steps,
        "batch_size": config.batch_size,
        "world_size": args.world_size,
        "lr": record["lr"],
        "eval_steps": config.eval_steps,
        "seed": config.seed,
        "augment": config.augment,
        "resume": config.resume,
        "push_to_hub": config.push_to_hub,
        "hub_model_id": config.hub_model_id,
        "output_dir": str(out),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "segdeploy_version": __version__,
        "transformers_version": transformers.__version__,
    }
