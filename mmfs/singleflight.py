"""Single-flight: however many tasks ask for the same thing at once, it is done once.

The work runs as its own task in a nursery the owner provides, not in the first caller's
task, so a caller that is cancelled (a reader interrupted with ^C, a client that hangs
up) never cancels the fetch that other callers are waiting on.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

import trio

from .errors import MmfsError

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Flight(Generic[V]):
    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: V | None = None
        self.error: MmfsError | None = None


class SingleFlight(Generic[K, V]):
    """A map of in-progress operations; callers of :meth:`run` with the same key share one."""

    def __init__(self) -> None:
        self._flights: dict[K, _Flight[V]] = {}
        #: Callers that joined an operation already in flight instead of starting one.
        self.coalesced = 0

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: K, work: Callable[[], Awaitable[V]], nursery: trio.Nursery) -> V:
        """Return ``work()``'s result, starting it unless an operation for ``key`` is running."""
        flight = self.start(key, work, nursery)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value  # type: ignore[return-value]

    async def join(self, key: K) -> None:
        """Wait for the operation for ``key`` to end, if one is running (its result is
        for its callers; joiners look where it put it)."""
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()

    def start(self, key: K, work: Callable[[], Awaitable[V]], nursery: trio.Nursery) -> _Flight[V]:
        """Start ``work`` for ``key`` in the background unless it is already running."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            nursery.start_soon(self._execute, key, flight, work)
        else:
            self.coalesced += 1
        return flight

    async def _execute(self, key: K, flight: _Flight[V], work: Callable[[], Awaitable[V]]) -> None:
        try:
            flight.value = await work()
        except MmfsError as exc:
            flight.error = exc
        except trio.Cancelled:
            flight.error = MmfsError("shutting down")
            raise
        except Exception as exc:  # a bug: log it whole, fail the waiters, keep serving
            log.exception("internal error while working on %r", key)
            flight.error = MmfsError(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            del self._flights[key]
            flight.done.set()
