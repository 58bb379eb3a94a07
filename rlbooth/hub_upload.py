"""Upload a finished stage's `model/` (weights and model card) to a Hugging Face Hub model repository."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rlbooth.errors import RlboothError
from rlbooth.model_card import CARD
from rlbooth.stages import read_stage


class HubUploadError(RlboothError, RuntimeError):
    """The upload failed: no login, no network, or a repository we may not write to."""


def hub_api() -> Any:
    """The client the upload goes through (tests put a fake one here)."""
    from huggingface_hub import HfApi

    return HfApi()


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
"""A Hub model repository id, `owner/name` (letters, digits, `-`, `_`, `.`; no `--` or `..`)."""


def check_repo_id(repo_id: str | None) -> None:
    """A push target that cannot be a Hub repository is refused before any training (None: no push)."""
    if repo_id is None:
        return
    if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith((".", "-")):
        raise HubUploadError(f"push target {repo_id!r} is not a Hub model repository id: give `owner/name`, e.g. "
                             "me/my-dog (letters, digits, '-', '_', '.'; no '--' or '..'; not a path or URL)")


def push_stage(stage_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Create `repo_id` if needed and upload the stage's model folder to it; returns the commit URL."""
    check_repo_id(repo_id)
    stage = read_stage(stage_dir)
    if not (stage.model_dir / CARD).is_file():
        raise HubUploadError(f"{stage.model_dir} has no {CARD}: it was written by an older rlbooth; "
                             "rerun the stage, or write a model card there first")
    api = hub_api()
    subject = stage.subject.name or stage.subject.class_noun
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(stage.model_dir),
                                   commit_message=f"rlbooth {stage.stage}: {subject}")
    except Exception as err:  # auth, network and permission errors come in many classes
        raise HubUploadError(f"upload of {stage.model_dir} to {repo_id!r} failed: {type(err).__name__}: {err}; "
                             "log in with `hf auth login` (or set HF_TOKEN) and check that you may write there") from err
    return str(getattr(commit, "commit_url", commit))
