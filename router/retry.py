"""When to try a failed delivery again: a pure policy, no sleeping, no I/O.

Exponential backoff with full jitter, never earlier than Klaviyo's ``Retry-After``, bounded by a
number of attempts and by the age of the event. :meth:`RetryPolicy.decide` returns the time of the
next attempt, or ``None`` when the job should become a dead letter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Backoff settings; every delay is in seconds."""

    #: Attempts before a retryable failure becomes a dead letter.
    max_attempts: int = 12
    #: Jobs older than this are dead-lettered instead of retried (default one day).
    max_age: float = 86_400.0
    #: Delay before the first retry; doubles with each attempt.
    base_delay: float = 1.0
    #: Longest delay between two attempts.
    max_delay: float = 600.0

    def backoff(self, attempts: int, rng: random.Random | None = None) -> float:
        """Delay after ``attempts`` failed attempts: half fixed, half random ("equal jitter")."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** max(attempts - 1, 0))
        jitter: float = (rng or random).uniform(0, ceiling / 2)
        return ceiling / 2 + jitter

    def decide(
        self,
        *,
        attempts: int,
        created_at: float,
        now: float,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float | None:
        """When to try again after the ``attempts``-th failure, or ``None`` to give up.

        ``retry_after`` (seconds, from Klaviyo) is a floor: the next attempt is never earlier.
        """
        if attempts >= self.max_attempts:
            return None
        delay = self.backoff(attempts, rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        at = now + delay
        if at - created_at > self.max_age:
            return None
        return at

    def give_up_reason(self, *, attempts: int, created_at: float, now: float) -> str:
        """Why :meth:`decide` returned ``None``, for the dead letter."""
        if attempts >= self.max_attempts:
            return f"gave up after {attempts} attempts"
        return f"gave up: the event is {now - created_at:.0f} s old (max_age {self.max_age:.0f} s)"
