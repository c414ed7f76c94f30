"""Derived artifacts (compiled engines, compile caches): their keys, ids and place on the mount.

An artifact is what a builder derived from one commit of a model: a TensorRT engine, a
torch.compile or vLLM compile cache... It is keyed by what determines it: the model's
commit, a *kind*, a *target* (GPU architecture, parallelism, precision: the builder's
choice) and the *builder* version. Its id is a sha1 of that key, 40 hex like a commit, and
it is immutable once published, so the data path serves it as one more commit of the
pseudo repo :data:`~mmfs.names.ARTIFACTS`: the same manifests, chunks, chunk maps, tiers and
single-flight as model files, nothing of its own (docs/artifacts.md).

On a node mount an artifact is the read-only directory ``<mount>/.artifacts/<id>/``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidName
from .names import RepoRef, check_path, is_commit, parse_repo_id

#: The directory at the mount's root holding published artifacts, one folder per id.
ARTIFACTS_DIR = ".artifacts"
#: The header a publisher presents ``MMFS_PUBLISH_TOKEN`` in (``Authorization`` stays the
#: caller's upstream credential, as on every other route of the backend).
PUBLISH_TOKEN_HEADER = "X-Mmfs-Publish-Token"
#: The builder version when none is given.
DEFAULT_BUILDER = "unversioned"
#: Kinds, targets and builder versions: names that fit in a path component and a log line.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")
_HASH_BLOCK = 8 << 20


def check_label(value: str, what: str) -> str:
    if not _LABEL.fullmatch(value):
        raise InvalidName(f"invalid {what} {value[:80]!r}: 1 to 128 of letters, digits and . _ + = - "
                          "(starting with a letter or digit)")
    return value


@dataclass(frozen=True, slots=True)
class ArtifactKey:
    """What determines an artifact: one commit of a model, a kind, a target, a builder version."""

    repo: RepoRef
    commit: str
    kind: str
    target: str
    builder: str = DEFAULT_BUILDER

    def __post_init__(self) -> None:
        if not is_commit(self.commit):
            raise InvalidName(f"an artifact is keyed by a 40-hex model commit, not {self.commit[:80]!r}")
        check_label(self.kind, "kind")
        check_label(self.target, "target")
        check_label(self.builder, "builder version")

    @property
    def id(self) -> str:
        """The artifact's name on the mount and in the backend (sha1 of the key)."""
        text = "\0".join(("mmfs-artifact-v1", str(self.repo), self.commit, self.kind, self.target, self.builder))
        return hashlib.sha1(text.encode()).hexdigest()

    def to_json(self) -> dict[str, str]:
        return {"provider": self.repo.provider, "repo": self.repo.repo_id, "commit": self.commit,
                "kind": self.kind, "target": self.target, "builder": self.builder}

    @classmethod
    def from_json(cls, data: Any) -> "ArtifactKey":
        """Parse and validate; :class:`InvalidName` on anything malformed."""
        try:
            return cls(parse_repo_id(str(data["repo"]), str(data["provider"])), str(data["commit"]),
                       str(data["kind"]), str(data["target"]), str(data.get("builder", DEFAULT_BUILDER)))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidName(f"an artifact key needs provider, repo, commit, kind and target ({exc})") from None

    def __str__(self) -> str:
        return f"{self.kind} of {self.repo}@{self.commit[:12]} for {self.target} (builder {self.builder})"


def artifact_dir(mountpoint: str | os.PathLike[str], artifact_id: str) -> Path:
    """Where a node mount shows the artifact ``artifact_id``."""
    return Path(mountpoint) / ARTIFACTS_DIR / artifact_id


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file of a directory about to be pushed."""

    path: str  # relative, '/'-separated
    size: int
    sha256: str
    local: Path

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def scan_dir(directory: Path) -> list[LocalFile]:
    """Every regular file under ``directory`` with its size and sha256, sorted by path.

    Symlinks and special files are refused (an artifact is plain files); empty folders are
    not kept (a manifest lists files)."""
    if not directory.is_dir():
        raise InvalidName(f"{directory} is not a directory")
    found = []
    for folder, dirs, files in os.walk(directory):
        dirs.sort()
        for name in [*dirs, *files]:
            local = Path(folder) / name
            if local.is_symlink():
                raise InvalidName(f"{local} is a symbolic link; an artifact holds plain files only")
        for name in files:
            local = Path(folder) / name
            if not local.is_file():
                raise InvalidName(f"{local} is not a regular file")
            relative = check_path(local.relative_to(directory).as_posix())
            hasher = hashlib.sha256()
            with open(local, "rb") as f:
                while block := f.read(_HASH_BLOCK):
                    hasher.update(block)
            found.append(LocalFile(relative, local.stat().st_size, hasher.hexdigest(), local))
    if not found:
        raise InvalidName(f"{directory} holds no files: nothing to publish")
    return sorted(found, key=lambda f: f.path)


__all__ = ["ARTIFACTS_DIR", "ArtifactKey", "DEFAULT_BUILDER", "LocalFile", "PUBLISH_TOKEN_HEADER", "artifact_dir", "check_label",
           "scan_dir"]
