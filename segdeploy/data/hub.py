"""Datasets on the Hugging Face Hub, loaded with `datasets.load_dataset`.

Script-based datasets such as scene_parse_150 are refused by datasets >= 4;
for those the Hub's automatic Parquet conversion (revision
"refs/convert/parquet") is loaded instead. Without a network the load must
fail at once with a message that points at the offline alternatives, not
after minutes of retries.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from segdeploy.data.columns import standard_columns
from segdeploy.data.labels import read_id2label
from segdeploy.data.splits import split_names
from segdeploy.errors import SegdeployError, one_line

PARQUET_REVISION = "refs/convert/parquet"
# Config (subfolder of the Parquet conversion) to use when a name gives none.
DEFAULT_CONFIGS = {"scene_parse_150": "scene_parsing"}
# Datasets whose class names live outside their repo (the HF guide's recipe for ADE20K).
KNOWN_ID2LABEL = {"scene_parse_150": ("huggingface/label-files", "ade20k-id2label.json")}
ALTERNATIVES = (
    "use a local folder in the ADE20K layout (images/<split>/*.jpg + annotations/<split>/*.png), "
    "a folder saved with datasets.save_to_disk, or 'synthetic'"
)
PROBE_TIMEOUT_S = 3.0


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """ "owner/dataset:config" -> ("owner/dataset", "config")."""
    repo, _, config = name.partition(":")
    return repo, (config or DEFAULT_CONFIGS.get(repo))


def hub_split(name: str, expr: str, *, option: str = "--split"):
    """Rows of Hub dataset `name` selected by `expr`, with standard columns."""
    split_names(expr, option=option)  # a syntax error is the user's, not the network's
    repo, config = parse_hub_name(name)
    ds = _load(repo, config, expr)
    return standard_columns(ds, where=name, row_prefix=f"{name} {expr} row ")


def hub_id2label(name: str) -> dict[int, str]:
    """id2label.json from the dataset repo, or the known label file for famous datasets."""
    from huggingface_hub import hf_hub_download

    repo, _ = parse_hub_name(name)
    candidates = [(repo, "id2label.json")]
    if repo in KNOWN_ID2LABEL:
        candidates.insert(0, KNOWN_ID2LABEL[repo])
    for repo_id, filename in candidates:
        try:
            path = hf_hub_download(repo_id, filename, repo_type="dataset")
        except Exception:  # absent file, absent network: try the next, then say what to do
            continue
        return read_id2label(path)
    raise SegdeployError(
        name,
        "no id2label.json found in the dataset repo; pass --id2label FILE "
        '(a JSON object {"0": "class name", ...})',
    )


def _load(repo: str, config: str | None, expr: str):
    import datasets

    _fail_fast_if_unreachable(repo)
    try:
        return datasets.load_dataset(repo, config, split=expr)
    except Exception as first:  # datasets raises many types; each becomes one line below
        first_err = first
    # Script datasets: datasets >= 4 refuses them; their Parquet conversion keeps
    # each config in a subfolder.
    try:
        return datasets.load_dataset(repo, data_dir=config, split=expr, revision=PARQUET_REVISION)
    except Exception as second:
        scripted = "scripts are no longer supported" in str(first_err)
        err = second if scripted else first_err
    raise SegdeployError(
        repo,
        f"not a local folder, and cannot load it from the Hugging Face Hub ({one_line(err)}); "
        f"{ALTERNATIVES}",
    )


def _fail_fast_if_unreachable(repo: str) -> None:
    """Without HF_HUB_OFFLINE, datasets would retry an unreachable Hub for a long time."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return  # offline mode never touches the network: cache or immediate error
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise SegdeployError(
            repo,
            f"not a local folder, and the Hugging Face Hub ({host}) is unreachable ({err}); "
            f"set HF_HUB_OFFLINE=1 to use a cached copy, or {ALTERNATIVES}",
        ) from None
