"""Build leases: one build of an artifact at a time across the cluster.

``mmfs artifact build`` asks the backend for the key's lease before it runs a builder.
The first asker gets it (``granted``, with a lease id and a generation number); the
others are told who builds (``building``) and ask again until the artifact is published,
the build failed, or the lease expired. A builder renews its lease while it runs; one
that dies stops renewing, the lease expires after its TTL, and the next ask takes over
with the next generation. A builder that fails releases its lease with its log tail:
every waiter that waited on that generation is answered ``failed`` with that tail, while
an ask that did not wait on it starts a new attempt.

Leases live in the backend's memory: a restarted backend has none, so a builder's next
renewal is refused and the waiters' next ask takes over (at worst one build runs twice;
publishing is idempotent and artifacts are immutable, so the first publish wins).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

#: Longest a builder may go between renewals (seconds), and the shortest TTL accepted.
MAX_TTL = 600.0
MIN_TTL = 1.0
#: Characters of a failed build's log kept for its waiters.
LOG_TAIL_CHARS = 4000


@dataclass(slots=True)
class Build:
    """The latest build attempt of one artifact."""

    key: dict[str, str]
    generation: int
    holder: str
    lease: str
    ttl: float
    expires: float
    started_at: float = field(default_factory=time.time)
    failed: bool = False
    released: bool = False
    log_tail: str = ""


class BuildLeases:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._builds: dict[str, Build] = {}  # artifact id -> latest attempt

    def _running(self, build: Build | None) -> bool:
        return build is not None and not build.released and build.expires > self._clock()

    def acquire(self, artifact_id: str, key: dict[str, str], holder: str, ttl: float,
                waited_on: int | None) -> dict[str, Any]:
        """The answer to one ask (the caller has checked the artifact is not published)."""
        ttl = min(max(ttl, MIN_TTL), MAX_TTL)
        build = self._builds.get(artifact_id)
        if build is not None and self._running(build):
            return {"state": "building", "generation": build.generation, "holder": build.holder,
                    "expires_in": round(build.expires - self._clock(), 3)}
        if build is not None and build.failed and waited_on == build.generation:
            return {"state": "failed", "generation": build.generation, "holder": build.holder,
                    "log_tail": build.log_tail}
        generation = build.generation + 1 if build is not None else 1
        lease = secrets.token_hex(16)
        self._builds[artifact_id] = Build(key, generation, holder, lease, ttl, self._clock() + ttl)
        return {"state": "granted", "generation": generation, "lease": lease, "ttl": ttl,
                "took_over": build is not None and not build.released}

    def renew(self, artifact_id: str, lease: str) -> bool:
        """Extend a running lease by its TTL; False when it is not held any more (expired
        and taken over, released, or unknown after a restart)."""
        build = self._builds.get(artifact_id)
        if build is None or build.lease != lease or build.released:
            return False
        if build.expires <= self._clock():
            return False
        build.expires = self._clock() + build.ttl
        return True

    def release(self, artifact_id: str, lease: str, *, failed: bool, log_tail: str = "") -> bool:
        build = self._builds.get(artifact_id)
        if build is None or build.lease != lease:
            return False
        build.released, build.failed = True, failed
        build.log_tail = log_tail[-LOG_TAIL_CHARS:]
        return True

    def forget(self, artifact_id: str) -> None:
        """The artifact is published: its attempts are history."""
        self._builds.pop(artifact_id, None)

    def in_progress(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [{"id": artifact_id, "key": b.key, "generation": b.generation, "holder": b.holder,
                 "started_at": b.started_at, "expires_in": round(b.expires - now, 3)}
                for artifact_id, b in sorted(self._builds.items()) if self._running(b)]

    def failed(self) -> list[dict[str, Any]]:
        return [{"id": artifact_id, "key": b.key, "generation": b.generation, "holder": b.holder}
                for artifact_id, b in sorted(self._builds.items()) if b.failed]


__all__ = ["Build", "BuildLeases", "LOG_TAIL_CHARS"]
