"""The backend's counters and their Prometheus text rendering (``GET /metrics``).

Engine and tier counters are read from their ``statistics()`` snapshots at scrape time;
the server adds what only it knows: requests by route and status, and bytes sent to
clients by the tier that supplied them (``memory``, ``disk``, ``shared``, or ``upstream`` when the
chunk had to be fetched, by this request or one it joined).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Iterable

from mmfs.engine import EngineStatistics

if TYPE_CHECKING:
    from .holders import HolderStatistics
    from .nixl_plane import PlaneStatistics

TIERS_SERVED = ("memory", "disk", "shared", "upstream")
#: Methods counted by name; any other (the client chooses it) counts as ``OTHER``, so
#: clients cannot grow the number of series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (route, method, status)
        self.served_bytes: Counter[str] = Counter({tier: 0 for tier in TIERS_SERVED})
        self.response_bytes = 0
        self.aborted_responses = 0
        self.access_checks: Counter[str] = Counter()

    def observe(self, route: str, method: str, status: int, sent: int, completed: bool) -> None:
        self.requests[(route or "other", method if method in METHODS else "OTHER", status)] += 1
        self.response_bytes += sent
        if not completed:
            self.aborted_responses += 1

    def render(self, engine: EngineStatistics, *, connections: int, active_requests: int,
               nixl: PlaneStatistics | None = None, replica_fetches: int = 0, replica_bytes: int = 0,
               holders: HolderStatistics | None = None,
               versions: dict[str, float] | None = None, artifacts: dict | None = None) -> str:
        """``replica_*``: the part of the engine's remote fetches that came from other replicas;
        ``versions``: the versioning metrics (:data:`VERSION_METRICS`) by name."""
        out = _Writer()
        out.metric("mmfs_backend_upstream_bytes_total", "counter", "Bytes fetched from the upstream (the Hub).",
                   [({}, engine.remote_bytes - replica_bytes)])
        out.metric("mmfs_backend_upstream_fetches_total", "counter", "Chunk fetches from the upstream.",
                   [({}, engine.remote_fetches - replica_fetches)])
        out.metric("mmfs_backend_replica_bytes_total", "counter",
                   "Bytes of chunks fetched from the other replicas (their owners; 0 without --replicas).",
                   [({}, replica_bytes)])
        out.metric("mmfs_backend_replica_fetches_total", "counter", "Chunk fetches from the other replicas.",
                   [({}, replica_fetches)])
        out.metric("mmfs_backend_inflight_fetches", "gauge", "Chunk loads in flight (single-flight entries).",
                   [({}, engine.inflight)])
        out.metric("mmfs_backend_coalesced_requests_total", "counter",
                   "Chunk requests that joined a load already in flight instead of starting one.",
                   [({}, engine.coalesced)])
        out.metric("mmfs_backend_integrity_failures_total", "counter",
                   "Chunks or files whose bytes failed their hash (purged, never served).",
                   [({}, engine.integrity_failures)])
        out.metric("mmfs_backend_files_verified", "gauge",
                   "Files verified against their upstream hash by this process (chunk maps made).",
                   [({}, engine.files_verified)])
        out.metric("mmfs_backend_provisional_dropped_total", "counter",
                   "Chunk copies received before their file's map existed that did not match it (dropped).",
                   [({}, engine.provisional_dropped)])
        out.metric("mmfs_backend_pending_write_bytes", "gauge",
                   "Chunk bytes waiting to be written to the cold tier (bounded).",
                   [({}, engine.pending_write_bytes)])
        if artifacts is not None:
            out.metric("mmfs_backend_artifacts", "gauge", "Derived artifacts published (compiled engines, caches).",
                       [({}, artifacts["artifacts"])])
            out.metric("mmfs_backend_artifact_bytes", "gauge", "Bytes of the files of published artifacts.",
                       [({}, artifacts["bytes"])])
            out.metric("mmfs_backend_artifact_builds_in_progress", "gauge",
                       "Artifact builds holding a live lease.", [({}, artifacts["building"])])
            out.metric("mmfs_backend_artifact_pushes_total", "counter",
                       "Artifact publishes, and pushes refused for want of the publish token.",
                       [({"outcome": k}, v) for k, v in sorted(artifacts["pushes"].items())])
            out.metric("mmfs_backend_artifact_uploaded_bytes_total", "counter",
                       "Blob bytes received by artifact pushes.", [({}, artifacts["uploaded_bytes"])])
        out.metric("mmfs_backend_served_bytes_total", "counter",
                   "File bytes sent to clients, by the tier that supplied them.",
                   [({"tier": tier}, self.served_bytes[tier]) for tier in TIERS_SERVED])
        tiers = engine.tiers
        out.metric("mmfs_backend_tier_hits_total", "counter", "Chunk lookups a tier answered.",
                   [({"tier": t.name}, t.hits) for t in tiers])
        out.metric("mmfs_backend_tier_misses_total", "counter", "Chunk lookups a tier could not answer.",
                   [({"tier": t.name}, t.misses) for t in tiers])
        out.metric("mmfs_backend_tier_hit_bytes_total", "counter", "Bytes a tier answered lookups with.",
                   [({"tier": t.name}, t.hit_bytes) for t in tiers])
        out.metric("mmfs_backend_tier_used_bytes", "gauge", "Bytes a tier holds.",
                   [({"tier": t.name}, t.used_bytes) for t in tiers])
        out.metric("mmfs_backend_tier_limit_bytes", "gauge", "Capacity of a tier in bytes.",
                   [({"tier": t.name}, t.limit_bytes) for t in tiers])
        out.metric("mmfs_backend_tier_entries", "gauge", "Chunks a tier holds.",
                   [({"tier": t.name}, t.entries) for t in tiers])
        out.metric("mmfs_backend_tier_evictions_total", "counter", "Chunks a tier evicted (LRU or TTL).",
                   [({"tier": t.name}, t.evictions) for t in tiers])
        out.metric("mmfs_backend_tier_errors_total", "counter", "I/O or checksum errors in a tier.",
                   [({"tier": t.name}, t.errors) for t in tiers])
        out.metric("mmfs_backend_requests_total", "counter", "HTTP requests answered, by route, method and status.",
                   [({"route": r, "method": m, "status": str(s)}, n) for (r, m, s), n in sorted(self.requests.items())])
        out.metric("mmfs_backend_response_bytes_total", "counter", "Bytes of response bodies sent.",
                   [({}, self.response_bytes)])
        out.metric("mmfs_backend_aborted_responses_total", "counter",
                   "Responses cut off mid-body (client gone, upstream failure, integrity failure).",
                   [({}, self.aborted_responses)])
        out.metric("mmfs_backend_access_checks_total", "counter",
                   "Caller token checks against the upstream for gated repos, by outcome.",
                   [({"outcome": k}, v) for k, v in sorted(self.access_checks.items())])
        out.metric("mmfs_nixl_chunks_total", "counter",
                   "Chunks nodes read over the NIXL data plane (leases released in time).",
                   [({}, nixl.chunks if nixl else 0)])
        out.metric("mmfs_nixl_bytes_total", "counter", "Bytes nodes read over the NIXL data plane.",
                   [({}, nixl.bytes if nixl else 0)])
        out.metric("mmfs_nixl_fallbacks_total", "counter",
                   "Chunks asked for over NIXL that went over TCP instead (no free slot, failed or late READ).",
                   [({}, nixl.fallbacks if nixl else 0)])
        out.metric("mmfs_nixl_lease_expirations_total", "counter", "NIXL slot leases that expired unreleased.",
                   [({}, nixl.expired if nixl else 0)])
        out.metric("mmfs_nixl_slots", "gauge", "NIXL slots in the registered pool (0 without --nixl).",
                   [({}, nixl.slots if nixl else 0)])
        out.metric("mmfs_nixl_slots_leased", "gauge", "NIXL slots leased to nodes now.",
                   [({}, nixl.leased if nixl else 0)])
        out.metric("mmfs_backend_peer_nodes", "gauge", "Sharing nodes heard from within --peer-ttl.",
                   [({}, holders.nodes if holders else 0)])
        out.metric("mmfs_backend_peer_redirects_total", "counter",
                   "Chunk requests sent to a peer instead of answered here (307).",
                   [({}, holders.redirects if holders else 0)])
        out.metric("mmfs_backend_peer_served_here_total", "counter",
                   "Chunk requests from sharing nodes answered with bytes here.",
                   [({}, holders.served_here if holders else 0)])
        out.metric("mmfs_backend_peer_reports_total", "counter",
                   "Peers reported by nodes, by problem (corrupt: bytes failed the chunk map; unreachable).",
                   [({"problem": "corrupt"}, holders.reports_corrupt if holders else 0),
                    ({"problem": "unreachable"}, holders.reports_unreachable if holders else 0)])
        out.metric("mmfs_backend_peer_banned", "gauge", "Peers never chosen now (reported for corrupt bytes).",
                   [({}, holders.banned if holders else 0)])
        for name, kind, help_text in VERSION_METRICS:
            out.metric(name, kind, help_text, [({}, (versions or {}).get(name, 0))])
        out.metric("mmfs_backend_open_connections", "gauge", "Client connections open.", [({}, connections)])
        out.metric("mmfs_backend_active_requests", "gauge", "Requests being answered.", [({}, active_requests)])
        out.metric("mmfs_backend_start_time_seconds", "gauge", "Unix time the server started.",
                   [({}, self.started)])
        return out.text()


#: The versioning metrics (:mod:`mmfs.refwatch`, :mod:`mmfs.retention`): name, type, help.
VERSION_METRICS = (
    ("mmfs_backend_refs_watched", "gauge", "Refs checked upstream once per --ref-ttl."),
    ("mmfs_backend_ref_checks_total", "counter", "Upstream checks of watched refs."),
    ("mmfs_backend_ref_moves_total", "counter", "Refs seen pointing at a new commit."),
    ("mmfs_backend_commits_pinned", "gauge", "Commits pinned by nodes (open files, CSI volumes)."),
    ("mmfs_backend_commits_retired", "gauge", "Commits no ref points at, unpinned, past --retain."),
    ("mmfs_backend_gc_reclaimed_bytes_total", "counter", "Bytes of retired commits' content dropped."),
)


class _Writer:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            rendered = repr(float(value)) if isinstance(value, float) else str(int(value))
            self._lines.append(f"{name}{{{label_text}}} {rendered}" if label_text else f"{name} {rendered}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
