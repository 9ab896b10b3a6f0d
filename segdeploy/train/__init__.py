"""Fine-tune a segmentation model with the Hugging Face Trainer: the library behind `segdeploy train`.

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

from segdeploy.train.config import (
    PRETRAINED_LR,
    SCRATCH_LR,
    TrainConfig,
    TrainResult,
    default_output_dir,
    resolve_lr,
)
from segdeploy.train.evaluation import StreamingMeanIoU, upsample_argmax
from segdeploy.train.output import (
    is_finished_model,
    newest_checkpoint,
    write_model_folder,
)
from segdeploy.train.run import train
from segdeploy.train.transform import make_transform

__all__ = [
    "PRETRAINED_LR",
    "SCRATCH_LR",
    "StreamingMeanIoU",
    "TrainConfig",
    "TrainResult",
    "default_output_dir",
    "is_finished_model",
    "make_transform",
    "newest_checkpoint",
    "resolve_lr",
    "train",
    "upsample_argmax",
    "write_model_folder",
]
