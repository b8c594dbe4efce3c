"""Klaviyo's rate limiting: fixed windows (1 s burst, 1 min steady, 1 day where documented) per bucket.

A bucket is one endpoint for one account (API key). A request is allowed only when every window of its bucket
has room; an allowed request counts in all of them, a refused one in none. Windows are aligned to multiples
of their size on the injected clock, like wall-clock fixed windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SECOND = 1.0
MINUTE = 60.0
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class Limit:
    """``limit`` requests per window of ``window`` seconds."""

    window: float
    limit: int


@dataclass(frozen=True, slots=True)
class Decision:
    """What the limiter says about one request."""

    allowed: bool
    #: Whole seconds until the exceeded window resets (at least 1); 0 when allowed.
    retry_after: int
    #: The steady (last listed) window's limit, remaining requests and seconds until it resets.
    limit: int
    remaining: int
    reset: int

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` headers (non-429 responses) or ``Retry-After`` (429)."""
        if not self.allowed:
            return {"Retry-After": str(self.retry_after)}
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }


@dataclass(slots=True)
class _Window:
    start: float
    count: int


def limits_for(burst_per_second: int, steady_per_minute: int, daily: int | None, scale: float) -> list[Limit]:
    """The windows of an endpoint, each limit multiplied by ``scale`` (never below 1)."""

    def scaled(value: int) -> int:
        return max(1, round(value * scale))

    limits = [Limit(SECOND, scaled(burst_per_second))]
    if daily is not None:
        limits.append(Limit(DAY, scaled(daily)))
    limits.append(Limit(MINUTE, scaled(steady_per_minute)))  # the steady window stays last: it feeds headers
    return limits


class FixedWindowLimiter:
    """Counts requests per (bucket, window size) in fixed windows of the injected clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._windows: dict[tuple[str, float], _Window] = {}

    def reset(self) -> None:
        """Forget every count."""
        self._windows.clear()

    def _window(self, bucket: str, size: float, now: float) -> _Window:
        start = math.floor(now / size) * size
        window = self._windows.get((bucket, size))
        if window is None or window.start != start:
            window = self._windows[(bucket, size)] = _Window(start, 0)
        return window

    def hit(self, bucket: str, limits: Sequence[Limit]) -> Decision:
        """Count one request in ``bucket`` if every window has room; say when to come back if not."""
        now = self.clock()
        windows = [(limit, self._window(bucket, limit.window, now)) for limit in limits]
        exceeded = [(limit, window) for limit, window in windows if window.count >= limit.limit]
        steady, steady_window = windows[-1]
        if exceeded:
            wait = max(window.start + limit.window - now for limit, window in exceeded)
            return Decision(False, max(1, math.ceil(wait)), steady.limit, 0, 0)
        for _, window in windows:
            window.count += 1
        reset = max(0, math.ceil(steady_window.start + steady.window - now))
        return Decision(True, 0, steady.limit, steady.limit - steady_window.count, reset)


class ManualClock:
    """A clock that only moves when told to: pass it as ``clock=`` for deterministic rate-limit tests."""

    def __init__(self, start: float = 6000.0) -> None:
        #: Current time in seconds (the default start is a whole minute, so windows begin with the test).
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds
