"""Hugging Face Hub names: `hf://OWNER/NAME[@REV]` (or `OWNER/NAME[@REV]`) model folders, downloaded whole
through `huggingface_hub` when it is installed and the Hub is reachable. A leaf module: the checkpoint
loaders and the diffusers RAE reader both use it."""

from __future__ import annotations

import re
from pathlib import Path


def first_line(text: str) -> str:
    """The first non-empty line of an error text (errors here are one line)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def hub_repo_id(spec: str) -> str | None:
    """"owner/name[@rev]" of a Hub model folder named `hf://owner/name[@rev]` or `owner/name[@rev]`, else None."""
    name = spec[len("hf://"):] if spec.startswith("hf://") else spec
    return name if _HUB_REPO.fullmatch(name) else None


def download_model_folder(repo: str) -> Path:
    """The local copy (Hugging Face cache) of the Hub model folder `owner/name[@rev]`; FileNotFoundError when
    huggingface_hub is missing or the repository cannot be reached."""
    repo_id, _, revision = repo.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo}: install `huggingface_hub` (pip install 'mfrae[hub]') to read Hub "
                                "model folders") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision or None))
    except Exception as err:  # offline, missing or private repository: one line naming it
        raise FileNotFoundError(f"cannot download the Hub model folder {repo}: {type(err).__name__}: "
                                f"{first_line(str(err))}") from None
