"""Issue 22, the runtime: bounded memory per image, per-image failures that stay per image,
models refused at open with the reason, and the Python API's bad inputs as one clear line.

Each test reproduces one item of the issue on the tiny SegFormer export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.cli import main
from segdeploy.data.synthetic import synthetic_sample
from segdeploy.errors import SegdeployError


def _img(path: Path, size=(40, 32), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_sample(seed, size=size)[0]).save(path)
    return path


def _infer(model: Path, *args: str):
    return CliRunner().invoke(
        main, ["infer", "--model", str(model), "--threads", "1", "--workers", "0", *args]
    )


def _model(src: Path, dst: Path, preprocessor: dict | None = None, config: dict | None = None):
    shutil.copytree(src, dst)
    for name, change in (("preprocessor_config.json", preprocessor), ("config.json", config)):
        if change:
            cfg = json.loads((dst / name).read_text())
            cfg.update(change)
            (dst / name).write_text(json.dumps(cfg))
    return dst


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


# -- 6. the pixel guard covers what the processor allocates ------------------------------------


@pytest.mark.parametrize(
    "processor",
    [
        {"image_processor_type": "MobileNetV2ImageProcessor", "size": {"shortest_edge": 256}},
        {"image_processor_type": "MobileViTImageProcessor", "size": {"shortest_edge": 224}},
    ],
)
def test_a_thin_strip_is_refused_before_the_resize_allocates_it(tiny_onnx_dir, tmp_path, processor):
    """Item 6: a 667-byte PNG of 200000x1 took 8 GB: the shortest-edge resize made it
    51200000x256. It is that image's failure; the others are segmented."""
    model = _model(tiny_onnx_dir, tmp_path / "m", {**processor, "crop_size": 64})
    strip = tmp_path / "in" / "strip.png"
    strip.parent.mkdir()
    Image.new("RGB", (200_000, 1)).save(strip)
    assert strip.stat().st_size < 1000
    _img(tmp_path / "in" / "ok.png")
    out = tmp_path / "out"
    result = _infer(model, str(tmp_path / "in"), "-o", str(out))
    assert result.exit_code == 1, result.output
    summary = _summary(out)
    assert summary["totals"]["images"] == 1
    [failure] = summary["failures"]
    assert failure["input"].endswith("strip.png") and "--max-pixels" in failure["reason"]
    assert "would make its 200000x1 pixels" in failure["reason"]

    from segdeploy.runtime.segmenter import Segmenter

    seg = Segmenter(model, "cpu", threads=1)
    with pytest.raises(SegdeployError, match="refused to keep memory bounded"):
        seg.predict(strip)


# -- 8. an image the model cannot run fails alone; a size it cannot run is refused at open ----


def test_an_image_the_model_cannot_run_fails_alone(tiny_onnx_dir, tmp_path):
    """Item 8: with `do_resize: false`, a 1x1 PNG aborted the run ('unexpected InvalidArgument'),
    no label map written and summary.json saying 0 images, 0 failed."""
    model = _model(tiny_onnx_dir, tmp_path / "m", {"do_resize": False})
    (tmp_path / "in").mkdir()
    Image.new("RGB", (1, 1)).save(tmp_path / "in" / "a_tiny.png")
    _img(tmp_path / "in" / "b.png", size=(64, 64))
    _img(tmp_path / "in" / "c.png", size=(64, 64), seed=1)
    out = tmp_path / "out"
    for workers in ("0", "2"):
        result = CliRunner().invoke(
            main,
            ["infer", "--model", str(model), "--threads", "1", "--workers", workers,
             "--batch-size", "4", str(tmp_path / "in"), "-o", str(out)],
        )  # fmt: skip
        assert result.exit_code == 1, result.output
        assert "unexpected" not in result.output
        summary = _summary(out)
        assert (summary["totals"]["images"], summary["totals"]["failed"]) == (2, 1)
        assert "the model cannot run this image" in summary["failures"][0]["reason"]
        assert sorted(p.name for p in (out / "in").iterdir()) == ["b.png", "c.png"]


