"""``mmfs-backend serve``: the cluster backend server.

    mmfs-backend serve --listen 0.0.0.0:3000 --data-dir /data \\
        [--memory-cache 8GiB] [--memory-ttl 600] [--chunk-size 4MiB] \\
        [--max-upstream-fetches 16] [--disk-cache 500GiB] [--stream-memory 32MiB] \\
        [--max-connections 1024] [--send-timeout 30] [--upstream-timeout 60] \\
        [--peer-ttl 10] [--peer-max-load 4] \\
        [--nixl [--nixl-pool 256MiB] [--nixl-lease-timeout 10]] \\
        [--replicas URL[,URL…] [--advertise HOST:PORT]] [--shared-dir DIR [--cold-compression zstd|none]] \\
        [--ref-ttl 60] [--warm-on-update auto] [--watch huggingface/<org>/<name>@<ref> ...] [--retain 3600]

The upstream is the Hub at ``HF_ENDPOINT`` with ``HF_TOKEN`` (for fetching, never a way
around a gated or private repo's rules: backend_server/access.py); ``MMFS_ADMIN_TOKEN``,
when set, is required for admin actions (``POST /v1/prefetch``). ``HF_HUB_OFFLINE=1`` serves
only what the data directory already holds. Under ``--data-dir`` (local storage: LMDB must
not sit on a network filesystem): ``chunks/`` (the cold tier: content-addressed chunks
indexed in LMDB; with ``--shared-dir`` the cold tier is there instead, see
:mod:`mmfs.tiers.shared`), ``metadata/`` (refs, manifests, file records, published artifacts),
``artifacts/`` (artifact blobs and uploads in progress, docs/artifacts.md) and
``access.json`` (repos found gated or private). ``MMFS_PUBLISH_TOKEN`` enables artifact
pushes and build leases for callers presenting it. One process at a time uses a data
directory: a second one (a rolling update started early) waits for the first to exit.
With ``--replicas``, chunks are owned by replicas by rendezvous hashing
(:mod:`mmfs.remote.replicas`): this replica fetches the chunks it owns upstream and
takes the others from their owners. On start it prints
``mmfs-backend listening on http://HOST:PORT`` to stdout; logs go to stderr (one line
per request with ``--log-level DEBUG``; at INFO only bodies cut short). SIGTERM or SIGINT: stop accepting, let requests in progress finish (up to
``--grace`` seconds), flush the stores, exit 0.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import trio

from mmfs import options
from mmfs.engine import EngineConfig, FetchEngine
from mmfs.errors import CacheError, MmfsError
from mmfs.manifest import DEFAULT_CHUNK_SIZE
from mmfs.metadata import MetadataStore
from mmfs.remote._http import policy_within
from mmfs.remote.base import Remote
from mmfs.refwatch import DEFAULT_REF_TTL, RefWatcher
from mmfs.retention import DEFAULT_GRACE, Retention
from mmfs.remote.hub import HubRemote, hub_endpoint
from mmfs.remote.replicas import Replica, ReplicaRemote, ReplicaSet, expand, parse_replica_urls
from mmfs.remote.router import StoreConfig, upstream
from mmfs.sizes import format_size, parse_size, size_argument
from mmfs.tiers.base import ChunkTier
from mmfs.tiers.disk import DiskTier
from mmfs.tiers.memory import MemoryTier
from mmfs.tiers.shared import SharedTier

from .access import AccessControl
from .app import STREAM_MEMORY, BackendApp
from .datadir import hold_data_dir
from .artifact_store import ArtifactOrigin, ArtifactStore
from .holders import HolderTable
from .http import MAX_CONNECTIONS, SEND_TIMEOUT, HTTPServer
from .metrics import Metrics
from .versions import VersionRoutes

log = logging.getLogger("backend_server")


def _replica_urls(text: str) -> list[str]:
    try:
        return parse_replica_urls(text)
    except MmfsError as exc:
        raise argparse.ArgumentTypeError(f"--replicas: {exc}") from None


#: Seconds between sweeps of the shared cold tier (settling chunks another replica verified).
SWEEP_EVERY = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfs-backend", description="The mmfs cluster backend server.")
    options.add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models from the Hub through the cluster cache",
                                description=__doc__.split("\n\n")[0])
    serve.add_argument("--listen", type=options.listen_address, default=("0.0.0.0", 3000), metavar="HOST:PORT",
                       help="address to listen on (default 0.0.0.0:3000; port 0 picks a free one)")
    serve.add_argument("--data-dir", type=Path, required=True, help="where the cold tier and metadata live")
    serve.add_argument("--memory-cache", type=size_argument, default=parse_size("2GiB"), metavar="SIZE",
                       help="hot tier size in memory (default 2GiB; 0 disables it)")
    serve.add_argument("--memory-ttl", type=options.seconds, default=600.0, metavar="SECONDS",
                       help="how long a chunk stays in the hot tier (default 600)")
    serve.add_argument("--chunk-size", type=options.chunk_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                       help=f"chunk size for new manifests (default {format_size(DEFAULT_CHUNK_SIZE)})")
    serve.add_argument("--max-upstream-fetches", type=options.positive_int, default=None, metavar="N",
                       help="chunk fetches from the upstream at once (default: 32MiB worth of chunks, 4 to 16)")
    serve.add_argument("--disk-cache", type=size_argument, default=None, metavar="SIZE",
                       help="cold tier size (default: 90%% of the data volume's size)")
    serve.add_argument("--stream-memory", type=options.size_between(options.MIN_CHUNK), default=STREAM_MEMORY, metavar="SIZE",
                       help="chunk bytes all streaming responses may hold at once (default 32MiB)")
    serve.add_argument("--nixl", action="store_true",
                       help="also serve chunks over NIXL (needs nixl-cu12: pip install --no-deps 'nixl-cu12>=1.5,<2')")
    serve.add_argument("--nixl-pool", type=size_argument, default=parse_size("256MiB"), metavar="SIZE",
                       help="registered DRAM nodes READ chunks from, in chunk-size slots (default 256MiB)")
    serve.add_argument("--nixl-lease-timeout", type=options.seconds, default=10.0, metavar="SECONDS",
                       help="how long a slot stays leased to a node that never releases it (default 10)")
    serve.add_argument("--max-connections", type=options.positive_int, default=MAX_CONNECTIONS, metavar="N",
                       help=f"client connections served at once; more are answered 503 (default {MAX_CONNECTIONS})")
    serve.add_argument("--upstream-timeout", type=options.seconds, default=60.0, metavar="SECONDS",
                       help="longest one upstream fetch may stay silent, retries included, before its "
                            "readers get an error (default: 60)")
    serve.add_argument("--send-timeout", type=options.seconds, default=SEND_TIMEOUT, metavar="SECONDS",
                       help="drop a client that takes no MiB of a response for this long (default 30); "
                            "streams wait up to twice this for --stream-memory")
    serve.add_argument("--peer-ttl", type=options.seconds, default=10.0, metavar="SECONDS",
                       help="forget a sharing node (mmfs mount --peer-listen) not heard from for this long (default 10)")
    serve.add_argument("--peer-max-load", type=options.positive_int, default=4, metavar="N",
                       help="chunks a sharing node is sent at once before the backend serves them itself (default 4)")
    serve.add_argument("--access-ttl", type=options.seconds, default=60.0, metavar="SECONDS",
                       help="how long a caller's access to a gated or private repo is trusted before it is "
                            "asked upstream again (default 60): a revoked token stops reading within this")
    serve.add_argument("--grace", type=options.seconds, default=5.0, metavar="SECONDS",
                       help="on SIGTERM, how long requests in progress may take to finish (default 5)")
    serve.add_argument("--replicas", type=_replica_urls, default=None, metavar="URL[,URL…]",
                       help="every replica of this backend, this one included, or one DNS name resolving to "
                            "all of them (a headless Service): each chunk is fetched upstream by its owner only")
    serve.add_argument("--advertise", type=options.listen_address, default=None, metavar="HOST:PORT",
                       help="this replica's address among --replicas (default: the --listen address, or "
                            "$POD_IP with the --listen port)")
    serve.add_argument("--shared-dir", type=Path, default=None, metavar="DIR",
                       help="cold tier shared by the replicas (an RWX volume; content-addressed, safe for "
                            "several writers) instead of chunks/ under --data-dir")
    serve.add_argument("--cold-compression", choices=["zstd", "none"], default="none",
                       help="compress chunks at rest in --shared-dir (byte-grouped zstd; default none)")
    serve.add_argument("--ref-ttl", type=options.seconds, default=DEFAULT_REF_TTL, metavar="SECONDS",
                       help="how often each ref in use is checked upstream, for the whole cluster; a move "
                            f"reaches the nodes within about this long (default {DEFAULT_REF_TTL:g})")
    serve.add_argument("--warm-on-update", choices=["auto", "on", "off"], default="auto",
                       help="when a watched ref moves, fetch its new commit before anyone reads it: auto "
                            "(default) for refs CSI volumes publish and refs watched with --watch or mmfs watch; "
                            "on: every ref in use; off: never")
    serve.add_argument("--watch", type=options.model_ref, action="append", default=[], metavar="huggingface/<org>/<name>@<ref>",
                       help="watch this ref (and warm its new commits) from the start, read or not; repeatable")
    serve.add_argument("--retain", type=options.seconds_or_zero, default=DEFAULT_GRACE, metavar="SECONDS",
                       help="how long a commit no ref points at any more, and no node pins, stays before its "
                            f"content is reclaimed (default {DEFAULT_GRACE:g})")
    serve.add_argument("--store", metavar="SPEC", action="append", default=[],
                       help="also serve this object store or local directory to the cluster, read with this "
                            "server's credentials: s3:<bucket>, azure:<container> (s3:* / azure:* for any), "
                            "file:<name>=<path> (repeatable; also MMFS_STORES; docs/providers.md)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _tame_malloc() -> None:
    """Give chunk-sized buffers back to the OS when freed.

    glibc raises its mmap threshold each time a large block is freed, after which
    multi-MiB chunk buffers (and the 64 KiB pieces an HTTP body arrives in) come from
    heaps, one per worker thread, that fragment and keep RSS high long after the bytes
    are gone. A fixed 32 KiB threshold keeps those buffers mmapped (unmapped on free),
    and two arenas stop every worker thread from growing a heap of its own. Measured
    with 50 cold readers of a 256 MiB file (4 MiB chunks, 64 MiB hot tier): peak RSS
    about 260-270 MiB without this, about 240-250 MiB with it, same throughput.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(-3, 32 << 10)  # M_MMAP_THRESHOLD
        if "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


