"""The backend as a remote, with chunk bytes over NIXL where both ends have it.

:class:`NixlBackendRemote` is a :class:`~mmfs.remote.backend.BackendRemote` whose
``fetch_chunk`` tries the backend's NIXL data plane first (``docs/protocol.md``, "NIXL
data plane"; the server half is ``backend_server/nixl_plane.py``)::

    GET /v1/nixl/chunk/...?index=N   (TCP)  -> {addr, length, verified, lease_id}
    NIXL READ backend slot -> local slot      (a worker thread; the trio loop never waits on it)
    copy the slot out
    POST /v1/nixl/release/<lease_id> (TCP)  -> 200: the slot was ours throughout the READ

and returns the bytes, which the engine hashes and checks exactly as for TCP. Everything else (resolve, manifests) is plain HTTP.

Fallback. Any failure of the data plane — NIXL missing here, a backend without
``--nixl`` (404), agent setup, a 503 (no free slot), a failed or timed-out READ, a lease
that expired before the release — fetches that chunk with ``BackendRemote.fetch_chunk``
over TCP. Each kind of failure is logged once. A backend without NIXL disables the plane
for good; other setup failures, and three failed READs in a row, switch it off for
``RETRY_AFTER`` seconds, after which the agent metadata is fetched again (a restarted
backend has a new one). Chunks of gated and private repos always come
over TCP: the backend keeps them out of its registered pool, which any node holding its
agent metadata could READ (``RestrictedOverTcp``). Errors about the chunk itself (not
found, access, integrity) are raised as TCP would raise them.

When NIXL is worth it. ``mmfs mount --transport auto`` (the default) builds this remote
only where NIXL can beat TCP: an RDMA device on this node (:func:`rdma_devices`), and then
uses the data plane only once the backend's ``/v1/nixl/agent`` announces one too
(``"rdma": true``). On hosts with DRAM and no RDMA NIC, UCX carries a READ over TCP or
shared memory, and measured here (a cold node reading 512 MiB from a warm backend) NIXL
got 0.17-0.22 GB/s at 4.3-5.7 CPU-s per GB against 0.29-0.36 GB/s at 2.9-3.7 for plain
``/v1/chunk``. ``--transport nixl`` uses the data plane wherever it works, RDMA or not.
:meth:`NixlBackendRemote.transport` says which transport is in use and why.

Threads. The agent runs without NIXL's progress thread (it spins a core) and in
``NIXL_THREAD_SYNC_STRICT`` mode: READs run in worker threads, which poll their
transfer to completion (with UCX over shared memory a READ of 4 MiB completes in about a
millisecond, mostly inside ``transfer()``).
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import trio

from ..errors import MmfsError, NotFound, TransientError
from ._http import RetryPolicy, error_from_response
from .backend import BackendRemote
from .base import FetchedChunk, FileSource

log = logging.getLogger(__name__)

#: Seconds the data plane stays off after setup failed or READs kept failing.
RETRY_AFTER = 60.0
#: READs failing in a row before the data plane is switched off for a while.
MAX_FAILURES = 3
#: Longest one READ may take before it counts as failed, seconds.
READ_TIMEOUT = 5.0
#: Local receive slots (each one backend slot in size): READs in flight at once.
LOCAL_SLOTS = 8
#: Where Linux lists RDMA devices (InfiniBand, RoCE and iWARP NICs).
RDMA_SYSFS = "/sys/class/infiniband"


def import_nixl() -> Any:
    """Import ``nixl_cu12`` (raises ``ImportError``) with its logging tamed.

    On import NIXL points its ``nixl`` logger at *stdout*, where both daemons print their
    ready line; its records go to the application's handlers (stderr) instead, from
    WARNING up (its INFO lines announce every agent).
    """
    import numpy  # noqa: F401 - NIXL's descriptor lists are numpy arrays
    import nixl_cu12

    nixl_logger = logging.getLogger("nixl")
    for handler in list(nixl_logger.handlers):
        nixl_logger.removeHandler(handler)
    nixl_logger.propagate = True
    if not os.environ.get("NIXL_LOG_LEVEL"):
        nixl_logger.setLevel(logging.WARNING)
    return nixl_cu12


def rdma_devices(root: str = RDMA_SYSFS) -> list[str]:
    """The RDMA devices of this host (``mlx5_0``, ...), empty where there are none."""
    try:
        return sorted(os.listdir(root))
    except OSError:
        return []


def nixl_available() -> bool:
    """Whether the NIXL Python package can be imported here (it is an optional extra)."""
    try:
        import_nixl()
    except ImportError:
        return False
    return True


class _Fallback(Exception):
    """The data plane could not deliver this chunk; ``kind`` groups causes for logging."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class NixlStatistics:
    state: str  # "off" (never or not now), "on"
    chunks: int  # chunks that came over NIXL
    bytes: int
    fallbacks: int  # chunks asked for over NIXL that came over TCP


