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

from collections.abc import Callable

from prometheus_client import Gauge

from service.errors import Overloaded, PayloadTooLarge

__all__ = ["ByteBudget", "Hold"]


class ByteBudget:
    """``limit`` bytes shared by holds; ``setting`` names the limit's environment variable in
    messages; ``full`` builds the 503 when other holds leave no room; ``gauge`` shows ``used``."""

    def __init__(self, limit: int, setting: str, what: str, gauge: Gauge,
                 full: Callable[..., Overloaded] = Overloaded, retry_after_s: int = 1):
        self.limit, self.setting, self.what, self.gauge = limit, setting, what, gauge
        self.full, self.retry_after_s = full, retry_after_s
        self.used = 0

    def check(self, held: int, more: int) -> None:
        """Whether a hold of ``held`` bytes may take ``more`` (raises if not, takes nothing)."""
        if held + more > self.limit:
            raise PayloadTooLarge(f"the {self.what} would take {held + more} bytes, above {self.setting} "
                                  f"({self.limit} bytes), the most all of them may take at once")
        if self.used + more > self.limit:
            raise self.full(f"the {self.what} being answered take {self.used} of {self.setting} "
                            f"({self.limit}) bytes: retry later", retry_after_s=self.retry_after_s)

    def hold(self) -> Hold:
        return Hold(self)

    def _add(self, n: int) -> None:
        self.used += n
        self.gauge.set(self.used)


class Hold:
    """What one request holds of a :class:`ByteBudget`; :meth:`release` gives it all back (also a
    context manager that releases on exit)."""

    def __init__(self, budget: ByteBudget):
        self.budget, self.held = budget, 0

    def take(self, n: int) -> None:
        if n <= 0:
            return
        self.budget.check(self.held, n)
        self.budget._add(n)
        self.held += n

    def account(self, n: int) -> None:
        """Hold exactly ``n`` bytes, without the check: bytes the process holds already (a response
        buffered for a client that is not reading it), counted so that the requests after them see
        them and are refused while they fill the budget."""
        self.budget._add(n - self.held)
        self.held = n

    def release(self) -> None:
        self.budget._add(-self.held)
        self.held = 0

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
