"""Hostile inputs to export and validate, second round (issue 22): export never deletes
or replaces what it did not write, adding a variant keeps the others, and every refusal
is one line before any work."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cli_checks import one_line_error
from click.testing import CliRunner
from test_hostile_train_export import NEED_ROOT, _in_mount

from segdeploy.cli import main


def _export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def _snapshot(folder):
    return {
        p.relative_to(folder): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


# ------------------------------------------------------------------ export --output (item 1)


def test_export_refuses_a_folder_of_the_users_files(tiny_model_dir, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.txt").write_text("thesis")
    (docs / "sub" / "chapter.txt").write_text("chapter")
    before = _snapshot(tmp_path)
    result = _export(tiny_model_dir, "--output", docs, "--no-validate")
    one_line_error(result, str(docs), "did not write", "sub/", "thesis.txt")
    assert _snapshot(tmp_path) == before  # nothing lost, nothing written beside it


def test_export_refuses_a_graph_beside_the_users_files(tiny_model_dir, tmp_path):
    """A model.onnx does not make a folder an earlier export: the other files must be
    export's too."""
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"someone's graph")
    (out / "notes.md").write_text("notes")
    one_line_error(_export(tiny_model_dir, "--output", out, "--no-validate"), "notes.md")
    assert (out / "notes.md").read_text() == "notes"


