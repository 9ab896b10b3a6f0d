"""`segdeploy train`: the thin Click layer over `segdeploy.train.train`."""

from __future__ import annotations

import click


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--model",
    default="nvidia/mit-b0",
    show_default=True,
    help="Hub id or local Hugging Face model folder of any family of the guide (SegFormer, "
    "BEiT, Data2VecVision, DPT, MobileNetV2, MobileViT, MobileViTV2, UPerNet), or "
    "scratch:<family>-<size> for random weights, offline: scratch:tiny and scratch:b0..b5 "
    "(SegFormer), scratch:dpt-large, scratch:beit-base, scratch:data2vec-vision-base, "
    "scratch:mobilenet-v2-1.0-513, scratch:mobilevit-small, scratch:mobilevitv2-1.0, "
    "scratch:upernet-convnext-tiny, scratch:upernet-swin-tiny, and <family>-tiny of each.",
)
@click.option(
    "--dataset",
    default="scene_parse_150",
    show_default=True,
    help="Hub id, local folder (images/<split>/ + annotations/<split>/), "
    "datasets.save_to_disk folder, or synthetic or synthetic:SIZE (e.g. synthetic:64).",
)
@click.option(
    "--split",
    default=None,
    help="Training rows, e.g. train, train[:50], train[:10%]  "
    "[default: train[:50] for the default dataset, else train].",
)
@click.option(
    "--eval-split",
    default=None,
    help="Evaluate on this split  [default: the dataset's own validation split (validation, "
    "val or valid) if it has one and --test-size is not given, else --test-size of --split].",
)
@click.option(
    "--test-size",
    type=float,
    default=None,
    help="Fraction of --split held out for evaluation (seeded)  [default: 0.2 where the "
    "dataset has no validation split].",
)
@click.option(
    "--output-dir",
    "-o",
    default=None,
    help="Model folder to write  [default: models/<model-name>-<dataset-name>].",
)
@click.option(
    "--epochs", type=float, default=50.0, show_default=True, help="Passes over the training rows."
)
@click.option(
    "--max-steps",
    type=int,
    default=None,
    help="Stop after this many optimiser steps (overrides --epochs).",
)
@click.option(
    "--batch-size",
    type=int,
    default=2,
    show_default=True,
    help="Images per step and process (under torchrun: per process).",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Learning rate  [default: 6e-5 for a pretrained --model, the guide's value; "
    "2e-3 for scratch:*, which learns nothing useful at 6e-5].",
)
@click.option(
    "--eval-steps",
    type=int,
    default=20,
    show_default=True,
    help="Evaluate and save a checkpoint every N steps (and at the last step).",
)
@click.option(
    "--image-size",
    type=int,
    default=None,
    help="Train and evaluate at SIZE x SIZE pixels  [default: the model's processor, 512 for "
    "SegFormer; BEiT and Data2VecVision run only at their config's image_size, which a "
    "pretrained one keeps].",
)
@click.option(
    "--reduce-labels/--no-reduce-labels",
    default=None,
    help="Mask value 0 means 'other' and is ignored, v becomes class v-1 (ADE20K)  "
    "[default: decided from the masks: on only if a mask value equals the number of classes; "
    "the choice is printed and recorded in train_args.json].",
)
@click.option(
    "--ignore-index",
    type=int,
    default=255,
    show_default=True,
    help="Label value (0..255, after reduction) that loss and mean IoU skip, e.g. 11 for CamVid void.",
)
@click.option(
    "--id2label",
    "id2label_file",
    default=None,
    metavar="FILE",
    help='Class names, a JSON object {"0": "road", ...}  [default: id2label.json beside the data].',
)
@click.option(
    "--seed",
    type=int,
    default=42,
    show_default=True,
    help="Seed for the split, weights and augmentation.",
)
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Colour jitter, random zoom-crop and flip on training images.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the newest checkpoint in <output-dir>/checkpoints. Repeat the same "
    "options: any that contradicts the recorded run (checkpoints/run.json: model, data, "
    "--image-size, --epochs, --max-steps, --batch-size, --lr, --eval-steps, --seed, "
    "--augment) is refused, each named, so that train_args.json stays true.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the model and checkpoints already in --output-dir. Nothing is removed "
    "before the new run has passed its checks (data, model, options); the old model files "
    "stay until complete new ones replace them.",
)
@click.option(
    "--push-to-hub",
    is_flag=True,
    help="Upload the finished model folder to the Hugging Face Hub (needs `hf auth login`).",
)
@click.option(
    "--hub-model-id",
    default=None,
    help="Hub repo for --push-to-hub  [default: <your user>/<output-dir name>].",
)
@click.option(
    "--workers", type=int, default=0, show_default=True, help="DataLoader worker processes."
)
def train(
    model: str,
    dataset: str,
    split: str | None,
    eval_split: str | None,
    test_size: float | None,
    output_dir: str | None,
    epochs: float,
    max_steps: int | None,
    batch_size: int,
    lr: float | None,
    eval_steps: int,
    image_size: int | None,
    reduce_labels: bool | None,
    ignore_index: int,
    id2label_file: str | None,
    seed: int,
    augment: bool,
    resume: bool,
    overwrite: bool,
    push_to_hub: bool,
    hub_model_id: str | None,
    workers: int,
) -> None:
    """Fine-tune a segmentation model (any family of the guide) on a segmentation dataset with the Hugging Face Trainer.

    The defaults are the Hugging Face semantic-segmentation guide: nvidia/mit-b0
    on scene_parse_150 train[:50] with 20% held out, reduced labels, learning
    rate 6e-5, batch size 2, evaluation and a checkpoint every 20 steps.

    \b
    Examples:
      segdeploy train                                      # the guide (needs the Hub)
      segdeploy train --model scratch:tiny --dataset synthetic:64 --image-size 64 \\
          --max-steps 300 --batch-size 8                   # offline, a minute on a CPU
      segdeploy train --model scratch:b0 --dataset data/camvid --ignore-index 11
                                                           # your folder: images/, annotations/
      torchrun --nproc_per_node 2 $(which segdeploy) train ...   # DDP, same options

    The output folder is a Hugging Face model folder (config.json, model.safetensors,
    preprocessor_config.json) plus metrics.json (final evaluation), train_args.json
    (what was run, read by `segdeploy export`), training_curves.png, and
    checkpoints/ for --resume. It only holds config.json and metrics.json once
    training has finished.
    """
    from segdeploy.data import DatasetSpec
    from segdeploy.train import TrainConfig
    from segdeploy.train import train as run_training

    if split is None:
        split = "train[:50]" if dataset == "scene_parse_150" else "train"
    spec = DatasetSpec(
        dataset,
        split=split,
        eval_split=eval_split,
        test_size=test_size,
        seed=seed,
        reduce_labels=reduce_labels,
        ignore_index=ignore_index,
        id2label_file=id2label_file,
    )
    config = TrainConfig(
        model=model,
        dataset=spec,
        output_dir=output_dir,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        eval_steps=eval_steps,
        image_size=image_size,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        augment=augment,
        push_to_hub=push_to_hub,
        hub_model_id=hub_model_id,
        workers=workers,
    )
    result = run_training(config)
    if result.is_main_process:
        _print_summary(result)


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    def iou(v):
        return "n/a" if v is None else f"{v:.4f}"

    table = Table(title="segdeploy train", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", str(result.steps))
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("final mean IoU", iou(result.metrics.get("mean_iou")))
    best = iou(result.best_mean_iou)
    if result.best_step is not None:
        best += f" (step {result.best_step})"
    table.add_row("best mean IoU", best)
    table.add_row(
        "eval set",
        f"{result.metrics.get('eval_split')}, {result.metrics.get('eval_samples')} images",
    )
    if result.resumed_from:
        table.add_row("resumed from", result.resumed_from)
    table.add_row("model", str(result.output_dir))
    if result.pushed_to:
        table.add_row("pushed to", f"https://huggingface.co/{result.pushed_to}")
    Console().print(table)