def test_a_processor_size_the_model_cannot_run_is_refused_at_open(tiny_onnx_dir, tmp_path):
    model = _model(tiny_onnx_dir, tmp_path / "m", {"size": {"height": 1, "width": 1}})
    _img(tmp_path / "in" / "a.png")
    result = _infer(model, str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    line = _last_line(result)
    assert "preprocessor_config.json" in line and "cannot run the image processor's 1x1" in line
    assert not (tmp_path / "out").exists()


# -- 13. config.json's ids are 0..N-1 -----------------------------------------------------------


@pytest.mark.parametrize(
    ("id2label", "says"),
    [
        ({"-1": "void", "0": "a", "1": "b", "2": "c", "3": "d"}, "'-1'"),
        ({"0": "a", "1": "b", "2": "c", "3": "d", "5": "e"}, "4 missing"),
        ({"0.0": "a", "1.0": "b", "2.0": "c", "3.0": "d", "4.0": "e"}, "'0.0'"),
    ],
)
def test_class_ids_must_be_zero_to_n_minus_one(tiny_onnx_dir, tmp_path, id2label, says):
    """Item 13: ids -1 or with gaps misnamed every class; float keys said 'unreadable'."""
    model = _model(tiny_onnx_dir, tmp_path / "m", config={"id2label": id2label})
    _img(tmp_path / "in" / "a.png")
    result = _infer(model, str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    line = _last_line(result)
    assert "config.json" in line and "id2label ids must be" in line and says in line
    assert not (tmp_path / "out").exists()


# -- 18. models refused at open, with the reason -------------------------------------------------


def test_a_graph_with_a_one_channel_input_is_refused_at_open(tiny_onnx_dir, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    model = _model(tiny_onnx_dir, tmp_path / "m")
    weight = helper.make_tensor("W", TensorProto.FLOAT, [5, 1, 1, 1], np.ones(5, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["pixel_values", "W"], ["logits"])],
        "one-channel",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 5, "h", "w"])],
        [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, model / "model.onnx")
    _img(tmp_path / "in" / "a.png")
    result = _infer(model, str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "1-channel input" in _last_line(result) and "model.onnx" in _last_line(result)
    assert not (tmp_path / "out").exists()


def test_a_300_character_variant_is_one_line(tiny_onnx_dir, tmp_path):
    _img(tmp_path / "in" / "a.png")
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "--variant", "v" * 300)
    assert result.exit_code == 2, result.output
    assert _last_line(result).startswith("error: --variant: too long")


