"""Property-based test of infer's planner (issue 22): random trees of folders, image and other
files, symlinks (to files, to folders, dangling, loops) and globs, a random OUT placed
anywhere (outside, inside an input folder, over the inputs, holding files of the user's).

Whatever the tree, a run of `run_infer` either is refused before it writes anything at
all, or: writes nothing outside OUT, never writes or removes an input (nor anything
else), gives every output a path of its own, and plans every image reachable from the
folder and file inputs exactly once.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from segdeploy.errors import SegdeployError
from segdeploy.runtime.infer import RunStopped, run_infer

NAMES = ["a", "b", "x", "x.png", "summary.json", "sub", "out", ".h"]
EXTS = [".png", ".jpg", ".txt"]
TOPS = ["in", "in2"]

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(tuple)
entries = st.one_of(
    st.tuples(st.just("dir"), st.sampled_from(TOPS), paths),
    st.tuples(st.just("file"), st.sampled_from(TOPS), paths, st.sampled_from(EXTS)),
    st.tuples(
        st.just("link"),
        st.sampled_from(TOPS),
        paths,
        st.sampled_from(["../a.png", "..", ".", "../../in2", "nowhere.png", "../sub", "../out"]),
    ),
)
#: OUT anywhere: beside the inputs (most often, so that most runs go ahead), inside an
#: input folder, over the inputs, at a file's path, inside a folder named like an output.
outs = st.sampled_from(
    ["out", "out", "out", "in/out", "in/out", "in/sub/out", "in", "in2/x.png", "out/in", "in/x.png"]
)
inputs = st.lists(
    st.sampled_from(
        ["in", "in", "in2", "in2", "in/*.png", "in/**/*.jpg", "in2/*", "in/sub", "in/x.png"]
    ),
    min_size=1,
    max_size=3,
)
#: Files of the user's put in OUT before the run (relative to OUT), now and then.
foreign = st.lists(
    st.sampled_from(["notes.txt", "in/a.png", "in/x.png", "summary.json"]), max_size=1
)
#: Always there, so that most trees hold images to plan.
BASE = [
    ("dir", "in", ()),
    ("dir", "in2", ()),
    ("file", "in", ("a",), ".png"),
    ("file", "in", ("b",), ".jpg"),
    ("file", "in2", ("x",), ".png"),
]


def _make(root: Path, tree: list) -> None:
    for i, entry in enumerate(tree):
        kind, top, parts = entry[0], entry[1], entry[2]
        path = root.joinpath(top, *parts)
        if kind == "file":
            path = path.with_name(path.name + entry[3])
        if os.path.lexists(path) or not path.parent.is_dir():
            continue  # taken, or its folder was not made (a file or a link is there)
        if kind == "dir":
            path.mkdir()
        elif kind == "file" and entry[3] == ".txt":
            path.write_text("notes")
        elif kind == "file":
            pixels = np.full((6 + i % 5, 8, 3), 40 * (i % 6), np.uint8)
            Image.fromarray(pixels).save(path, format="PNG" if entry[3] == ".png" else "JPEG")
        else:
            path.symlink_to(entry[3])


def _snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root`, not following links: bytes, 'dir', or the link's target."""
    seen: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                seen[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                seen[rel] = "dir"
            elif os.path.isfile(p):
                seen[rel] = Path(p).read_bytes()
            else:
                seen[rel] = "special"
    return seen


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def _reachable(root: Path, texts: list[str], out_real: str) -> set[str]:
    """The real paths of the images a run must plan, found independently of the planner:
    folders walked through links (each real folder once), hidden names and OUT left out,
    and the image files that inputs name."""
    found: set[str] = set()
    visited: set[str] = set()

    def walk(folder: str) -> None:
        real = os.path.realpath(folder)
        if real in visited or _inside(real, out_real):
            return
        visited.add(real)
        for name in sorted(os.listdir(folder)):
            p = os.path.join(folder, name)
            if name.startswith(".") or _inside(os.path.realpath(p), out_real):
                continue
            if os.path.isdir(p):
                walk(p)
            elif os.path.isfile(p) and Path(name).suffix in (".png", ".jpg"):
                found.add(os.path.realpath(p))

    for text in texts:
        path = root / text
        if glob.has_magic(text):
            continue  # globs: covered by the other properties, not by this reference
        if path.is_dir():
            walk(str(path))
        elif path.is_file():
            found.add(os.path.realpath(path))
    return found


@pytest.fixture(scope="module")
def segmenter(tiny_onnx_dir):
    from segdeploy.runtime.segmenter import Segmenter

    return Segmenter(tiny_onnx_dir, "cpu", threads=1)


@settings(
    max_examples=int(os.environ.get("PLANNER_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    tree=st.lists(entries, max_size=14),
    out=outs,
    texts=inputs,
    theirs=foreign,
    overlay=st.booleans(),
)
def test_a_run_never_writes_outside_out_or_over_inputs(
    segmenter, tree, out, texts, theirs, overlay
):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _make(root, [*BASE, *tree])
        out_path = root / out
        for rel in theirs:
            target = out_path / rel
            with contextlib.suppress(OSError):
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.write_bytes(b"the user's own file")
        before = _snapshot(root)
        try:
            summary = run_infer(
                [str(root / t) for t in texts], None, out_path, workers=0, threads=1,
                overlay=overlay, progress=False, segmenter=segmenter,
            )  # fmt: skip
        except RunStopped:
            summary = None  # it ran, and every image failed: the properties below still hold
        except SegdeployError as err:
            event(f"refused: {err.problem.split(' /')[0][:40]}")
            assert _snapshot(root) == before, "refused, but something was written"
            return
        event("ran")
        after = _snapshot(root)
        out_real = os.path.realpath(out_path)
        assert not set(before) - set(after), "something was removed"
        new_files = set()
        for rel, value in after.items():
            if before.get(rel) == value:
                continue
            assert rel not in before, f"{rel} was there before the run and was written"
            real = os.path.realpath(root / rel)
            if value == "dir" and _inside(out_real, real):
                continue  # a missing folder on the way to OUT, made as `mkdir -p` would
            assert _inside(real, out_real), f"{rel} written outside OUT"
            if isinstance(value, bytes):
                new_files.add(real)
        records = _records(out_path)
        outputs = [os.path.realpath(out_path / r["output"]) for r in records if "output" in r]
        assert len(outputs) == len(set(outputs)), "two outputs share a path"
        planned = [os.path.realpath(r["input"]) for r in records]
        assert len(planned) == len(set(planned)), "an image was planned twice"
        if not any(glob.has_magic(t) for t in texts):
            assert set(planned) == _reachable(root, texts, out_real)
        assert summary is None or summary["totals"]["images"] == len(outputs)
        overlays = {os.path.realpath(out_path / r["overlay"]) for r in records if "overlay" in r}
        summary_file = os.path.realpath(out_path / "summary.json")
        assert new_files <= {*outputs, *overlays, summary_file}, "a file not in the summary"


def _records(out: Path) -> list[dict]:
    import json

    summary = json.loads((out / "summary.json").read_text())
    return summary["images"] + summary["failures"]
