"""The model families of the Hugging Face semantic-segmentation guide, one entry each.

Everything segdeploy needs to know about an architecture lives in its
`Family` entry, keyed by transformers' `model_type`: the classes that load it,
the image processor it ships with, how it reaches ONNX (the exporter route and
the opsets it needs), which spatial axes of that graph may be dynamic, the
stride of its logits, its known upstream bugs, the op types int8 leaves in
float, and the `scratch:` architectures (a real size from the paper or the Hub
config, and a tiny one for tests). Adding a family is one entry here.

Import-light on purpose: `segdeploy infer` reads this registry on machines
without torch, so class names are strings, resolved by `model_class()` and
`scratch_config()` only when called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from segdeploy.errors import SegdeployError
from segdeploy.folders import CONFIG_FILE, read_json

#: LayerNormalization became an ONNX op in opset 17: below it, torch writes
#: LayerNorm as ~9 primitive nodes (slower, and int8 cannot leave it in float as a unit).
LAYERNORM_OPSET = 17
#: Opset of torch's dynamo exporter (torch.onnx.export(dynamo=True)): the lowest it writes natively.
DYNAMO_OPSET = 18

AUTO_CLASS = "AutoModelForSemanticSegmentation"
#: The exporter routes (segdeploy.export.routes), and what each is, as reports say it.
ROUTES = {
    "optimum": "Optimum's ONNX exporter (onnx_export_from_model) with the family's task",
    "optimum-custom": "Optimum's extension point: a custom OnnxConfig (optimum.exporters.onnx.export)",
    "torch-dynamo": "torch.onnx.export(dynamo=True): Optimum and TorchScript cannot export the family",
}
#: The op types that today's SegFormer int8 path keeps in float (segdeploy.export.quantize,
#: DEFAULT_FLOAT_OP_TYPES, measured there on SegFormer b0). Repeated here rather than
#: imported because quantize.py imports onnx at module level.
TRANSFORMER_FLOAT_OPS = ("Softmax", "LayerNormalization")


@dataclass(frozen=True)
class Family:
    """What segdeploy knows about one architecture (all strings: no import needed)."""

    model_type: str  # transformers' config.model_type, the registry key
    name: str  # human name, as the guide spells it
    scratch_name: str  # prefix of its scratch ids: scratch:<scratch_name>-<size>
    model_class: str  # concrete transformers class; AUTO_CLASS loads every family
    config_class: str
    image_processor: str  # slow processor class (use_fast=False) the Hub configs name
    route: str  # one of ROUTES
    optimum_task: str | None  # Optimum task name for routes "optimum"/"optimum-custom"
    min_opset: int  # lowest opset whose graph is right
    min_opset_why: str  # said when a lower --opset is refused
    default_opset: int
    dynamic_spatial: bool  # may height/width be dynamic axes of the exported graph?
    square_only: bool  # does the model itself accept only height == width?
    fixed_size_why: str | None  # why not, when not: what the graph would get wrong
    logits_stride: int  # logits are input / stride (per side), for its scratch configs
    scratch: Mapping[str, Callable[[], dict[str, Any]]] = field(repr=False)  # size -> kwargs
    real_sizes: tuple[str, ...] = ()  # sizes in `scratch` taken from a paper or Hub config
    known_issues: tuple[str, ...] = ()
    int8_float_op_types: tuple[str, ...] = TRANSFORMER_FLOAT_OPS
    int8_measured: bool = False  # whether int8_float_op_types were measured on this family
    # onnxruntime's quant_pre_process fails on the graph ("Incomplete symbolic shape
    # inference") unless called with skip_symbolic_shape=True (measured, tiny models).
    int8_skip_symbolic_shape: bool = False
    #: The model itself runs only at config.image_size (its position tables are sized for
    #: it): train keeps a pretrained one at that size, and a scratch one is built at --image-size.
    size_bound: bool = False
    #: The config field its loss reads the ignored label from.
    loss_ignore_attr: str = "semantic_loss_ignore_index"


# ---------------------------------------------------------------------------
# Scratch architectures: kwargs of the family's config class (id2label added by
# scratch_config). Real sizes follow the paper or the Hub checkpoint's config.json;
# "tiny" ones are shaped like the real one (same strides, same head) but small
# enough for a CPU test in about a second.
# ---------------------------------------------------------------------------


# (hidden_sizes, depths, decoder_hidden_size) per MiT size; heads, sr ratios and MLP
# ratios are shared by all MiT variants (Xie et al. 2021, table 6).
MIT_SIZES = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
    # Not in the paper: small enough to train in minutes on two CPU cores.
    "tiny": ([16, 32, 64, 128], [1, 1, 1, 1], 64),
}


def _segformer(size: str) -> Callable[[], dict[str, Any]]:
    def kwargs() -> dict[str, Any]:
        hidden, depths, decoder = MIT_SIZES[size]
        return dict(
            hidden_sizes=hidden,
            depths=depths,
            num_attention_heads=[1, 2, 5, 8] if size != "tiny" else [1, 2, 4, 8],
            sr_ratios=[8, 4, 2, 1],
            decoder_hidden_size=decoder,
        )

    return kwargs


def _dpt_large() -> dict[str, Any]:
    # Intel/dpt-large-ade (Ranftl et al. 2021, ViT-L/16 at 384).
    return dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=384,
        patch_size=16,
        backbone_out_indices=[5, 11, 17, 23],
        neck_hidden_sizes=[256, 512, 1024, 1024],
        fusion_hidden_size=256,
        use_batch_norm_in_fusion_residual=True,
        use_auxiliary_head=True,
    )


def _dpt_tiny() -> dict[str, Any]:
    return dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        use_batch_norm_in_fusion_residual=True,
        use_auxiliary_head=True,
    )


def _beit_base() -> dict[str, Any]:
    # microsoft/beit-base-finetuned-ade-640-640 (Bao et al. 2022, UperNet head at 640).
    return dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=640,
        patch_size=16,
        use_relative_position_bias=True,
        use_auxiliary_head=True,
        out_indices=[3, 5, 7, 11],
        pool_scales=[1, 2, 3, 6],
        auxiliary_channels=256,
        drop_path_rate=0.1,
    )


def _beit_tiny() -> dict[str, Any]:
    return dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        use_relative_position_bias=True,
        use_auxiliary_head=True,
        out_indices=[0, 1, 2, 3],
        pool_scales=[1, 2, 3, 6],
        auxiliary_channels=16,
        drop_path_rate=0.0,
    )


def _data2vec_base() -> dict[str, Any]:
    # Baevski et al. 2022: ViT-B/16 with an UperNet head on ADE20K at 512.
    return {**_beit_base(), "image_size": 512}


def _mobilenet_v2_513() -> dict[str, Any]:
    # google/deeplabv3_mobilenet_v2_1.0_513: DeepLabV3 head, output stride 8, 513 input.
    return dict(depth_multiplier=1.0, image_size=513, output_stride=8)


def _mobilenet_v2_tiny() -> dict[str, Any]:
    return dict(depth_multiplier=0.25, image_size=64, output_stride=8, min_depth=4)


def _mobilevit_small() -> dict[str, Any]:
    # apple/deeplabv3-mobilevit-small (Mehta & Rastegari 2022): DeepLabV3 at 512, stride 16.
    return dict(
        hidden_sizes=[144, 192, 240],
        neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640],
        image_size=512,
        output_stride=16,
    )


def _mobilevit_tiny() -> dict[str, Any]:
    return dict(
        hidden_sizes=[16, 16, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64],
        num_attention_heads=2,
        image_size=64,
        output_stride=16,
        aspp_out_channels=16,
    )


def _mobilevitv2_10() -> dict[str, Any]:
    # apple/mobilevitv2-1.0 with the DeepLabV3 head of the paper's segmentation runs
    # (Mehta & Rastegari 2023): 512 input, output stride 8.
    return dict(width_multiplier=1.0, image_size=512, output_stride=8, aspp_out_channels=256)


def _mobilevitv2_tiny() -> dict[str, Any]:
    return dict(
        width_multiplier=0.25,
        image_size=64,
        output_stride=8,
        aspp_out_channels=16,
        n_attn_blocks=[1, 1, 1],
    )


def _upernet(backbone: dict[str, Any], hidden: int, aux: int) -> dict[str, Any]:
    stages = ["stage1", "stage2", "stage3", "stage4"]
    return dict(
        backbone_config={**backbone, "out_features": stages},
        hidden_size=hidden,
        auxiliary_in_channels=None,
        auxiliary_channels=aux,
        use_auxiliary_head=True,
    )


def _upernet_convnext_tiny() -> dict[str, Any]:
    # openmmlab/upernet-convnext-tiny (Liu et al. 2022, ConvNeXt-T + UperNet, 512).
    convnext = dict(model_type="convnext", hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
    return _upernet(convnext, 512, 256)


def _upernet_swin_tiny() -> dict[str, Any]:
    # openmmlab/upernet-swin-tiny (Liu et al. 2021, Swin-T + UperNet, 512).
    swin = dict(
        model_type="swin",
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        drop_path_rate=0.3,
    )
    return _upernet(swin, 512, 256)


def _upernet_tiny() -> dict[str, Any]:
    return _upernet(
        dict(model_type="convnext", hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]), 16, 16
    )


def _upernet_tiny_swin() -> dict[str, Any]:
    swin = dict(
        model_type="swin",
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        drop_path_rate=0.0,
    )
    return _upernet(swin, 16, 16)


_VIT_FIXED = (
    "its relative position bias tables are built for config.image_size: at any other "
    "size the model itself refuses the input or needs interpolate_pos_encoding, which "
    "the exported graph does not carry"
)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            model_type="segformer",
            name="SegFormer",
            scratch_name="segformer",
            model_class="SegformerForSemanticSegmentation",
            config_class="SegformerConfig",
            image_processor="SegformerImageProcessor",
            route="optimum",
            optimum_task="semantic-segmentation",
            min_opset=11,
            min_opset_why="its bilinear resize needs ONNX Resize with half-pixel coordinates (opset 11)",
            default_opset=LAYERNORM_OPSET,
            dynamic_spatial=True,
            square_only=False,
            fixed_size_why=None,
            logits_stride=4,
            scratch={s: _segformer(s) for s in MIT_SIZES},
            real_sizes=("b0", "b1", "b2", "b3", "b4", "b5"),
            int8_measured=True,
        ),
        Family(
            model_type="dpt",
            name="DPT",
            scratch_name="dpt",
            model_class="DPTForSemanticSegmentation",
            config_class="DPTConfig",
            image_processor="DPTImageProcessor",
            route="optimum",
            optimum_task="semantic-segmentation",
            min_opset=LAYERNORM_OPSET,
            min_opset_why="it is a ViT: below 17 LayerNorm is not one ONNX node",
            default_opset=LAYERNORM_OPSET,
            dynamic_spatial=True,
            square_only=True,
            fixed_size_why=None,
            logits_stride=1,
            scratch={"large": _dpt_large, "tiny": _dpt_tiny},
            real_sizes=("large",),
            known_issues=(
                "transformers 4.57: DPTForSemanticSegmentation's loss raises UnboundLocalError "
                "when use_auxiliary_head=False (the auxiliary loss is computed unconditionally); "
                "check_trainable() refuses that setting",
                "DPT's ViT reassembles its tokens on a square grid: the model (torch itself) "
                "raises at non-square inputs (RuntimeError: shape '[2, 6, 6, 32]' is invalid at "
                "96x128), so infer must feed square images",
            ),
            int8_skip_symbolic_shape=True,
        ),
        Family(
            model_type="beit",
            name="BEiT",
            scratch_name="beit",
            model_class="BeitForSemanticSegmentation",
            config_class="BeitConfig",
            image_processor="BeitImageProcessor",
            route="torch-dynamo",
            optimum_task=None,
            min_opset=DYNAMO_OPSET,
            min_opset_why="Optimum lacks its segmentation task and TorchScript fails on "
            "adaptive_avg_pool2d, so it goes through torch's dynamo exporter (opset 18)",
            default_opset=DYNAMO_OPSET,
            dynamic_spatial=False,
            square_only=False,
            fixed_size_why=_VIT_FIXED,
            logits_stride=4,
            scratch={"base": _beit_base, "tiny": _beit_tiny},
            real_sizes=("base",),
            size_bound=True,
        ),
        Family(
            model_type="data2vec-vision",
            name="Data2VecVision",
            scratch_name="data2vec-vision",
            model_class="Data2VecVisionForSemanticSegmentation",
            config_class="Data2VecVisionConfig",
            image_processor="BeitImageProcessor",
            route="torch-dynamo",
            optimum_task=None,
            min_opset=DYNAMO_OPSET,
            min_opset_why="Optimum lacks its segmentation task and TorchScript fails on "
            "adaptive_avg_pool2d, so it goes through torch's dynamo exporter (opset 18)",
            default_opset=DYNAMO_OPSET,
            dynamic_spatial=False,
            square_only=False,
            fixed_size_why=_VIT_FIXED,
            logits_stride=4,
            scratch={"base": _data2vec_base, "tiny": _beit_tiny},
            real_sizes=("base",),
            size_bound=True,
        ),
        Family(
            model_type="mobilenet_v2",
            name="MobileNetV2 (DeepLabV3)",
            scratch_name="mobilenet-v2",
            model_class="MobileNetV2ForSemanticSegmentation",
            config_class="MobileNetV2Config",
            image_processor="MobileNetV2ImageProcessor",
            route="optimum-custom",
            optimum_task="semantic-segmentation",
            min_opset=11,
            min_opset_why="its bilinear resize needs ONNX Resize with half-pixel coordinates (opset 11)",
            default_opset=LAYERNORM_OPSET,
            dynamic_spatial=False,
            square_only=False,
            fixed_size_why="tf_padding computes TensorFlow 'SAME' padding from the input size in "
            "Python, so a traced graph keeps the traced size's padding: a dynamic graph traced "
            "at 64x64 gave 12x12 logits at 100x100 where torch gives 13x13",
            logits_stride=8,
            scratch={"1.0-513": _mobilenet_v2_513, "tiny": _mobilenet_v2_tiny},
            real_sizes=("1.0-513",),
            int8_float_op_types=(),  # no attention, no LayerNorm
        ),
        Family(
            model_type="mobilevit",
            name="MobileViT",
            scratch_name="mobilevit",
            model_class="MobileViTForSemanticSegmentation",
            config_class="MobileViTConfig",
            image_processor="MobileViTImageProcessor",
            # Optimum exports MobileViT (task image-segmentation) with dynamic axes only; its
            # extension point, a custom OnnxConfig, writes the fixed-size graph it needs.
            route="optimum-custom",
            optimum_task="image-segmentation",
            min_opset=LAYERNORM_OPSET,
            min_opset_why="its transformer blocks' LayerNorm is one ONNX node from opset 17",
            default_opset=LAYERNORM_OPSET,
            dynamic_spatial=False,
            square_only=False,
            fixed_size_why="its patch unfolding compares the feature map with the patch grid "
            "in Python (interpolating when they differ), so a traced graph keeps the traced "
            "size's branch: a dynamic graph traced at 64x64 failed at 100x132 (Reshape of "
            "{2,16,13,17} to {224,2,9,2}), found by validation's second-size check",
            logits_stride=16,
            scratch={"small": _mobilevit_small, "tiny": _mobilevit_tiny},
            real_sizes=("small",),
            int8_skip_symbolic_shape=True,
        ),
        Family(
            model_type="mobilevitv2",
            name="MobileViTV2",
            scratch_name="mobilevitv2",
            model_class="MobileViTV2ForSemanticSegmentation",
            config_class="MobileViTV2Config",
            image_processor="MobileViTImageProcessor",
            # Not "optimum-custom": TorchScript's col2im symbolic needs a constant output
            # size, and MobileViTV2 computes it from the input shape (TypeError
            # 'NoneType' object is not subscriptable, occurred when translating col2im).
            route="torch-dynamo",
            optimum_task=None,
            min_opset=DYNAMO_OPSET,
            min_opset_why="its folding of patches back into a feature map (nn.functional.fold) "
            "is ONNX Col2Im, which exists from opset 18",
            default_opset=DYNAMO_OPSET,
            dynamic_spatial=True,
            square_only=False,
            fixed_size_why=None,
            logits_stride=8,
            scratch={"1.0": _mobilevitv2_10, "tiny": _mobilevitv2_tiny},
            real_sizes=("1.0",),
            # Its GroupNorm(1 group) reaches ONNX as Reshape + InstanceNormalization.
            int8_float_op_types=("Softmax", "InstanceNormalization"),
            int8_skip_symbolic_shape=True,
        ),
        Family(
            model_type="upernet",
            name="UPerNet",
            scratch_name="upernet",
            model_class="UperNetForSemanticSegmentation",
            config_class="UperNetConfig",
            image_processor="SegformerImageProcessor",
            route="torch-dynamo",
            optimum_task=None,
            min_opset=DYNAMO_OPSET,
            min_opset_why="Optimum has no UPerNet and TorchScript fails on the pyramid pooling's "
            "adaptive_avg_pool2d, so it goes through torch's dynamo exporter (opset 18)",
            default_opset=DYNAMO_OPSET,
            dynamic_spatial=False,
            square_only=False,
            fixed_size_why="the pyramid pooling's adaptive_avg_pool2d is traced into fixed "
            "pooling windows: a graph traced at 64x64 was silently wrong at 96x128",
            logits_stride=1,
            scratch={
                "convnext-tiny": _upernet_convnext_tiny,
                "swin-tiny": _upernet_swin_tiny,
                "tiny": _upernet_tiny,
                "tiny-swin": _upernet_tiny_swin,
            },
            real_sizes=("convnext-tiny", "swin-tiny"),
            int8_float_op_types=TRANSFORMER_FLOAT_OPS,
            loss_ignore_attr="loss_ignore_index",
        ),
    )
}


def supported() -> str:
    return ", ".join(FAMILIES)


def family_of(config_or_model_type: Any, *, where: str | os.PathLike | None = None) -> Family:
    """The entry for a model_type, a config object, a config.json dict or a model folder;
    SegdeployError naming `where` (else the folder given) for any other model_type."""
    obj = config_or_model_type
    model_type = _model_type(obj)
    try:
        return FAMILIES[model_type]
    except KeyError:
        is_path = isinstance(obj, os.PathLike) or (isinstance(obj, str) and os.path.exists(obj))
        raise SegdeployError(
            where if where is not None else os.fspath(obj) if is_path else None,
            f"model_type {model_type!r} is not supported; segdeploy supports {supported()}",
        ) from None


def _model_type(obj: Any) -> str:
    if isinstance(obj, str) and obj in FAMILIES:
        return obj
    if isinstance(obj, str | os.PathLike) and os.path.exists(obj):
        obj = _read_config(obj)
    if isinstance(obj, Mapping):
        return str(obj.get("model_type"))
    return str(getattr(obj, "model_type", obj))


def _read_config(path: str | os.PathLike) -> dict:
    """config.json of a model folder (or the file itself) as a dict."""
    from pathlib import Path

    path = Path(path)
    path = path / CONFIG_FILE if path.is_dir() else path
    config = read_json(path, missing="missing: not a Hugging Face model folder")
    if not isinstance(config, dict):
        raise SegdeployError(path, "not a JSON object")
    return config


# ---------------------------------------------------------------------------
# Lazy resolution (these import transformers)
# ---------------------------------------------------------------------------


def model_class(family: Family, *, auto: bool = True):
    """The class that builds/loads the family: AutoModelForSemanticSegmentation by default
    (it maps all eight model types), else the concrete class."""
    import transformers

    return getattr(transformers, AUTO_CLASS if auto else family.model_class)


def processor_class(family: Family):
    import transformers

    return getattr(transformers, family.image_processor)


def scratch_ids() -> list[str]:
    """Every `scratch:` id: <scratch_name>-<size>, e.g. mobilevit-small, upernet-tiny-swin."""
    return [f"{f.scratch_name}-{s}" for f in FAMILIES.values() for s in f.scratch]


def parse_scratch(scratch_id: str) -> tuple[Family, str]:
    """("mobilevit-small") -> (MobileViT's entry, "small"); SegdeployError naming the ids."""
    for family in sorted(FAMILIES.values(), key=lambda f: -len(f.scratch_name)):
        prefix = family.scratch_name + "-"
        if scratch_id.startswith(prefix) and scratch_id[len(prefix) :] in family.scratch:
            return family, scratch_id[len(prefix) :]
    raise SegdeployError(
        "--model",
        f"unknown scratch architecture {scratch_id!r}; choose one of {', '.join(scratch_ids())}",
    )


def scratch_config(family: Family | str, size: str, id2label: Mapping[int, str]):
    """A transformers config of `family` at `size`, with id2label/label2id filled in."""
    import transformers

    family = family if isinstance(family, Family) else family_of(family)
    if size not in family.scratch:
        raise SegdeployError(
            "--model",
            f"unknown {family.name} size {size!r}; choose one of {', '.join(family.scratch)}",
        )
    id2label = {int(k): str(v) for k, v in id2label.items()}
    kwargs = {k: v for k, v in family.scratch[size]().items() if k not in _LABEL_KEYS}
    config = getattr(transformers, family.config_class)(
        **kwargs, id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    check_trainable(config)
    return config


_LABEL_KEYS = ("id2label", "label2id", "num_labels", "model_type", "transformers_version")


def check_trainable(config) -> None:
    """SegdeployError for a config that a known upstream bug would break in training."""
    if config.model_type == "dpt" and not getattr(config, "use_auxiliary_head", True):
        raise SegdeployError(
            CONFIG_FILE,
            "DPT with use_auxiliary_head=False cannot be trained: transformers' "
            "DPTForSemanticSegmentation loss then raises UnboundLocalError; set "
            "use_auxiliary_head=True",
        )


# The processor settings that make each processor give `side` x `side` from any photo,
# keyed by processor class: the crop processors resize the shortest edge and crop the
# square, BEiT's is told not to crop (its default crops 224 out of 256).
_SQUARE_KWARGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "SegformerImageProcessor": lambda s: {"size": {"height": s, "width": s}},
    "DPTImageProcessor": lambda s: {"size": {"height": s, "width": s}},
    "BeitImageProcessor": lambda s: {"size": {"height": s, "width": s}, "do_center_crop": False},
    "MobileNetV2ImageProcessor": lambda s: {
        "size": {"shortest_edge": s},
        "crop_size": {"height": s, "width": s},
    },
    "MobileViTImageProcessor": lambda s: {
        "size": {"shortest_edge": s},
        "crop_size": {"height": s, "width": s},
    },
}


def square_processor_kwargs(family: Family, side: int) -> dict[str, Any]:
    """Keyword arguments of the family's image processor that make it output side x side."""
    return _SQUARE_KWARGS[family.image_processor](side)