def test_a_graph_that_is_a_device_says_so(tiny_onnx_dir, tmp_path):
    """Item 19: `model.onnx -> /dev/zero` said 'no model.onnx here (found: model.onnx)'."""
    model = _model(tiny_onnx_dir, tmp_path / "m")
    (model / "model.onnx").unlink()
    (model / "model.onnx").symlink_to("/dev/zero")
    _img(tmp_path / "in" / "a.png")
    result = _infer(model, str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    line = _last_line(result)
    assert "model.onnx" in line and "special file" in line and "/dev/zero" in line


# -- 19. what a file that cannot be read is called -------------------------------------------------


def test_special_and_unreadable_files_are_named_for_what_they_are(tmp_path):
    from segdeploy.runtime.image_io import load_image

    os.mkfifo(tmp_path / "pipe.png")
    cases = [
        (tmp_path / "pipe.png", "not a regular file (a FIFO)"),
        (Path("/dev/zero"), "not a regular file (a character device)"),
        (tmp_path, "is a folder"),
    ]
    for path, says in cases:
        with pytest.raises(SegdeployError, match=r".*") as err:
            load_image(path)
        assert says in str(err.value) and "empty" not in str(err.value), err.value


def test_a_file_without_read_permission_is_not_called_corrupt(tmp_path):
    """Item 19: a `chmod 000` file was 'corrupt or truncated'. Root reads through any mode
    bits, so as root the check runs without root's capabilities (setpriv)."""
    photo = _img(tmp_path / "locked.png")
    photo.chmod(0)
    code = (
        "import sys\nfrom segdeploy.runtime.image_io import load_image\n"
        "from segdeploy.errors import SegdeployError\n"
        "try:\n    load_image(sys.argv[1])\nexcept SegdeployError as e:\n    print(e)\n"
    )
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: cannot drop the capability to read any file")
        bits = "+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked"
        prefix = ["setpriv", "--bounding-set=-all", f"--securebits={bits}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code, str(photo)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "locked.png: cannot read: Permission denied" in proc.stdout, proc.stdout
    assert "corrupt" not in proc.stdout


# -- 20. the Python API: bad inputs are one clear SegdeployError ----------------------------------


@pytest.fixture(scope="module")
def seg(tiny_onnx_dir):
    from segdeploy.runtime.segmenter import Segmenter

    return Segmenter(tiny_onnx_dir, "cpu", threads=1)


@pytest.mark.parametrize(
    ("image", "says"),
    [
        (np.zeros((3, 40, 32), np.uint8), "channels-first"),
        (np.zeros((40, 32, 2), np.uint8), "HxWx3"),
        (np.zeros((0, 0, 3), np.uint8), "empty image"),
        (np.zeros((40, 32, 3), np.float32), "uint8"),
        (Image.new("RGB", (0, 0)), "empty image"),
    ],
    ids=["chw", "hxwx2", "0x0", "float", "pil-0x0"],
)
def test_the_api_refuses_arrays_it_cannot_read(seg, image, says):
    with pytest.raises(SegdeployError) as err:
        seg.predict(image)
    assert says in str(err.value)


def test_the_api_reads_grey_arrays_of_either_shape(seg):
    """Item 20: HxWx1 gave PIL's raw TypeError; it is the same grey image as HxW."""
    grey = synthetic_sample(0, size=(40, 32))[0][:, :, 0]
    assert np.array_equal(seg.predict(grey[:, :, None]), seg.predict(grey))


def test_predict_batch_refuses_one_path_and_folders_are_named(seg, tmp_path):
    """Item 20: predict_batch("a.jpg") iterated characters; a folder was 'corrupt or truncated'."""
    photo = _img(tmp_path / "a.png")
    with pytest.raises(SegdeployError, match="predict_batch takes a list"):
        seg.predict_batch(str(photo))
    with pytest.raises(SegdeployError, match="predict_batch takes a list"):
        seg.predict_batch(np.zeros((40, 32, 3), np.uint8))
    assert len(seg.predict_batch([str(photo)])) == 1
    assert len(seg.predict_batch(np.zeros((2, 40, 32, 3), np.uint8))) == 2
    with pytest.raises(SegdeployError, match="is a folder"):
        seg.predict(tmp_path)


# -- 21. workers import the installed package, whatever the working directory --------------------


def test_a_segdeploy_folder_in_the_working_directory_does_not_break_workers(
    tiny_onnx_dir, tmp_path
):
    """Item 21: after `git clone`, the clone's parent holds a folder `segdeploy`: every worker
    died importing it, and the run still reported success."""
    script = Path(sys.executable).with_name("segdeploy")
    if not script.is_file():
        pytest.skip("segdeploy is not installed as a command in this environment")
    (tmp_path / "segdeploy").mkdir()  # the clone: no __init__.py at its top
    for i in range(3):
        _img(tmp_path / "photos" / f"p{i}.png", seed=i)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run(
        [str(script), "infer", "--model", str(tiny_onnx_dir), "photos", "-o", "out",
         "--workers", "2", "--threads", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker process died" not in proc.stderr
    assert _summary(tmp_path / "out")["totals"]["images"] == 3


def test_a_run_that_segments_nothing_is_a_failure(tiny_onnx_dir, tmp_path):
    """Item 21: `segdeploy demo` exited 0 with '0 images' when every image failed."""
    from segdeploy.runtime.infer import RunStopped, run_infer

    for name in ("a.png", "b.png"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"\x89PNG not really")
    with pytest.raises(RunStopped, match="no image was segmented: all 2 failed") as err:
        run_infer([tmp_path / "in"], tiny_onnx_dir, tmp_path / "out", workers=0, threads=1)
    assert err.value.exit_code == 1
    assert _summary(tmp_path / "out")["totals"]["failed"] == 2
