"""Byte budgets: what the requests in flight hold between them, against one limit each.

Two budgets bound what clients can make the server hold: the memory of the inference bodies being
read and decoded (``max_request_memory_bytes``, the dataplane's, shared by REST and gRPC) and the
spool of the batch-attribution bodies (``max_spool_bytes``, the REST app's). A request takes bytes
through its :class:`Hold` as it comes to hold them and gives them all back when it ends; a request
that would take a budget past its limit fails at once -- with 413 when it alone exceeds the limit
(it can never fit), with a 503 + ``Retry-After`` when the other requests leave no room now. Used
from the event loop only, so there is no lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import Gauge

from service.errors import Overloaded, PayloadTooLarge

__all__ = ["ByteBudget", "Hold"]


class ByteBudget:
    """``limit`` bytes shared by holds; ``setting`` names the limit's environment variable in
    messages; ``full`` builds the 503 when other holds leave no room; ``gauge`` shows ``used``.

    A hold may also *reserve* bytes (:meth:`reserve`): room for something not yet received whose
    size is known only as a bound (a gRPC message). A reservation waits until it fits beside
    everything held and reserved; the other takes are checked against what is held, not reserved,
    so reservations -- bounds, mostly far above what arrives -- never refuse a body or an answer.
    What the process holds stays within the limit plus the bytes actually received into the
    reservations (at most the limit again)."""

    def __init__(self, limit: int, setting: str, what: str, gauge: Gauge,
                 full: Callable[..., Overloaded] = Overloaded, retry_after_s: int = 1):
        self.limit, self.setting, self.what, self.gauge = limit, setting, what, gauge
        self.full, self.retry_after_s = full, retry_after_s
        self.used = 0            # held and reserved
        self.reserved = 0
        self.waiting = 0         # reservations waiting for room now
        self._freed: asyncio.Event | None = None   # set when bytes are given back, for waiters

    def check(self, held: int, more: int) -> None:
        """Whether a hold of ``held`` bytes may take ``more`` (raises if not, takes nothing)."""
        self._never_fits(held, more)
        if self.used - self.reserved + more > self.limit:
            raise self._full(self.used - self.reserved)

    def _never_fits(self, held: int, more: int) -> None:
        """The 413 for a hold that would exceed the limit on its own, whatever the others take."""
        if held + more > self.limit:
            raise PayloadTooLarge(f"the {self.what} would take {held + more} bytes, above {self.setting} "
                                  f"({self.limit} bytes), the most all of them may take at once")

    def _full(self, taken: int) -> Overloaded:
        """The 503 for a request refused because the others take ``taken`` bytes now."""
        return self.full(f"the {self.what} being answered take {taken} of {self.setting} "
                         f"({self.limit}) bytes: retry later", retry_after_s=self.retry_after_s)

    def hold(self) -> Hold:
        return Hold(self)

    async def reserve(self, hold: Hold, n: int, timeout_s: float | None) -> None:
        """Reserve ``n`` bytes in ``hold`` once they fit beside everything held and reserved,
        waiting up to ``timeout_s`` for room (None: for as long as it takes; then refused as
        :meth:`check` refuses; at once when ``n`` alone exceeds the limit). Waiters are not served
        in order: each looks again when bytes come back; :attr:`waiting` counts them."""
        self._never_fits(hold.held, n)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self.used + n > self.limit:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise self._full(self.used)
            if self._freed is None:
                self._freed = asyncio.Event()
            self.waiting += 1
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                pass
            finally:
                self.waiting -= 1
        self._add(n)
        self.reserved += n
        hold.held += n
        hold.reserved += n

    def _add(self, n: int) -> None:
        self.used += n
        self.gauge.set(self.used)
        if n < 0 and self._freed is not None:
            self._freed.set()
            self._freed = None


class Hold:
    """What one request holds of a :class:`ByteBudget`; :meth:`release` gives it all back (also a
    context manager that releases on exit)."""

    def __init__(self, budget: ByteBudget):
        self.budget, self.held, self.reserved = budget, 0, 0

    def take(self, n: int) -> None:
        if n <= 0:
            return
        self.budget.check(self.held, n)
        self.budget._add(n)
        self.held += n

    def resize(self, n: int) -> None:
        """Hold ``n`` bytes instead of what it holds and reserves now, checked as :meth:`take`
        against the others (holding nothing when refused)."""
        self.release()
        self.take(n)

    def account(self, n: int) -> None:
        """Hold exactly ``n`` bytes, without the check: bytes the process holds already (a response
        buffered for a client that is not reading it), counted so that the requests after them see
        them and are refused while they fill the budget."""
        self.budget._add(n - self.held)
        self.held = n

    def release(self) -> None:
        self.budget.reserved -= self.reserved
        self.reserved = 0
        self.budget._add(-self.held)
        self.held = 0

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
