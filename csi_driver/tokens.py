"""Per-volume Hub tokens: the files the mmfs daemon's ``.access/<key>`` views read.

A volume whose ``nodePublishSecretRef`` names a Secret with a ``token`` (or ``HF_TOKEN``)
key is published from ``<mount-root>/.access/<key>/…`` instead of ``<mount-root>/…``,
where ``<key>`` is a hash of the token and ``<token-dir>/<key>`` holds the token (mode
0600). The daemon (``mmfs mount --token-dir``) reads that file for every access check of
that view, so two pods on one node with different tokens read through different views,
each checked with its own token (mmfs/access.py, docs/node.md "Access"). A token file is
removed once no published volume uses its view.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Secret keys read for the token, in order.
SECRET_KEYS = ("token", "HF_TOKEN")


def token_of(secrets: dict[str, str]) -> str | None:
    """The Hub token among a volume's publish secrets, if any (blank values are none)."""
    for key in SECRET_KEYS:
        value = (secrets.get(key) or "").strip()
        if value:
            return value
    return None


def token_key(token: str) -> str:
    """The view name of ``token``: 32 hex digits of a hash, never the token itself."""
    return hashlib.sha256(f"mmfs-view\0{token.strip()}".encode()).hexdigest()[:32]


class TokenStore:
    """``<token-dir>/<key>`` files, written atomically and readable by root only."""

    def __init__(self, token_dir: str) -> None:
        self.dir = Path(token_dir)

    def put(self, token: str) -> str:
        """Write ``token``'s file (if needed) and return its key."""
        if any(c.isspace() for c in token) or len(token) > 4096:
            raise ValueError("the volume's token must be one line without blanks, at most 4096 bytes")
        key = token_key(token)
        path = self.dir / key
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.is_file() and path.read_text() == token:
            return key
        tmp = path.with_name(f".{key}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, token.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return key

    def prune(self, keys_in_use: set[str]) -> None:
        """Remove token files no published volume uses any more (their views stop working)."""
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            if len(path.name) == 32 and path.name not in keys_in_use:
                path.unlink(missing_ok=True)
