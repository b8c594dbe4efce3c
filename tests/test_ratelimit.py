"""SlidingWindow and RateLimits on a fake clock whose sleep moves time: limits over every span, blocks."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Mapping, Sequence

import pytest
from multidict import CIMultiDict

from router.klaviyo.ratelimit import RateLimits, SlidingWindow, retry_after
from router.klaviyo.spec import endpoint_by_operation


class FakeTime:
    """A clock that stands still until something sleeps on it; sleeping moves it forward at once."""

    def __init__(self, start: float = 10_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


def window(time: FakeTime, burst: int = 10, steady: int = 150) -> SlidingWindow:
    return SlidingWindow(burst, steady, clock=time, sleep=time.sleep)


def most_in_any_span(times: Sequence[float], span: float) -> int:
    """The largest number of ``times`` inside any half-open span ``[t, t + span)``.

    The busiest span can always be moved to start at one of the times, so checking those suffices;
    fixed windows of any alignment are such spans too.
    """
    ordered = sorted(times)
    return max(bisect.bisect_left(ordered, t + span) - i for i, t in enumerate(ordered))


async def sends(limiter: SlidingWindow, time: FakeTime, count: int, *, tasks: int = 1) -> list[float]:
    """Acquire ``count`` slots from ``tasks`` concurrent tasks; the clock reading of each send."""
    sent: list[float] = []

    async def worker(share: int) -> None:
        for _ in range(share):
            await limiter.acquire()
            sent.append(time())

    await asyncio.gather(*(worker(count // tasks) for _ in range(tasks)))
    return sent


@pytest.mark.parametrize("tasks", [1, 25])
async def test_never_over_burst_or_steady_in_any_span(tasks: int) -> None:
    time = FakeTime()
    sent = await sends(window(time, burst=10, steady=150), time, 3000, tasks=tasks)
    assert len(sent) == 3000
    assert most_in_any_span(sent, 1.0) == 10
    assert most_in_any_span(sent, 60.0) == 150
    # and it uses what the limits allow: 3000 sends at 150 a minute take just under 20 minutes
    elapsed = max(sent) - min(sent)
    assert 19 * 60 <= elapsed <= 20 * 60 + 1


async def test_burst_alone_binds_when_steady_is_generous() -> None:
    time = FakeTime()
    sent = await sends(window(time, burst=3, steady=10_000), time, 300)
    assert most_in_any_span(sent, 1.0) == 3
    assert 99 <= max(sent) - min(sent) <= 100.5


async def test_first_burst_goes_at_once() -> None:
    time = FakeTime()
    limiter = window(time)
    waits = [await limiter.acquire() for _ in range(10)]
    assert waits == [0.0] * 10 and time.slept == []
    assert await limiter.acquire() == pytest.approx(1.0)


async def test_block_until_holds_every_send_until_then() -> None:
    time = FakeTime()
    limiter = window(time)
    limiter.block_until(time() + 5.0)
    limiter.block_until(time() + 2.0)  # an earlier moment never shortens a block
    assert limiter.delay(time()) == pytest.approx(5.0)
    start = time()
    assert await limiter.acquire() == pytest.approx(5.0)
    assert time() >= start + 5.0
    assert await limiter.acquire() == 0.0


HEADERS: dict[str, tuple[int, Mapping[str, str], float]] = {
    "429 with Retry-After 3": (429, {"Retry-After": "3"}, 3.0),
    "429 without Retry-After": (429, {}, 1.0),
    "429, unreadable Retry-After": (429, {"Retry-After": "soon"}, 1.0),
    "429, lower-case header": (429, CIMultiDict({"retry-after": "4"}), 4.0),
    "used-up window": (200, {"RateLimit-Remaining": "0", "RateLimit-Reset": "7"}, 7.0),
    "used-up window, reset 0": (202, {"RateLimit-Remaining": "0", "RateLimit-Reset": "0"}, 1.0),
    "room left": (200, {"RateLimit-Remaining": "5", "RateLimit-Reset": "7"}, 0.0),
    "no reset given": (200, {"RateLimit-Remaining": "0"}, 0.0),
    "503 with Retry-After 9 pauses the endpoint too": (503, {"Retry-After": "9"}, 9.0),
    "503 without Retry-After": (503, {}, 0.0),
}


@pytest.mark.parametrize(("status", "headers", "blocked"), HEADERS.values(), ids=HEADERS.keys())
async def test_observe(status: int, headers: Mapping[str, str], blocked: float) -> None:
    time = FakeTime()
    limiter = window(time)
    limiter.observe(headers, status)
    assert limiter.delay(time()) == pytest.approx(blocked)
    start = time()
    await limiter.acquire()
    assert time() - start == pytest.approx(blocked, abs=0.002)


RETRY_AFTER = {
    "seconds": ({"Retry-After": "3"}, 3.0),
    "fraction": ({"Retry-After": "2.5"}, 2.5),
    "zero": ({"Retry-After": "0"}, 0.0),
    "absent": ({}, 9.0),
    "negative": ({"Retry-After": "-1"}, 9.0),
    "http date (Klaviyo sends seconds)": ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 9.0),
}


@pytest.mark.parametrize(("headers", "seconds"), RETRY_AFTER.values(), ids=RETRY_AFTER.keys())
def test_retry_after(headers: Mapping[str, str], seconds: float) -> None:
    assert retry_after(headers, default=9.0) == seconds


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SlidingWindow(0, 10)
    with pytest.raises(ValueError, match="at least 1"):
        SlidingWindow(10, 0)


SCALES = {
    "documented": (1.0, 10, 150),
    "half": (0.5, 5, 75),
    "tiny scale keeps one": (0.001, 1, 1),
}


@pytest.mark.parametrize(("scale", "burst", "steady"), SCALES.values(), ids=SCALES.keys())
def test_rate_limits_scale_the_spec(scale: float, burst: int, steady: int) -> None:
    bulk_events = endpoint_by_operation("bulk_create_events")  # tier M: 10/s, 150/min
    assert (bulk_events.burst_per_second, bulk_events.steady_per_minute) == (10, 150)
    found = RateLimits(scale=scale).window(bulk_events)
    assert (found.burst, found.steady) == (burst, steady)


async def test_rate_limits_keep_one_window_per_endpoint_on_their_clock() -> None:
    time = FakeTime()
    limits = RateLimits(clock=time, sleep=time.sleep)
    events = endpoint_by_operation("create_event")
    bulk = endpoint_by_operation("bulk_create_events")
    assert limits.window(events) is limits.window(events)
    assert limits.window(events) is not limits.window(bulk)
    limits.window(bulk).observe({"Retry-After": "3"}, 429)
    assert await limits.window(events).acquire() == 0.0  # a 429 blocks its own endpoint only
    start = time()
    assert await limits.window(bulk).acquire() == pytest.approx(3.0)
    assert time() - start == pytest.approx(3.0, abs=0.002)
