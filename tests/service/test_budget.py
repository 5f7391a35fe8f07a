"""service.budget: holds, and reservations (room for a message whose size is known only as a bound)."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Gauge

from service.budget import ByteBudget
from service.errors import Overloaded, PayloadTooLarge


def _budget(limit: int = 100) -> ByteBudget:
    return ByteBudget(limit, "HJSERVE_TEST", "test bodies", Gauge("b", "b", registry=CollectorRegistry()))


def test_a_reservation_waits_for_room_and_never_refuses_a_take():
    budget = _budget()

    async def main():
        body, reception, other = budget.hold(), budget.hold(), budget.hold()
        body.take(50)
        await budget.reserve(reception, 50, timeout_s=1)          # fits beside the 50 held
        assert (budget.used, budget.reserved) == (100, 50)
        body.take(40)                    # a take is checked against what is held (90), not reserved
        waiting = asyncio.ensure_future(budget.reserve(other, 20, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()        # 140 held and reserved: no room for 20 more
        body.release()                   # 50 reserved: room now
        await asyncio.wait_for(waiting, 1)
        assert (budget.used, budget.reserved) == (70, 70)
        reception.resize(30)             # the message arrived: its reservation becomes what it takes
        assert (budget.used, budget.reserved, reception.held, reception.reserved) == (50, 20, 30, 0)
        with pytest.raises(Overloaded):
            body.take(80)                # 30 held + 80 > 100 (the 20 reserved do not count)
        body.take(70)
        other.release()
        reception.release()
        body.release()
        assert (budget.used, budget.reserved) == (0, 0)

    asyncio.run(main())


def test_a_reservation_without_room_is_refused_after_its_wait_and_one_too_large_at_once():
    budget = _budget()

    async def main():
        body = budget.hold()
        body.take(60)
        started = time.monotonic()
        with pytest.raises(Overloaded):
            await budget.reserve(budget.hold(), 50, timeout_s=0.2)
        waited = time.monotonic() - started
        with pytest.raises(PayloadTooLarge):
            await budget.reserve(budget.hold(), 101, timeout_s=5)
        return waited, budget.used, budget.reserved

    waited, used, reserved = asyncio.run(main())
    assert 0.15 < waited < 2 and (used, reserved) == (60, 0)


def test_a_reservation_without_a_deadline_waits_until_room_and_is_counted_while_it_waits():
    """``timeout_s=None`` (a stream's next message): no refusal however long it waits; ``waiting``
    counts it meanwhile, which is what ends an idle stream's hold on its room."""
    budget = _budget()

    async def main():
        body, stream = budget.hold(), budget.hold()
        body.take(90)
        waiting = asyncio.ensure_future(budget.reserve(stream, 50, timeout_s=None))
        await asyncio.sleep(0.3)
        counted = budget.waiting
        assert not waiting.done()
        body.release()
        await asyncio.wait_for(waiting, 1)
        stream.release()
        return counted, budget.waiting, budget.used

    assert asyncio.run(main()) == (1, 0, 0)
