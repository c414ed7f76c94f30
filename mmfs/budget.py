"""A semaphore counted in bytes: how every place where chunk data waits stays bounded."""

from __future__ import annotations

import trio

from .errors import TransientError


class ByteBudget:
    """``await acquire(n)`` waits until ``n`` bytes are free; ``release(n)`` gives them back.

    A request larger than the whole budget takes all of it (one oversized chunk waits for
    everything else to drain rather than deadlocking). ``peak`` is the most ever taken at
    once (never above ``total``), ``waiting`` the callers waiting now (the backend's
    ``/healthz`` shows both for ``--stream-memory``)."""

    def __init__(self, total: int, what: str = "memory budget") -> None:
        self.total = max(1, total)
        self.free = self.total
        self.what = what
        self.peak = 0
        self.waiting = 0
        self._released = trio.Event()

    @property
    def used(self) -> int:
        return self.total - self.free

    async def acquire(self, n: int, timeout: float = float("inf")) -> int:
        """Take ``n`` bytes (at most ``total``) and return how many were taken;
        :class:`TransientError` after ``timeout`` seconds."""
        n = min(n, self.total)
        if self.free < n:
            self.waiting += 1
            try:
                with trio.move_on_after(timeout):
                    while self.free < n:
                        await self._released.wait()
            finally:
                self.waiting -= 1
            if self.free < n:
                raise TransientError(f"the {self.what} ({self.total} bytes) stayed in use by others for "
                                     f"{timeout:g}s; retry")
        self.free -= n
        self.peak = max(self.peak, self.total - self.free)
        return n

    def release(self, n: int) -> None:
        self.free += n
        self._released.set()
        self._released = trio.Event()
