"""The ``mmfs`` command: mount, unmount, prefetch, status, verify, watch, gc, artifact.

Errors end in a one-line message on stderr and a non-zero exit; ``--debug`` adds logs.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import options
from .artifacts import DEFAULT_BUILDER
from .errors import InvalidName, MmfsError
from .remote.router import StoreConfig
from .sizes import format_size, parse_size, size_argument

EXIT_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfs", description="The model filesystem for inference clusters.")
    options.add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser("mount", help="mount the model namespace (until unmounted; --daemon: in the "
                                "background)",
                                description="Mount MOUNTPOINT/huggingface/<org>/<name>/<rev>/<path> read-only.")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", type=options.non_empty)
    mount.add_argument("--nonempty", action="store_true", help="mount even if MOUNTPOINT holds files (hidden "
                       "while mounted)")
    mount.add_argument("--backend", metavar="URL[,URL…]", type=_backend_urls, help="cluster backend URL, or its "
                       "replicas' URLs, or one name resolving to every replica (default: embedded mode, the Hub at "
                       "HF_ENDPOINT directly)")
    mount.add_argument("--transport", choices=["tcp", "nixl", "auto"], default="auto",
                       help="how chunk bytes come from --backend: tcp, nixl (NIXL READs, TCP per chunk when "
                       "that fails), or auto (default): TCP unless this node and the backend both have an RDMA "
                       "device (and nixl-cu12 here, --nixl there); without RDMA, NIXL is slower than TCP")
    mount.add_argument("--cache-dir", metavar="DIR", default=None,
                       help="disk chunk cache and metadata DB (default: /var/cache/mmfs)")
    mount.add_argument("--cache-size", metavar="SIZE", type=size_argument, default=parse_size("50GiB"),
                       help="disk cache bound (default: 50GiB)")
    mount.add_argument("--memory-cache", metavar="SIZE", type=size_argument, default=parse_size("1GiB"),
                       help="memory cache bound (default: 1GiB)")
    mount.add_argument("--chunk-size", metavar="SIZE", type=options.chunk_size, default=parse_size("4MiB"),
                       help="chunk size in embedded mode, 64KiB to 256MiB (default: 4MiB; a backend picks its own)")
    mount.add_argument("--read-ahead", metavar="SIZE", type=options.read_ahead, default=parse_size("16MiB"),
                       help="kernel readahead of the mount, 4KiB to 1GiB (default: 16MiB)")
    mount.add_argument("--remote-timeout", metavar="SECONDS", type=options.seconds, default=60.0,
                       help="longest a file-system call waits on the backend/Hub before EIO (default: 60)")
    mount.add_argument("--max-tasks", metavar="N", type=options.int_between(1, 10_000), default=64,
                       help="FUSE requests served concurrently (default: 64)")
    mount.add_argument("--passthrough", choices=["auto", "on", "off"], default="auto",
                       help="FUSE passthrough for files complete in the disk cache (default: auto, where the "
                            "kernel, libfuse and privileges allow it; on: like auto, but the mount fails to "
                            "start where it cannot be used)")
    mount.add_argument("--ref-ttl", metavar="SECONDS", type=options.seconds, default=60.0,
                       help="how often branches and tags are checked for a new commit (by the backend for the "
                            "cluster, or here when embedded); a move shows within about this long (default: 60)")
    mount.add_argument("--warm-on-update", action="store_true",
                       help="when a ref moves, fetch in the background the new versions of the files this node "
                            "held (unchanged files cost nothing)")
    mount.add_argument("--retain", metavar="SECONDS", type=options.seconds_or_zero, default=3600.0,
                       help="how long a commit no ref points at and nothing pins (open files, CSI volumes) stays "
                            "before mmfs gc or the periodic sweep reclaims its content (default: 3600)")
    mount.add_argument("--peer-listen", metavar="HOST:PORT", type=options.listen_address,
                       help="share this node's verified chunks with other nodes on HOST:PORT, and read chunks "
                       "from them where the backend says so (needs --backend)")
    mount.add_argument("--peer-advertise", metavar="URL", type=options.http_url, default=None,
                       help="the URL other nodes reach --peer-listen at (default: http://HOST:PORT)")
    mount.add_argument("--peer-labels", metavar="KEY=VALUE,...", type=_labels, default={},
                       help="topology labels such as zone=a,rack=3: peers sharing them are preferred")
    mount.add_argument("--daemon", action="store_true", help="run in the background: return once mounted, "
                       "logs in --log-file")
    mount.add_argument("--log-file", metavar="FILE", help="write logs to FILE instead of stderr (default with "
                       "--daemon: CACHE_DIR/mount.log)")
    mount.add_argument("--store", metavar="SPEC", action="append", default=[],
                       help="embedded mode: also serve this object store or local directory: s3:<bucket>, "
                            "azure:<container>, file:<name>=<path> (repeatable; also MMFS_STORES; "
                            "docs/providers.md)")
    mount.add_argument("--token-file", metavar="FILE",
                       help="the Hub token this mount reads with (default: HF_TOKEN); sent to --backend, which "
                            "checks it for gated and private repos")
    mount.add_argument("--token-dir", metavar="DIR", type=options.absolute_path,
                       help="per-volume tokens: MOUNTPOINT/.access/<key>/ reads with the token in DIR/<key> "
                            "(written by mmfs-csi; docs/node.md, \"Access\")")
    mount.add_argument("--access-ttl", metavar="SECONDS", type=options.seconds, default=60.0,
                       help="how long a token's access to a repo is trusted before it is checked again "
                            "(default: 60): a revoked token stops reading cached bytes within this")
    mount.add_argument("--debug", action="store_true", help="debug logging (and FUSE debug output)")

    unmount = commands.add_parser("unmount", aliases=["umount"], help="unmount a running mmfs mount")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT", type=options.non_empty)
    unmount.add_argument("--lazy", "-z", action="store_true", help="detach even if busy")

    prefetch = commands.add_parser("prefetch", help="warm the node cache (through a mount) or a backend",
                                   description="Warm huggingface/<org>/<name>[@<rev>]: through a running mount "
                                   "(default: the only mmfs mount) or, with --backend, the backend alone.")
    prefetch.add_argument("model", metavar="huggingface/<org>/<name>[@<rev>]")
    prefetch.add_argument("--include", metavar="GLOB", nargs="+", action="extend", default=[],
                          help="only files matching one of these globs (path or file name)")
    where = prefetch.add_mutually_exclusive_group()
    where.add_argument("--mount", metavar="MOUNTPOINT", type=options.non_empty, help="warm through this mount")
    where.add_argument("--backend", metavar="URL", type=options.http_url, help="warm this backend (no mount needed)")
    prefetch.add_argument("--jobs", "-j", metavar="N", type=options.int_between(1, 1024), default=8,
                          help="parallel readers, 1 to 1024 (default: 8)")
    prefetch.add_argument("--timeout", metavar="SECONDS", type=options.seconds, default=3600.0,
                          help="with --backend: give up after this long (default: 3600)")
    prefetch.add_argument("--token-file", metavar="FILE",
                          help="with --backend: the Hub token to send (default: HF_TOKEN), for gated and "
                               "private repos; the admin token, if the backend has one, comes from MMFS_ADMIN_TOKEN")
    prefetch.add_argument("--debug", action="store_true")

    status = commands.add_parser("status", help="what a mount holds: repos, cache use, hit rates")
    status.add_argument("--mount", metavar="MOUNTPOINT", type=options.non_empty, help="only this mount "
                        "(default: every mmfs mount)")
    status.add_argument("--json", action="store_true", help="raw JSON (a list when several mounts are shown)")

    verify = commands.add_parser("verify", help="scrub the node's disk cache for bit rot (daemon stopped)")
    verify.add_argument("--cache-dir", metavar="DIR", help="the cache dir (default: /var/cache/mmfs)")
    verify.add_argument("--repair", action="store_true", help="drop damaged chunks (fetched again when read)")

    watch = commands.add_parser("watch", help="keep a branch or tag checked for new commits, read or not",
                                description="Watch huggingface/<org>/<name>@<ref>: through a mount (default: "
                                "the only mmfs mount; its backend then watches it for the cluster) or a backend.")
    watch.add_argument("model", metavar="huggingface/<org>/<name>@<ref>")
    where = watch.add_mutually_exclusive_group()
    where.add_argument("--mount", metavar="MOUNTPOINT")
    where.add_argument("--backend", metavar="URL")
    watch.add_argument("--no-warm", action="store_true",
                       help="with --backend: do not prefetch the new commits it moves to")

    gc = commands.add_parser("gc", help="reclaim the content of retired commits now",
                             description="Drop the content only retired commits use (no ref points at them, "
                             "nothing pins them, past --retain): in a mount's caches, or with --backend, a backend's.")
    where = gc.add_mutually_exclusive_group()
    where.add_argument("--mount", metavar="MOUNTPOINT")
    where.add_argument("--backend", metavar="URL")
    gc.add_argument("--dry-run", action="store_true", help="say what would be reclaimed, reclaim nothing")
    gc.add_argument("--json", action="store_true", help="raw JSON")

    artifact = commands.add_parser("artifact", help="derived artifacts: compiled engines, compile caches",
                                   description="Artifacts derived from a model commit, keyed by kind, target and "
                                   "builder version, published once per cluster (docs/artifacts.md).")
    actions = artifact.add_subparsers(dest="action", required=True, metavar="ACTION")
    path = actions.add_parser("path", help="print the artifact's directory on the mount (exit 1: not published)")
    push = actions.add_parser("push", help="upload a directory as the artifact (needs MMFS_PUBLISH_TOKEN)")
    push.add_argument("directory", metavar="DIR")
    build = actions.add_parser("build", help="run COMMAND to build the artifact, once per cluster, unless published",
                               description="Runs COMMAND with MMFS_MODEL_PATH (the model on the mount) and "
                               "MMFS_ARTIFACT_OUT (an empty folder), then pushes what it wrote; concurrent "
                               "requesters of one key wait for that one build (needs MMFS_PUBLISH_TOKEN).")
    for action in (path, push, build):
        action.add_argument("--kind", required=True, help="e.g. tensorrt-engine, torch-compile-cache")
        action.add_argument("--model", required=True, metavar="huggingface/<org>/<name>@<rev>")
        action.add_argument("--target", required=True, help="what the build is for (GPU arch, parallelism, "
                            "precision), free-form: e.g. sm90-tp2-fp8")
        action.add_argument("--builder", default=DEFAULT_BUILDER, metavar="VERSION",
                            help=f"the builder's version, part of the key (default: {DEFAULT_BUILDER})")
        action.add_argument("--mount", metavar="MOUNTPOINT", help="the mmfs mount (default: the only one)")
        if action is not path:
            action.add_argument("--backend", metavar="URL", type=options.http_url,
                                help="the backend (default: MMFS_BACKEND, else the mount's backend)")
    build.add_argument("--lease-ttl", metavar="SECONDS", type=options.seconds, default=30.0,
                       help="the build lease expires this long after the builder's last renewal (default: 30)")
    build.add_argument("--timeout", metavar="SECONDS", type=options.seconds, default=None,
                       help="give up waiting for another node's build after this long (default: no limit)")
    build.add_argument("builder_command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    return parser


def _backend_urls(text: str) -> str:
    """``--backend``: one URL or the replicas' URLs, comma-separated (checked as the remote will read them)."""
    from .errors import InvalidName
    from .remote.replicas import parse_replica_urls

    try:
        parse_replica_urls(text)
    except InvalidName as exc:
        raise options.OptionError(str(exc)) from None
    return text


def _labels(text: str) -> dict[str, str]:
    from .peer_server import parse_labels

    try:
        return parse_labels(text)
    except ValueError as exc:
        raise options.OptionError(str(exc)) from None


def _setup_logging(debug: bool, log_file: str | None = None) -> None:
    where: dict[str, Any] = {"filename": log_file} if log_file else {"stream": sys.stderr}
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", **where)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


def _mount(args: argparse.Namespace) -> int:
    from .daemon import DEFAULT_CACHE_DIR, MountOptions, run
    from .peer_server import PeerOptions

    if args.transport == "nixl" and not args.backend:
        return options.usage_error("mmfs mount", "--transport nixl needs --backend (NIXL carries chunks from a "
                                   "backend; embedded mode reads the Hub over HTTP)")
    peers = None
    if args.peer_listen is not None:
        if not args.backend:
            return options.usage_error("mmfs mount", "--peer-listen needs --backend (nodes share what they read "
                                       "through a backend)")
        if args.peer_listen[1] == 0:
            return options.usage_error("mmfs mount", "--peer-listen needs a fixed port: other nodes are sent there")
        peers = PeerOptions(host=args.peer_listen[0], port=args.peer_listen[1], advertise=args.peer_advertise or "",
                            labels=args.peer_labels)
    elif args.peer_advertise or args.peer_labels:
        return options.usage_error("mmfs mount", "--peer-advertise and --peer-labels need --peer-listen")
    if args.store and args.backend:
        return options.usage_error("mmfs mount", "--store is for embedded mode; with --backend, the backend's "
                                   "--store list applies")
    try:
        StoreConfig.from_env(args.store)
    except InvalidName as exc:
        return options.usage_error("mmfs mount", str(exc))
    cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
    if args.daemon:
        from .background import start

        print(start(args.argv, Path(args.log_file or Path(cache_dir) / "mount.log")), flush=True)
        return 0
    try:
        _setup_logging(args.debug, args.log_file)
    except OSError as exc:
        raise MmfsError(f"cannot write the log file {args.log_file}: {exc.strerror or exc}") from None
    mount_options = MountOptions(
        mountpoint=args.mountpoint, backend=args.backend, transport=args.transport,
        cache_dir=cache_dir, cache_size=args.cache_size, memory_cache=args.memory_cache,
        chunk_size=args.chunk_size, read_ahead=args.read_ahead, remote_timeout=args.remote_timeout,
        max_tasks=args.max_tasks, debug=args.debug, passthrough=args.passthrough, nonempty=args.nonempty,
        peers=peers, log_file=os.path.abspath(args.log_file) if args.log_file else None,
        ref_ttl=args.ref_ttl, warm_on_update=args.warm_on_update, retain=args.retain,
        stores=tuple(args.store), token=_token(args.token_file), token_dir=args.token_dir,
        access_ttl=args.access_ttl)
    return run(mount_options)


