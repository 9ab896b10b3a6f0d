"""Issue 12, infer side: what a hostile or careless command line must never do to user files.

Each test reproduces one failure found by trying segdeploy as an adversary would;
tiny models and generated files only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.atomic import STALE_AFTER_S, TMP_MARKER, atomic_dir, atomic_path
from segdeploy.cli import main
from segdeploy.data.synthetic import synthetic_sample
from segdeploy.errors import SegdeployError

REPO = Path(__file__).resolve().parents[1]


def _img(path: Path, size=(40, 32), seed=0) -> Path:
    """A small RGB image; `size` is (height, width), so outputs can be told apart by size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_sample(seed, size=size)[0]).save(
        path, format="PNG" if path.suffix.lower() == ".png" else None
    )
    return path


def _infer(model: Path, *args: str):
    return CliRunner().invoke(main, ["infer", "--model", str(model), "--threads", "1", *args])


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this id now (reuse within the test is unlikely)


# -- 1. infer never overwrites its inputs -------------------------------------------------


@pytest.mark.parametrize(
    ("files", "args", "named"),
    [
        (["photos/p.png"], ["-o", ".", "photos"], "photos"),
        (["a.png"], ["-o", ".", "a.png"], "a.png"),
        (["par/in/x.png"], ["-o", "par", "par/in"], "par/in"),
    ],
)
def test_inputs_inside_the_output_folder_are_refused_before_writing(
    tiny_onnx_dir, tmp_path, monkeypatch, files, args, named
):
    monkeypatch.chdir(tmp_path)
    before = {f: _img(tmp_path / f).read_bytes() for f in files}
    listing = sorted(p for p in tmp_path.rglob("*"))
    result = _infer(tiny_onnx_dir, *args)
    assert result.exit_code == 2, result.output
    assert named in result.output and "-o" in result.output
    assert "Traceback" not in result.output
    assert {f: (tmp_path / f).read_bytes() for f in files} == before
    assert sorted(p for p in tmp_path.rglob("*")) == listing  # nothing written at all


def test_an_output_that_resolves_to_an_input_is_refused(tiny_onnx_dir, tmp_path):
    photo = _img(tmp_path / "photos" / "p.png")
    original = photo.read_bytes()
    # A hard link in OUT that is the input itself: the label map would replace the photo.
    (tmp_path / "out" / "photos").mkdir(parents=True)
    os.link(photo, tmp_path / "out" / "photos" / "p.png")
    result = _infer(tiny_onnx_dir, "-o", str(tmp_path / "out"), str(tmp_path / "photos"))
    assert result.exit_code == 2, result.output
    assert "p.png" in result.output and "-o" in result.output
    assert photo.read_bytes() == original
    assert not (tmp_path / "out" / "summary.json").exists()

    # A symlink in OUT that leads back to the inputs: outputs would land outside OUT.
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "photos").symlink_to(tmp_path / "photos")
    result = _infer(tiny_onnx_dir, "-o", str(tmp_path / "out"), str(tmp_path / "photos"))
    assert result.exit_code == 2, result.output
    assert "outside the output folder" in result.output
    assert photo.read_bytes() == original
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["p.png"]


# -- 2. '..' after a wildcard never leaves OUT ---------------------------------------------


@pytest.mark.parametrize("out", ["../o", "out"])
def test_glob_with_dotdot_writes_inside_out_only(tiny_onnx_dir, tmp_path, monkeypatch, out):
    work = tmp_path / "gl" / "work"
    (work / "sub").mkdir(parents=True)
    victim = _img(tmp_path / "gl" / "victim.png")
    original = victim.read_bytes()
    monkeypatch.chdir(work)
    result = _infer(tiny_onnx_dir, "-o", out, "*/../../*.png")
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == original
    assert not (work / "victim.png").exists()
    out_dir = (work / out).resolve()
    summary = _summary(out_dir)
    assert [r["output"] for r in summary["images"]] == ["victim.png"]
    assert ".." not in json.dumps(summary["images"])
    assert (out_dir / "victim.png").is_file()


# -- 3. symlink loops end; a file is segmented once ------------------------------------------


