"""`train --push-to-hub`: checked before training, uploaded after."""

from __future__ import annotations

from pathlib import Path

from segdeploy.errors import SegdeployError
from segdeploy.train.models import hub_reachable
from segdeploy.train.output import CHECKPOINTS


def check_can_push(repo_id: str) -> str:
    """Fail before training, not after, when pushing cannot work."""
    from huggingface_hub import whoami

    if not hub_reachable():
        raise SegdeployError(
            "--push-to-hub",
            "the Hugging Face Hub cannot be reached (offline); train without it and "
            "upload the folder later with `hf upload`",
        )
    try:
        user = whoami()
    except Exception as err:  # huggingface_hub raises several types for a missing/bad token
        raise SegdeployError(
            "--push-to-hub", f"not logged in to the Hugging Face Hub ({err}); run `hf auth login`"
        ) from None
    return repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"


def push(out: Path, repo_id: str) -> str:
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, exist_ok=True)
    upload_folder(
        folder_path=out,
        repo_id=repo_id,
        ignore_patterns=[f"{CHECKPOINTS}/**", ".*"],
        commit_message="segdeploy train",
    )
    return repo_id
