"""Pure decisions of a sync run: what to send, the removal guard, the time Klaviyo's limits imply."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from router.klaviyo.spec import endpoint_by_operation

Change = Literal["create", "update", "unchanged"]

#: Profiles per bulk import job and bytes per job body (Klaviyo: ≤ 10 000 and ≤ 5 MB).
MAX_JOB_PROFILES: Final = 10_000
MAX_JOB_BYTES: Final = 5 * 1024 * 1024 - 4096
#: Ids per list relationship call and values per ``any(...)`` filter.
MAX_LIST_IDS: Final = 1000
MAX_FILTER_VALUES: Final = 100
#: Profiles per bulk subscribe job.
MAX_SUBSCRIBE: Final = 1000


def removal_refusal(removing: int, members: int, max_percent: float) -> str | None:
    """Why a mirror run must not remove ``removing`` of the ``members`` this sync added, if it must not."""
    if removing == 0 or members == 0:
        return None
    share = 100.0 * removing / members
    if share <= max_percent:
        return None
    return (
        f"Refusing to remove {removing} of the {members} members this sync added to the list "
        f"({share:.0f}% > max_removal_percent {max_percent:g}%): is the query's result complete? "
        "Run again with --allow-mass-removal if it is."
    )


def paced_seconds(requests: int, burst_per_second: int, steady_per_minute: int) -> float:
    """Least time ``requests`` calls to one endpoint take within its burst and steady limits."""
    if requests <= 1:
        return 0.0
    by_burst = math.ceil(requests / burst_per_second) - 1
    by_steady = 60 * (math.ceil(requests / steady_per_minute) - 1)
    return float(max(by_burst, by_steady))


@dataclass(frozen=True, slots=True)
class Estimate:
    """What sending ``rows`` rows costs at most (before the unchanged are known)."""

    rows: int
    import_jobs: int
    seconds: float
    #: The same profiles one by one through Update Profile, as seed 000's Amperity sends them.
    one_by_one_seconds: float

    def lines(self) -> list[str]:
        return [
            f"{self.rows} row{_s(self.rows)}: at most {self.import_jobs} bulk import job{_s(self.import_jobs)} "
            f"of up to {MAX_JOB_PROFILES} profiles, "
            f"about {_duration(self.seconds)} at Klaviyo's rate limits "
            f"(one by one through Update Profile: {_duration(self.one_by_one_seconds)})",
        ]


def estimate(rows: int) -> Estimate:
    """The time Klaviyo's documented limits imply for ``rows`` profiles."""
    jobs = math.ceil(rows / MAX_JOB_PROFILES)
    bulk = endpoint_by_operation("bulk_import_profiles")
    one = endpoint_by_operation("create_or_update_profile")  # the same L tier as Update Profile
    return Estimate(
        rows=rows,
        import_jobs=jobs,
        seconds=paced_seconds(jobs, bulk.burst_per_second, bulk.steady_per_minute),
        one_by_one_seconds=paced_seconds(rows, one.burst_per_second, one.steady_per_minute),
    )


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