def test_symlink_loops_end_and_each_file_is_segmented_once(tiny_onnx_dir, tmp_path):
    loop1 = tmp_path / "loop1"
    _img(loop1 / "a.png")
    (loop1 / "self").symlink_to(".")
    loop = tmp_path / "loop"
    _img(loop / "b.png", seed=1)
    _img(loop / "sub" / "c.png", seed=2)
    (loop / "sub" / "up").symlink_to("..")
    (loop / "self").symlink_to("../loop")
    out = tmp_path / "out"
    result = _infer(
        tiny_onnx_dir,
        "-o",
        str(out),
        str(loop1),
        str(loop),
        str(loop1 / "a.png"),  # reached a second time as a file
    )
    assert result.exit_code == 0, result.output
    summary = _summary(out)
    inputs = sorted(Path(r["input"]).resolve().name for r in summary["images"])
    assert inputs == ["a.png", "b.png", "c.png"]
    assert len(list(out.rglob("*.png"))) == 3
    # Through the loop by a recursive glob: the same file, once.
    result = _infer(tiny_onnx_dir, "-o", str(tmp_path / "out2"), str(loop1 / "**" / "*.png"))
    assert result.exit_code == 0, result.output
    assert _summary(tmp_path / "out2")["totals"]["images"] == 1
    # Two loops under a recursive glob (glob.iglob follows them for ever).
    result = _infer(tiny_onnx_dir, "-o", str(tmp_path / "out3"), str(loop / "**" / "*.png"))
    assert result.exit_code == 0, result.output
    assert _summary(tmp_path / "out3")["totals"]["images"] == 2


# -- 4. globs and files never read the output folder ----------------------------------------


def test_globs_and_files_never_read_the_output_folder(tiny_onnx_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _img(tmp_path / "inin" / "a.png")
    assert _infer(tiny_onnx_dir, "-o", "inin/out", "inin").exit_code == 0
    assert (tmp_path / "inin" / "out" / "inin" / "a.png").is_file()
    result = _infer(tiny_onnx_dir, "-o", "inin/out", "inin/**/*.png")
    assert result.exit_code == 0, result.output
    summary = _summary(tmp_path / "inin" / "out")
    assert [r["input"] for r in summary["images"]] == ["inin/a.png"]
    assert not (tmp_path / "inin" / "out" / "inin" / "out").exists()
    # A file of the output folder named on the command line (an unquoted glob the shell
    # expanded) is refused before anything is written.
    result = _infer(tiny_onnx_dir, "-o", "inin/out", "inin/out/inin/a.png")
    assert result.exit_code == 2, result.output
    assert "inin/out/inin/a.png" in result.output and "-o" in result.output


# -- 5. every output name of a run is unique -----------------------------------------------


def test_every_output_name_is_unique(tiny_onnx_dir, tmp_path):
    sizes = {"x.png": (40, 32), "x.jpg": (48, 32), "x.png.png": (56, 32)}
    for name, size in sizes.items():
        _img(tmp_path / "in" / name, size=size)
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, "-o", str(out), str(tmp_path / "in"))
    assert result.exit_code == 0, result.output
    records = _summary(out)["images"]
    outputs = [r["output"] for r in records]
    assert len(outputs) == 3 and len(set(outputs)) == 3
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(outputs)
    for r in records:  # each label map is its own image's, not another's written over it
        with Image.open(out / r["output"]) as im:
            assert (im.height, im.width) == sizes[Path(r["input"]).name]


# -- 6. a graph whose class count contradicts config.json is refused -------------------------


