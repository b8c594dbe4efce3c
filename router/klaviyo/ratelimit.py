"""Pace requests to each Klaviyo endpoint below its documented limits, before Klaviyo has to say 429.

Klaviyo counts requests in fixed windows (burst: one second, steady: one minute) whose alignment a
client cannot see. :class:`SlidingWindow` keeps the send times of the last minute and lets a
request go only when no one-second span holds ``burst`` sends and no one-minute span holds
``steady`` sends — then no fixed window of any alignment is over either limit. A ``Retry-After``
(on a 429, and on any other answer that carries one, a 503 say) and ``RateLimit-Remaining: 0``
block the whole endpoint until the time they name; a request admitted before the block came but
not yet on its way checks :meth:`SlidingWindow.blocked` again and waits its turn anew
(:meth:`router.klaviyo.client.KlaviyoClient.send`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

from router.klaviyo.spec import Endpoint

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


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
        """Learn from Klaviyo's answer: ``Retry-After`` (any status; 1 s on a 429 without one),
        else ``RateLimit-*``."""
        now = self._clock()
        if status == 429 or "Retry-After" in headers:
            self.block_until(now + retry_after(headers, default=1.0))
            return
        remaining = headers.get("RateLimit-Remaining")
        reset = headers.get("RateLimit-Reset")
        if remaining is not None and reset is not None and _number(remaining) == 0:
            self.block_until(now + (_number(reset) or 1.0))


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
    """One :class:`SlidingWindow` per endpoint, created on first use from the spec's limits."""

    def __init__(
        self, *, scale: float = 1.0, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        #: Multiplier on every limit (below 1 to leave headroom for other clients of the account).
        self.scale = scale
        self._clock = clock
        self._sleep = sleep
        self._windows: dict[str, SlidingWindow] = {}

    def window(self, endpoint: Endpoint) -> SlidingWindow:
        found = self._windows.get(endpoint.operation_id)
        if found is None:
            burst = max(1, int(endpoint.burst_per_second * self.scale))
            steady = max(1, int(endpoint.steady_per_minute * self.scale))
            found = SlidingWindow(burst, steady, clock=self._clock, sleep=self._sleep)
            self._windows[endpoint.operation_id] = found
        return found
