"""Tiny random models of every family for the tests, re-initialised so their logits mean something.

transformers' default init draws conv/linear weights from N(0, 0.02) and, for MobileViT,
the BatchNorm scales too: a tiny MobileViT then outputs logits of ~1e-8 (1e-45 in some
configs), and "ONNX agrees with torch" or "masks agree" would hold for any graph. He-normal
weights and identity norms give logits of order 1-100.
"""

from __future__ import annotations

from pathlib import Path

#: (model_type, scratch size): every family's tiny config, UPerNet with both backbones.
CASES = [
    ("segformer", "tiny"),
    ("dpt", "tiny"),
    ("beit", "tiny"),
    ("data2vec-vision", "tiny"),
    ("mobilenet_v2", "tiny"),
    ("mobilevit", "tiny"),
    ("mobilevitv2", "tiny"),
    ("upernet", "tiny"),
    ("upernet", "tiny-swin"),
]
CASE_IDS = [f"{t}-{s}" for t, s in CASES]
ID2LABEL = {0: "road", 1: "sky", 2: "tree", 3: "car", 4: "person"}
SIDE = 64  # every tiny model's input size

#: preprocessor_config.json of each processor, producing SIDE x SIDE from any photo.
PROCESSOR_KWARGS = {
    "SegformerImageProcessor": {"size": {"height": SIDE, "width": SIDE}},
    "BeitImageProcessor": {"size": {"height": SIDE, "width": SIDE}, "do_center_crop": False},
    "DPTImageProcessor": {"size": {"height": SIDE, "width": SIDE}},
    "MobileNetV2ImageProcessor": {
        "size": {"shortest_edge": SIDE},
        "crop_size": {"height": SIDE, "width": SIDE},
    },
    "MobileViTImageProcessor": {
        "size": {"shortest_edge": SIDE},
        "crop_size": {"height": SIDE, "width": SIDE},
    },
}


def reinit(model, seed: int = 0):
    """He-normal conv/linear weights (seeded), identity norm layers; returns the model in eval."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear | torch.nn.ConvTranspose2d):
            torch.nn.init.kaiming_normal_(module.weight, generator=gen)
        elif isinstance(module, norms) and module.weight is not None:
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return model.eval()


def build_model(model_type: str, size: str, seed: int = 0):
    from transformers import AutoModelForSemanticSegmentation

    from segdeploy.families import scratch_config

    config = scratch_config(model_type, size, ID2LABEL)
    return reinit(AutoModelForSemanticSegmentation.from_config(config), seed)


def save_model_folder(out: Path, model_type: str, size: str) -> Path:
    """A Hugging Face model folder: config.json, weights, preprocessor_config.json."""
    from segdeploy.families import family_of, processor_class

    family = family_of(model_type)
    build_model(model_type, size).save_pretrained(out)
    processor_class(family)(**PROCESSOR_KWARGS[family.image_processor]).save_pretrained(out)
    return out
