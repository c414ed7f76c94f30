"""Whose token a node reads with, and the check that gates cached bytes per caller.

One FUSE mount serves every pod of a node, and the kernel tells the daemon only the
caller's pid and uid, which do not say which volume (and so which token) a read came
through. So credentials are per *view*: the mount's root reads with the mount's own
token (``--token-file`` or ``HF_TOKEN``), and ``<mount>/.access/<key>/`` is the same
namespace read with the token in ``<token-dir>/<key>``. The CSI node plugin writes one
such file per distinct volume token (the key is a hash of the token) and bind-mounts the
pod's volume from under that view, so two pods with different tokens see different
inodes, and the kernel's page cache of one is never the other's (docs/node.md, "Access").

The node's caches are shared by every view, so bytes cached for one view must not
reach a view without access: :class:`AccessGate` asks the remote (the backend's
``HEAD /v1/file``, or the Hub's ``HEAD resolve``) whether a view's token may read a
repo's content before a file of it is opened, and again on a read once the answer is
``ttl`` seconds old; answers are cached per (token, repo) for ``ttl`` seconds, never
longer, so a revoked token stops reading cached bytes within that bound.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import trio

from .errors import AccessDenied, MmfsError, NotFound, RepoNotFound, UpstreamError
from .names import RepoRef
from .remote.base import FileSource, Remote
from .singleflight import SingleFlight

log = logging.getLogger(__name__)

#: The directory at the mount's root holding one view per token key.
ACCESS_DIR = ".access"
#: Longest a token file may be (a Hub token is under 100 bytes).
_MAX_TOKEN = 4096


def is_token_key(name: str) -> bool:
    """A view name: 32 lower-case hex digits (csi_driver/tokens.py derives them from tokens)."""
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def read_token_file(path: str | os.PathLike[str]) -> str:
    """A token from a file (one line, surrounding blanks dropped); :class:`MmfsError` naming the problem."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_TOKEN + 1)
    except OSError as exc:
        raise MmfsError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    token = data.decode("utf-8", "replace").strip()
    if not token or len(data) > _MAX_TOKEN or any(c.isspace() for c in token):
        raise MmfsError(f"the token file {path} must hold one token on one line")
    return token


@dataclass(frozen=True, slots=True)
class Credentials:
    """The mount's own token and where views' tokens are."""

    token: str | None = None
    token_dir: Path | None = None

    def auth(self, view: str) -> str | None:
        """The ``Authorization`` value of ``view`` (``""``: the mount's own).
        :class:`NotFound` for a view without a token file (never published, or unpublished)."""
        if not view:
            return f"Bearer {self.token}" if self.token else None
        if self.token_dir is None or not is_token_key(view):
            raise NotFound(f"no access view {view!r}")
        path = self.token_dir / view
        if not path.is_file():
            raise NotFound(f"no access view {view!r} (no token file in {self.token_dir})")
        try:
            return f"Bearer {read_token_file(path)}"
        except MmfsError as exc:
            log.error("access view %s: %s", view, exc)
            raise NotFound(f"access view {view!r} has no usable token") from None


class AccessGate:
    """Per-(token, repo) content checks against the remote, cached for ``ttl`` seconds.

    What the remote said a repo is (open, gated, private) is remembered in ``state_file``:
    when the remote cannot be reached, an open repo stays readable from the caches (a
    warm node outlives its backend), a restricted one only by a token whose answer is
    still fresh, and a repo never answered for is refused (fails closed)."""

    def __init__(self, remote: Remote, nursery: Callable[[], trio.Nursery], state_file: Path | None = None, *,
                 ttl: float = 60.0, answer_timeout: float = 30.0) -> None:
        self.remote = remote
        #: Longest an open waits for the remote's answer before the last known one is used
        #: (a hung remote must not take the repos it last said were open down with it).
        self.answer_timeout = answer_timeout
        self._nursery = nursery  # where checks run (the engine's, once it is entered)
        self.ttl = ttl
        self._state_file = state_file
        self._kinds: dict[str, str] = self._load()
        self._answers: dict[tuple[str | None, RepoRef], tuple[MmfsError | None, float]] = {}
        self._flights: SingleFlight[tuple[str | None, RepoRef], MmfsError | None] = SingleFlight()
        self.checks = 0

    def _load(self) -> dict[str, str]:
        if self._state_file is None:
            return {}
        try:
            kinds = json.loads(self._state_file.read_text())
            return {str(k): str(v) for k, v in kinds.items()} if isinstance(kinds, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("cannot read %s (%s): every repo is checked afresh", self._state_file, exc)
            return {}

    def _remember(self, repo: RepoRef, kind: str) -> None:
        if self._kinds.get(str(repo)) == kind:
            return
        self._kinds[str(repo)] = kind
        if self._state_file is not None:
            try:
                tmp = self._state_file.with_name(self._state_file.name + ".tmp")
                tmp.write_text(json.dumps(self._kinds))
                os.replace(tmp, self._state_file)
            except OSError as exc:
                log.warning("cannot record access answers in %s: %s", self._state_file, exc)

    def kind(self, repo: RepoRef) -> str | None:
        """What the remote last said ``repo`` is (``open``, ``gated``, ``private`` or
        ``restricted``), ``None`` if never asked."""
        return self._kinds.get(str(repo))

    def fresh(self, auth: str | None, repo: RepoRef) -> bool:
        """Whether ``auth`` was allowed ``repo`` less than ``ttl`` seconds ago (reads may go on)."""
        answer = self._answers.get((_auth_id(auth), repo))
        return answer is not None and answer[0] is None and time.monotonic() - answer[1] < self.ttl

    async def check(self, source: FileSource, auth: str | None) -> None:
        """Raise :class:`AccessDenied` (or the remote's refusal) unless ``auth`` may read ``source``'s repo."""
        key = (_auth_id(auth), source.repo)
        answer = self._answers.get(key)
        if answer is None or time.monotonic() - answer[1] >= self.ttl:
            try:
                with trio.move_on_after(self.answer_timeout) as waiting:
                    refusal = await self._flights.run(key, lambda: self._ask(source, auth), self._nursery())
                if waiting.cancelled_caught:
                    raise UpstreamError(f"no answer within {self.answer_timeout:g} s")
            except UpstreamError as exc:  # no answer
                if self._kinds.get(str(source.repo)) != "open":
                    raise UpstreamError(f"cannot check access to {source.repo} ({exc}); not served until "
                                        "the remote answers") from None
                log.warning("cannot check access to %s (%s): it was open when last asked, serving it", source.repo,
                            exc)
                refusal = None
            if len(self._answers) > 10_000:
                self._answers.clear()
            self._answers[key] = answer = (refusal, time.monotonic())
        if answer[0] is not None:
            raise answer[0]

    async def _ask(self, source: FileSource, auth: str | None) -> MmfsError | None:
        self.checks += 1
        try:
            kind = await self.remote.check_access(source, auth=auth)
        except (AccessDenied, RepoNotFound) as exc:  # refused a file the manifest lists: restricted
            self._remember(source.repo, "restricted")
            return exc
        except NotFound as exc:
            return exc
        self._remember(source.repo, kind)
        return None


def _auth_id(auth: str | None) -> str | None:
    return hashlib.sha256(auth.encode()).hexdigest()[:16] if auth else None
