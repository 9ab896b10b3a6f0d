"""`segdeploy infer` and `Segmenter`: masks equal to transformers in torch, outputs, bad input, resume."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.atomic import TMP_MARKER
from segdeploy.cli import main
from segdeploy.data.synthetic import synthetic_sample
from segdeploy.errors import SegdeployError

# ONNX Runtime and torch differ by float rounding in the logits (~1e-6), which can
# flip the argmax at exact class borders only.
MIN_AGREEMENT = 0.9999


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def make_photos(root: Path) -> dict[str, Path]:
    """Real-looking images (synthetic scenes) of several sizes, formats and modes."""
    rgb = [
        Image.fromarray(synthetic_sample(i, seed=7, size=s)[0])
        for i, s in enumerate(
            [(64, 64), (100, 37), (240, 320), (77, 131), (48, 200), (90, 90), (64, 96)]
        )
    ]
    files = {
        "jpeg": _save(rgb[0], root / "a" / "scene.jpg", quality=92),
        "png": _save(rgb[1], root / "a" / "tall.png"),
        "large": _save(rgb[2], root / "b" / "deep" / "street.jpg", quality=90),
        "gray": _save(rgb[3].convert("L"), root / "b" / "gray.png"),
        "rgba": _save(rgb[4].convert("RGBA"), root / "rgba.png"),
        "palette": _save(rgb[5].convert("P", palette=Image.Palette.ADAPTIVE), root / "pal.gif"),
    }
    rotated = rgb[6]
    exif = rotated.getexif()
    exif[0x0112] = 8  # display rotated 90 degrees counter-clockwise
    files["exif"] = _save(rotated, root / "b" / "phone.jpg", exif=exif, quality=92)
    sixteen = np.asarray(rgb[0].convert("L"), dtype=np.uint16) * 257
    files["16bit"] = _save(Image.fromarray(sixteen), root / "b" / "depth16.png")
    return files


def torch_masks(model_dir: Path, images: list[Image.Image]) -> list[np.ndarray]:
    """The reference: transformers' processor and model, bilinear upsampling, argmax."""
    import torch
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    model = SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = SegformerImageProcessor.from_pretrained(model_dir)
    masks = []
    with torch.no_grad():
        for im in images:
            logits = model(**processor(images=im, return_tensors="pt")).logits
            up = torch.nn.functional.interpolate(
                logits, size=(im.height, im.width), mode="bilinear", align_corners=False
            )
            masks.append(up.argmax(1)[0].numpy())
    return masks


def reference_image(path: Path) -> Image.Image:
    """How Hugging Face loads an image: EXIF transpose, then RGB."""
    from transformers.image_utils import load_image as hf_load_image

    if "16" in path.stem:  # HF would clip 16-bit values to 255; the scaling rule is ours
        from segdeploy.runtime.image_io import load_image

        return load_image(path)
    return hf_load_image(str(path))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("in") / "photos"
    return root, make_photos(root)


