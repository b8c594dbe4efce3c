"""One Klaviyo account's rate limits held by a whole cluster: every router process paces its requests
through the database the processes share.

Klaviyo counts an account's requests per endpoint, whichever machine sends them: three processes
each pacing themselves to the limit would send three times too much. A :class:`SharedWindow` asks
the database for each send's time instead (:meth:`SendBudget.reserve_send`, one atomic call): the
database keeps, per destination and endpoint, the reserved times of the last minute's sends and
gives each new send the earliest time at which no one-second span holds ``burst`` of them and no
one-minute span holds ``steady`` — the guarantee of the local :class:`~router.klaviyo.ratelimit.
SlidingWindow`, over every process's sends, with the database's clock as the only clock. The
process sleeps until that time and sends.

A ``Retry-After`` (a 429's, a 503's), or ``RateLimit-Remaining: 0``, blocks the endpoint for every process: the
process that got it stops at once and records the block in the database, whose next reservations
start after it; a process whose reserved time came while the endpoint was blocked gives up that
time and reserves again. While the database is out of reach, reservations wait for it (delivery
cannot settle jobs then either).

:func:`shared_pacers` plugs this into :class:`~router.klaviyo.ratelimit.RateLimits` when the queue
keeps send budgets (PostgreSQL); with SQLite or memory the in-process pacer stays.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import structlog

from router.klaviyo.ratelimit import Clock, PacerFactory, Sleep, pause_seconds

log = structlog.get_logger("router.klaviyo.shared_ratelimit")

#: Seconds added to the spacing the limits ask for. A request leaves a little after its reserved
#: time (the database's answer, the event loop's wake-up, the connection), by a delay that differs
#: between processes; without a margin, request k+burst could catch up with request k and land in
#: the same one-second window of Klaviyo's.
MARGIN = 0.02


@runtime_checkable
class SendBudget(Protocol):
    """Where the cluster's send times are kept (:class:`router.queue.postgres.PostgresQueue`)."""

    async def reserve_send(self, bucket: str, burst: int, steady: int, margin: float) -> float:
        """Reserve the bucket's next send under both limits; the seconds to wait before it."""

    async def block_sends(self, bucket: str, seconds: float) -> None:
        """Let no process send to the bucket for ``seconds``."""

    async def sends_blocked_for(self, bucket: str) -> float:
        """Seconds before the bucket may send again (0: now)."""


def shared_pacers(queue: object, destination: str, *, margin: float = MARGIN) -> PacerFactory | None:
    """A factory of :class:`SharedWindow` for ``destination``'s endpoints when ``queue`` keeps send
    budgets for the cluster; None (pace in this process) otherwise."""
    if not isinstance(queue, SendBudget):
        return None
    budget = queue

    def pacer(operation_id: str, burst: int, steady: int) -> SharedWindow:
        return SharedWindow(budget, f"{destination}/{operation_id}", burst, steady, margin=margin)

    return pacer


class SharedWindow:
    """Admission control for one endpoint of one destination, shared by every process of a cluster."""

    def __init__(
        self,
        budget: SendBudget,
        bucket: str,
        burst: int,
        steady: int,
        *,
        margin: float = MARGIN,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if burst < 1 or steady < 1:
            raise ValueError("rate limits must be at least 1")
        self.budget = budget
        self.bucket = bucket
        self.burst = burst
        self.steady = steady
        self.margin = margin
        self._clock = clock
        self._sleep = sleep
        #: This process's own block (clock time), effective before the database has it.
        self._blocked_until = 0.0
        self._sharing: set[asyncio.Task[None]] = set()

    async def acquire(self) -> float:
        """Wait for a send time reserved across the cluster; returns the seconds waited."""
        waited = 0.0
        while True:
            blocked = self._blocked_until - self._clock()
            if blocked > 0:
                await self._sleep(blocked)
                waited += blocked
            delay = await self.budget.reserve_send(self.bucket, self.burst, self.steady, self.margin)
            if delay <= 0:
                return waited
            await self._sleep(delay)
            waited += delay
            # a 429 may have blocked the endpoint while this send waited: then its time is given up
            if self._blocked_until <= self._clock() and await self.budget.sends_blocked_for(self.bucket) <= 0:
                return waited

    def block_until(self, moment: float) -> None:
        """Send nothing before ``moment`` (clock time), here at once and in every process soon."""
        self._blocked_until = max(self._blocked_until, moment)
        seconds = moment - self._clock()
        if seconds > 0:
            task = asyncio.get_running_loop().create_task(self._share(seconds))
            self._sharing.add(task)
            task.add_done_callback(self._sharing.discard)

    def blocked(self) -> bool:
        """Whether this process knows the endpoint blocked now (other processes' blocks reach it
        through the database, at its next reservation)."""
        return self._clock() < self._blocked_until

    def observe(self, headers: Mapping[str, str], status: int) -> None:
        """Learn from Klaviyo's answer (:func:`~router.klaviyo.ratelimit.pause_seconds`)."""
        seconds = pause_seconds(headers, status)
        if seconds is not None:
            self.block_until(self._clock() + seconds)

    async def _share(self, seconds: float) -> None:
        try:
            await self.budget.block_sends(self.bucket, seconds)
        except Exception as exc:  # this process keeps its own block; the others learn from their 429s
            log.warning("rate_limit_block_not_shared", bucket=self.bucket, seconds=seconds, error=str(exc))
