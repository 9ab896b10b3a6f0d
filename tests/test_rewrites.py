"""Exact rewrites before export (segdeploy.export.rewrites): the same logits, less work.

SegFormer's decode head is folded: its 1x1 fuse convolution and batch norm move into
each stage's projection, before the upsampling. The folded head must give the
unmodified head's logits (to float32 rounding) with trained-looking weights (batch norm
statistics far from 0/1, every stage's block of the fuse weight different), at square
and non-square sizes; the exported graph must lose the 4d-channel fuse convolution
and still equal the unmodified PyTorch model; `--no-rewrite` keeps the original graph.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from transformers import SegformerForSemanticSegmentation

from segdeploy.cli import main
from segdeploy.export.rewrites import REWRITES, apply_rewrites, folded_segformer_head
from segdeploy.export.routes import export_fp32
from segdeploy.train.models import scratch_config

ID2LABEL = {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}


def _trained_looking(seed: int = 0, **config) -> SegformerForSemanticSegmentation:
    """A tiny SegFormer whose decode head has statistics a trained one would have."""
    torch.manual_seed(seed)
    cfg = scratch_config("tiny", ID2LABEL)
    for key, value in config.items():
        setattr(cfg, key, value)
    model = SegformerForSemanticSegmentation(cfg).eval()
    head = model.decode_head
    with torch.no_grad():
        head.batch_norm.running_mean.uniform_(-2, 2)
        head.batch_norm.running_var.uniform_(0.2, 3)
        head.batch_norm.weight.uniform_(0.5, 2)
        head.batch_norm.bias.uniform_(-1, 1)
        for mlp in head.linear_c:
            mlp.proj.bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (70, 50)])
def test_the_folded_segformer_head_gives_the_same_logits(size):
    model = _trained_looking()
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        hidden = model.segformer(pixels, output_hidden_states=True).hidden_states
        folded = folded_segformer_head(model.decode_head)(hidden)
    assert folded.shape == expected.shape
    scale = expected.abs().max().item()
    assert torch.allclose(folded, expected, atol=1e-5 * max(scale, 1.0)), (
        (folded - expected).abs().max().item()
    )
    assert torch.equal(folded.argmax(1), expected.argmax(1))


def test_the_fold_needs_an_eval_mode_model():
    model = _trained_looking().train()
    with pytest.raises(ValueError, match="eval"):
        apply_rewrites(model)


def test_a_family_without_a_rewrite_is_left_as_it_is():
    from transformers import MobileNetV2Config, MobileNetV2ForSemanticSegmentation

    model = MobileNetV2ForSemanticSegmentation(
        MobileNetV2Config(num_labels=3, image_size=64, depth_multiplier=0.35)
    ).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_rewrites(model) == []
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _fuse_weights(graph: onnx.ModelProto, d: int) -> list[str]:
    """Initializers shaped like the fuse convolution's weight: d x 4d x 1 x 1."""
    return [i.name for i in graph.graph.initializer if list(i.dims) == [d, 4 * d, 1, 1]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewrite") / "model"
    _trained_looking(seed=2).save_pretrained(folder)
    from transformers import SegformerImageProcessor

    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def test_the_exported_graph_is_folded_and_equals_the_unmodified_model(model_dir, tmp_path):
    d = SegformerForSemanticSegmentation.from_pretrained(model_dir).config.decoder_hidden_size
    folded = export_fp32(model_dir, tmp_path / "folded")
    plain = export_fp32(model_dir, tmp_path / "plain", rewrite=False)
    assert _fuse_weights(onnx.load(plain), d), "the unfolded graph keeps its fuse weight"
    assert not _fuse_weights(onnx.load(folded), d)
    model = SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()
    pixels = np.random.default_rng(0).standard_normal((2, 3, 80, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    for graph in (folded, plain):
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"pixel_values": pixels})[0]
        np.testing.assert_allclose(logits, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("flag", [None, "--no-rewrite"])
def test_export_says_which_rewrites_it_applied(model_dir, tmp_path, flag):
    out = tmp_path / "onnx"
    args = ["export", str(model_dir), "--output", str(out)] + ([flag] if flag else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "validation.json").read_text())
    expected = {"fold-decode-head": REWRITES["segformer"].what} if flag is None else {}
    assert report["exporter"]["rewrites"] == expected
    d = SegformerForSemanticSegmentation.from_pretrained(model_dir).config.decoder_hidden_size
    assert bool(_fuse_weights(onnx.load(out / "model.onnx"), d)) == (flag is not None)