def _model_copy(src: Path, dst: Path, num_labels: int) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["id2label"] = {str(i): f"c{i}" for i in range(num_labels)}
    cfg["label2id"] = {f"c{i}": i for i in range(num_labels)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("num_labels", [3, 300])
def test_graph_and_config_class_counts_must_agree(tiny_onnx_dir, tmp_path, num_labels):
    model = _model_copy(tiny_onnx_dir, tmp_path / "m", num_labels)
    _img(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    result = _infer(model, "-o", str(out), str(tmp_path / "in"))
    assert result.exit_code == 2, result.output
    assert "5 classes" in result.output and f"names {num_labels}" in result.output
    assert "model.onnx" in result.output
    assert not out.exists()


def test_dynamic_class_axis_is_checked_before_any_output(tiny_onnx_dir, tmp_path):
    import onnx

    from segdeploy.runtime.segmenter import Segmenter

    model = _model_copy(tiny_onnx_dir, tmp_path / "m", 3)
    graph = onnx.load(model / "model.onnx")
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    onnx.save(graph, model / "model.onnx")
    _img(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    result = _infer(model, "-o", str(out), str(tmp_path / "in"))
    assert result.exit_code == 2, result.output
    assert "5 classes" in result.output and "names 3" in result.output
    assert not out.exists()
    _model_copy(tiny_onnx_dir, tmp_path / "ok", 5)
    shutil.copy(model / "model.onnx", tmp_path / "ok" / "model.onnx")
    assert Segmenter(tmp_path / "ok", "cpu", threads=1).num_labels == 5


# -- 11. --max-pixels above Pillow's limit admits the image -------------------------------


def test_max_pixels_above_pillows_limit_admits_the_image(tiny_onnx_dir, tmp_path, monkeypatch):
    from segdeploy.runtime.image_io import load_image

    # Pillow refuses above 2 x MAX_IMAGE_PIXELS; lowered here so a cheap image stands in
    # for a 182 MP one. 100 x 120 = 12000 pixels > 2 x 1000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "in" / "big.png"
    path.parent.mkdir()
    Image.new("RGB", (100, 120)).save(path)
    assert load_image(path, max_pixels=20_000).size == (100, 120)
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's limit is put back, not left raised
    with pytest.raises(SegdeployError, match="too large to decode safely"):
        load_image(path, max_pixels=5_000)
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, "-o", str(out), "--max-pixels", "20000", str(path))
    assert result.exit_code == 0, result.output
    assert _summary(out)["totals"]["images"] == 1
    assert Image.MAX_IMAGE_PIXELS == 1000


# -- 13. the output folder: OS trouble is one line, exit 2, before work starts ---------------


def test_output_under_a_file_is_one_line_exit_2(tiny_onnx_dir, tmp_path):
    _img(tmp_path / "in" / "a.png")
    (tmp_path / "file.txt").write_text("mine")
    result = _infer(tiny_onnx_dir, "-o", str(tmp_path / "file.txt" / "out"), str(tmp_path / "in"))
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "file.txt" in line and "Not a directory" in line
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_read_only_output_folder_is_one_line_exit_2(tiny_onnx_dir, tmp_path):
    _img(tmp_path / "in" / "a.png")
    out = tmp_path / "ro"
    out.mkdir()
    args = ["infer", "--model", str(tiny_onnx_dir), "--threads", "1", "-o", str(out)]
    args.append(str(tmp_path / "in"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if os.geteuid() == 0:
        # root writes through chmod 0555: a read-only tmpfs in a private mount namespace.
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: cannot make a read-only folder")
        cmd = f'mount -t tmpfs -o ro none "{out}" && exec "$0" -m segdeploy "$@"'
        run = ["unshare", "-m", "sh", "-c", cmd, sys.executable, *args]
    else:
        out.chmod(0o555)
        run = [sys.executable, "-m", "segdeploy", *args]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    if os.geteuid() == 0 and "mount" in proc.stderr and proc.returncode not in (0, 1, 2):
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(out) in lines[0], proc.stderr
    assert "Read-only file system" in lines[0] or "Permission denied" in lines[0]


# -- 14. preprocessor_config.json is validated when it is read ------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"size": {"height": 0, "width": 64}}, "size.height"),
        ({"size": {"height": 64, "width": -5}}, "size.width"),
        ({"size": {"height": 100000, "width": 64}}, "size.height"),
        ({"size": {"height": "abc", "width": 64}}, "size.height"),
        ({"size": "abc"}, "size"),
        ({"image_mean": "abc"}, "image_mean"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.2, 0.0, 0.2]}, "image_std"),
        ({"image_std": None}, "image_std"),
        ({"rescale_factor": "1/255"}, "rescale_factor"),
        ({"rescale_factor": 0}, "rescale_factor"),
        ({"do_normalize": "yes"}, "do_normalize"),
        ({"resample": "bilinear"}, "resample"),
    ],
)
def test_absurd_preprocessor_configs_exit_2_naming_the_field(
    tiny_onnx_dir, tmp_path, change, field
):
    model = tmp_path / "m"
    shutil.copytree(tiny_onnx_dir, model)
    cfg_path = model / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(change)
    cfg_path.write_text(json.dumps(cfg))
    _img(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    result = _infer(model, "-o", str(out), str(tmp_path / "in"))
    assert result.exit_code == 2, result.output
    assert "preprocessor_config.json" in result.output and field in result.output
    assert "unexpected" not in result.output
    assert not out.exists()


# -- 15. temporaries carry their pid; stale ones are removed, nothing else ----------------


def _stale(path: Path) -> Path:
    """Make `path` look long unchanged (the sweep spares fresh temporaries)."""
    old = time.time() - STALE_AFTER_S - 60
    os.utime(path, (old, old))
    return path


def test_temporaries_carry_the_writers_pid(tmp_path):
    with atomic_path(tmp_path / "x.png") as tmp:
        assert tmp.name.startswith(f".x{TMP_MARKER}{os.getpid()}-") and tmp.suffix == ".png"
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "onnx") as tmp:
        assert tmp.name.startswith(f".onnx{TMP_MARKER}{os.getpid()}-")