@pytest.fixture(scope="module")
def infer_run(photos, tiny_onnx_dir, tmp_path_factory):
    root, _ = photos
    out = tmp_path_factory.mktemp("out")
    result = CliRunner().invoke(
        main,
        [
            "infer",
            "--model",
            str(tiny_onnx_dir),
            str(root),
            "-o",
            str(out),
            "--overlay",
            "--batch-size",
            "3",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result


def test_masks_equal_transformers_in_torch(photos, infer_run, tiny_model_dir):
    root, files = photos
    out, _ = infer_run
    names = list(files)
    refs = torch_masks(tiny_model_dir, [reference_image(files[n]) for n in names])
    for name, ref in zip(names, refs, strict=True):
        label = out / "photos" / files[name].relative_to(root).with_suffix(".png")
        with Image.open(label) as im:
            assert im.mode == "L"
            mask = np.asarray(im)
        assert mask.shape == ref.shape, name
        agreement = (mask == ref).mean()
        assert agreement >= MIN_AGREEMENT, f"{name}: {agreement:.6f}"
    # the EXIF image is upright: stored 64x96 (h x w), displayed 96x64
    with Image.open(out / "photos" / "b" / "phone.png") as im:
        assert (im.height, im.width) == (96, 64)


def test_summary_and_outputs(photos, infer_run):
    root, files = photos
    out, result = infer_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["images"] == len(files) and summary["totals"]["failed"] == 0
    assert summary["totals"]["images_per_s"] > 0 and summary["interrupted"] is False
    assert summary["provider"] == "cpu" and summary["num_labels"] == 5
    assert len(summary["images"]) == len(files) and summary["failures"] == []
    for rec in summary["images"]:
        label = out / rec["output"]
        with Image.open(label) as im:
            mask = np.asarray(im)
        assert rec["size"] == list(mask.shape)
        shares = {c["id"]: c["share"] for c in rec["classes"]}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
        for cls, share in shares.items():
            assert share == pytest.approx((mask == cls).mean(), abs=1e-6)
        assert rec["time_s"]["total"] >= rec["time_s"]["model"] > 0
        with Image.open(out / rec["overlay"]) as ov:
            assert ov.size == (mask.shape[1], mask.shape[0]) and ov.mode == "RGB"
    assert not list(out.rglob(f"*{TMP_MARKER}*"))
    assert f"segmented {len(files)} images" in result.output


def test_segmenter_api(tiny_onnx_dir, tiny_model_dir, photos):
    from segdeploy import Segmenter

    _, files = photos
    seg = Segmenter(tiny_onnx_dir, provider="cpu", threads=1, batch_size=2)
    paths = [files["jpeg"], files["png"], files["large"]]
    batch = seg.predict_batch(paths)
    assert [m.shape for m in batch] == [(64, 64), (100, 37), (240, 320)]
    single = seg.predict(files["png"])
    assert np.array_equal(single, batch[1])
    # PIL images and arrays work too, at their own sizes
    img = Image.open(files["large"]).convert("RGB")
    assert np.array_equal(seg.predict(img), batch[2])
    assert np.array_equal(seg.predict(np.asarray(img)), batch[2])
    # a trained model folder with the export in onnx/ is found as well
    model = Path(str(tiny_model_dir) + "_with_onnx")
    if not model.exists():
        shutil.copytree(tiny_model_dir, model)
        shutil.copytree(tiny_onnx_dir, model / "onnx")
    assert np.array_equal(Segmenter(model, provider="cpu").predict(files["png"]), single)
    with pytest.raises(SegdeployError, match="cannot segment a int"):
        seg.predict(3)


def test_missing_model_exits_2_at_once(tmp_path, photos):
    root, _ = photos
    runner = CliRunner()
    out = tmp_path / "o"
    result = runner.invoke(
        main, ["infer", "--model", str(tmp_path / "nope"), str(root), "-o", str(out)]
    )
    assert result.exit_code == 2 and "model folder not found" in result.output
    (tmp_path / "empty_model").mkdir()
    result = runner.invoke(
        main, ["infer", "--model", str(tmp_path / "empty_model"), str(root), "-o", str(out)]
    )
    assert result.exit_code == 2 and "no model.onnx" in result.output
    assert not out.exists()


def test_missing_variant_names_what_is_there(tiny_onnx_dir, tmp_path):
    result = CliRunner().invoke(
        main, ["infer", "--model", str(tiny_onnx_dir), "--variant", "int8", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "no model_int8.onnx" in result.output and "found: model.onnx" in result.output


def test_bad_inputs_are_reported_and_the_run_goes_on(tiny_onnx_dir, tmp_path, monkeypatch, caplog):
    root = tmp_path / "mixed"
    good = _save(Image.fromarray(synthetic_sample(1, size=48)[0]), root / "good.png")
    _save(Image.fromarray(synthetic_sample(2, size=48)[0]), root / "locked" / "inside.png")
    big = _save(Image.fromarray(synthetic_sample(3, size=(80, 90))[0]), root / "big.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image")
    cut = _save(Image.fromarray(synthetic_sample(4, size=120)[0]), root / "cut.jpg")
    cut.write_bytes(cut.read_bytes()[:600])
    (root / "readme.txt").write_text("ignored: not an image by name")

    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    caplog.set_level(logging.ERROR, logger="segdeploy.runtime.infer")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "infer",
            "--model",
            str(tiny_onnx_dir),
            str(root),
            "-o",
            str(out),
            "--max-pixels",
            "5000",
        ],
    )
    assert result.exit_code == 1, result.output
    summary = json.loads((out / "summary.json").read_text())
    reasons = {Path(f["input"]).name: f["reason"] for f in summary["failures"]}
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["cut.jpg"].startswith("corrupt or truncated image")
    assert reasons["big.png"].startswith("image too large to decode safely: 90x80")
    assert reasons["locked"] == "cannot read folder: Permission denied"
    assert summary["totals"] == {
        **summary["totals"],
        "images": 1,
        "failed": 5,
        "ignored_non_images": 1,
    }
    assert (out / "mixed" / "good.png").is_file() and not (out / "mixed" / "big.png").exists()
    for name, reason in reasons.items():  # every failure logged (stderr) with its path and reason
        assert any(name in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert good.is_file() and big.is_file()


def test_output_tree_names_and_exclusions(tiny_onnx_dir, tmp_path, caplog):
    root = tmp_path / "tree"
    img = Image.fromarray(synthetic_sample(0, size=40)[0])
    _save(img, root / "x.jpg")
    _save(img, root / "x.png")  # same stem: both keep their extension
    _save(img, root / "deep" / "er" / "y.jpg")
    _save(img, root / ".hidden" / "z.png")
    out = root / "out"  # output inside the input folder: never read back as input
    args = ["infer", "--model", str(tiny_onnx_dir), str(root), "-o", str(out)]
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["totals"]["images"] == 3
    produced = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert produced == ["tree/deep/er/y.png", "tree/x.jpg.png", "tree/x.png.png"]

    # a quoted glob is mirrored from its folder part; a plain file goes to the top
    out2 = tmp_path / "out2"
    result = CliRunner().invoke(
        main,
        [
            "infer",
            "--model",
            str(tiny_onnx_dir),
            str(root / "**" / "*.jpg"),
            str(root / "x.png"),
            "-o",
            str(out2),
        ],
    )
    assert result.exit_code == 0, result.output
    produced = sorted(str(p.relative_to(out2)) for p in out2.rglob("*.png"))
    assert produced == ["tree/deep/er/y.png", "tree/x.png", "x.png"]

    # A pattern that matches nothing, like a missing input, is refused before any work.
    result = CliRunner().invoke(main, ["infer", "--model", str(tiny_onnx_dir), str(root / "*.gif")])
    assert result.exit_code == 2 and "no file matches this pattern" in result.output


def test_inputs_that_would_collide_are_refused(tiny_onnx_dir, tmp_path):
    for d in ("a", "b"):
        _save(Image.new("RGB", (8, 8)), tmp_path / d / "same" / "i.png")
    result = CliRunner().invoke(
        main,
        [
            "infer",
            "--model",
            str(tiny_onnx_dir),
            str(tmp_path / "a" / "same"),
            str(tmp_path / "b" / "same"),
        ],
    )
    assert result.exit_code == 2 and "would write to the same outputs" in result.output


def _folder_of(n: int, root: Path) -> Path:
    for i in range(n):
        _save(Image.fromarray(synthetic_sample(i, size=(40 + i, 50))[0]), root / f"img{i:02d}.png")
    return root


def _labels(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.asarray(Image.open(p)) for p in sorted(out.rglob("*.png"))}


def test_resume_after_interruption(tiny_onnx_dir, tmp_path, monkeypatch):
    """Ctrl-C during the 3rd model call, and again inside a file write: only complete
    files remain, summary.json says so, and --skip-existing finishes the job."""
    import segdeploy.runtime.pipeline as pipeline_mod
    from segdeploy.runtime.infer import run_infer
    from segdeploy.runtime.segmenter import Segmenter

    root = _folder_of(9, tmp_path / "in")
    kwargs = dict(provider="cpu", batch_size=2, threads=1, workers=2, overlay=True, progress=False)
    run_infer([root], tiny_onnx_dir, tmp_path / "full", **kwargs)
    full = _labels(tmp_path / "full")
    assert len(full) == 9

    out = tmp_path / "out"
    calls = {"n": 0}
    forward = Segmenter.forward

    def interrupted_forward(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kw)

    monkeypatch.setattr(Segmenter, "forward", interrupted_forward)
    with pytest.raises(KeyboardInterrupt):
        run_infer([root], tiny_onnx_dir, out, **kwargs)
    monkeypatch.setattr(Segmenter, "forward", forward)
    assert len(_labels(out)) == 4  # the two batches the model finished were written
    assert not list(out.rglob(f"*{TMP_MARKER}*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["totals"]["images"] == 4

    # Interrupted again in the middle of writing a label file. The write runs in a worker
    # process, out of a monkeypatch's reach, so this part runs the stages in-process
    # (workers=0, the reference path); tests/test_pipeline.py interrupts the worker path.
    save = pipeline_mod.save_labels
    writes = {"n": 0}

    def interrupted_save(path, labels, **kwargs):
        writes["n"] += 1
        if writes["n"] == 2:
            from segdeploy.atomic import atomic_path

            with atomic_path(path) as tmp:
                tmp.write_bytes(b"\x89PNG half a file")
                raise KeyboardInterrupt
        save(path, labels, **kwargs)

    monkeypatch.setattr(pipeline_mod, "save_labels", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run_infer([root], tiny_onnx_dir, out, skip_existing=True, **{**kwargs, "workers": 0})
    monkeypatch.setattr(pipeline_mod, "save_labels", save)
    assert not list(out.rglob(f"*{TMP_MARKER}*"))
    partial = _labels(out)
    assert 4 < len(partial) < 9
    for name, mask in partial.items():  # whatever is there is complete and right
        assert np.array_equal(mask, full[name])

    summary = run_infer([root], tiny_onnx_dir, out, skip_existing=True, **kwargs)
    assert summary["totals"]["skipped"] == len(partial)
    assert summary["totals"]["images"] == 9 - len(partial)
    assert summary["interrupted"] is False
    final = _labels(out)
    assert final.keys() == full.keys()
    assert all(np.array_equal(final[k], full[k]) for k in full)
    on_disk = json.loads((out / "summary.json").read_text())
    assert len(on_disk["images"]) == 9  # skipped images keep their record (size, classes)
    assert all(rec["classes"] for rec in on_disk["images"])


def test_sixteen_bit_labels_and_class_shares(tmp_path):
    from segdeploy.runtime.infer import class_shares, save_labels

    labels = np.array([[0, 300], [300, 65535]], dtype=np.uint16)
    save_labels(tmp_path / "l16.png", labels)
    with Image.open(tmp_path / "l16.png") as im:
        assert im.mode.startswith("I;16") or im.mode == "I"
        assert np.array_equal(np.asarray(im), labels)
    small = np.array([[1, 1], [2, 0]], dtype=np.uint8)
    save_labels(tmp_path / "l8.png", small)
    with Image.open(tmp_path / "l8.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), small)
    shares = class_shares(small, {0: "a", 1: "b", 2: "c"})
    assert shares == [
        {"id": 1, "name": "b", "share": 0.5},
        {"id": 0, "name": "a", "share": 0.25},
        {"id": 2, "name": "c", "share": 0.25},
    ]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (37, 53), (360, 480)])
def test_label_png_decodes_to_the_same_array_as_pillows_png(tmp_path, shape, dtype):
    """label_png (zlib, no row filter) is a valid PNG: Pillow reads back the exact ids, with
    the mode Pillow's own writer gives (L, I;16)."""
    from segdeploy.runtime.image_io import label_png

    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    top = np.iinfo(dtype).max
    labels = rng.integers(0, top, size=shape, endpoint=True, dtype=dtype)
    labels[: shape[0] // 2] = labels[0, 0]  # long runs of one id too, as in label maps
    labels.flat[-1] = top  # the extreme id survives (and the byte order of 16-bit ids)
    with Image.open(io.BytesIO(label_png(labels))) as ours:
        ours.load()
        theirs_file = tmp_path / "pillow.png"
        Image.fromarray(labels).save(theirs_file)
        with Image.open(theirs_file) as theirs:
            assert ours.mode == theirs.mode and ours.size == theirs.size
            assert np.array_equal(np.asarray(ours), labels)
            assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_label_png_refuses_what_png_cannot_hold():
    from segdeploy.runtime.image_io import label_png

    for bad in (np.zeros((2, 2), np.int32), np.zeros((2, 2, 3), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="2-D uint8 or uint16"):
            label_png(bad)


def test_palettes():
    from segdeploy.runtime.palette import ade20k_palette, distinct_palette, overlay, palette_for

    ade = palette_for(150)
    assert (
        ade.shape == (150, 3)
        and ade[0].tolist() == [120, 120, 120]
        and ade[1].tolist() == [180, 120, 120]
    )
    assert np.array_equal(ade, ade20k_palette())
    other = palette_for(11)
    assert other.shape == (11, 3) and not np.array_equal(other, ade[:11])
    assert len({tuple(c) for c in distinct_palette(256)}) == 256
    img = Image.new("RGB", (2, 1), (100, 100, 100))
    blended = np.asarray(
        overlay(img, np.array([[0, 1]]), np.array([[200, 0, 100], [0, 0, 0]], np.uint8))
    )
    assert blended.tolist() == [[[150, 50, 100], [50, 50, 50]]]


def test_fused_argmax_graph_gives_the_same_masks(tiny_onnx_dir, tmp_path, photos):
    """A graph with upsampling and argmax fused in (export --fuse-argmax) runs through the
    same API and equals the numpy path."""
    fuse = pytest.importorskip("segdeploy.export.fuse_argmax")
    from segdeploy import Segmenter

    folder = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, folder)
    fuse.fuse_argmax(folder / "model.onnx", folder / "model_fused.onnx", num_labels=5)
    _, files = photos
    paths = [files["jpeg"], files["png"], files["large"], files["gray"]]
    plain = Segmenter(folder, provider="cpu", threads=1).predict_batch(paths)
    fused_seg = Segmenter(folder, provider="cpu", variant="fused", threads=1)
    assert fused_seg.fused
    for a, b in zip(plain, fused_seg.predict_batch(paths), strict=True):
        assert a.shape == b.shape and (a == b).mean() >= 0.999
    with pytest.raises(SegdeployError, match="fused"):
        fused_seg.logits(np.zeros((1, 3, 64, 64), np.float32))


def test_default_model_is_the_newest_export_under_models(tmp_path, tiny_onnx_dir, monkeypatch):
    from segdeploy.folders import newest_export

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["infer", str(tmp_path)])
    assert result.exit_code == 2 and "no exported model here" in result.output

    for name, mtime in (("old", 1_000_000), ("new", 2_000_000)):
        shutil.copytree(tiny_onnx_dir, tmp_path / "models" / name / "onnx")
        os.utime(tmp_path / "models" / name / "onnx" / "model.onnx", (mtime, mtime))
    assert newest_export() == Path("models") / "new"
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "a.png")
    result = CliRunner().invoke(main, ["infer", "images", "-o", "out"])
    assert result.exit_code == 0, result.output
    assert "models/new" in result.output
    assert (tmp_path / "out" / "images" / "a.png").is_file()
