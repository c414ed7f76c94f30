"""Validation of the names users hand us: providers, repo ids, revisions, file paths.

Everything that becomes a URL, a directory or an LMDB key passes through here first, so
``..``, absolute paths, NUL bytes and over-long names are refused with
:class:`~mmfs.errors.InvalidName` before they reach the network or the disk.
"""

from __future__ import annotations

import re
from urllib.parse import quote
from dataclasses import dataclass

from .errors import InvalidName

#: The Hub's repo types the cluster serves, each under its own provider name (the mount's
#: top-level folder, the first part of a repo's keys): models under ``huggingface`` and
#: datasets under ``huggingface-datasets``. A provider name, not a folder level inside
#: ``huggingface/``, keeps every repo at ``<provider>/<org>/<name>`` (no org is mistaken
#: for a repo type) and keeps model paths as they were.
HUB_REPO_TYPES = {"huggingface": "model", "huggingface-datasets": "dataset"}
#: Object stores and local directories: no commits, so revisions are listing digests and
#: their one branch is :data:`STORE_BRANCH` (docs/providers.md).
STORE_PROVIDERS = ("s3", "azure", "file")
PROVIDERS = (*HUB_REPO_TYPES, *STORE_PROVIDERS)
#: The branch of a store model: moves whenever the listing under its prefix changes.
STORE_BRANCH = "latest"
#: Longest key prefix a store model may have (S3 keys are at most 1024 bytes).
PREFIX_MAX = 1024
#: Longest single path component Linux accepts (NAME_MAX) and longest path (PATH_MAX).
NAME_MAX = 255
PATH_MAX = 4096
#: The Hub caps each half of a repo id at 96 characters.
REPO_PART_MAX = 96

_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True, slots=True)
class RepoRef:
    """A repository: ``<provider>/<org>/<name>`` (``huggingface/...`` for a Hub model,
    ``huggingface-datasets/...`` for a Hub dataset), or for a store provider
    ``<provider>/<bucket>/<prefix…>`` (``name`` is then a key prefix that may hold ``/``)."""

    provider: str
    org: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.org}/{self.name}"

    @property
    def hub_repo_type(self) -> str | None:
        """``"model"`` or ``"dataset"`` for a Hub repo, ``None`` for other providers."""
        return HUB_REPO_TYPES.get(self.provider)

    @property
    def url_path(self) -> str:
        """``provider/org/name`` for the node protocol's URLs: a store prefix's ``/`` is
        sent as ``%2F``, so the name stays one path segment."""
        return f"{self.provider}/{self.org}/{quote(self.name, safe='')}"

    def __str__(self) -> str:
        return f"{self.provider}/{self.org}/{self.name}"


#: The pseudo repo whose "commits" are published artifacts (:mod:`mmfs.artifacts`): an
#: artifact's id is a 40-hex digest of its key, so the data path serves it like a commit.
ARTIFACTS = RepoRef("artifacts", "mmfs", "published")


def repo_of(provider: str, repo_id: str) -> RepoRef:
    """The repo a manifest or URL names: a model repo, or the artifacts pseudo repo."""
    if provider == ARTIFACTS.provider and repo_id == ARTIFACTS.repo_id:
        return ARTIFACTS
    return parse_repo_id(repo_id, provider)


def check_provider(provider: str) -> str:
    if provider not in PROVIDERS:
        raise InvalidName(f"unknown provider {provider!r} (known: {', '.join(PROVIDERS)})")
    return provider


def hub_provider(repo_type: str) -> str:
    """The provider name of a Hub repo type (``"dataset"`` -> ``"huggingface-datasets"``)."""
    for provider, kind in HUB_REPO_TYPES.items():
        if kind == repo_type:
            return provider
    raise InvalidName(f"repo type {repo_type!r} is not served here (served: {', '.join(HUB_REPO_TYPES.values())})")


def check_repo_part(part: str, what: str = "repo name") -> str:
    if "\0" in part:
        raise InvalidName(f"{what} contains a NUL byte")
    if len(part) > REPO_PART_MAX:
        raise InvalidName(f"{what} is longer than {REPO_PART_MAX} characters")
    if not _REPO_PART.match(part) or ".." in part or "--" in part:
        raise InvalidName(f"invalid {what} {part!r}: use letters, digits, '-', '_' and '.'")
    return part