def _token(token_file: str | None) -> str | None:
    """The token of ``--token-file``, else ``HF_TOKEN`` (as the Hub's own clients read it)."""
    if token_file:
        from .access import read_token_file

        return read_token_file(token_file)
    return os.environ.get("HF_TOKEN") or None


def _unmount(args: argparse.Namespace) -> int:
    from . import mountutil

    info = mountutil.mount_at(args.mountpoint)
    if info is None:
        print(f"mmfs unmount: {args.mountpoint} is not mounted", file=sys.stderr)
        return EXIT_ERROR
    try:
        mountutil.unmount(args.mountpoint, lazy=args.lazy or mountutil.is_dead(args.mountpoint))
    except OSError as exc:
        hint = "; files are open there: close them, or detach it now with 'mmfs unmount --lazy' (it goes " \
               "away once they are closed)" if exc.errno == errno.EBUSY and not args.lazy else ""
        print(f"mmfs unmount: {exc.strerror or exc}{hint}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _prefetch(args: argparse.Namespace) -> int:
    from . import warm

    if args.debug:
        _setup_logging(True)
    target = warm.parse_target(args.model)
    if args.backend:
        summary = warm.prefetch_backend(args.backend, target, args.include, args.jobs, args.timeout,
                                        token=_token(args.token_file))
        print(summary.line(f"{target} warmed in {args.backend}"), flush=True)
    else:
        mountpoint = warm.find_mount(args.mount)
        summary = warm.prefetch_mount(mountpoint, target, args.include, args.jobs)
        print(summary.line(f"{target} cached through {mountpoint}"), flush=True)
    return 0


def read_status(mountpoint: str) -> dict[str, Any]:
    from .vfs import CONTROL_DIR, STATUS_FILE

    path = os.path.join(mountpoint, CONTROL_DIR, STATUS_FILE)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as exc:
        raise MmfsError(f"cannot read {path}: {exc.strerror} (is {mountpoint} an mmfs mount?)") from None


def format_status(status: dict[str, Any]) -> str:
    lines = [f"mmfs at {status.get('mountpoint')} ({status.get('mode')}"
             + (f" {status['backend']}" if status.get("backend") else "") + f"), pid {status.get('pid')}, "
             f"up {status.get('uptime_s', 0):.0f} s" + (", offline" if status.get("offline") else "")]
    if status.get("rss_bytes"):
        lines[0] += f", RSS {format_size(status['rss_bytes'])}"
    if status.get("log_file"):
        lines.append(f"log: {status['log_file']}")
    lines.append("repos:")
    if not status.get("repos"):
        lines.append("  (none yet)")
    for repo in status.get("repos", []):
        lines.append(f"  {repo['repo']}")
        for ref, commit in repo.get("refs", {}).items():
            lines.append(f"    {ref} -> {commit}")
        for commit in repo.get("commits", []):
            size = f", {commit['files']} files, {format_size(commit['bytes'])}" if commit.get("files") is not None else ""
            lines.append(f"    {commit['commit']}{size}")
    lines.append("cache:")
    for tier in status.get("tiers", []):
        lookups = tier["hits"] + tier["misses"]
        lines.append(f"  {tier['name']:<7} {format_size(tier['used_bytes'])} of {format_size(tier['limit_bytes'])}, "
                     f"{tier['entries']} chunks, hit rate {tier['hit_rate'] * 100:.1f}% of {lookups} lookups, "
                     f"{tier['evictions']} evictions" + (f", {tier['errors']} errors" if tier.get("errors") else ""))
    for problem in status.get("cache_problems", []):
        lines.append(f"  unavailable: {problem} (serving without it)")
    if status.get("transport"):
        requested = status.get("transport_requested")
        lines.append(f"transport: {status['transport']}" + (f" (--transport {requested})" if requested else "")
                     + (f": {status['transport_reason']}" if status.get("transport_reason") else ""))
        nixl = status.get("nixl")
        if nixl:
            lines[-1] += (f"; over NIXL so far: {format_size(nixl.get('bytes', 0))} in {nixl.get('chunks', 0)} "
                          f"chunks, {nixl.get('fallbacks', 0)} fallbacks to TCP")
    remote = status.get("remote", {})
    lines.append(f"remote: {remote.get('url')}: {format_size(remote.get('bytes', 0))} in {remote.get('fetches', 0)} "
                 f"chunk fetches ({remote.get('coalesced', 0)} coalesced, {remote.get('inflight', 0)} in flight)")
    peers = status.get("peers")
    if peers:
        lines.append(f"peers: node {peers.get('node')}: from peers {format_size(peers.get('bytes_from_peers', 0))} in "
                     f"{peers.get('chunks_from_peers', 0)} chunks, from the backend "
                     f"{format_size(peers.get('bytes_from_backend', 0))} in {peers.get('chunks_from_backend', 0)}; "
                     f"served to peers {format_size(peers.get('bytes_served', 0))} in {peers.get('chunks_served', 0)}; "
                     f"{peers.get('fallbacks', 0)} fallbacks, {peers.get('bad_peers', 0)} bad peers")
    if status.get("artifacts"):
        lines.append("artifacts opened here:")
        for item in status["artifacts"]:
            lines.append(f"  {item['id']}: {item['files']} files, {format_size(item['bytes'])}")
    backend_artifacts = status.get("backend_artifacts")
    if backend_artifacts is not None:
        if "error" in backend_artifacts:
            lines.append(f"backend artifacts: unknown ({backend_artifacts['error']})")
        else:
            published = backend_artifacts.get("artifacts", [])
            lines.append(f"backend artifacts: {len(published)} published, "
                         f"{format_size(sum(a.get('size', 0) for a in published))}")
            for item in published:
                key = item["key"]
                lines.append(f"  {item['id']}: {key['kind']} of {key['provider']}/{key['repo']}@{key['commit'][:12]} "
                             f"for {key['target']} ({key['builder']}), {format_size(item.get('size', 0))}")
            for item in backend_artifacts.get("building", []):
                key = item["key"]
                lines.append(f"  building: {key['kind']} of {key['provider']}/{key['repo']}@{key['commit'][:12]} "
                             f"for {key['target']} on {item['holder']} (lease expires in {item['expires_in']:.0f} s)")
    integrity = status.get("integrity", {})
    lines.append(f"integrity: {integrity.get('failures', 0)} failures, {integrity.get('files_verified', 0)} files "
                 "verified")
    versions = status.get("versions")
    if versions:
        updates = versions.get("updates", {})
        how = (f"from {updates['backend']} ({'connected' if updates.get('connected') else 'unreachable: ' + str(updates.get('last_error'))})"
               if "backend" in updates else f"checked upstream every {updates.get('interval_s', 0):g} s")
        retention = versions.get("retention", {})
        lines.append(f"versions: refs {how}; {len(versions.get('moves', []))} moves recorded; "
                     f"{len(retention.get('pinned', []))} pinned, {len(retention.get('in_grace', []))} in grace, "
                     f"{len(retention.get('retired', []))} retired commits")
        for move in versions.get("moves", [])[-5:]:
            lines.append(f"  {move['ref']}: {move['from'][:12]} -> {move['to'][:12]} (by {move['detected_by']})")
        for ref in versions.get("gone_upstream", []):
            lines.append(f"  {ref}: gone upstream, serving its last known commit")
    passthrough = status.get("passthrough")
    if passthrough is not None:
        state = "on" if passthrough.get("enabled") else f"off ({passthrough.get('off_reason')})"
        lazy = passthrough.get("lazy_opens", {})
        why = ", ".join(f"{reason} {count}" for reason, count in lazy.items())
        files = passthrough.get("open_files", {})
        lines.append(f"passthrough: {state}; {passthrough.get('opens', 0)} opens in passthrough, "
                     f"{sum(lazy.values())} lazy" + (f" ({why})" if why else "")
                     + f"; open now: {files.get('passthrough', 0)} passthrough, {files.get('lazy', 0)} lazy")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    """One mount's status (``--mount``), else every mmfs mount's (a JSON list with several)."""
    from .mountutil import mmfs_mounts
    from .warm import find_mount

    if args.mount:
        mountpoints = [find_mount(args.mount)]
    else:
        mountpoints = [m.mountpoint for m in mmfs_mounts()]
        if len(mountpoints) < 2:
            mountpoints = [find_mount(None)]  # one, or the "no mmfs mount found" message
    statuses, failures = [], []
    for mountpoint in mountpoints:
        try:
            status = read_status(mountpoint)
        except MmfsError as exc:
            if len(mountpoints) == 1:
                raise
            failures.append(str(exc))  # a mount going away meanwhile: the others are still shown
            continue
        if status.get("backend"):
            status["backend_artifacts"] = _backend_artifacts(status["backend"])
        statuses.append(status)
    if args.json:
        print(json.dumps(statuses[0] if len(mountpoints) == 1 else statuses, indent=2, sort_keys=True))
    else:
        print("\n\n".join(format_status(status) for status in statuses))
    for failure in failures:
        print(f"mmfs status: {failure}", file=sys.stderr)
    return EXIT_ERROR if failures else 0


def _backend_artifacts(backend: str) -> dict[str, Any]:
    """What the backend publishes and builds (its ``/v1/artifacts``), or why not known."""
    from .artifact_client import ArtifactClient

    client = ArtifactClient(backend, timeout=5.0, retries=1)
    try:
        return client.listing()
    except MmfsError as exc:
        return {"error": str(exc)}
    finally:
        client.close()


def _artifact(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .artifact_client import ArtifactClient, build, push, resolve_key
    from .artifacts import artifact_dir
    from .warm import find_mount

    command = getattr(args, "builder_command", [])
    command = command[1:] if command[:1] == ["--"] else command
    if args.action == "build" and not command:
        return options.usage_error("mmfs artifact build",
                                   "give the builder after --: mmfs artifact build ... -- COMMAND [ARGS...]")
    needs_mount = args.action != "push" or args.mount is not None
    mountpoint = find_mount(args.mount) if needs_mount else None
    backend = getattr(args, "backend", None) or os.environ.get("MMFS_BACKEND")
    if not backend and mountpoint is not None and args.action != "path":
        backend = read_status(mountpoint).get("backend")
    if args.action != "path" and not backend:
        raise MmfsError("no backend: pass --backend URL, set MMFS_BACKEND, or use a mount in backend mode")
    client = ArtifactClient(backend) if backend else None
    try:
        key = resolve_key(args.model, args.kind, args.target, args.builder, mount=mountpoint, client=client)
        if args.action == "path":
            assert mountpoint is not None
            where = artifact_dir(mountpoint, key.id)
            if not where.is_dir():
                print(f"mmfs artifact path: {key} is not published (no {where})", file=sys.stderr)
                return EXIT_ERROR
            print(where)
            return 0
        assert client is not None
        if args.action == "push":
            pushed = push(client, Path(args.directory), key)
            state = "published" if pushed.created else "was already published"
            print(f"{key.id} {state}: {pushed.files} files, {format_size(pushed.bytes)} "
                  f"({format_size(pushed.sent_bytes)} sent)")
            return 0
        assert mountpoint is not None
        print(build(client, key, command, mountpoint=mountpoint, lease_ttl=args.lease_ttl, timeout=args.timeout),
              flush=True)
        return 0
    finally:
        if client is not None:
            client.close()


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .daemon import DEFAULT_CACHE_DIR
    from .verify import verify

    report = verify(Path(args.cache_dir or DEFAULT_CACHE_DIR), repair=args.repair)
    by_file: dict[str, list[str]] = {}
    for damage in report.damaged:
        by_file.setdefault(str(damage.path), []).append(f"chunk {damage.chunk}: {damage.reason}")
    for path, problems in sorted(by_file.items()):
        print(f"{path}: {len(problems)} damaged chunk(s){' (dropped)' if args.repair else ''}")
        for problem in problems:
            print(f"  {problem}")
    print(f"mmfs verify: {report.chunks} chunks, {report.bytes} bytes checked; {len(report.damaged)} damaged"
          + (f", {report.dropped} dropped" if args.repair else ""))
    return EXIT_ERROR if report.damaged and not args.repair else 0


def _watch(args: argparse.Namespace) -> int:
    from .refwatch import parse_ref_key
    from .warm import find_mount

    repo, revision = parse_ref_key(args.model)
    if args.backend:
        from urllib.parse import quote

        url = f"{args.backend.rstrip('/')}/v1/watch/{repo}/{quote(revision, safe='')}" + ("?warm=0" if args.no_warm else "")
        answer = _post(url)
        print(f"{answer['ref']} -> {answer['commit']}: watched by {args.backend}, checked every "
              f"{answer['interval_s']:g} s" + (", new commits warmed" if answer["warm"] else ""))
        return 0
    mountpoint = find_mount(args.mount)
    path = os.path.join(mountpoint, str(repo), revision)
    try:
        target = os.readlink(path)  # resolving it makes the ref known, hence watched
    except OSError as exc:
        raise MmfsError(f"cannot watch {args.model}: {path}: {exc.strerror}") from None
    print(f"{repo}@{revision} -> {os.path.basename(target)}: watched through {mountpoint}")
    return 0


def _post(url: str) -> dict[str, Any]:
    """POST to a backend; its error message (or why it cannot be reached) as an MmfsError."""
    import httpx

    try:
        response = httpx.post(url, timeout=600)
    except httpx.HTTPError as exc:
        raise MmfsError(f"cannot reach {url.split('/v1/')[0]}: {exc}") from None
    if response.status_code >= 400:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text[:200]
        raise MmfsError(f"{response.status_code}: {message}")
    return response.json()


def _gc(args: argparse.Namespace) -> int:
    from .retention import GcReport
    from .vfs import CONTROL_DIR
    from .warm import find_mount

    if args.backend:
        report = _post(f"{args.backend.rstrip('/')}/v1/gc" + ("?dry_run=1" if args.dry_run else ""))
        where = args.backend
    else:
        mountpoint = find_mount(args.mount)
        path = os.path.join(mountpoint, CONTROL_DIR, "gc-dry-run.json" if args.dry_run else "gc.json")
        try:
            with open(path, "rb") as f:
                report = json.loads(f.read())
        except OSError as exc:
            raise MmfsError(f"cannot read {path}: {exc.strerror} (is {mountpoint} an mmfs mount?)") from None
        where = mountpoint
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"mmfs gc ({where}): {GcReport(**report).line()}")
        for commit in report["retired"]:
            print(f"  retired {commit}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --daemon, which runs the same command
    handler = {"mount": _mount, "unmount": _unmount, "umount": _unmount, "prefetch": _prefetch,
               "status": _status, "verify": _verify, "watch": _watch, "gc": _gc,
               "artifact": _artifact}[args.command]
    try:
        return handler(args)
    except MmfsError as exc:
        what = f"{args.command} {args.action}" if args.command == "artifact" else args.command
        print(f"mmfs {what}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"mmfs {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
