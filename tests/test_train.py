"""segdeploy train: learning on synthetic data, the output folder, --resume, bad input.

One module-scoped run of scratch:tiny on synthetic:64 (200 steps, ~15-30 s on
two cores) backs several tests; the rest train for a handful of steps at 32 px.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from transformers import TrainerCallback

from segdeploy.cli import main
from segdeploy.data import DatasetSpec, label_array, load_splits
from segdeploy.errors import SegdeployError
from segdeploy.train import (
    SCRATCH_LR,
    StreamingMeanIoU,
    TrainConfig,
    default_output_dir,
    is_finished_model,
    newest_checkpoint,
    train,
    write_model_folder,
)

FINAL_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "metrics.json",
    "train_args.json",
    "training_curves.png",
)


def small_config(out: Path, **overrides) -> TrainConfig:
    """A few steps of scratch:tiny on 32 px synthetic images."""
    values = dict(
        model="scratch:tiny",
        dataset=DatasetSpec("synthetic:32", split="train[:16]", eval_split="validation[:6]"),
        output_dir=str(out),
        max_steps=4,
        eval_steps=2,
        batch_size=2,
        image_size=32,
    )
    values.update(overrides)
    return TrainConfig(**values)


def evaluate_saved_model(folder: Path) -> float:
    """Mean IoU of a saved model folder on its recorded eval split, computed without
    the Trainer or segdeploy.train.metrics: a per-class numpy count over every eval image."""
    import torch
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    args = json.loads((folder / "train_args.json").read_text())
    spec = DatasetSpec.from_dict(args["dataset"])
    size = args["image_size"]
    model = SegformerForSemanticSegmentation.from_pretrained(folder).eval()
    processor = SegformerImageProcessor.from_pretrained(folder)
    data = load_splits(spec, need_train=False)
    n = model.config.num_labels
    inter, union = np.zeros(n), np.zeros(n)
    for row in data.eval:
        ref = label_array(
            row["annotation"],
            reduce_labels=spec.reduce_labels,
            ignore_index=spec.ignore_index,
            num_labels=n,
            where=row["name"],
        )
        ref = np.asarray(
            Image.fromarray(ref.astype(np.int32)).resize((size, size), Image.Resampling.NEAREST)
        )
        pixels = processor(images=row["image"].convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        up = torch.nn.functional.interpolate(
            logits, size=(size, size), mode="bilinear", align_corners=False
        )
        pred = up.argmax(1)[0].numpy()
        keep = ref != spec.ignore_index
        for c in range(n):
            p, r = (pred == c) & keep, (ref == c) & keep
            inter[c] += (p & r).sum()
            union[c] += (p | r).sum()
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(np.where(union > 0, inter / union, np.nan)))


# --- one real run: scratch:tiny learns synthetic ---------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tiny-synthetic"
    config = TrainConfig(
        model="scratch:tiny",
        dataset=DatasetSpec("synthetic:64", split="train[:200]", eval_split="validation[:40]"),
        output_dir=str(out),
        max_steps=200,
        eval_steps=50,
        batch_size=8,
        image_size=64,
    )
    start = time.monotonic()
    result = train(config)
    print(f"\nscratch:tiny, 200 steps: {time.monotonic() - start:.1f} s, mIoU {result.metrics}")
    return result


def test_scratch_tiny_reaches_half_mean_iou_on_synthetic(trained):
    assert trained.steps == 200
    assert trained.metrics["mean_iou"] > 0.5
    evals = [h["eval_mean_iou"] for h in trained.log_history if "eval_mean_iou" in h]
    assert len(evals) == 4  # steps 50, 100, 150, 200
    assert trained.best_mean_iou == max(evals)


def test_loss_decreases(trained):
    losses = [h["loss"] for h in trained.log_history if "loss" in h]
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


def test_output_folder_is_a_finished_model_folder(trained):
    out = trained.output_dir
    for name in FINAL_FILES:
        assert (out / name).is_file(), name
    assert is_finished_model(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    assert all((out / name).stat().st_mode & 0o044 == 0o044 for name in FINAL_FILES)  # shareable

    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {
        "0": "background",
        "1": "disc",
        "2": "box",
        "3": "triangle",
        "4": "ring",
    }
    assert config["semantic_loss_ignore_index"] == 255
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["do_reduce_labels"] is False
    assert processor["size"] == {"height": 64, "width": 64}

    args = json.loads((out / "train_args.json").read_text())
    spec = DatasetSpec.from_dict(args["dataset"])
    assert spec.reduce_labels is False  # resolved, not None
    assert spec.eval_split == "validation[:40]"
    assert args["model"] == "scratch:tiny" and args["image_size"] == 64
    assert args["lr"] == SCRATCH_LR and args["steps"] == 200

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_iou"] == trained.metrics["mean_iou"]
    assert len(metrics["per_category_iou"]) == 5 and metrics["eval_samples"] == 40

    with Image.open(out / "training_curves.png") as png:
        assert png.format == "PNG" and png.width >= 400
    assert newest_checkpoint(out / "checkpoints").name == "checkpoint-200"


def test_reported_mean_iou_equals_an_independent_evaluation(trained):
    # The Trainer streamed batches through upsample_argmax + MeanIoU; redo it by hand.
    assert evaluate_saved_model(trained.output_dir) == pytest.approx(
        trained.metrics["mean_iou"], abs=1e-9
    )


def test_a_finished_model_is_not_overwritten_by_accident(trained):
    before = (trained.output_dir / "metrics.json").read_bytes()
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--model",
            "scratch:tiny",
            "--dataset",
            "synthetic:64",
            "-o",
            str(trained.output_dir),
        ],
    )
    assert result.exit_code == 2
    assert "already holds a trained model" in result.stderr and "--overwrite" in result.stderr
    assert (trained.output_dir / "metrics.json").read_bytes() == before


# --- resume -------------------------------------------------------------------------------


class _CrashAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


class _RecordSteps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_resume_continues_from_the_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(small_config(out, max_steps=8, eval_steps=4), callbacks=[_CrashAt(6)])
    # Crashed after checkpoint-4: checkpoints to resume from, but no model folder.
    assert newest_checkpoint(out / "checkpoints").name == "checkpoint-4"
    assert not (out / "config.json").exists() and not (out / "metrics.json").exists()
    assert not is_finished_model(out)

    with pytest.raises(SegdeployError, match="unfinished run .*--resume"):
        train(small_config(out, max_steps=8, eval_steps=4))

    recorder = _RecordSteps()
    result = train(small_config(out, max_steps=8, eval_steps=4, resume=True), callbacks=[recorder])
    assert result.resumed_from.endswith("checkpoint-4")
    assert recorder.steps == [5, 6, 7, 8]
    assert result.steps == 8 and is_finished_model(out)
    # The history before the crash came back with the checkpoint.
    assert [h["step"] for h in result.log_history if "eval_mean_iou" in h] == [4, 8]


def test_resume_refuses_other_options(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(small_config(out, max_steps=4, eval_steps=2), callbacks=[_CrashAt(3)])
    with pytest.raises(SegdeployError, match="made with image_size=32"):
        train(small_config(out, max_steps=4, eval_steps=2, image_size=48, resume=True))


def test_overwrite_starts_afresh(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(small_config(out, max_steps=6, eval_steps=2), callbacks=[_CrashAt(5)])
    recorder = _RecordSteps()
    result = train(
        small_config(out, max_steps=2, eval_steps=2, overwrite=True), callbacks=[recorder]
    )
    assert recorder.steps == [1, 2] and result.steps == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]


def test_failed_final_write_keeps_the_previous_model(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(small_config(out, max_steps=2))
    before = {name: (out / name).read_bytes() for name in FINAL_FILES}

    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("segdeploy.train.output.plot_training_curves", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        train(small_config(out, max_steps=4, overwrite=True))
    assert {name: (out / name).read_bytes() for name in FINAL_FILES} == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # Training itself had finished: --resume only evaluates and writes the folder.
    monkeypatch.undo()
    recorder = _RecordSteps()
    result = train(small_config(out, max_steps=4, resume=True), callbacks=[recorder])
    assert recorder.steps == [] and result.steps == 4
    assert json.loads((out / "train_args.json").read_text())["steps"] == 4
    assert json.loads((out / "metrics.json").read_text())["step"] == 4


def test_write_model_folder_moves_config_and_metrics_last(tmp_path, monkeypatch):
    import os

    moved = []
    real_replace = os.replace
    monkeypatch.setattr(
        "segdeploy.train.output.os.replace",
        lambda a, b: (moved.append(Path(b).name), real_replace(a, b)),
    )
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from segdeploy.train.models import scratch_config

    model = SegformerForSemanticSegmentation(scratch_config("tiny", {0: "a", 1: "b"}))
    write_model_folder(
        tmp_path, model, SegformerImageProcessor(), {"mean_iou": 0.5}, {"model": "x"}, []
    )
    assert moved[-2:] == ["config.json", "metrics.json"]
    assert set(moved) >= set(FINAL_FILES)


# --- metric plumbing ----------------------------------------------------------------------


def test_streaming_metric_answers_on_the_last_batch_and_resets():
    from transformers import EvalPrediction

    rng = np.random.default_rng(0)
    metric = StreamingMeanIoU(num_labels=3, ignore_index=255)
    batches = [(rng.integers(0, 3, (2, 8, 8)), rng.integers(0, 3, (2, 8, 8))) for _ in range(3)]
    for i, (pred, ref) in enumerate(batches):
        out = metric(EvalPrediction(predictions=pred, label_ids=ref), compute_result=i == 2)
        assert (out == {}) == (i < 2)
    whole_pred = np.concatenate([p for p, _ in batches])
    whole_ref = np.concatenate([r for _, r in batches])
    ious = [
        ((whole_pred == c) & (whole_ref == c)).sum() / ((whole_pred == c) | (whole_ref == c)).sum()
        for c in range(3)
    ]
    assert out["mean_iou"] == pytest.approx(np.mean(ious))
    # A second evaluation starts from zero.
    pred, ref = batches[0]
    again = metric(EvalPrediction(predictions=pred, label_ids=ref), compute_result=True)
    assert again["mean_iou"] != pytest.approx(out["mean_iou"])


def test_default_output_dir_names_model_and_dataset():
    assert default_output_dir("nvidia/mit-b0", "scene_parse_150") == Path(
        "models/mit-b0-scene_parse_150"
    )
    assert default_output_dir("scratch:tiny", "synthetic:64") == Path(
        "models/scratch-tiny-synthetic-64"
    )
    assert default_output_dir("./my/model/", "/data/camvid") == Path("models/model-camvid")


# --- the CLI ------------------------------------------------------------------------------


def test_cli_trains_into_the_default_folder_and_prints_a_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "scratch:tiny", "--dataset", "synthetic:32", "--split", "train[:8]"]
    args += ["--eval-split", "validation[:4]", "--image-size", "32", "--max-steps", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "models" / "scratch-tiny-synthetic-32"
    assert is_finished_model(out)
    for row in ("steps", "best mean IoU", "final mean IoU", str(out.relative_to(tmp_path))):
        assert row in result.stdout


def _bad_mask_folder(root: Path) -> Path:
    from segdeploy.data.synthetic import write_synthetic_folder

    write_synthetic_folder(root, n_train=4, n_val=2, size=32)
    mask = root / "annotations" / "train" / "synthetic_00002.png"
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(mask)
    return mask


def _bad_id2label(tmp_path: Path, text: str) -> str:
    path = tmp_path / "labels.json"
    path.write_text(text)
    return str(path)


BAD_INPUT = {
    "ignore index above 255": (["--ignore-index", "300"], "--ignore-index"),
    "negative ignore index": (["--ignore-index", "-1"], "--ignore-index"),
    "id2label not an object": (["--id2label", "{tmp}/labels.json"], "labels.json", "[1, 2]"),
    "id2label keys not ints": (["--id2label", "{tmp}/labels.json"], "labels.json", '{"a": "x"}'),
    "id2label missing": (["--id2label", "{tmp}/none.json"], "none.json"),
    "hub model offline": (["--model", "nvidia/mit-b0"], "scratch:tiny"),
    "unknown scratch size": (["--model", "scratch:b9"], "scratch:b0"),
    "missing model folder": (["--model", "./no/such/model"], "no such model folder"),
    "missing dataset folder": (["--dataset", "/no/such/data"], "/no/such/data"),
    "bad mask value": (["--dataset", "{tmp}/ade"], "synthetic_00002.png"),
    "resume without checkpoint": (["--resume"], "--resume"),
    "push offline": (["--push-to-hub"], "--push-to-hub"),
    "zero batch size": (["--batch-size", "0"], "--batch-size"),
    "tiny image size": (["--image-size", "8"], "--image-size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_cli_bad_input_is_one_line_and_exit_2(case, tmp_path):
    options, expected, *content = BAD_INPUT[case]
    if content:
        _bad_id2label(tmp_path, content[0])
    if case == "bad mask value":
        _bad_mask_folder(tmp_path / "ade")
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    out = tmp_path / "out"
    base = ["train", "--model", "scratch:tiny", "--dataset", "synthetic:32", "--image-size", "32"]
    base += ["--max-steps", "2", "--no-reduce-labels", "-o", str(out)]
    start = time.monotonic()
    result = CliRunner().invoke(main, base + options)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert not is_finished_model(out) and not (out / "config.json").exists()
    assert time.monotonic() - start < 30  # offline Hub ids fail at once, not after retries


# --- real data ----------------------------------------------------------------------------


@pytest.mark.slow
def test_camvid_scratch_tiny_20_steps_on_cpu(camvid, tmp_path):
    out = tmp_path / "camvid"
    args = ["train", "--dataset", str(camvid), "--no-reduce-labels", "--ignore-index", "11"]
    args += ["--model", "scratch:tiny", "--max-steps", "20", "--eval-split", "val"]
    args += ["--image-size", "128", "-o", str(out)]
    start = time.monotonic()
    result = CliRunner().invoke(main, args)
    print(f"\nCamVid scratch:tiny 20 steps at 128 px: {time.monotonic() - start:.1f} s")
    assert result.exit_code == 0, result.output
    for name in FINAL_FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 11 and config["id2label"]["0"] == "sky"
    assert config["semantic_loss_ignore_index"] == 11
    spec = DatasetSpec.from_dict(json.loads((out / "train_args.json").read_text())["dataset"])
    assert (spec.eval_split, spec.reduce_labels, spec.ignore_index) == ("val", False, 11)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_samples"] == 101 and len(metrics["per_category_iou"]) == 11
    assert 0.0 < metrics["mean_iou"] < 1.0
    assert newest_checkpoint(out / "checkpoints").name == "checkpoint-20"