def check_store_part(part: str, what: str) -> str:
    """A bucket, container, root or key prefix component: the Hub's characters, no length
    cap of its own and ``--`` allowed (stores have their own, stricter rules upstream)."""
    if "\0" in part:
        raise InvalidName(f"{what} contains a NUL byte")
    if len(part.encode()) > NAME_MAX:
        raise InvalidName(f"{what} is longer than {NAME_MAX} bytes")
    if not _REPO_PART.match(part) or ".." in part:
        raise InvalidName(f"invalid {what} {part!r}: use letters, digits, '-', '_' and '.'")
    return part


def check_prefix_part(part: str) -> str:
    """One component of a store model's key prefix. ``latest`` and 40-hex names are
    refused: on the mount they mark where the prefix ends and the revision begins."""
    check_store_part(part, "key prefix component")
    if part == STORE_BRANCH or is_commit(part):
        raise InvalidName(f"key prefix component {part!r} is a revision name ({STORE_BRANCH!r} or 40 hex): "
                          "such a prefix cannot be named on the mount")
    return part


def make_repo(provider: str, org: str, name: str) -> RepoRef:
    """A validated :class:`RepoRef`: Hub repos are ``org/name``; store models are a bucket
    (container, file root) and a key prefix of one or more components."""
    check_provider(provider)
    if provider not in STORE_PROVIDERS:
        return RepoRef(provider, check_repo_part(org, "organisation"), check_repo_part(name))
    check_store_part(org, "bucket, container or root name")
    if not name or len(name.encode()) > PREFIX_MAX:
        raise InvalidName(f"a {provider} model needs a key prefix of 1 to {PREFIX_MAX} bytes after {org!r}")
    for part in name.split("/"):
        check_prefix_part(part)
    return RepoRef(provider, org, name)


def parse_repo_id(repo_id: str, provider: str = "huggingface") -> RepoRef:
    """Parse ``org/name`` (stores: ``bucket/prefix…``) into a :class:`RepoRef`."""
    if provider in STORE_PROVIDERS:
        org, _, name = repo_id.strip("/").partition("/")
        if not name:
            raise InvalidName(f"invalid {provider} repo id {repo_id!r}: expected <bucket>/<prefix…>")
        return make_repo(provider, org, name)
    parts = repo_id.split("/")
    if len(parts) != 2:
        raise InvalidName(f"invalid repo id {repo_id!r}: expected <org>/<name>")
    return RepoRef(check_provider(provider), check_repo_part(parts[0], "organisation"), check_repo_part(parts[1]))


def check_revision(revision: str) -> str:
    """A branch, tag or commit as the Hub accepts it (``refs/pr/1`` included).

    As in git, no ``/``-separated part may be empty or begin with a dot: ``.`` and ``..``
    would name the repo's own directory or its parent wherever a revision becomes a path."""
    if "\0" in revision:
        raise InvalidName("revision contains a NUL byte")
    if not revision or len(revision) > NAME_MAX:
        raise InvalidName(f"revision must be 1 to {NAME_MAX} characters")
    if not _REVISION.match(revision) or any(not part or part.startswith(".") for part in revision.split("/")):
        raise InvalidName(f"invalid revision {revision!r}")
    return revision


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def check_path(path: str) -> str:
    """A file path inside a repo: relative, no ``.``/``..`` components, no NUL, bounded."""
    if "\0" in path:
        raise InvalidName("path contains a NUL byte")
    if not path or len(path.encode()) > PATH_MAX:
        raise InvalidName(f"path must be 1 to {PATH_MAX} bytes")
    if path.startswith("/"):
        raise InvalidName(f"path {path!r} is absolute; paths are relative to the repo")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidName(f"invalid path {path!r}: empty, '.' or '..' component")
        if len(part.encode()) > NAME_MAX:
            raise InvalidName(f"path component longer than {NAME_MAX} bytes in {path[:64]!r}…")
    return path
