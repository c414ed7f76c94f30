"""The node plugin's behaviour, free of gRPC: publish, unpublish, stats, health, re-bind.

:class:`NodeDriver` methods raise :class:`CsiError` carrying the gRPC status code the
spec asks for; ``server.py`` only translates. Locking: an operation takes its volume id
and target path without waiting; when either is busy the caller gets ``ABORTED`` (the
spec's "operation pending for volume"), and the re-bind loop simply skips it this round.

Access modes. The mount is always read-only. A request counts as a *write* (refused with
``FAILED_PRECONDITION``) when its access mode is a writer mode and ``readonly`` is false.
A writer mode with ``readonly=true`` is accepted, because kubelet sends
``SINGLE_NODE_WRITER`` for every CSI inline volume (and for PVs with ReadWriteOnce):
refusing it would make inline volumes unusable, so pods must say ``readOnly: true``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from mmfs.names import is_commit

from . import mounts
from .state import Published, StateStore
from .tokens import TokenStore, token_of
from .volumes import InvalidVolume, VolumeSpec, parse_volume_context

log = logging.getLogger(__name__)

READER_MODES = frozenset({2, 3})  # SINGLE_NODE_READER_ONLY, MULTI_NODE_READER_ONLY
UNKNOWN_MODE = 0


class CsiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Config:
    node_id: str
    mount_root: str
    state_dir: str
    driver_name: str = "mmfs.csi.dynamo.io"
    #: Readahead written for the mount root's FUSE device; 0 leaves the kernel's value alone.
    read_ahead_kb: int = 16384
    #: Seconds between re-bind passes.
    rebind_interval: float = 5.0
    #: Upper bound on any single call into the mmfs mount (stat, readlink, statvfs).
    fs_timeout: float = 5.0
    #: Command run as ``<cmd> prefetch <provider>/<org>/<name>@<commit> --mount <root>``.
    prefetch_command: str = "mmfs"
    #: kubelet's root directory: targets are only accepted where kubelet puts them.
    kubelet_dir: str = "/var/lib/kubelet"
    #: Where per-volume tokens are written (the daemon's ``--token-dir``; csi_driver/tokens.py).
    token_dir: str = "/var/lib/mmfs/tokens"


@dataclass(frozen=True, slots=True)
class PublishRequest:
    volume_id: str
    target_path: str
    volume_context: dict[str, str]
    readonly: bool
    has_capability: bool
    block: bool
    access_mode: int
    #: ``nodePublishSecretRef``'s data: a ``token`` key makes the volume read with it.
    secrets: dict[str, str] = field(default_factory=dict)


class NodeDriver:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.mount_root = mounts.canonical(config.mount_root)
        self.state = StateStore(config.state_dir)
        self.tokens = TokenStore(config.token_dir)
        self._busy: set[str] = set()
        self._background: set[str] = set()  # the part of _busy held by the re-bind loop
        self._busy_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._probe_in_flight = False
        self._tuned_device: str | None = None
        self._stop = threading.Event()
        self._last_mount_reason: str | None = "unchecked"

    # ---- locking ----

    @contextlib.contextmanager
    def _claim(self, *keys: str) -> Iterator[None]:
        """Hold ``keys`` for an RPC: ``ABORTED`` while another RPC holds one of them. A
        re-bind pass holding one (a short health check) is waited for instead: the
        plugin's own background work must not fail a kubelet call."""
        deadline = time.monotonic() + self.config.fs_timeout + 1.0
        while not self._try_claim(keys):
            with self._busy_lock:
                only_background = all(k in self._background for k in keys if k in self._busy)
            if not only_background or time.monotonic() > deadline:
                raise CsiError(grpc.StatusCode.ABORTED, f"an operation on {' / '.join(keys)} is already in progress")
            time.sleep(0.02)
        try:
            yield
        finally:
            self._release(keys)

    def _try_claim(self, keys: tuple[str, ...], *, background: bool = False) -> bool:
        with self._busy_lock:
            if any(k in self._busy for k in keys):
                return False
            self._busy.update(keys)
            if background:
                self._background.update(keys)
            return True

    def _release(self, keys: tuple[str, ...]) -> None:
        with self._busy_lock:
            self._busy.difference_update(keys)
            self._background.difference_update(keys)

    # ---- health ----

    def mount_problem(self) -> str | None:
        """``None`` while the mmfs mount is live, else why not. Never blocks longer than
        ``fs_timeout``; while an earlier check still hangs, reports that instead of
        starting another thread."""
        if mounts.fuse_device(self.mount_root) is None:
            return f"{self.mount_root} is not a FUSE mount"
        with self._probe_lock:
            if self._probe_in_flight:
                return f"an earlier stat of {self.mount_root} is still hanging"
            self._probe_in_flight = True

        def check() -> None:
            try:
                # statvfs, not stat: the kernel may answer stat of the root from its cache
                # long after the daemon died; statfs always reaches the daemon.
                try:
                    os.statvfs(self.mount_root)
                except OSError as exc:
                    if exc.errno != errno.ENOSYS:
                        raise
                    os.stat(self.mount_root)
            finally:
                with self._probe_lock:
                    self._probe_in_flight = False

        try:
            mounts.bounded(check, self.config.fs_timeout)
        except mounts.Timeout:
            return f"statfs {self.mount_root} hangs (over {self.config.fs_timeout:g}s)"
        except OSError as exc:
            return f"statfs {self.mount_root}: {os.strerror(exc.errno or errno.EIO)}"
        return None

    def _fs(self, fn, what: str):  # type: ignore[no-untyped-def]
        """Run a call into the mount, bounded; map failures to gRPC codes."""
        try:
            return mounts.bounded(fn, self.config.fs_timeout)
        except mounts.Timeout as exc:
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{what}: mmfs mount does not answer ({exc})") from exc
        except FileNotFoundError as exc:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"{what}: not found") from exc
        except OSError as exc:
            if exc.errno in mounts.STALE_ERRNOS:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{what}: mmfs mount is down ({exc.strerror})") from exc
            raise CsiError(grpc.StatusCode.INTERNAL, f"{what}: {exc}") from exc

    # ---- targets ----

    def _target(self, volume_id: str, path: str, what: str = "target_path") -> str:
        """Check the ids of a call and return its target, canonical.

        The plugin runs as root and mounts, unmounts and removes directories at the paths it
        is given: only where kubelet puts volume targets,
        ``<kubelet dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount``, never an
        arbitrary directory of the host."""
        if not volume_id:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
        if not path:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is required")
        if not os.path.isabs(path) or "\0" in path:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be an absolute path")
        target = mounts.canonical(path)
        pods = os.path.join(mounts.canonical(self.config.kubelet_dir), "pods")
        relative = os.path.relpath(target, pods).split(os.sep)
        if len(relative) != 5 or relative[0] in (".", "..") or relative[1:3] != ["volumes", "kubernetes.io~csi"] \
                or relative[4] != "mount" or relative[3] in (".", ".."):
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{what} {path!r} is not a volume target kubelet would give: expected "
                           f"{pods}/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount")
        return target

    # ---- publish ----

    def publish(self, req: PublishRequest) -> str:
        """Bind the requested revision read-only on the target; returns the pinned commit."""
        target = self._target(req.volume_id, req.target_path)
        if not req.has_capability:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "volume_capability is required")
        if req.block:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, "block volumes are not supported; use a mount volume")
        if req.access_mode == UNKNOWN_MODE:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "volume_capability.access_mode is required")
        if req.access_mode not in READER_MODES and not req.readonly:
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "mmfs volumes are read-only: use a *_READER_ONLY access mode or readonly=true (readOnly: true)",
            )
        try:
            spec = parse_volume_context(req.volume_context)
        except InvalidVolume as exc:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc

        with self._claim(f"volume:{req.volume_id}", f"target:{target}"):
            existing = self.state.get(target)
            if existing is not None:
                return self._republish(existing, req.volume_id, spec).commit
            if mounts.is_mount_point(target):
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"{target} is already a mount point not made by this plugin")
            problem = self.mount_problem()
            if problem:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"mmfs mount is down: {problem}")
            commit, source = self._resolve(spec, self._view_root(req.secrets))
            entry = Published(req.volume_id, target, source, spec.provider, spec.repo, spec.revision, commit, spec.sub_path)
            self._bind_new(entry)
            self.state.put(entry)
        if spec.prefetch:
            self._start_prefetch(spec, commit)
        return commit

    def _republish(self, existing: Published, volume_id: str, spec: VolumeSpec) -> Published:
        wanted = Published(volume_id, existing.target_path, "", spec.provider, spec.repo, spec.revision, "", spec.sub_path)
        if not existing.same_volume(wanted):
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{existing.target_path} already publishes volume {existing.volume_id} "
                f"({existing.provider}/{existing.repo}@{existing.revision})",
            )
        # Same request again: keep the commit pinned the first time. Repair if needed.
        if mounts.is_mount_point(existing.target_path) and mounts.path_health(existing.target_path, self.config.fs_timeout) is None:
            return existing
        self._rebind(existing)
        return existing

    def _view_root(self, secrets: dict[str, str]) -> str:
        """Where the volume is read from: the mount's root, or the view of the volume's
        token (``<mount-root>/.access/<key>``, its token file written first)."""
        token = token_of(secrets)
        if token is None:
            return self.mount_root
        try:
            key = self.tokens.put(token)
        except ValueError as exc:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, f"nodePublishSecretRef: {exc}") from None
        except OSError as exc:
            raise CsiError(grpc.StatusCode.INTERNAL, f"cannot write the volume's token under "
                           f"{self.config.token_dir}: {exc.strerror}") from None
        return os.path.join(self.mount_root, ".access", key)

    def _resolve(self, spec: VolumeSpec, root: str) -> tuple[str, str]:
        """``(commit, source directory)`` of *spec* under ``root`` (the mount root or a
        token's view): a branch or tag is read through its symlink now, so every later
        publish of this target sees this commit."""
        org, name = spec.repo.split("/", 1)  # a store model's prefix may hold "/"
        repo_dir = os.path.join(root, spec.provider, org, name)
        self._fs(lambda: os.stat(repo_dir), f"repo {spec.provider}/{spec.repo}")
        rev_path = os.path.join(repo_dir, spec.revision)
        st = self._fs(lambda: os.lstat(rev_path), f"revision {spec.revision} of {spec.repo}")
        if is_commit(spec.revision) or not stat.S_ISLNK(st.st_mode):
            commit = spec.revision
        else:
            link = self._fs(lambda: os.readlink(rev_path), f"revision {spec.revision} of {spec.repo}")
            resolved = os.path.normpath(os.path.join(os.path.dirname(rev_path), link))
            if os.path.dirname(resolved) != repo_dir:
                raise CsiError(grpc.StatusCode.INTERNAL, f"{rev_path} points outside its repo: {link!r}")
            commit = os.path.basename(resolved)
        if not is_commit(commit):  # only a commit directory is pinned: never the repo or a ref folder
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"revision {spec.revision} of {spec.repo} is no commit")
        source = os.path.join(repo_dir, commit, spec.sub_path) if spec.sub_path else os.path.join(repo_dir, commit)
        what = f"{spec.repo}@{spec.revision}" + (f" subPath {spec.sub_path}" if spec.sub_path else "")
        st = self._fs(lambda: os.stat(source), what)
        if not stat.S_ISDIR(st.st_mode):
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is a file; subPath must name a directory")
        return commit, source

    def _bind_new(self, entry: Published) -> None:
        """mkdir + bind; on any failure release what this call made."""
        target = entry.target_path
        created = False
        try:
            os.mkdir(target, 0o755)
            created = True
        except FileExistsError:
            if not os.path.isdir(target):
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"{target} exists and is not a directory") from None
        except FileNotFoundError as exc:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, f"parent of {target} does not exist") from exc
        try:
            mounts.bind_read_only(entry.source, target)
        except Exception as exc:
            with contextlib.suppress(Exception):
                mounts.unmount_all(target)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(target)
            raise CsiError(grpc.StatusCode.INTERNAL, f"bind {entry.source} on {target}: {exc}") from exc

    def _rebind(self, entry: Published) -> None:
        """Replace whatever is (or is not) mounted on the target by a fresh bind."""
        try:
            mounts.unmount_all(entry.target_path)
        except mounts.MountError as exc:
            raise CsiError(grpc.StatusCode.INTERNAL, str(exc)) from exc
        problem = self.mount_problem()
        if problem:
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"mmfs mount is down: {problem}")
        self._fs(lambda: os.stat(entry.source), f"{entry.repo}@{entry.commit}")
        self._bind_new(entry)

    def _start_prefetch(self, spec: VolumeSpec, commit: str) -> None:
        exe = shutil.which(self.config.prefetch_command)
        if exe is None:
            log.warning("prefetch asked for %s@%s but %r is not installed", spec.repo, commit, self.config.prefetch_command)
            return
        argv = [exe, "prefetch", f"{spec.provider}/{spec.repo}@{commit}", "--mount", self.mount_root]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.warning("prefetch %s: %s", " ".join(argv), exc)
            return
        log.info("prefetch started (pid %d): %s", proc.pid, " ".join(argv))

        def reap() -> None:
            code = proc.wait()
            log.info("prefetch pid %d of %s@%s exited with %d", proc.pid, spec.repo, commit, code)

        threading.Thread(target=reap, name="csi-prefetch-reaper", daemon=True).start()

    # ---- unpublish ----

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target = self._target(volume_id, target_path)
        with self._claim(f"volume:{volume_id}", f"target:{target}"):
            try:
                mounts.unmount_all(target)
            except mounts.MountError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL, str(exc)) from exc
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL, f"remove {target}: {exc.strerror}") from exc
            self.state.remove(target)
            in_use = {part for entry in self.state.all() for part in entry.source.split("/")}
            self.tokens.prune(in_use)

    # ---- stats ----

    def volume_stats(self, volume_id: str, volume_path: str) -> tuple[os.statvfs_result | None, str | None]:
        """``(statvfs, None)`` for a healthy volume, ``(None, why)`` for an abnormal one;
        ``NOT_FOUND`` unless this plugin published ``volume_id`` at ``volume_path``."""
        if not volume_id:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
        if not volume_path:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "volume_path is required")
        path = mounts.canonical(volume_path) if os.path.isabs(volume_path) and "\0" not in volume_path else ""
        published = self.state.get(path) if path else None
        if published is None or published.volume_id != volume_id:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {volume_id} is not published at {volume_path}")
        mounted = mounts.is_mount_point(path)
        err = mounts.path_health(path, self.config.fs_timeout)
        if err is not None:
            return None, f"{path}: {os.strerror(err)} (mmfs mount down or restarting)"
        if not mounted:
            return None, f"{path} is not mounted"
        try:
            return mounts.bounded(lambda: os.statvfs(path), self.config.fs_timeout), None
        except (OSError, mounts.Timeout) as exc:
            return None, f"statvfs {path}: {exc}"

    # ---- background: readahead and re-bind ----

    def tune_read_ahead(self) -> None:
        if self.config.read_ahead_kb <= 0:
            return
        device = mounts.fuse_device(self.mount_root)
        if device is None or device == self._tuned_device:
            return
        try:
            mounts.set_read_ahead(device, self.config.read_ahead_kb)
        except OSError as exc:
            log.warning("cannot set read_ahead_kb of bdi %s: %s", device, exc)
        self._tuned_device = device

    def rebind_pass(self) -> int:
        """One pass: tune readahead, then re-bind every recorded target whose bind went
        stale (or vanished) while the mount root is live. Returns how many were re-bound."""
        problem = self.mount_problem()
        if problem != self._last_mount_reason:
            if problem:
                log.warning("mmfs mount not ready: %s", problem)
            else:
                log.info("mmfs mount at %s is live", self.mount_root)
            self._last_mount_reason = problem
        if problem:
            return 0
        self.tune_read_ahead()
        rebound = 0
        for entry in self.state.all():
            keys = (f"volume:{entry.volume_id}", f"target:{entry.target_path}")
            if not self._try_claim(keys, background=True):
                continue
            try:
                if self._rebind_if_stale(entry):
                    rebound += 1
            except CsiError as exc:
                log.warning("re-bind of %s failed: %s", entry.target_path, exc.message)
            finally:
                self._release(keys)
        return rebound

    def _rebind_if_stale(self, entry: Published) -> bool:
        if self.state.get(entry.target_path) != entry:
            return False  # unpublished or replaced since the snapshot
        mounted = mounts.is_mount_point(entry.target_path)
        err = mounts.path_health(entry.target_path, self.config.fs_timeout)
        if err is None and mounted:
            return False
        if err == errno.ENOENT and not mounted:
            log.info("target %s is gone; forgetting it", entry.target_path)
            self.state.remove(entry.target_path)
            return False
        why = os.strerror(err) if err is not None else "not mounted"
        self._rebind(entry)
        log.info("re-bound %s (%s) to %s", entry.target_path, why, entry.source)
        return True

    def run_background(self) -> threading.Thread:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.rebind_pass()
                except Exception:  # noqa: BLE001 - the loop must survive anything
                    log.exception("re-bind pass failed")
                self._stop.wait(self.config.rebind_interval)

        thread = threading.Thread(target=loop, name="csi-rebind", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