async def serve(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir
    host, port = args.listen
    disk_limit = args.disk_cache or int(shutil.disk_usage(data_dir).total * 0.9)
    # Each fetch holds up to twice its chunk while the body arrives: bound them in bytes.
    fetches = args.max_upstream_fetches or max(4, min(16, (32 << 20) // args.chunk_size))
    config = EngineConfig.from_env(max_concurrent_fetches=fetches, ref_ttl=args.ref_ttl)
    hub = HubRemote(chunk_size=args.chunk_size, policy=policy_within(args.upstream_timeout))
    tiers: list[ChunkTier] = [MemoryTier(args.memory_cache, ttl_seconds=args.memory_ttl)]
    shared: SharedTier | None = None
    try:
        if args.shared_dir is not None:
            shared = SharedTier(args.shared_dir, args.disk_cache or int(shutil.disk_usage(args.shared_dir).total * 0.9),
                                compression=args.cold_compression)
            tiers.append(shared)
        else:
            tiers.append(DiskTier(data_dir / "chunks", disk_limit))
    except CacheError as exc:  # a crash loop would serve nothing: serve from memory instead
        log.error("%s: running without the cold tier (memory only)", exc)
    metadata = MetadataStore(data_dir / "metadata")
    artifacts = ArtifactStore(data_dir / "artifacts", metadata, args.chunk_size)
    remote: Remote = ArtifactOrigin(upstream(hub, StoreConfig.from_env(args.store), args.chunk_size), artifacts)
    if args.replicas:
        self_id = _advertised(args)
        replicas = ReplicaSet(args.replicas, always=Replica(self_id, f"http://{self_id}"))
        remote = ReplicaRemote(replicas, self_id=self_id, local=remote)
        log.info("replica %s of %s", self_id, ", ".join(r.id for r in replicas.members))
    access = AccessControl(hub.url, os.environ.get("HF_TOKEN") or None, data_dir / "access.json",
                           caller_ttl=args.access_ttl)
    metrics = Metrics()
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise MmfsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    nixl = None
    if args.nixl:
        from .nixl_plane import NixlPlane, agent_name

        nixl = NixlPlane(agent_name(listeners[0].socket.getsockname()[1]), pool_bytes=args.nixl_pool,
                         slot_size=args.chunk_size, lease_timeout=args.nixl_lease_timeout)
        log.info("NIXL data plane: agent %s, %d slots of %s; RDMA devices: %s", nixl.name, nixl.slots,
                 format_size(nixl.slot_size), ", ".join(nixl.rdma_devices) or
                 "none (nodes with --transport auto use TCP; --transport nixl still reads over NIXL)")
    async with FetchEngine(tiers, remote, metadata, config) as engine:
        server: HTTPServer
        app = BackendApp(engine, access, metrics, upstream=hub.url, data_dir=str(data_dir),
                         stream_memory=args.stream_memory, stream_wait=2 * args.send_timeout, nixl=nixl,
                         holders=HolderTable(ttl=args.peer_ttl, max_load=args.peer_max_load),
                         artifacts=artifacts,
                         admin_token=os.environ.get("MMFS_ADMIN_TOKEN") or None,
                         stats=lambda: {"connections": server.connections, "active_requests": server.active_requests})
        watcher = RefWatcher(engine, interval=args.ref_ttl, warm_all=args.warm_on_update == "on",
                             warmer=app.warm_commit if args.warm_on_update != "off" else None)
        for repo, revision in args.watch:
            watcher.watch(repo, revision, reason="--watch", warm=True, persist=False)
        retention = Retention(engine, grace=args.retain)
        app.versions = VersionRoutes(app, watcher, retention, warm_published=args.warm_on_update != "off", hub=hub)
        server = HTTPServer(app.handle, observer=lambda req, resp, sent, secs, done:
                            metrics.observe(resp.route, req.method, resp.status, sent, done),
                            max_connections=args.max_connections, send_timeout=args.send_timeout)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(_watch_signals, stop)

            async def run_server(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await server.serve(listeners, stop, grace=args.grace, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(run_server)
            bound = listeners[0].socket.getsockname()
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            log.info("serving %s through %s; data in %s (memory %s, ttl %.0fs, disk %s, chunks %s, "
                     "%d upstream fetches, holder %s)", hub.url, f"http://{shown}:{bound[1]}", data_dir,
                     format_size(args.memory_cache), args.memory_ttl, format_size(disk_limit),
                     format_size(args.chunk_size), fetches, config.holder)
            print(f"mmfs-backend listening on http://{shown}:{bound[1]}", flush=True)
            nursery.start_soon(_expire_memory, tiers[0], args.memory_ttl)
            if shared is not None:
                nursery.start_soon(_sweep_shared, shared)
            if not config.offline:
                nursery.start_soon(watcher.run)
            nursery.start_soon(retention.sweep, app.versions.pinned)
            if nixl is not None:
                nursery.start_soon(nixl.run)
        await app.aclose()
        if nixl is not None:
            nixl.close()
        await access.aclose()
    log.info("stopped")
    return 0


async def _watch_signals(stop: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            stop.set()
            return


async def _expire_memory(tier: MemoryTier, ttl: float) -> None:
    """Hand memory back once chunks outlive their TTL, even when no request touches the tier."""
    while True:
        await trio.sleep(max(1.0, min(ttl / 4, 60.0)))
        tier.expire()


async def _sweep_shared(tier: SharedTier) -> None:
    while True:
        await trio.sleep(SWEEP_EVERY)
        try:
            await tier.sweep()
        except OSError as exc:
            log.error("shared cold tier %s: sweep failed: %s", tier.root, exc)


def _advertised(args: argparse.Namespace) -> str:
    """This replica's id in the set (``IP:port``), as nodes and the other replicas name it."""
    host, port = args.advertise or args.listen
    if host in ("0.0.0.0", "::", ""):
        host = os.environ.get("POD_IP", "")
        if not host:
            raise MmfsError("--replicas needs to know this replica's address: give --advertise HOST:PORT "
                            "(or set POD_IP), or --listen a specific address")
    if port == 0:
        raise MmfsError("--replicas needs a fixed port: the other replicas and the nodes must know it")
    return expand(f"http://{f'[{host}]' if ':' in host else host}:{port}")[0].id


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nixl and args.nixl_pool < args.chunk_size:
        parser.error(f"--nixl-pool {format_size(args.nixl_pool)} holds no chunk of --chunk-size "
                     f"{format_size(args.chunk_size)}: give at least one chunk's worth")
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not os.environ.get("HF_ENDPOINT"):
        log.info("HF_ENDPOINT is not set: the upstream is %s", hub_endpoint())
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        if args.shared_dir is not None:
            args.shared_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(args.data_dir, os.W_OK):
            raise MmfsError(f"--data-dir {args.data_dir} is not writable")
    except OSError as exc:
        print(f"mmfs-backend: error: cannot use --data-dir {args.data_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except MmfsError as exc:
        print(f"mmfs-backend: error: {exc}", file=sys.stderr)
        return 2
    _tame_malloc()
    try:
        with hold_data_dir(args.data_dir):
            return trio.run(serve, args)
    except MmfsError as exc:
        print(f"mmfs-backend: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main", "serve"]