def test_stale_temporaries_of_dead_runs_are_removed(tiny_onnx_dir, tmp_path):
    from segdeploy.atomic import open_temporary

    dead = _dead_pid()
    _img(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    sub = out / "in"
    sub.mkdir(parents=True)
    stale = [
        sub / f".a{TMP_MARKER}{dead}-k2j4h5x1.png",
        sub / f".a_overlay{TMP_MARKER}{dead}-abc_1234.jpg",
        out / f".summary{TMP_MARKER}{dead}.jsonl",  # an older version's record file
        out / f".summary{TMP_MARKER}{dead}-abc_1234.jsonl",
    ]
    keep = [
        sub / f"a{TMP_MARKER}{dead}-k2j4h5x1.png",  # not hidden: a user's file
        sub / f".notes{TMP_MARKER}abc.txt",  # no pid
        sub / f".cam{TMP_MARKER}{dead}.jpg",  # no random part: not the tool's name
        sub / f".a{TMP_MARKER}{dead}-k2j4h5x1.png.bak",  # not the pattern
        out / "mine.txt",
    ]
    for p in stale + keep:
        p.write_bytes(b"x")
        _stale(p)
    live, live_path = open_temporary(sub / "b.png")  # a live run's work in progress
    _stale(live_path)
    fresh = sub / f".c{TMP_MARKER}{dead}-k2j4h5x1.png"  # just made: perhaps not locked yet
    fresh.write_bytes(b"x")
    try:
        result = _infer(tiny_onnx_dir, "-o", str(out), str(tmp_path / "in"))
        assert result.exit_code == 0, result.output
        assert [p for p in stale if p.exists()] == []
        assert [p for p in [*keep, live_path, fresh] if not p.exists()] == []
    finally:
        live.close()


def test_stale_temporary_folders_are_removed(tmp_path):
    from segdeploy.atomic import remove_stale_temporaries

    dead = _dead_pid()
    litter = tmp_path / f".onnx{TMP_MARKER}{dead}-a1b2c3d4"
    litter.mkdir()
    (litter / "model.onnx").write_bytes(b"x")
    _stale(litter)
    (tmp_path / "onnx").mkdir()
    with atomic_dir(tmp_path / "onnx") as building:  # a live export: locked while it builds
        _stale(building)
        removed = remove_stale_temporaries(tmp_path)
        assert [p.name for p in removed] == [litter.name]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([building.name, "onnx"])


def test_export_removes_stale_temporaries_beside_its_folder(tiny_model_dir, tmp_path):
    from segdeploy.export import export_onnx

    dead = _dead_pid()
    litter = tmp_path / f".onnx{TMP_MARKER}{dead}-a1b2c3d4"
    litter.mkdir()
    _stale(litter)
    with atomic_dir(tmp_path / "other") as live:  # another export, still running
        export_onnx(tiny_model_dir, tmp_path / "onnx", validate=False)
        assert not litter.exists() and live.is_dir()
    assert (tmp_path / "onnx" / "model.onnx").is_file()


def test_labels_written_are_right_after_planning(tiny_onnx_dir, tmp_path):
    """The planned run writes the same masks as the Segmenter API."""
    from segdeploy.runtime.segmenter import Segmenter

    a = _img(tmp_path / "in" / "a.png", size=(40, 56), seed=3)
    out = tmp_path / "out"
    assert _infer(tiny_onnx_dir, "-o", str(out), str(tmp_path / "in")).exit_code == 0
    mask = Segmenter(tiny_onnx_dir, "cpu", threads=1).predict(a)
    assert np.array_equal(np.asarray(Image.open(out / "in" / "a.png")), mask)
