"""The backend's NIXL data plane: a registered pool of chunk slots that nodes READ from.

    node                                   backend
    GET /v1/nixl/agent  ───────────────▶   {name, metadata (base64), slot_size, ...}
    add_remote_agent(metadata)
    GET /v1/nixl/chunk/...?index=N ────▶   engine.read_chunk (same rules as /v1/chunk),
                                           copy into a free slot, lease it
                        ◀───────────────   {slot, addr, length, verified, lease_id}
    NIXL READ addr..addr+length  ═══════▶  (one-sided: no backend code runs)
    POST /v1/nixl/release/<lease_id> ──▶   200 while the lease held, else 404

Only the node needs the other's metadata: a READ is initiated by the node, and with the
UCX backend the target's agent answers it without knowing the initiator (checked with two
processes here). So there is no "register a peer" step, and a backend keeps no per-node
state besides leases.

Leases. A slot is leased from the moment its bytes are written until the node releases
it or ``lease_timeout`` passes, so a node that dies mid-read never leaks a slot. A
release answered 200 proves the slot was not reused while the node read it; a node whose
lease had expired gets 404 and must not trust what it read (it falls back to TCP). When
no slot is free, a request waits up to ``slot_wait`` seconds, then :class:`NixlBusy`
(503): the node fetches that chunk over TCP.

Progress. The agent runs without NIXL's progress thread (that thread spins a whole core,
measured here: 22 s of CPU in 25 s idle). :meth:`NixlPlane.run` drives UCX instead with
a non-blocking ``get_new_notifs()`` every 2 ms while leases are out (new nodes connect
then) and every 20 ms otherwise, and expires leases; about 2 % of a core.
"""

from __future__ import annotations

import base64
import logging
import mmap
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import trio

from mmfs.errors import MmfsError, TransientError
from mmfs.remote.nixl import import_nixl, rdma_devices

log = logging.getLogger(__name__)

#: Seconds a slot stays leased when the node never releases it.
LEASE_TIMEOUT = 10.0
#: Seconds a chunk request waits for a free slot before answering 503.
SLOT_WAIT = 0.25
_FAST_POLL = 0.002
_SLOW_POLL = 0.02


class NixlMissing(MmfsError):
    """``--nixl`` was asked for but NIXL cannot be used here."""


class NixlBusy(TransientError):
    """No slot is free (or the chunk does not fit one): fetch this chunk over TCP."""


@dataclass(slots=True)
class Lease:
    lease_id: str
    slot: int
    length: int
    expires: float


@dataclass(frozen=True, slots=True)
class PlaneStatistics:
    slots: int
    leased: int
    chunks: int  # leases released by their node in time: bytes that went over NIXL
    bytes: int
    busy: int  # chunk requests answered 503 (the node used TCP)
    expired: int
    failed: int  # leases the node released saying its READ failed
    late: int  # releases that came after their lease expired

    @property
    def fallbacks(self) -> int:
        """Chunks asked for over NIXL that the node had to fetch over TCP, as far as the backend knows."""
        return self.busy + self.failed + self.late