def test_export_refuses_any_folder_of_the_model_but_onnx(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (model / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    before = _snapshot(model)
    for inside in ("checkpoints", "checkpoints/onnx", "exports"):
        result = _export(model, "--output", model / inside, "--no-validate")
        one_line_error(result, "inside the model folder", str(model / "onnx"))
    assert _snapshot(model) == before  # the checkpoints are there for --resume
    assert _export(model, "--output", model / "onnx", "--no-validate").exit_code == 0


OPENVINO_EXPORT = {  # what `--quantize int8 --int8-engine openvino` adds to an export
    "model_openvino_int8.xml": b"<net/>",
    "model_openvino_int8.bin": b"weights",
    "quantization_openvino_int8.json": b"{}",
    "validation_openvino_int8.json": b"{}",
}


def test_export_again_over_an_openvino_int8_export(tiny_model_dir, tmp_path):
    """The OpenVINO IR's weights (.bin) and its quantization report are export's own
    files: exporting into that folder again keeps them (same fp32 graph), it does not
    refuse the folder as someone else's."""
    out = tmp_path / "onnx"
    assert _export(tiny_model_dir, "--output", out, "--no-validate").exit_code == 0
    for name, data in OPENVINO_EXPORT.items():
        (out / name).write_bytes(data)
    result = _export(tiny_model_dir, "--output", out, "--no-validate")
    assert result.exit_code == 0, result.output
    assert {name: (out / name).read_bytes() for name in OPENVINO_EXPORT} == OPENVINO_EXPORT
    assert "kept from the earlier export" in result.output


def test_readding_a_dropped_openvino_graph_names_its_options():
    from segdeploy.export.folder import readd_options

    dropped = ["model_openvino_int8.bin", "model_openvino_int8.xml", "model_fp16.onnx"]
    assert readd_options(dropped) == "--quantize int8 --int8-engine openvino --fp16"


def test_export_to_the_working_folder_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for output in (".", "sub/..", str(tmp_path.parent)):
        one_line_error(_export(tiny_model_dir, "--output", output, "--no-validate"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_export_refuses_a_symlink_output(tiny_model_dir, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    result = _export(tiny_model_dir, "--output", tmp_path / "link", "--no-validate")
    one_line_error(result, "symbolic link")
    assert (tmp_path / "link").is_symlink()


# ------------------------------------------------------------------ adding a variant (item 22)


@pytest.fixture(scope="module")
def fp16_export(tiny_model_dir, tmp_path_factory):
    """An export with model_fp16.onnx and its validation report."""
    out = tmp_path_factory.mktemp("add") / "onnx"
    result = _export(tiny_model_dir, "--output", out, "--fp16", "--random-inputs", "2")
    assert result.exit_code == 0, result.output
    return out


def test_adding_a_variant_keeps_the_others_and_their_reports(fp16_export, tiny_model_dir, tmp_path):
    out = shutil.copytree(fp16_export, tmp_path / "onnx")
    fp16 = (out / "model_fp16.onnx").read_bytes()
    report = (out / "validation_fp16.json").read_text()
    result = _export(tiny_model_dir, "--output", out, "--optimize", "--random-inputs", "2")
    assert result.exit_code == 0, result.output
    assert "kept from the earlier export (same model.onnx): model_fp16.onnx" in result.output
    assert (out / "model_optimized.onnx").is_file()
    assert (out / "validation_optimized.json").is_file()
    assert (out / "model_fp16.onnx").read_bytes() == fp16
    assert (out / "validation_fp16.json").read_text() == report
    assert json.loads((out / "validation.json").read_text())["passed"] is True
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_variants_of_another_fp32_graph_are_dropped_and_said(fp16_export, tiny_model_dir, tmp_path):
    out = shutil.copytree(fp16_export, tmp_path / "onnx")
    old = (out / "model.onnx").read_bytes()
    result = _export(tiny_model_dir, "--output", out, "--opset", "18", "--no-validate")
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").read_bytes() != old  # another graph: opset 18
    assert not (out / "model_fp16.onnx").exists() and not (out / "validation_fp16.json").exists()
    assert not (out / "validation.json").exists()  # it judged the old graph
    warning = " ".join(result.output.split())
    assert "dropped model_fp16.onnx, validation.json, validation_fp16.json" in warning
    assert "add --fp16 to make them again" in warning


def test_an_export_without_validation_keeps_the_report_of_the_same_graph(
    fp16_export, tiny_model_dir, tmp_path
):
    out = shutil.copytree(fp16_export, tmp_path / "onnx")
    report = (out / "validation.json").read_text()
    result = _export(tiny_model_dir, "--output", out, "--no-validate")
    assert result.exit_code == 0, result.output
    assert (out / "validation.json").read_text() == report
    assert (out / "model_fp16.onnx").is_file()
    assert os.stat(out / "model_fp16.onnx").st_nlink == 1  # the old folder is gone


# ------------------------------------------------------------------ validate (items 17, 18, 19)


def test_validate_refuses_a_nan_tolerance(tiny_model_dir, tiny_onnx_dir, tmp_path):
    onnx = shutil.copytree(tiny_onnx_dir, tmp_path / "onnx")
    for option in ("--tolerance", "--logit-tolerance"):
        result = CliRunner().invoke(
            main, ["validate", str(onnx), "--model", str(tiny_model_dir), option, "nan"]
        )
        one_line_error(result, option, "nan")
    assert not (onnx / "validation.json").exists()
    result = _export(tiny_model_dir, "--output", tmp_path / "out", "--tolerance", "nan")
    one_line_error(result, "--tolerance")
    assert not (tmp_path / "out").exists()


def test_validate_graph_of_another_folder_leaves_its_report_alone(
    fp16_export, tiny_model_dir, tmp_path
):
    mine = shutil.copytree(fp16_export, tmp_path / "mine")
    other = shutil.copytree(fp16_export, tmp_path / "other")
    before = _snapshot(other)
    for graph in ("../other/model_fp16.onnx", str(other / "model_fp16.onnx")):
        result = CliRunner().invoke(
            main, ["validate", str(mine), "--model", str(tiny_model_dir), "--graph", graph]
        )
        one_line_error(result, "--graph", "is a path")
    assert _snapshot(other) == before


def test_config_whose_classes_do_not_fit_the_weights_is_one_line(
    tiny_model_dir, tiny_onnx_dir, tmp_path
):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["id2label"] = {str(i): f"class {i}" for i in range(100000)}
    config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    (model / "config.json").write_text(json.dumps(config))
    needles = (str(model / "config.json"), "100000 classes", "decode_head.classifier", "[5")
    one_line_error(_export(model, "--no-validate"), *needles)
    assert not (model / "onnx").exists()
    onnx = shutil.copytree(tiny_onnx_dir, tmp_path / "onnx")
    result = CliRunner().invoke(main, ["validate", str(onnx), "--model", str(model)])
    one_line_error(result, *needles)
    assert not (onnx / "validation.json").exists()


# ------------------------------------------------------------------ read-only folders (item 17)


@NEED_ROOT
def test_validate_of_a_read_only_export_is_refused_before_work(
    tiny_model_dir, tiny_onnx_dir, tmp_path
):
    mount = tmp_path / "ro"
    mount.mkdir()
    rc, err, listing, _ = _in_mount(
        str(mount), ["validate", f"{mount}/{tiny_onnx_dir.name}", "--model", str(tiny_model_dir)],
        size="20m", seed=tiny_onnx_dir, ro=True,
    )  # fmt: skip
    assert rc == 2, err
    assert "cannot write validation.json here: Read-only file system" in err
    assert "unexpected" not in err and "validating" not in err  # before any image ran
