"""The model-family registry: one entry per architecture of the guide, each one buildable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from family_models import CASE_IDS, CASES, ID2LABEL, SIDE, build_model

from segdeploy.errors import SegdeployError
from segdeploy.export.routes import ROUTES
from segdeploy.families import (
    FAMILIES,
    LAYERNORM_OPSET,
    check_trainable,
    family_of,
    model_class,
    parse_scratch,
    processor_class,
    scratch_config,
    scratch_ids,
)

GUIDE = {
    "segformer",
    "dpt",
    "beit",
    "data2vec-vision",
    "mobilenet_v2",
    "mobilevit",
    "mobilevitv2",
    "upernet",
}


def test_registry_holds_the_eight_architectures_of_the_guide():
    assert set(FAMILIES) == GUIDE
    assert {t for t, _ in CASES} == GUIDE


@pytest.mark.parametrize("model_type", sorted(GUIDE))
def test_entry_is_consistent_with_transformers(model_type):
    family = FAMILIES[model_type]
    assert getattr(transformers, family.config_class).model_type == model_type
    mapping = transformers.models.auto.modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
    assert mapping[model_type] == family.model_class  # so the Auto class loads it
    assert model_class(family) is transformers.AutoModelForSemanticSegmentation
    assert model_class(family, auto=False).__name__ == family.model_class
    # The processor the Hub configs of this model type name (transformers' own mapping).
    processors = transformers.models.auto.image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES
    assert processors[model_type][0] == family.image_processor
    assert processor_class(family).__name__ == family.image_processor
    assert family.route in ROUTES
    assert family.default_opset >= max(family.min_opset, LAYERNORM_OPSET)
    assert set(family.real_sizes) <= set(family.scratch) and family.real_sizes
    assert "tiny" in family.scratch


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.optimum_task))
def test_optimum_knows_the_task_of_optimum_routes(model_type):
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs
    from optimum.exporters.tasks import TasksManager

    family = FAMILIES[model_type]
    tasks = TasksManager.get_supported_tasks_for_model_type(
        model_type, "onnx", library_name="transformers"
    )
    if family.route == "optimum":
        assert family.optimum_task in tasks
    else:  # "optimum-custom": Optimum lacks the task, or writes only dynamic axes (MobileViT)
        assert family.optimum_task not in tasks or not family.dynamic_spatial


@pytest.mark.parametrize("scratch_id", scratch_ids())
def test_every_scratch_config_builds_with_its_labels(scratch_id):
    family, size = parse_scratch(scratch_id)
    config = scratch_config(family, size, ID2LABEL)
    assert config.model_type == family.model_type
    assert config.id2label == ID2LABEL and config.label2id == {v: k for k, v in ID2LABEL.items()}
    assert config.num_labels == len(ID2LABEL)


def test_real_sizes_have_their_published_shapes():
    base = scratch_config("beit", "base", ID2LABEL)
    assert (base.hidden_size, base.num_hidden_layers, base.image_size) == (768, 12, 640)
    swin = scratch_config("upernet", "swin-tiny", ID2LABEL).backbone_config
    assert (swin.model_type, swin.embed_dim, swin.depths) == ("swin", 96, [2, 2, 6, 2])
    convnext = scratch_config("upernet", "convnext-tiny", ID2LABEL).backbone_config
    assert (convnext.model_type, convnext.hidden_sizes) == ("convnext", [96, 192, 384, 768])
    assert scratch_config("mobilenet_v2", "1.0-513", ID2LABEL).image_size == 513
    assert scratch_config("segformer", "b0", ID2LABEL).hidden_sizes == [32, 64, 160, 256]


@pytest.mark.parametrize(("model_type", "size"), CASES, ids=CASE_IDS)
def test_tiny_model_builds_and_runs_with_meaningful_logits(model_type, size):
    family = FAMILIES[model_type]
    model = build_model(model_type, size)
    with torch.no_grad():
        pixels = torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
        logits = model(pixel_values=pixels).logits
    side = SIDE // family.logits_stride
    assert tuple(logits.shape) == (1, len(ID2LABEL), side, side)
    # Re-initialised: logits far from 0, and not one class everywhere.
    assert logits.abs().max() > 0.5
    assert len(torch.unique(logits.argmax(1))) > 1


def test_family_of_accepts_configs_dicts_and_folders(tmp_path):
    config = scratch_config("mobilevit", "tiny", ID2LABEL)
    assert family_of(config).name == "MobileViT"
    assert family_of({"model_type": "upernet"}).name == "UPerNet"
    config.save_pretrained(tmp_path)
    assert family_of(tmp_path).model_type == "mobilevit"


def test_unsupported_model_type_is_one_line_naming_the_supported():
    with pytest.raises(SegdeployError) as err:
        family_of("vit")
    message = str(err.value)
    assert "\n" not in message and "'vit' is not supported" in message
    assert all(t in message for t in GUIDE)


def test_unsupported_folder_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(SegdeployError, match=f"^{tmp_path}: model_type 'vit' is not supported"):
        family_of(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(SegdeployError, match="config.json: unreadable"):
        family_of(tmp_path)


def test_unknown_scratch_id_names_the_choices():
    with pytest.raises(SegdeployError, match="mobilevit-small"):
        parse_scratch("mobilevit-huge")
    assert parse_scratch("upernet-tiny-swin")[1] == "tiny-swin"
    assert parse_scratch("data2vec-vision-base")[0].model_type == "data2vec-vision"


def test_dpt_without_auxiliary_head_is_refused_not_crashed():
    config = scratch_config("dpt", "tiny", ID2LABEL)
    config.use_auxiliary_head = False
    # The upstream bug the refusal guards against: the loss crashes.
    model = transformers.AutoModelForSemanticSegmentation.from_config(config)
    with pytest.raises(UnboundLocalError):
        model(pixel_values=torch.randn(1, 3, SIDE, SIDE), labels=torch.zeros(1, SIDE, SIDE).long())
    with pytest.raises(SegdeployError, match="use_auxiliary_head=False"):
        check_trainable(config)


def test_registry_imports_neither_torch_nor_transformers():
    code = (
        "import json, sys\n"
        "import segdeploy.families as f, segdeploy.runtime.processors\n"
        "f.family_of('dpt'); f.parse_scratch('beit-base')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers'})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []
