"""Issue 22, infer's output folder: infer never replaces, deletes or writes among files it did
not write, and a run that cannot hold is refused before the first write.

Each test reproduces one failure of the issue (its item number in the test's name or
docstring) on the tiny SegFormer export and generated photos.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.atomic import STALE_AFTER_S, atomic_path, remove_stale_temporaries
from segdeploy.cli import main
from segdeploy.data.synthetic import synthetic_sample
from segdeploy.runtime.provenance import read_mark


def _img(path: Path, size=(40, 32), seed=0) -> Path:
    """A small RGB photo; `size` is (height, width)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_sample(seed, size=size)[0]).save(
        path, format="PNG" if path.suffix.lower() == ".png" else "JPEG"
    )
    return path


def _infer(model: Path, *args: str):
    return CliRunner().invoke(
        main, ["infer", "--model", str(model), "--threads", "1", "--workers", "0", *args]
    )


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: file bytes, or a tag for folders and links."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[key] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = p.read_bytes()
    return out


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _age(path: Path, seconds: float = STALE_AFTER_S + 60) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


# -- 2. infer never replaces what it did not write ------------------------------------------


def test_ground_truth_in_the_output_folder_is_never_replaced(tiny_onnx_dir, tmp_path):
    """Item 2: `infer ds/images/train -o ds/annotations` replaced the ground-truth masks."""
    for name in ("a", "b"):
        _img(tmp_path / "ds" / "images" / "train" / f"{name}.png")
        mask = np.full((40, 32), 3, np.uint8)
        (tmp_path / "ds" / "annotations" / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(tmp_path / "ds" / "annotations" / "train" / f"{name}.png")
    before = _tree(tmp_path)
    result = _infer(
        tiny_onnx_dir, str(tmp_path / "ds/images/train"), "-o", str(tmp_path / "ds/annotations")
    )
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "annotations/train/a.png" in line
    assert "did not write" in line and "--overwrite" in line and "1 more" in line
    assert _tree(tmp_path) == before  # nothing written, not even summary.json

    result = _infer(
        tiny_onnx_dir, str(tmp_path / "ds/images/train"), "-o", str(tmp_path / "ds/annotations"),
        "--overwrite",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "ds/annotations/train/a.png") as im:
        assert read_mark(im.filename) is not None  # now segdeploy's own, marked


def test_earlier_outputs_are_replaced_but_an_edited_one_is_not(tiny_onnx_dir, tmp_path):
    """A rerun replaces segdeploy's own outputs (marked, unchanged); one the user edited since
    is theirs now."""
    _img(tmp_path / "in" / "a.png")
    _img(tmp_path / "in" / "b.png", seed=1)
    out = tmp_path / "out"
    assert _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out)).exit_code == 0
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out), "--overlay")
    assert result.exit_code == 0, result.output  # its own files, and new overlays

    edited = out / "in" / "b.png"
    labels = np.asarray(Image.open(edited)).copy()
    labels[0, 0] = (labels[0, 0] + 1) % 5
    Image.fromarray(labels).save(edited)  # a hand correction, saved by another program
    before = _tree(tmp_path)
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out))
    assert result.exit_code == 2, result.output
    assert "in/b.png" in result.output and "did not write" in result.output
    assert _tree(tmp_path) == before


def test_a_foreign_summary_json_is_not_replaced(tiny_onnx_dir, tmp_path):
    _img(tmp_path / "in" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text('{"my": "notes"}')
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "summary.json" in result.output and "--overwrite" in result.output
    assert (tmp_path / "out" / "summary.json").read_text() == '{"my": "notes"}'
    assert not (tmp_path / "out" / "in").exists()


# -- 12. --skip-existing keeps only this model's outputs, unchanged ---------------------------


def _other_model(src: Path, dst: Path) -> Path:
    """The same graph with another preprocessing: another model to --skip-existing."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "preprocessor_config.json").read_text())
    cfg["size"] = {"height": 32, "width": 32}
    (dst / "preprocessor_config.json").write_text(json.dumps(cfg))
    return dst


def test_skip_existing_trusts_only_this_models_unchanged_outputs(tiny_onnx_dir, tmp_path):
    """Item 12: maps of another model, of another photo, an RGB map, a map with ids beyond the
    classes were all 'done'."""
    for i, name in enumerate(("a", "b", "c", "d")):
        _img(tmp_path / "in" / f"{name}.png", seed=i)
    out = tmp_path / "out"
    other = _other_model(tiny_onnx_dir, tmp_path / "other")
    assert _infer(other, str(tmp_path / "in"), "-o", str(out)).exit_code == 0
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out), "--skip-existing")
    assert result.exit_code == 0, result.output
    assert _summary(out)["totals"]["skipped"] == 0  # another model's maps: all redone
    assert _summary(out)["totals"]["images"] == 4

    _img(tmp_path / "in" / "b.png", size=(24, 56), seed=9)  # the photo changed since
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out), "--skip-existing")
    assert result.exit_code == 0, result.output
    records = {Path(r["input"]).name: r for r in _summary(out)["images"]}
    assert not records["b.png"].get("skipped") and records["b.png"]["size"] == [24, 56]
    assert all(records[n].get("skipped") for n in ("a.png", "c.png", "d.png"))

    Image.new("RGB", (32, 40)).save(out / "in" / "c.png")  # an RGB map
    Image.fromarray(np.full((40, 32), 200, np.uint8)).save(out / "in" / "d.png")  # id 200
    before = _tree(tmp_path)
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out), "--skip-existing")
    assert result.exit_code == 2 and "did not write" in result.output, result.output
    assert _tree(tmp_path) == before
    result = _infer(
        tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out), "--skip-existing", "--overwrite"
    )
    assert result.exit_code == 0, result.output
    records = {Path(r["input"]).name: r for r in _summary(out)["images"]}
    assert [n for n, r in sorted(records.items()) if not r.get("skipped")] == ["c.png", "d.png"]
    for name in ("c", "d"):
        labels = np.asarray(Image.open(out / "in" / f"{name}.png"))
        assert labels.ndim == 2 and labels.max() < 5


# -- 14. an OUT inside an input folder holds only what segdeploy wrote -------------------------


def test_output_inside_an_input_folder_with_photos_is_refused(tiny_onnx_dir, tmp_path, monkeypatch):
    """Item 14: `-o photos/out` with photos in photos/out left them unsegmented, outputs among them."""
    monkeypatch.chdir(tmp_path)
    _img(tmp_path / "photos" / "q.png")
    _img(tmp_path / "photos" / "out" / "p.png", seed=1)
    before = _tree(tmp_path)
    result = _infer(tiny_onnx_dir, "photos", "-o", "photos/out")
    assert result.exit_code == 2, result.output
    assert "photos/out" in result.output and "photos/out/p.png" in result.output
    assert _tree(tmp_path) == before

    # An OUT of its own inside the inputs is fine, again and again (it holds only ours).
    for _ in range(2):
        result = _infer(tiny_onnx_dir, "photos", "-o", "photos/masks")
        assert result.exit_code == 0, result.output
    assert sorted(r["output"] for r in _summary(tmp_path / "photos/masks")["images"]) == [
        "photos/out/p.png",
        "photos/q.png",
    ]


# -- 15. output file/folder clashes are planned -----------------------------------------------


def test_a_folder_named_like_a_label_map_and_a_folder_named_summary_json(
    tiny_onnx_dir, tmp_path, monkeypatch
):
    """Item 15: `x.jpg` beside a folder `x.png/`; an input folder named `summary.json`."""
    monkeypatch.chdir(tmp_path)
    _img(tmp_path / "d" / "x.jpg", size=(40, 32))
    _img(tmp_path / "d" / "x.png" / "y.png", size=(48, 32))
    result = _infer(tiny_onnx_dir, "d", "-o", "out")
    assert result.exit_code == 0, result.output
    outputs = {Path(r["input"]).name: r["output"] for r in _summary(tmp_path / "out")["images"]}
    assert outputs == {"x.jpg": "d/x.png", "y.png": "d/x.png-2/y.png"}
    assert np.asarray(Image.open(tmp_path / "out/d/x.png")).shape == (40, 32)

    _img(tmp_path / "summary.json" / "s.png")
    result = _infer(tiny_onnx_dir, "summary.json", "-o", "out2")
    assert result.exit_code == 0, result.output
    summary = _summary(tmp_path / "out2")  # the summary is a file, not the input's folder
    assert [r["output"] for r in summary["images"]] == ["summary.json-2/s.png"]


def test_a_folder_at_an_output_path_is_refused_before_writing(tiny_onnx_dir, tmp_path):
    _img(tmp_path / "in" / "x.png")
    (tmp_path / "out" / "in" / "x.png").mkdir(parents=True)  # where x.png's label map goes
    before = _tree(tmp_path)
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "x.png" in result.output and "is a folder" in result.output
    assert _tree(tmp_path) == before


# -- 16. temporaries fit whenever the final name does ------------------------------------------


@pytest.mark.parametrize("stem_bytes", [232, 240, 251])
def test_long_stems_are_written(tiny_onnx_dir, tmp_path, stem_bytes):
    """Item 16: a stem of 232-251 bytes: the label name fits, the temporary did not."""
    stem = "é" * ((stem_bytes - 1) // 2) + "x" * (1 + (stem_bytes - 1) % 2)
    assert len(stem.encode()) == stem_bytes
    _img(tmp_path / "in" / f"{stem}.png")
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "in" / f"{stem}.png").is_file()
    # With overlays the overlay's name (stem + '_overlay.jpg') no longer fits from 244 bytes:
    # that image fails alone, with the reason.
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(tmp_path / "o2"), "--overlay")
    if stem_bytes + len("_overlay.jpg") <= 255:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1, result.output
        assert (
            "longer than the file system allows"
            in _summary(tmp_path / "o2")["failures"][0]["reason"]
        )


# -- 3. stale temporaries: only the tool's own, only when nobody holds them ---------------------


def test_a_live_temporary_of_another_pid_namespace_is_kept(tmp_path):
    """Item 3: a run in another PID namespace (pid 9 there, dead here) lost its record file to
    a second run's sweep. Its writer holds the temporary locked: the sweep keeps it."""
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys; from segdeploy.atomic import open_temporary;"
            "f, p = open_temporary(sys.argv[1]); print(p, flush=True); sys.stdin.read()",
            str(tmp_path / "summary.jsonl"),
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    try:
        live = Path(holder.stdout.readline().strip())
        # As the other namespace named it: a pid that is dead in this one.
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        renamed = live.with_name(f".summary.tmp-{dead}-{live.name.split('-')[-1]}")
        live.rename(renamed)  # the lock stays with the file
        _age(renamed)
        assert remove_stale_temporaries(tmp_path) == []
        assert renamed.exists()
    finally:
        holder.communicate("")
    assert remove_stale_temporaries(tmp_path) == [renamed]  # its writer is gone now


def test_outputs_named_like_temporaries_survive_later_runs(tiny_onnx_dir, tmp_path):
    """Item 3: an input named `.cam.tmp-999999.jpg` gave an output that the next run deleted."""
    cam = _img(tmp_path / ".cam.tmp-999999.jpg")
    cam2 = _img(tmp_path / ".cam.tmp-999999-abcdefgh.jpg", seed=1)
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, str(cam), str(cam2), "-o", str(out))
    assert result.exit_code == 0, result.output
    written = sorted(r["output"] for r in _summary(out)["images"])
    # The second name would be one of the tool's temporaries: it gets another name.
    assert written == [".cam.tmp-999999-abcdefgh-2.png", ".cam.tmp-999999.png"]
    for name in written:
        _age(out / name)
    _img(tmp_path / "other.png")
    assert _infer(tiny_onnx_dir, str(tmp_path / "other.png"), "-o", str(out)).exit_code == 0
    assert all((out / name).is_file() for name in written)


def test_a_killed_writers_temporary_goes_once_stale(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "x.png") as tmp:
        tmp.write_bytes(b"half")
        litter = tmp.with_name(tmp.name.replace(".x.", ".y.", 1))
        tmp.rename(litter)  # what a SIGKILL leaves: a temporary nobody holds
        raise KeyboardInterrupt
    assert remove_stale_temporaries(tmp_path) == []  # fresh: perhaps not locked yet
    _age(litter)
    assert remove_stale_temporaries(tmp_path) == [litter]


# -- 24 and 19: inputs that are missing, empty, or special ------------------------------------


def test_a_missing_input_is_exit_2_before_anything_is_written(tiny_onnx_dir, tmp_path):
    """Item 24: exit 1 after creating OUT/summary.json ('0 skipped, 1 failed')."""
    _img(tmp_path / "in" / "a.png")
    for args in (["nothere"], [str(tmp_path / "in"), "nothere"], [str(tmp_path / "*.tif")]):
        result = _infer(tiny_onnx_dir, *args, "-o", str(tmp_path / "out"))
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1].startswith("error: ")
        assert not (tmp_path / "out").exists()


def test_an_empty_folder_is_not_a_silent_success(tiny_onnx_dir, tmp_path):
    """Item 19: an empty folder exited 0 without a word."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    for folder, words in (("empty", "no image files found"), ("notes", "1 files are not images")):
        result = _infer(tiny_onnx_dir, str(tmp_path / folder), "-o", str(tmp_path / "out"))
        assert result.exit_code == 2, result.output
        assert folder in result.output and words in result.output
        assert not (tmp_path / "out").exists()


def test_two_globs_of_one_folder_are_accepted(tiny_onnx_dir, tmp_path, monkeypatch):
    """Item 19: `'d/*.jpg' 'd/*.png'` was refused as colliding."""
    monkeypatch.chdir(tmp_path)
    _img(tmp_path / "d" / "a.jpg")
    _img(tmp_path / "d" / "b.png", seed=1)
    result = _infer(tiny_onnx_dir, "d/*.jpg", "d/*.png", "-o", "out")
    assert result.exit_code == 0, result.output
    assert sorted(r["output"] for r in _summary(tmp_path / "out")["images"]) == [
        "d/a.png",
        "d/b.png",
    ]
    # Two different folders of one name still collide.
    _img(tmp_path / "e" / "d" / "c.png")
    result = _infer(tiny_onnx_dir, "d/*.png", "e/d/*.png", "-o", "out3")
    assert result.exit_code == 2 and "run them separately" in result.output, result.output


def test_dangling_links_and_special_files_in_folders_are_counted_and_said(
    tiny_onnx_dir, tmp_path, caplog
):
    """Item 19: folder walks dropped them without a count."""
    _img(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "in" / "pipe.jpg")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(out))
    assert result.exit_code == 0, result.output
    totals = _summary(out)["totals"]
    assert (totals["dangling_symlinks"], totals["special_files"], totals["images"]) == (1, 1, 1)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "1 dangling symlinks" in said and "1 special files" in said


def test_names_with_newlines_are_quoted_in_the_log(tiny_onnx_dir, tmp_path, caplog):
    """Item 19: a name with a newline forged log lines."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a\nERROR forged.png").write_bytes(b"not a png")
    with caplog.at_level("ERROR"):
        result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    lines = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert lines and all("\n" not in line and "\\n" in line for line in lines)