def agent_name(port: int) -> str:
    """``mmfs-backend-<POD_NAME or hostname>-<port>``: unique per backend process in a cluster."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"mmfs-backend-{host}-{port}"


class NixlPlane:
    """A NIXL agent with ``pool_bytes // slot_size`` registered DRAM slots.

    Every method but :meth:`run` returns quickly and runs on the trio thread, the only
    thread that touches the agent.
    """

    def __init__(self, name: str, *, pool_bytes: int, slot_size: int,
                 lease_timeout: float = LEASE_TIMEOUT, slot_wait: float = SLOT_WAIT) -> None:
        try:
            import numpy as np

            nixl = import_nixl()
            nixl_agent, nixl_agent_config = nixl.nixl_agent, nixl.nixl_agent_config
        except ImportError as exc:
            raise NixlMissing(f"--nixl needs the NIXL Python package, which is not importable ({exc}); "
                              "install it with: pip install --no-deps 'nixl-cu12>=1.5,<2' numpy") from None
        slots = pool_bytes // slot_size
        if slots < 1:
            raise NixlMissing(f"--nixl-pool must hold at least one chunk of {slot_size} bytes")
        self.name = name
        self.slot_size = slot_size
        self.slots = slots
        self.lease_timeout = lease_timeout
        self.slot_wait = slot_wait
        try:
            self._agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        except Exception as exc:  # noqa: BLE001 - the bindings raise their own classes
            raise NixlMissing(f"cannot start a NIXL agent: {exc}") from None
        if "UCX" not in self._agent.backends:
            raise NixlMissing("NIXL has no UCX backend plugin here; --nixl needs it")
        # Anonymous mmap: page-aligned, zeroed, ours for the process's life.
        self._memory = mmap.mmap(-1, slots * slot_size)
        self._array = np.frombuffer(self._memory, dtype=np.uint8)
        self.base = int(self._array.ctypes.data)
        self._view = memoryview(self._memory)
        try:
            self._registered = self._agent.register_memory(
                np.array([[self.base, slots * slot_size, 0]], dtype=np.uint64), "DRAM")
        except Exception as exc:  # noqa: BLE001
            raise NixlMissing(f"cannot register {slots * slot_size} bytes with NIXL: {exc}") from None
        self.metadata = self._agent.get_agent_metadata()
        #: RDMA devices of this host, announced to nodes: ``--transport auto`` uses NIXL
        #: only when both ends have one (without RDMA, NIXL loses to TCP).
        self.rdma_devices = rdma_devices()
        self._free = list(range(slots - 1, -1, -1))
        self._leases: dict[str, Lease] = {}
        self._released = trio.Event()
        self._active_until = 0.0
        self.chunks = self.bytes = self.busy = self.expired = self.failed = self.late = 0

    def describe(self) -> dict[str, Any]:
        """The body of ``GET /v1/nixl/agent``."""
        return {"name": self.name, "metadata": base64.b64encode(self.metadata).decode("ascii"),
                "backend": "UCX", "mem_type": "DRAM", "rdma": bool(self.rdma_devices),
                "rdma_devices": self.rdma_devices, "slot_size": self.slot_size, "slots": self.slots,
                "lease_timeout_s": self.lease_timeout}

    async def lease(self, data: bytes, verified: bool) -> dict[str, Any]:
        """Copy ``data`` into a free slot and lease it; the body of a ``/v1/nixl/chunk`` answer.

        Raises :class:`NixlBusy` when ``data`` does not fit a slot or none frees up in time.
        """
        if len(data) > self.slot_size:
            self.busy += 1
            raise NixlBusy(f"a chunk of {len(data)} bytes does not fit a NIXL slot of {self.slot_size} bytes; "
                           "use /v1/chunk")
        self._expire()
        if not self._free:
            with trio.move_on_after(self.slot_wait):
                while not self._free:
                    soonest = min((lease.expires for lease in self._leases.values()),
                                  default=time.monotonic() + self.slot_wait)
                    with trio.move_on_after(max(0.0, soonest - time.monotonic()) + 0.001):
                        await self._released.wait()
                    self._expire()
        if not self._free:
            self.busy += 1
            raise NixlBusy(f"all {self.slots} NIXL slots are leased; use /v1/chunk for now")
        slot = self._free.pop()
        offset = slot * self.slot_size
        self._view[offset:offset + len(data)] = data  # a memcpy: about 0.5 ms for 4 MiB
        lease = Lease(secrets.token_hex(12), slot, len(data), time.monotonic() + self.lease_timeout)
        self._leases[lease.lease_id] = lease
        self._active_until = time.monotonic() + 1.0
        return {"slot": slot, "addr": self.base + offset, "length": len(data), "verified": verified,
                "lease_id": lease.lease_id, "agent": self.name, "lease_timeout_s": self.lease_timeout}

    def release(self, lease_id: str, *, failed: bool = False) -> bool:
        """Free a lease; ``False`` when it had expired (or never existed)."""
        self._expire()
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            self.late += 1  # the node read under an expired lease and now fetches over TCP
            return False
        self._free_slot(lease.slot)
        if failed:
            self.failed += 1
        else:
            self.chunks += 1
            self.bytes += lease.length
        return True

    def statistics(self) -> PlaneStatistics:
        return PlaneStatistics(self.slots, len(self._leases), self.chunks, self.bytes, self.busy, self.expired,
                               self.failed, self.late)

    def _free_slot(self, slot: int) -> None:
        self._free.append(slot)
        self._released.set()
        self._released = trio.Event()

    def _expire(self) -> None:
        now = time.monotonic()
        for lease_id in [k for k, v in self._leases.items() if v.expires <= now]:
            lease = self._leases.pop(lease_id)
            self.expired += 1
            log.warning("NIXL lease %s (slot %d) expired unreleased after %.0f s", lease_id, lease.slot,
                        self.lease_timeout)
            self._free_slot(lease.slot)

    async def run(self) -> None:
        """Drive the agent's progress and expire leases, until cancelled."""
        while True:
            try:
                self._agent.get_new_notifs()
            except Exception as exc:  # noqa: BLE001 - keep serving; nodes fall back to TCP
                log.warning("NIXL progress failed: %s", exc)
                await trio.sleep(1.0)
            self._expire()
            busy = self._leases or time.monotonic() < self._active_until
            await trio.sleep(_FAST_POLL if busy else _SLOW_POLL)

    def close(self) -> None:
        try:
            self._agent.deregister_memory(self._registered)
        except Exception as exc:  # noqa: BLE001
            log.debug("NIXL deregister failed: %s", exc)


__all__ = ["LEASE_TIMEOUT", "SLOT_WAIT", "Lease", "NixlBusy", "NixlMissing", "NixlPlane", "PlaneStatistics",
           "agent_name"]
