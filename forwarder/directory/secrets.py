"""The SQLite backend's token secrets: a file next to the directory, kept like the SRS
secrets (postsrsd's format: one secret per line, the first signs, every one verifies;
created 0600 on first use; `forwarder token rotate` puts a new one first)."""

from __future__ import annotations

from pathlib import Path

from forwarder.srsstore import (
    ensure_secrets,
    load_secrets,
    rotate_secrets,
    secrets_file_problems,
)

TOKEN_SECRETS_FILE = "token-secrets"
WHAT = "token"


def token_secrets_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_SECRETS_FILE


def load_token_secrets(path: Path) -> list[bytes]:
    """The secrets, the signing one first; the file is created (0600) if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_secrets(path)
    return load_secrets(path, WHAT)


def rotate_token_secrets(path: Path) -> int:
    """A new signing secret first, the old ones kept (or the first one, if there was no
    file); return how many there are now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not ensure_secrets(path):
        rotate_secrets(path)
    return len(load_secrets(path, WHAT))


def token_secrets_problems(path: Path) -> list[str]:
    """For `forwarder check`: a missing file is no problem (made on first use)."""
    if not path.exists():
        return []
    return secrets_file_problems(path, WHAT)