class _Plane:
    """This node's agent, its registered receive slots, and the backend it reads from."""

    def __init__(self, info: dict[str, Any], slots: int) -> None:
        import numpy as np

        nixl = import_nixl()
        nixl_agent, nixl_agent_config = nixl.nixl_agent, nixl.nixl_agent_config
        nixl_thread_sync_t = nixl.nixl_thread_sync_t
        self._np = np
        host = os.environ.get("NODE_NAME") or os.environ.get("POD_NAME") or socket.gethostname()
        self.name = f"mmfs-node-{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self.agent = nixl_agent(self.name, nixl_agent_config(
            enable_prog_thread=False, backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        if "UCX" not in self.agent.backends:
            raise _Fallback("setup", "NIXL has no UCX backend plugin on this node")
        self.slot_size = int(info["slot_size"])
        self.buffer = np.zeros(slots * self.slot_size, dtype=np.uint8)
        self.base = int(self.buffer.ctypes.data)
        self.registered = self.agent.register_memory(
            np.array([[self.base, slots * self.slot_size, 0]], dtype=np.uint64), "DRAM")
        self.remote = self.agent.add_remote_agent(base64.b64decode(info["metadata"]))
        if isinstance(self.remote, bytes):
            self.remote = self.remote.decode()
        self.free = list(range(slots))
        self.slots: trio.Semaphore  # set on the trio thread

    def read(self, slot: int, addr: int, length: int) -> bytes:
        """READ ``length`` bytes at the backend's ``addr`` into ``slot``; return a copy. In a thread."""
        np = self._np
        offset = slot * self.slot_size
        local = self.agent.get_xfer_descs(np.array([[self.base + offset, length, 0]], dtype=np.uint64), "DRAM")
        remote = self.agent.get_xfer_descs(np.array([[addr, length, 0]], dtype=np.uint64), "DRAM")
        handle = self.agent.initialize_xfer("READ", local, remote, self.remote)
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + READ_TIMEOUT
            spins = 0
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise _Fallback("read", f"NIXL READ of {length} bytes took over {READ_TIMEOUT:g} s")
                spins += 1
                time.sleep(0 if spins < 100 else 0.0002)
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise _Fallback("read", f"NIXL READ of {length} bytes ended in state {state}")
        finally:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception as exc:  # noqa: BLE001 - an unfinished transfer cannot always be released
                log.debug("NIXL: releasing a transfer handle failed: %s", exc)
        return self.buffer[offset:offset + length].tobytes()

    def close(self) -> None:
        for step in (lambda: self.agent.remove_remote_agent(self.remote),
                     lambda: self.agent.deregister_memory(self.registered)):
            try:
                step()
            except Exception as exc:  # noqa: BLE001
                log.debug("NIXL: cleanup step failed: %s", exc)


