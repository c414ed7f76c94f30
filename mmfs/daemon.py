"""The node daemon: wires tiers, remote, engine, VFS and pyfuse3 together, and runs the mount.

    MemoryTier(--memory-cache) ─ DiskTier(--cache-dir, --cache-size) ─ remote
    remote = BackendRemote(--backend)  or, embedded, ProviderRemote: HubRemote(HF_ENDPOINT, HF_TOKEN)
             plus the stores of --store (mmfs/remote/router.py)
             (ReplicaRemote where --backend names several replicas: each chunk from its owner)
             (NixlBackendRemote with --transport nixl, or with auto where NIXL can win:
             see choose_transport; wrapped in PeeringRemote with --peer-listen, which
             also runs a PeerServer: node-to-node sharing, mmfs/remote/peer.py)

Versions: with a backend, a :class:`~mmfs.refwatch.RefFollower` long-polls it for moves
of the refs this node holds; embedded, a :class:`~mmfs.refwatch.RefWatcher` checks them
upstream itself; either flips the branch symlinks within ``--ref-ttl`` and, with
``--warm-on-update``, warms what changed. :class:`~mmfs.retention.Retention` keeps the
commits refs point at, those pinned (open files, CSI bind mounts of a commit directory)
and those within ``--retain`` of that, and reclaims the rest (``mmfs gc``).

Life cycle: open the caches (a cache dir that cannot be opened is logged and the daemon
runs with the memory tier only: status shows the disk tier missing), clear a dead
mount left by a killed daemon, mount, raise the mount's readahead, print the ready line,
serve until the mount goes away (``mmfs unmount``, ``fusermount3 -u``) or SIGTERM/SIGINT
arrives, then unmount and exit 0.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import mountutil
from .background import READY_PREFIX
from .access import Credentials
from .engine import EngineConfig, FetchEngine
from .errors import CacheError, InvalidName, MmfsError
from .fuse_ops import Operations
from .manifest import DEFAULT_CHUNK_SIZE
from .metadata import MetadataStore
from .manifest import FileEntry
from .names import RepoRef, is_commit
from .peer_server import PeerOptions, PeerServer
from .prefetch import ReadAheadConfig
from .refwatch import DEFAULT_REF_TTL, RefFollower, RefWatcher, parse_ref_key
from .retention import DEFAULT_GRACE, Retention
from .remote._http import policy_within
from .remote.backend import BackendRemote
from .remote.base import FileSource, Remote
from .remote.hub import HubRemote
from .remote.replicas import ReplicaRemote, ReplicaSet, expand, parse_replica_urls
from .remote.peer import PeeringRemote
from .remote.router import StoreConfig, upstream
from .tiers.base import ChunkTier
from .tiers.disk import DiskTier
from .tiers.memory import MemoryTier
from .vfs import Vfs, VfsConfig

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/mmfs"


@dataclass(frozen=True, slots=True)
class MountOptions:
    mountpoint: str
    #: Cluster backend URL; ``None`` is embedded mode (the Hub directly).
    backend: str | None = None
    #: How chunk bytes come from the backend: ``tcp``, ``nixl`` (falls back to TCP per
    #: chunk), or ``auto`` (:func:`choose_transport`: TCP unless both ends have RDMA).
    transport: str = "auto"
    cache_dir: str = DEFAULT_CACHE_DIR
    #: Disk chunk cache bound, bytes.
    cache_size: int = 50 << 30
    #: Memory chunk cache bound, bytes.
    memory_cache: int = 1 << 30
    #: Chunk size of manifests made here (embedded mode; a backend chooses its own).
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Kernel readahead of the mount (sysfs bdi), bytes.
    read_ahead: int = 16 << 20
    #: Longest a file-system call waits on the remote before EIO, seconds.
    remote_timeout: float = 60.0
    #: pyfuse3 worker tasks: requests served concurrently.
    max_tasks: int = 64
    #: Chunks fetched from the remote at once.
    max_fetches: int = 16
    read_ahead_chunks: tuple[int, int] = (2, 32)
    allow_other: bool | None = None  # None: when root
    #: FUSE passthrough for files complete in the disk cache: ``auto`` (where the kernel,
    #: libfuse and privileges allow; one log line says which), ``on`` (as auto, but the mount
    #: fails to start where passthrough cannot be used: :func:`passthrough_required`) or ``off``.
    passthrough: str = "auto"
    #: Mount over a directory that holds files (they are hidden while mounted).
    nonempty: bool = False
    #: Node-to-node sharing (``--peer-listen``, ``--peer-advertise``, ``--peer-labels``);
    #: ``None``: this node neither serves nor asks peers.
    peers: PeerOptions | None = None
    #: Where the logs go (``--log-file``, ``--daemon``); ``None``: stderr. Shown by ``mmfs status``.
    log_file: str | None = None
    #: Seconds between checks of a branch or tag: a move shows on the mount within about this.
    ref_ttl: float = DEFAULT_REF_TTL
    #: When a ref moves, fetch in the background the new versions of the files this node
    #: held of the old commit (unchanged files are shared: nothing to fetch).
    warm_on_update: bool = False
    #: Seconds a commit stays after no ref points at it and nothing pins it (retention.py).
    retain: float = DEFAULT_GRACE
    #: Object stores and local roots served in embedded mode (``--store``, plus
    #: ``MMFS_STORES``; :class:`~mmfs.remote.router.StoreConfig`). With a backend, the
    #: backend's own list applies.
    stores: tuple[str, ...] = ()
    #: The Hub token this mount reads with (``--token-file`` or ``HF_TOKEN``).
    token: str | None = None
    #: Where per-volume tokens are (``.access/<key>`` views; mmfs/access.py).
    token_dir: str | None = None
    #: Seconds a token's access to a repo is trusted before it is checked again.
    access_ttl: float = 60.0
    debug: bool = False


@dataclass(frozen=True, slots=True)
class TransportChoice:
    """How a mount with ``--backend`` gets chunk bytes, decided at start: ``kind`` is
    ``tcp`` or ``nixl``, ``reason`` says why (the ready line and ``mmfs status`` show it)."""

    requested: str
    kind: str
    reason: str
    #: A few words for the ready line.
    brief: str = ""


def choose_transport(options: MountOptions) -> TransportChoice:
    """``--transport`` made concrete. The rule for ``auto``: NIXL only where it can beat TCP.

    NIXL moves bytes with one-sided RDMA READs where the hosts have RDMA NICs; without one,
    UCX carries them over TCP or shared memory, and measured on such a host (a cold node
    reading 512 MiB from a warm backend) NIXL was slower and costlier than plain HTTP:
    0.17-0.22 GB/s and 4.3-5.7 CPU-s per GB against 0.29-0.36 GB/s and 2.9-3.7. So
    ``auto`` picks NIXL only when this node has an RDMA device and nixl-cu12 is installed;
    the remote then also waits for the backend to announce an RDMA device of its own
    (``/v1/nixl/agent``), and uses TCP otherwise. ``nixl`` forces the data plane (still
    falling back to TCP per chunk); ``tcp`` never loads NIXL.
    """
    requested = options.transport
    if requested == "tcp":
        return TransportChoice(requested, "tcp", "--transport tcp", "--transport tcp")
    from .remote.nixl import nixl_available, rdma_devices

    if requested == "nixl":
        if not nixl_available():
            raise MmfsError("--transport nixl needs the NIXL Python package on this node: "
                            "pip install --no-deps 'nixl-cu12>=1.5,<2' numpy (or use --transport auto)")
        return TransportChoice(requested, "nixl", "--transport nixl", "--transport nixl")
    devices = rdma_devices()  # checked first: without RDMA, NIXL is not even loaded
    if not devices:
        return TransportChoice(requested, "tcp", "--transport auto: no RDMA device on this node, and without "
                               "RDMA NIXL is slower than TCP (--transport nixl forces it)", "auto: no RDMA here")
    if not nixl_available():
        return TransportChoice(requested, "tcp", f"--transport auto: RDMA device {', '.join(devices)} here, but "
                               "the NIXL Python package (nixl-cu12) is not installed", "auto: no nixl-cu12 here")
    return TransportChoice(requested, "nixl", f"--transport auto: RDMA device {', '.join(devices)} here; NIXL once "
                           "the backend announces RDMA too, TCP until then", "auto: RDMA here")


def replica_set(backend: str) -> ReplicaSet | None:
    """The replicas ``--backend`` names (a list, or one name resolving to several
    addresses: a headless Service), or ``None`` for a single backend."""
    urls = parse_replica_urls(backend)
    if len(urls) == 1:
        try:
            if len(expand(urls[0])) < 2:
                return None
        except MmfsError:
            return None  # not resolvable yet: one backend, found when it is asked
    return ReplicaSet(urls)


def make_remote(options: MountOptions, transport: TransportChoice | None = None) -> Remote:
    policy = policy_within(options.remote_timeout)
    if options.backend:
        transport = transport or choose_transport(options)
        replicas = replica_set(options.backend)
        if replicas is not None:
            if transport.kind == "nixl":
                log.warning("NIXL reads from one backend only: chunks come over TCP from the replicas %s",
                            ", ".join(r.id for r in replicas.members))
            remote = ReplicaRemote(replicas, policy=policy, auth=_bearer(options.token))
            return PeeringRemote(remote, peer_url(options.peers)) if options.peers is not None else remote
        if transport.kind == "nixl":
            from .remote.nixl import NixlBackendRemote

            return NixlBackendRemote(options.backend, policy=policy, auto=transport.requested == "auto",
                                     reason=transport.reason, auth=_bearer(options.token))
        backend = BackendRemote(options.backend, policy=policy, auth=_bearer(options.token))
        if options.peers is not None:
            return PeeringRemote(backend, peer_url(options.peers))
        return backend
    hub = HubRemote(chunk_size=options.chunk_size, policy=policy, token=options.token or "")
    return upstream(hub, StoreConfig.from_env(list(options.stores)), options.chunk_size)


def _bearer(token: str | None) -> str | None:
    return f"Bearer {token}" if token else None


def peer_url(peers: PeerOptions) -> str:
    """The URL other nodes reach this one at: ``--peer-advertise``, else the listen address."""
    return peers.advertise.rstrip("/") or f"http://{peers.host}:{peers.port}"


def transport_status(remote: Remote, transport: TransportChoice) -> dict[str, Any]:
    """The transport in use now and why: a NIXL remote knows (it may have switched off)."""
    live = getattr(remote, "transport", None)
    if callable(live):
        return live()
    return {"requested": transport.requested, "in_use": transport.kind, "reason": transport.reason}


def make_engine(options: MountOptions, problems: list[str] | None = None,
                transport: TransportChoice | None = None) -> FetchEngine:
    """The engine over the caches at ``--cache-dir``.

    A broken cache disk must not take the models down with it: a metadata DB or disk tier
    that cannot be opened is logged, appended to ``problems`` and left out (memory only)."""
    cache = Path(options.cache_dir)
    problems = problems if problems is not None else []
    metadata: MetadataStore | None = None
    tiers: list[ChunkTier] = [MemoryTier(options.memory_cache)]
    try:
        metadata = MetadataStore(cache / "metadata")
    except CacheError as exc:
        problems.append(str(exc))
        log.error("%s: running without the metadata DB (refs and manifests are not remembered)", exc)
    try:
        tiers.append(DiskTier(cache / "chunks", options.cache_size))
    except CacheError as exc:
        problems.append(str(exc))
        log.error("%s: running without the disk cache (memory only)", exc)
    # A map request held at the backend must answer well within the VFS's bound, so that
    # a reader waiting for a file's end sees progress before that bound runs out.
    config = EngineConfig.from_env(max_concurrent_fetches=options.max_fetches,
                                   map_wait=max(0.5, min(10.0, options.remote_timeout / 4)),
                                   stall_timeout=options.remote_timeout, ref_ttl=options.ref_ttl)
    engine = FetchEngine(tiers, make_remote(options, transport), metadata, config)
    if isinstance(engine.remote, PeeringRemote):
        engine.remote.attach(engine.known_map, engine.chunk_map)
    return engine


def published_commits(mountpoint: str) -> set[tuple[RepoRef, str]]:
    """Commits whose directory (or a folder in it) is bind-mounted from this mount: what
    CSI volumes publish (csi_driver binds ``<provider>/<org>/<name>/<commit>[/<subPath>]``)."""
    found = set()
    try:
        ours = mountutil.mount_at(mountpoint)
        binds = mountutil.mmfs_mounts()
    except OSError:
        return found
    for info in binds:
        parts = info.root.strip("/").split("/")
        if ours is None or info.device != ours.device:
            continue
        # <provider>/<org>/<name…>/<commit>: a store model's name may hold "/"
        at = next((i for i in range(3, len(parts)) if is_commit(parts[i])), None)
        if at is not None:
            found.add((RepoRef(parts[0], parts[1], "/".join(parts[2:at])), parts[at]))
    return found


async def warm_changed(engine: FetchEngine, repo: RepoRef, revision: str, old: str, new: str) -> None:
    """Node warm-on-update: the new commit's versions of the files this node held (any
    chunk in a tier) of the old commit; unchanged files share content, so they cost nothing."""
    before = await engine.manifest(repo, old)
    after = await engine.manifest(repo, new)
    held: list[FileEntry] = []
    for entry in after.files:
        previous = before.file(entry.path)
        if previous is None or previous.content_id == entry.content_id or previous.chunk_count == 0:
            continue
        if any(tier.contains(previous.chunk_key(i)) for tier in engine.tiers for i in range(previous.chunk_count)):
            held.append(entry)
    for entry in held:
        await engine.warm(FileSource(repo, new, entry))
    log.info("%s@%s: warmed %d changed files of %s", repo, revision, len(held), new)


def mode_text(options: MountOptions, transport: TransportChoice | None = None) -> str:
    if not options.backend:
        return "embedded"
    return f"backend {options.backend}" + (f", transport {transport.kind} ({transport.brief})" if transport else "")


def _mount_options(options: MountOptions) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {"ro", "fsname=mmfs", "subtype=mmfs", "noatime"}
    allow_other = options.allow_other if options.allow_other is not None else os.geteuid() == 0
    if allow_other:
        opts.add("allow_other")  # pods run as other users
    if options.debug:
        opts.add("debug")
    return opts


async def serve(options: MountOptions, *, ready: Any = None) -> None:
    """Mount, serve until unmounted or signalled, unmount."""
    mountpoint = os.path.abspath(options.mountpoint)
    cache_problems: list[str] = []
    transport = choose_transport(options) if options.backend else None
    engine = make_engine(options, cache_problems, transport)
    started = time.time()
    config = VfsConfig(remote_timeout=options.remote_timeout, access_ttl=options.access_ttl,
                       read_ahead=ReadAheadConfig(initial_chunks=options.read_ahead_chunks[0],
                                                  max_chunks=options.read_ahead_chunks[1]))

    def describe() -> dict[str, Any]:
        info: dict[str, Any] = {"mountpoint": mountpoint, "mode": "backend" if options.backend else "embedded",
                                "backend": options.backend,
                                "transport": None, "transport_requested": None, "transport_reason": None,
                                "cache_dir": os.path.abspath(options.cache_dir), "pid": os.getpid(),
                                "offline": engine.config.offline, "daemon_started_at": started,
                                "cache_problems": cache_problems, "passthrough_option": options.passthrough,
                                "log_file": options.log_file}
        replicas = engine.remote.backend if isinstance(engine.remote, PeeringRemote) else engine.remote
        if isinstance(replicas, ReplicaRemote):
            info["replicas"] = replicas.status()
        if transport is not None:
            now = transport_status(engine.remote, transport)
            info.update(transport=now["in_use"], transport_requested=now["requested"],
                        transport_reason=now["reason"])
            if "nixl" in now:
                info["nixl"] = now["nixl"]
        if peer_server is not None:
            info["peers"] = peer_server.status()
        try:
            import psutil

            info["rss_bytes"] = psutil.Process().memory_info().rss
        except Exception:  # noqa: BLE001 - optional
            pass
        return info

    peer_server: PeerServer | None = None
    peer_listeners: list[trio.SocketListener] = []
    if options.peers is not None:
        if not isinstance(engine.remote, PeeringRemote):
            raise MmfsError("--peer-listen needs --backend (nodes share what they read through a backend)")
        peer_server = PeerServer(engine, engine.remote, options.peers)
        try:
            peer_listeners = await trio.open_tcp_listeners(options.peers.port, host=options.peers.host)
        except OSError as exc:
            raise MmfsError(f"cannot listen on --peer-listen {options.peers.host}:{options.peers.port}: "
                            f"{exc.strerror or exc}") from exc
    retention = Retention(engine, grace=options.retain, on_reclaim=lambda content_id: vfs.drop_pages(content_id))
    follower: RefFollower | None = None
    watcher: RefWatcher | None = None

    def pinned() -> set[tuple[RepoRef, str]]:
        return vfs.open_commits() | published_commits(mountpoint)

    async def gc(dry_run: bool) -> dict[str, Any]:
        return (await retention.collect(pinned(), dry_run=dry_run)).to_json()

    def versions() -> dict[str, Any]:
        refs = follower.status() if follower is not None else watcher.status() if watcher is not None else {}
        history = engine.metadata.ref_history(limit=20) if engine.metadata is not None else []
        return {"ref_ttl_s": options.ref_ttl, "warm_on_update": options.warm_on_update, "updates": refs,
                "moves": [{"ref": m.ref, "from": m.from_commit, "to": m.to_commit, "at": m.at,
                           "detected_by": m.detected_by} for m in history],
                "gone_upstream": sorted(f"{repo}@{rev}" for repo, rev in engine.gone),
                "retention": retention.status(pinned())}

    async with engine:
        if peer_server is not None:
            await engine.nursery.start(peer_server.run, peer_listeners)
        warmer = (lambda *args: warm_changed(engine, *args)) if options.warm_on_update else None
        if options.backend:
            follower = RefFollower(engine, parse_replica_urls(options.backend),
                                   wait=min(30.0, max(options.ref_ttl, 5.0)),
                                   name=f"{engine.config.holder}:{mountpoint}",
                                   pinned=lambda: [f"{r}@{c}" for r, c in pinned()],
                                   published=lambda: published_refs(engine, published_commits(mountpoint)),
                                   warmer=warmer)
        elif not engine.config.offline:
            watcher = RefWatcher(engine, interval=options.ref_ttl, warm_all=True, warmer=warmer)
        credentials = Credentials(options.token, Path(options.token_dir) if options.token_dir else None)
        vfs = Vfs(engine, config, describe=lambda: {**describe(), "versions": versions()},
                  controls={"gc.json": lambda: gc(False), "gc-dry-run.json": lambda: gc(True)},
                  credentials=credentials, access_state=Path(options.cache_dir) / "access.json")
        if peer_server is not None:
            peer_server.shareable = vfs.shareable  # open repos only (mmfs/peer_server.py)
        operations = Operations(vfs, passthrough=options.passthrough != "off")
        if options.passthrough == "on" and operations.passthrough_why_not is not None:
            raise MmfsError(f"--passthrough on: FUSE passthrough cannot be used: {operations.passthrough_why_not}")
        pyfuse3.init(operations, mountpoint, _mount_options(options))
        unmounted = False
        failure: list[str | None] = []
        try:
            async with trio.open_nursery() as nursery:
                async def announce_when_tuned() -> None:
                    # The kernel sets the mount's readahead from the INIT reply (to its
                    # 128 KiB default), so raise it only once INIT has been answered, and
                    # say "mounted" only then: a file opened earlier keeps the readahead it
                    # was opened with (128 KiB reads: 8 times the requests, measured).
                    await operations.initialized.wait()
                    if options.passthrough == "on":
                        failure.append(passthrough_required(vfs, engine))
                        if failure[0] is not None:
                            pyfuse3.terminate()  # never ready: unmount and exit 1
                            return
                    await trio.sleep(0.05)
                    mountutil.set_read_ahead(mountpoint, options.read_ahead)
                    print(f"{READY_PREFIX}{mountpoint} ({mode_text(options, transport)})", flush=True)
                    if ready is not None:
                        ready()

                async def watch_signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                        task_status.started()
                        async for signum in signals:
                            log.info("%s: unmounting %s", signal.Signals(signum).name, mountpoint)
                            pyfuse3.terminate()
                            return

                await nursery.start(watch_signals)
                nursery.start_soon(announce_when_tuned)
                if follower is not None:
                    nursery.start_soon(follower.run)
                if watcher is not None:
                    nursery.start_soon(watch_known_refs, watcher)
                nursery.start_soon(retention.sweep, pinned)
                await pyfuse3.main(min_tasks=4, max_tasks=options.max_tasks)
                unmounted = True
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s%s", mountpoint, "" if unmounted else " after an error")
        if failure and failure[0] is not None:
            raise MmfsError(f"--passthrough on: FUSE passthrough cannot be used: {failure[0]}")


def published_refs(engine: FetchEngine, commits: set[tuple[RepoRef, str]]) -> list[str]:
    """Refs of the repos CSI volumes publish commits of (a volume is made from a ref): the
    backend warms their new commits by default."""
    repos = {repo for repo, _ in commits}
    refs = engine.metadata.refs() if engine.metadata is not None else {}
    return [key for key in refs if any(key.startswith(f"{repo}@") for repo in repos)]


async def watch_known_refs(watcher: RefWatcher) -> None:
    """Embedded: every ref this node has resolved is checked upstream each ``--ref-ttl``."""
    engine = watcher.engine
    while True:
        started = trio.current_time()
        for key in engine.metadata.refs() if engine.metadata is not None else {}:
            try:
                watcher.touch(*parse_ref_key(key))
            except InvalidName:
                continue  # a record of another mmfs version: nothing to check
        await watcher.check_all()
        await trio.sleep_until(started + watcher.interval)


def passthrough_required(vfs: Vfs, engine: FetchEngine) -> str | None:
    """For ``--passthrough on``, once INIT was answered: why passthrough cannot be used on
    this mount (``None``: it can).

    Beyond what INIT says (kernel, libfuse), a probe registers a scratch file of the disk
    cache as a backing file, as the first passthrough open would, so what only that shows
    (EPERM: no CAP_SYS_ADMIN; ELOOP: the cache on overlayfs) fails the start too instead of
    switching passthrough off at the first open."""
    if vfs.passthrough_off is not None:
        return vfs.passthrough_off
    disk = next((t for t in engine.tiers if isinstance(t, DiskTier)), None)
    if disk is None:
        return "no disk cache (the cache dir could not be opened)"
    probe = disk.root / f".passthrough-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return f"cannot create a probe file in the disk cache: {exc}"
    try:
        vfs.backing.close(vfs.backing.open(fd))
    except OSError as exc:
        return f"registering a backing file in {disk.root} failed: {exc.strerror or exc}" + {
            errno.EPERM: " (the daemon lacks CAP_SYS_ADMIN)", errno.EACCES: " (the daemon lacks CAP_SYS_ADMIN)",
            errno.ELOOP: " (the cache dir is on a stacked file system such as overlayfs)"}.get(exc.errno or 0, "")
    finally:
        os.close(fd)
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def prepare_mountpoint(path: str, *, nonempty: bool = False) -> None:
    """Create the mountpoint, or clear a dead mount there; refuse a live mmfs mount, a
    mountpoint that is not a directory, and one that holds files unless ``nonempty``
    (mounting would hide them: a typo'd path should not silently shadow a directory)."""
    if not path.strip():
        raise MmfsError("the mountpoint is empty: give a directory such as /var/lib/mmfs/models")
    if mountutil.clear_stale(path):
        return
    info = mountutil.mount_at(path)
    if info is not None and info.fstype == mountutil.FSTYPE:
        raise MmfsError(f"{path} is already an mmfs mount (unmount it first: mmfs unmount {path})")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise MmfsError(f"{path} is not a directory (the mountpoint must be a directory)")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MmfsError(f"cannot create the mountpoint {path}: {exc.strerror or exc}") from None
    if not nonempty:
        with os.scandir(target) as entries:
            if next(entries, None) is not None:
                raise MmfsError(f"{path} is not empty (its files would be hidden while mounted); "
                                "use an empty directory or pass --nonempty")


def _tune_malloc() -> None:
    """Chunk buffers (MiBs each) come from the heap and are reused, not mmapped afresh.

    Every chunk received is a new buffer. Above glibc's mmap threshold each one is a fresh
    mapping: a page fault and a zeroed page per 4 KiB, then unmapped when the chunk leaves
    memory; below it, but with the default trim threshold, the heap top is handed back and
    faulted in again. Measured here (4 MiB buffers): 1.05 CPU-s per GB mmapped, 0.43 from
    the heap, 0.09 from a heap that keeps what was freed; same peak RSS. Chunks are all one size, so freed blocks are reused whole and the heap does not
    fragment; RSS stays at about the memory tier's bound plus what is in flight. Few
    arenas: buffers are allocated on the trio thread, worker threads only hash and write.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: chunk buffers below it
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: freed buffers stay for the next ones
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run(options: MountOptions) -> int:
    """Blocking entry point of ``mmfs mount``; returns the exit status."""
    _tune_malloc()
    try:
        prepare_mountpoint(options.mountpoint, nonempty=options.nonempty)
        trio.run(serve, options)
    except KeyboardInterrupt:
        return 0  # ^C before the signal handler was in place: unmounted on the way out
    except MmfsError as exc:
        print(f"mmfs mount: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:
        log.debug("mount failed", exc_info=True)
        print(f"mmfs mount: cannot mount {options.mountpoint}: {exc}", file=sys.stderr)
        return 1
    return 0
