"""RetryPolicy: backoff bounds per attempt, the Retry-After floor, and when (and why) it gives up."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from router.retry import RetryPolicy

NOW = 1_700_000_000.0
DEFAULT = RetryPolicy()
SEEDS = range(200)


@dataclass(frozen=True, slots=True)
class Row:
    """One decision: the inputs, and the delay bounds expected (``None``: give up)."""

    attempts: int
    expected: tuple[float, float] | None
    policy: RetryPolicy = DEFAULT
    age: float = 0.0
    retry_after: float | None = None


TABLE = {
    # equal jitter: the delay lies in [ceiling / 2, ceiling], ceiling = base * 2 ** (attempts - 1)
    "attempt 0 counts as 1": Row(0, (0.5, 1.0)),
    "attempt 1": Row(1, (0.5, 1.0)),
    "attempt 2 doubles": Row(2, (1.0, 2.0)),
    "attempt 3 doubles again": Row(3, (2.0, 4.0)),
    "attempt 10": Row(10, (256.0, 512.0)),
    "attempt 11 is capped by max_delay": Row(11, (300.0, 600.0)),
    "base_delay scales": Row(3, (10.0, 20.0), policy=RetryPolicy(base_delay=5.0)),
    "small max_delay caps early": Row(4, (1.5, 3.0), policy=RetryPolicy(max_delay=3.0)),
    # Retry-After is a floor, never a ceiling
    "Retry-After above the backoff wins": Row(1, (30.0, 30.0), retry_after=30.0),
    "Retry-After below the backoff is moot": Row(3, (2.0, 4.0), retry_after=0.2),
    "Retry-After of 0 is moot": Row(1, (0.5, 1.0), retry_after=0.0),
    # max_attempts: the attempts-th failure with attempts >= max_attempts is the last
    "one attempt left": Row(11, (300.0, 600.0)),
    "max_attempts reached": Row(12, None),
    "max_attempts exceeded": Row(13, None),
    "max_attempts 1 never retries": Row(1, None, policy=RetryPolicy(max_attempts=1)),
    "max_attempts 3, second failure": Row(2, (1.0, 2.0), policy=RetryPolicy(max_attempts=3)),
    "max_attempts 3, third failure": Row(3, None, policy=RetryPolicy(max_attempts=3)),
    # max_age: the next attempt must still fall inside it
    "young event": Row(1, (0.5, 1.0), policy=RetryPolicy(max_age=100.0), age=98.0),
    "next attempt past max_age": Row(1, None, policy=RetryPolicy(max_age=100.0), age=100.0),
    "Retry-After pushes past max_age": Row(
        1, None, policy=RetryPolicy(max_age=100.0), age=50.0, retry_after=60.0
    ),
    "day-old event under the default max_age": Row(1, None, age=86_400.0),
}


@pytest.mark.parametrize("row", TABLE.values(), ids=TABLE.keys())
def test_decide(row: Row) -> None:
    delays: set[float] = set()
    for seed in SEEDS:
        at = row.policy.decide(
            attempts=row.attempts,
            created_at=NOW - row.age,
            now=NOW,
            retry_after=row.retry_after,
            rng=random.Random(seed),
        )
        if row.expected is None:
            assert at is None
            continue
        assert at is not None
        low, high = row.expected
        assert low <= at - NOW <= high
        delays.add(at - NOW)
    if row.expected is not None and row.expected[0] < row.expected[1]:
        assert len(delays) > len(SEEDS) // 2, "the delay should be jittered"


def test_same_seed_same_delay() -> None:
    first = DEFAULT.decide(attempts=4, created_at=NOW, now=NOW, rng=random.Random(7))
    second = DEFAULT.decide(attempts=4, created_at=NOW, now=NOW, rng=random.Random(7))
    assert first == second is not None


def test_backoff_spreads_over_the_jitter_range() -> None:
    rng = random.Random(1)
    delays = [DEFAULT.backoff(5, rng) for _ in range(2000)]
    assert 8.0 <= min(delays) < 8.2
    assert 15.8 < max(delays) <= 16.0


GIVE_UP = {
    "attempts": (RetryPolicy(max_attempts=2), 2, 10.0, "gave up after 2 attempts"),
    "attempts beyond": (DEFAULT, 15, 10.0, "gave up after 15 attempts"),
    "age": (DEFAULT, 3, 90_000.4, "gave up: the event is 90000 s old (max_age 86400 s)"),
    "age, custom max_age": (
        RetryPolicy(max_age=60.0),
        1,
        61.0,
        "gave up: the event is 61 s old (max_age 60 s)",
    ),
}


@pytest.mark.parametrize(("policy", "attempts", "age", "reason"), GIVE_UP.values(), ids=GIVE_UP.keys())
def test_give_up_reason(policy: RetryPolicy, attempts: int, age: float, reason: str) -> None:
    assert policy.decide(attempts=attempts, created_at=NOW - age, now=NOW, rng=random.Random(0)) is None
    assert policy.give_up_reason(attempts=attempts, created_at=NOW - age, now=NOW) == reason