class NixlBackendRemote(BackendRemote):
    """A :class:`BackendRemote` that moves chunk bytes over NIXL when it can, else TCP."""

    def __init__(self, url: str, *, policy: RetryPolicy = RetryPolicy(), auth: str | None = None,
                 local_slots: int = LOCAL_SLOTS, auto: bool = False, reason: str = "--transport nixl") -> None:
        """``auto``: use the data plane only where the backend announces an RDMA device
        (``--transport auto`` on a node that has one); ``reason``: why NIXL was chosen,
        shown by :meth:`transport` until the data plane is on or off."""
        super().__init__(url, policy=policy, auth=auth)
        self._auto = auto
        self._reason = reason
        self._local_slots = local_slots
        self._plane_: _Plane | None = None
        self._disabled_until = 0.0  # monotonic; inf when the backend has no data plane
        self._setup_lock = trio.Lock()
        self._failures = 0
        self._logged: set[str] = set()
        self.chunks = self.bytes = self.fallbacks = 0

    def statistics(self) -> NixlStatistics:
        return NixlStatistics("on" if self._plane_ is not None else "off", self.chunks, self.bytes, self.fallbacks)

    def transport(self) -> dict[str, Any]:
        """Which transport chunk bytes take now and why (``mmfs status``, ``status.json``)."""
        if self._plane_ is not None:
            in_use = "nixl"
        elif time.monotonic() < self._disabled_until:
            in_use = "tcp"
        else:  # not tried yet (it starts with the first chunk), or trying again
            in_use = "nixl"
        return {"requested": "auto" if self._auto else "nixl", "in_use": in_use, "reason": self._reason,
                "nixl": {"chunks": self.chunks, "bytes": self.bytes, "fallbacks": self.fallbacks}}

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        plane = await self._plane(auth)
        if plane is not None:
            try:
                fetched = await self._fetch_nixl(plane, source, index, auth)
            except _Fallback as exc:
                self._note(exc)
                self.fallbacks += 1
                if exc.kind == "read":
                    self._failures += 1
                    if self._failures >= MAX_FAILURES:
                        self._switch_off(f"{self._failures} NIXL READs failed in a row", RETRY_AFTER)
            else:
                self._failures = 0
                self.chunks += 1
                self.bytes += len(fetched.data)
                return fetched
        return await super().fetch_chunk(source, index, auth=auth)

    async def _fetch_nixl(self, plane: _Plane, source: FileSource, index: int, auth: str | None) -> FetchedChunk:
        start, end = source.entry.chunk_span(index)
        url = f"{self.url}/v1/nixl/chunk/{source.repo.url_path}/{source.commit}/{quote(source.entry.path)}?index={index}"
        answer = await self._control("GET", url, auth)
        length, addr, lease_id = int(answer["length"]), int(answer["addr"]), str(answer["lease_id"])
        if length != end - start or length > plane.slot_size:
            await self._release(lease_id, auth, failed=True)
            raise _Fallback("protocol", f"backend leased {length} bytes for a chunk of {end - start}")
        async with plane.slots:
            slot = plane.free.pop()
            try:
                data = await trio.to_thread.run_sync(plane.read, slot, addr, length)
            except Exception as exc:
                await self._release(lease_id, auth, failed=True)
                raise exc if isinstance(exc, _Fallback) else _Fallback("read", f"NIXL READ failed: {exc}") from None
            finally:
                plane.free.append(slot)
        if not await self._release(lease_id, auth):
            raise _Fallback("lease", f"the NIXL lease on chunk {index} of {source.entry.path} expired mid-read")
        return FetchedChunk(data=data, file_verified=bool(answer.get("verified")), source_url=url)

    async def _control(self, method: str, url: str, auth: str | None) -> dict[str, Any]:
        """One try at a control request: transient trouble is a fallback, other errors are raised."""
        try:
            response = await self._client.request(method, url, headers=self._headers(auth))
        except TransientError as exc:
            raise _Fallback("control", f"control request failed: {exc}") from None
        if not response.is_success:
            error = error_from_response(response)
            if response.headers.get("X-Error-Code") == "RestrictedOverTcp":  # gated/private: never in the pool
                raise _Fallback("restricted", str(error))
            if isinstance(error, TransientError):  # 503: no free slot; 5xx/429 from a proxy
                raise _Fallback("busy", f"backend answered {response.status_code}: {error}")
            raise error
        try:
            answer = response.json()
        except ValueError:
            raise _Fallback("protocol", f"backend sent unreadable JSON for {url.split('?', 1)[0]}") from None
        if not isinstance(answer, dict):
            raise _Fallback("protocol", "backend sent JSON that is not an object")
        return answer

    async def _release(self, lease_id: str, auth: str | None, *, failed: bool = False) -> bool:
        url = f"{self.url}/v1/nixl/release/{quote(lease_id, safe='')}" + ("?failed=1" if failed else "")
        try:
            await self._control("POST", url, auth)
        except (_Fallback, MmfsError) as exc:
            log.debug("NIXL: release of lease %s: %s", lease_id, exc)
            return False
        return True

    async def _plane(self, auth: str | None) -> _Plane | None:
        if self._plane_ is not None or time.monotonic() < self._disabled_until:
            return self._plane_
        async with self._setup_lock:
            if self._plane_ is not None or time.monotonic() < self._disabled_until:
                return self._plane_
            if not nixl_available():
                self._switch_off("the NIXL Python package (nixl-cu12) is not installed on this node", float("inf"))
                return None
            try:
                info = await self._control("GET", f"{self.url}/v1/nixl/agent", auth)
            except NotFound:
                self._switch_off(f"backend {self.url} has no NIXL data plane (start it with --nixl)", float("inf"))
                return None
            except (_Fallback, MmfsError) as exc:
                self._switch_off(f"cannot read the backend's NIXL agent: {exc}", RETRY_AFTER)
                return None
            if self._auto and info.get("rdma") is not True:
                self._switch_off(f"--transport auto: backend {self.url} announces no RDMA device, and without "
                                 "RDMA NIXL is slower than TCP (use --transport nixl to force it)", float("inf"),
                                 level=logging.INFO)
                return None
            try:
                plane = await trio.to_thread.run_sync(_Plane, info, self._local_slots)
            except Exception as exc:  # noqa: BLE001 - NIXL's bindings raise their own classes
                self._switch_off(f"NIXL agent setup failed: {exc}", RETRY_AFTER)
                return None
            plane.slots = trio.Semaphore(self._local_slots)
            self._plane_ = plane
            self._failures = 0
            self._reason = (f"NIXL data plane on: agent {plane.name} reads from {plane.remote}"
                            + (f" (--transport auto: RDMA here and on the backend: "
                               f"{', '.join(map(str, info.get('rdma_devices') or []))})" if self._auto else ""))
            log.info("%s (%d local slots of %d bytes)", self._reason, self._local_slots, plane.slot_size)
            return self._plane_

    def _switch_off(self, why: str, seconds: float, *, level: int = logging.WARNING) -> None:
        self._disabled_until = time.monotonic() + seconds
        # Dropped, not closed: READs in flight may still use its memory; the agent
        # deregisters it when the last of them lets go.
        self._plane_ = None
        again = "" if seconds == float("inf") else f"; trying again in {seconds:.0f} s"
        self._reason = f"NIXL off, chunks go over TCP: {why}{again}"
        log.log(level, "%s", self._reason)

    def _note(self, exc: _Fallback) -> None:
        if exc.kind not in self._logged:
            self._logged.add(exc.kind)
            log.warning("NIXL: %s; this chunk goes over TCP (further %r fallbacks are not logged)", exc, exc.kind)

    async def aclose(self) -> None:
        if self._plane_ is not None:
            self._plane_.close()
            self._plane_ = None
        await super().aclose()


__all__ = ["RDMA_SYSFS", "NixlBackendRemote", "NixlStatistics", "nixl_available", "rdma_devices"]
