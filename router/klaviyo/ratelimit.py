"""Pace requests to each Klaviyo endpoint below its documented limits, before Klaviyo has to say 429.

Klaviyo counts requests in fixed windows (burst: one second, steady: one minute) whose alignment a
client cannot see. :class:`SlidingWindow` keeps the send times of the last minute and lets a
request go only when no one-second span holds ``burst`` sends and no one-minute span holds
``steady`` sends — then no fixed window of any alignment is over either limit. A ``Retry-After``
(on a 429, and on any other answer that carries one, a 503 say) and ``RateLimit-Remaining: 0``
block the whole endpoint until the time they name; a request admitted before the block came but
not yet on its way checks :meth:`Pacer.blocked` again and waits its turn anew
(:meth:`router.klaviyo.client.KlaviyoClient.send`).

That is one process's pacing. :class:`RateLimits` takes another :class:`Pacer` per endpoint when
given a ``pacer`` factory: :mod:`router.klaviyo.shared_ratelimit` paces every process of a cluster
through the database they share.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from router.klaviyo.spec import Endpoint

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Pacer(Protocol):
    """What the client needs of an endpoint's pacing: wait for a slot, learn from each answer."""

    #: Sends allowed per second and per minute.
    burst: int
    steady: int

    async def acquire(self) -> float:
        """Wait for a slot and take it; returns the seconds waited."""

    def observe(self, headers: Mapping[str, str], status: int) -> None:
        """Learn from Klaviyo's answer (:func:`pause_seconds`)."""

    def blocked(self) -> bool:
        """Whether the endpoint may not be sent to now (a request admitted earlier waits its turn anew)."""

    def block_until(self, moment: float) -> None:
        """Send nothing before ``moment`` (clock time)."""


#: Makes the pacer of one endpoint from its operation id, burst (per second) and steady (per minute).
PacerFactory = Callable[[str, int, int], Pacer]


class SlidingWindow:
    """Admission control for one endpoint: ``burst`` per second and ``steady`` per minute."""

    def __init__(
        self, burst: int, steady: int, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        if burst < 1 or steady < 1:
            raise ValueError("rate limits must be at least 1")
        self.burst = burst
        self.steady = steady
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque()
        self._blocked_until = 0.0
        self._lock = asyncio.Lock()

    def delay(self, now: float) -> float:
        """Seconds to wait before a send at ``now`` keeps both limits (0: go now)."""
        sent = self._sent
        while sent and sent[0] <= now - 60.0:
            sent.popleft()
        wait = max(0.0, self._blocked_until - now)
        if len(sent) >= self.steady:
            wait = max(wait, sent[-self.steady] + 60.0 - now)
        if len(sent) >= self.burst:
            wait = max(wait, sent[-self.burst] + 1.0 - now)
        return wait

    async def acquire(self) -> float:
        """Wait for a slot and take it; returns the seconds waited."""
        waited = 0.0
        async with self._lock:
            while (wait := self.delay(self._clock())) > 0:
                # a hair past the edge, so the window has surely moved on
                await self._sleep(wait + 0.001)
                waited += wait
            self._sent.append(self._clock())
        return waited

    def block_until(self, moment: float) -> None:
        """Send nothing before ``moment`` (clock time): Retry-After, or a used-up window."""
        self._blocked_until = max(self._blocked_until, moment)

    def blocked(self) -> bool:
        """Whether a ``Retry-After`` (or a used-up window) forbids sending now."""
        return self._clock() < self._blocked_until

    def observe(self, headers: Mapping[str, str], status: int) -> None:
        """Learn from Klaviyo's answer (:func:`pause_seconds`)."""
        seconds = pause_seconds(headers, status)
        if seconds is not None:
            self.block_until(self._clock() + seconds)


def pause_seconds(headers: Mapping[str, str], status: int) -> float | None:
    """Seconds an answer says to send nothing more to its endpoint (a ``Retry-After``, on a 429 or
    any other status, a 503 say: 1 s for a 429 without one; or ``RateLimit-Reset`` when
    ``RateLimit-Remaining`` is 0); None when it says nothing of the kind."""
    if status == 429 or "Retry-After" in headers:
        return retry_after(headers, default=1.0)
    remaining = headers.get("RateLimit-Remaining")
    reset = headers.get("RateLimit-Reset")
    if remaining is not None and reset is not None and _number(remaining) == 0:
        return _number(reset) or 1.0
    return None


def retry_after(headers: Mapping[str, str], *, default: float) -> float:
    """Seconds named by ``Retry-After`` (Klaviyo sends whole seconds), else ``default``."""
    value = _number(headers.get("Retry-After"))
    return default if value is None or value < 0 else value


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


class RateLimits:
    """One pacer per endpoint, created on first use from the spec's limits: a :class:`SlidingWindow`,
    or what ``pacer`` makes."""

    def __init__(
        self,
        *,
        scale: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        pacer: PacerFactory | None = None,
    ) -> None:
        #: Multiplier on every limit (below 1 to leave headroom for other clients of the account).
        self.scale = scale
        self._clock = clock
        self._sleep = sleep
        self._pacer = pacer
        self._windows: dict[str, Pacer] = {}

    def window(self, endpoint: Endpoint) -> Pacer:
        found = self._windows.get(endpoint.operation_id)
        if found is None:
            burst = max(1, int(endpoint.burst_per_second * self.scale))
            steady = max(1, int(endpoint.steady_per_minute * self.scale))
            if self._pacer is None:
                found = SlidingWindow(burst, steady, clock=self._clock, sleep=self._sleep)
            else:
                found = self._pacer(endpoint.operation_id, burst, steady)
            self._windows[endpoint.operation_id] = found
        return found
