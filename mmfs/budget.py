"""A semaphore counted in bytes: how every place where chunk data waits stays bounded."""

from __future__ import annotations

import trio

from .errors import TransientError


class ByteBudget:
    """``await acquire(n)`` waits until ``n`` bytes are free; ``release(n)`` gives them back.

    A request larger than the whole budget takes all of it (one oversized chunk waits for
    everything else to drain rather than deadlocking)."""

    def __init__(self, total: int, what: str = "memory budget") -> None:
        self.total = max(1, total)
        self.free = self.total
        self.what = what
        self._released = trio.Event()

    @property
    def used(self) -> int:
        return self.total - self.free

    async def acquire(self, n: int, timeout: float = float("inf")) -> int:
        """Take ``n`` bytes (at most ``total``) and return how many were taken;
        :class:`TransientError` after ``timeout`` seconds."""
        n = min(n, self.total)
        with trio.move_on_after(timeout):
            while self.free < n:
                await self._released.wait()
            self.free -= n
            return n
        raise TransientError(f"the {self.what} ({self.total} bytes) stayed in use by others for {timeout:g}s; retry")

    def release(self, n: int) -> None:
        self.free += n
        self._released.set()
        self._released = trio.Event()
