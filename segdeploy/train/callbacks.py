"""Trainer callbacks that `segdeploy train` adds to the Hugging Face Trainer's own."""

from __future__ import annotations

from transformers import TrainerCallback


class EvaluateAtEnd(TrainerCallback):
    """Evaluate (and log) at the last step too, not only every eval_steps."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_log = True
        return control


class SyncBuffers(TrainerCallback):
    """Under DDP, give every rank rank 0's BatchNorm statistics before it evaluates or saves.

    DDP averages gradients, but each rank updates BatchNorm running statistics
    (SegFormer's decode head) from its own batch, so after a step the ranks'
    models differ slightly. Evaluation is sharded across ranks and checkpoints
    come from rank 0: without this, the reported mean IoU would mix several
    models and not be the saved model's. (SyncBatchNorm would avoid the drift,
    but torch only supports it on GPUs.)
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist

        if model is None or not (dist.is_available() and dist.is_initialized()):
            return control
        if dist.get_world_size() > 1 and (control.should_evaluate or control.should_save):
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)
        return control
