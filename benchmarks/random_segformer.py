"""A random-init SegFormer model folder exported as `segdeploy export` exports it (Optimum,
after segdeploy's exact rewrites): the benchmarks' model when speed, not accuracy, is
measured (the weights do not change the time). Results committed before 2026-12-07
17:10 UTC were measured on Optimum's graph without the rewrite (the decode head unfolded)."""

from __future__ import annotations

from pathlib import Path


def random_segformer(
    model_dir: Path, onnx_dir: Path, size: str, id2label: dict[int, str], image_size: int
) -> Path:
    """`scratch:<size>` with seed-0 weights saved in `model_dir`, its processor at
    `image_size`, exported at opset 17 into `onnx_dir` (returned)."""
    import torch
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from segdeploy.export.routes import export_fp32
    from segdeploy.train.models import scratch_config

    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(scratch_config(size, id2label)).eval()
    model.save_pretrained(model_dir)
    SegformerImageProcessor(
        size={"height": image_size, "width": image_size}, do_reduce_labels=False
    ).save_pretrained(model_dir)
    export_fp32(model_dir, onnx_dir, opset=17)
    return onnx_dir
