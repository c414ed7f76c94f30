"""What a pod asks for: the ``volumeAttributes`` of an inline volume or a static PV.

==============  ========  ==============================================================
key             default   meaning
==============  ========  ==============================================================
``provider``    huggingface  the namespace under the mount root (``huggingface-datasets``
                             for a Hub dataset; ``s3``, ``azure``, ``file``: docs/providers.md)
``repo``        (required)   ``org/name`` (stores: ``<bucket>/<prefix…>``)
``revision``    ``main``     branch, tag or 40-hex commit; a branch or tag is pinned to
                             its commit at publish time (stores: ``latest``)
``subPath``     (none)       a directory inside the repo to publish instead of its root
``prefetch``    ``false``    ``"true"`` starts warming that commit in the background
==============  ========  ==============================================================

Keys under ``csi.storage.k8s.io/`` (pod info from kubelet) are ignored; any other key is
refused, so a typo such as ``revison`` fails loudly instead of silently serving ``main``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mmfs.errors import InvalidName
from mmfs.names import STORE_BRANCH, STORE_PROVIDERS, check_path, check_revision, parse_repo_id

KNOWN_KEYS = frozenset({"provider", "repo", "revision", "subPath", "prefetch"})
KUBELET_PREFIX = "csi.storage.k8s.io/"
DEFAULT_PROVIDER = "huggingface"
DEFAULT_REVISION = "main"


class InvalidVolume(ValueError):
    """The volume attributes are missing or malformed (gRPC ``INVALID_ARGUMENT``)."""


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    provider: str
    repo: str  # "org/name"
    revision: str
    sub_path: str  # "" for the repo root
    prefetch: bool


def parse_volume_context(context: Mapping[str, str]) -> VolumeSpec:
    """Validate *context* into a :class:`VolumeSpec`, or raise :class:`InvalidVolume`."""
    unknown = sorted(k for k in context if k not in KNOWN_KEYS and not k.startswith(KUBELET_PREFIX))
    if unknown:
        raise InvalidVolume(f"unknown volume attributes {unknown}; known: {sorted(KNOWN_KEYS)}")
    repo = context.get("repo", "")
    if not repo:
        raise InvalidVolume("volume attribute 'repo' (org/name) is required")
    provider = context.get("provider") or DEFAULT_PROVIDER
    revision = context.get("revision") or (STORE_BRANCH if provider in STORE_PROVIDERS else DEFAULT_REVISION)
    raw_sub_path = context.get("subPath", "")
    if raw_sub_path.startswith("/"):
        raise InvalidVolume(f"subPath {raw_sub_path!r} must be relative to the repo")
    sub_path = raw_sub_path.rstrip("/")
    prefetch_raw = context.get("prefetch", "false").lower()
    if prefetch_raw not in ("true", "false"):
        raise InvalidVolume(f"prefetch must be 'true' or 'false', not {context['prefetch']!r}")
    try:
        ref = parse_repo_id(repo, provider)
        check_revision(revision)
        if sub_path:
            check_path(sub_path)
    except InvalidName as exc:
        raise InvalidVolume(str(exc)) from exc
    return VolumeSpec(ref.provider, ref.repo_id, revision, sub_path, prefetch_raw == "true")
