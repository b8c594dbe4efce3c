"""Planning a batch (router.plan) and planning it in another process (router.planner)."""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import signal
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.destination import Destination
from router.errors import MappingError
from router.klaviyo.batch import MAX_EVENTS
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import load_mappings
from router.plan import DEAD, OK, Plan, claim_size, plan, plan_payloads
from router.planner import Planner
from router.queue import Job, JobState


def track(n: int, user: str | None = None) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user or f"u{n}",
        "event": "Viewed",
        "messageId": f"m{n}",
        "properties": {"email": f"u{n}@example.com"},
    }


def leased(n: int, message: dict[str, Any] | bytes) -> Job:
    return Job(
        id=n,
        source="web",
        destination="klaviyo",
        message_id=f"m{n}",
        ordering_key=None,
        payload=message if isinstance(message, bytes) else orjson.dumps(message),
        state=JobState.IN_FLIGHT,
        attempts=0,
        next_attempt_at=0.0,
        lease_expires_at=60.0,
        last_error=None,
        created_at=0.0,
        updated_at=0.0,
    )


def tracks(count: int) -> list[Job]:
    return [leased(n, track(n)) for n in range(count)]


def event_counts(work: Plan) -> list[int]:
    return [
        len(item["attributes"]["events"]["data"])
        for request in work.requests
        if request.path == "/api/event-bulk-create-jobs"
        for item in request.body["data"]["attributes"]["events-bulk-create"]["data"]
    ]


# -- giving back the jobs behind the last full event job -------------------------------------------------------


@pytest.mark.parametrize("rest", [1, 100, MAX_EVENTS - 1])
def test_a_partial_last_event_job_is_given_back(rest: int) -> None:
    jobs = tracks(2 * MAX_EVENTS + rest)
    work = plan(jobs, Destination(), load_mappings(), give_back_partial=True)
    assert [job.id for job in work.given_back] == list(range(2 * MAX_EVENTS, 2 * MAX_EVENTS + rest))
    assert len(work.verdicts) == work.events == 2 * MAX_EVENTS
    assert [len(request.sources) for request in work.requests] == [MAX_EVENTS, MAX_EVENTS]
    assert {source for request in work.requests for source in request.sources} == set(range(2 * MAX_EVENTS))


@pytest.mark.parametrize(
    ("count", "give_back"),
    [
        (MAX_EVENTS + 100, False),  # not asked to: send what there is
        (600, True),  # no full job before it
        (2 * MAX_EVENTS, True),  # nothing partial
    ],
)
def test_nothing_is_given_back_otherwise(count: int, give_back: bool) -> None:
    work = plan(tracks(count), Destination(), load_mappings(), give_back_partial=give_back)
    assert (work.given_back, len(work.verdicts), work.events) == ([], count, count)


def test_given_back_jobs_take_their_refusals_and_skips_along() -> None:
    jobs = tracks(MAX_EVENTS + 1)  # the last one opens the partial event job
    jobs.append(leased(MAX_EVENTS + 1, {"type": "alias", "userId": "a", "previousId": "b", "messageId": "x"}))
    jobs.append(leased(MAX_EVENTS + 2, b"[oops"))
    jobs += [leased(n, track(n)) for n in range(MAX_EVENTS + 3, MAX_EVENTS + 12)]
    work = plan(jobs, Destination(), load_mappings(), give_back_partial=True)
    assert len(work.verdicts) == MAX_EVENTS and work.skipped == 0
    assert [job.id for job in work.given_back] == list(range(MAX_EVENTS, MAX_EVENTS + 12))
    assert all(verdict.state == OK and not verdict.reason for verdict in work.verdicts)


def test_refusals_and_skips_before_the_cut_stay() -> None:
    jobs = [leased(0, b"[oops"), leased(1, {"type": "alias", "userId": "a", "messageId": "x"})]
    jobs += [leased(n, track(n)) for n in range(2, MAX_EVENTS + 12)]
    work = plan(jobs, Destination(), load_mappings(), give_back_partial=True)
    assert len(work.verdicts) == MAX_EVENTS + 2
    assert (work.verdicts[0].state, work.verdicts[1].state, work.skipped) == (DEAD, OK, 1)
    assert work.verdicts[1].reason.startswith("alias call skipped")


# -- claim sizes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch_size", "events_per_job", "expected"),
    [
        (1000, None, 2000),  # nothing known yet: enough when every second job is an event
        (1000, 0.0, 1000),  # no events: nothing to fill
        (1000, 0.65, 1724),  # one event job: 1000 / 0.65, 12 % over
        (1000, 1.0, 1120),
        (5000, 0.65, 5170),  # three event jobs
        (1000, 0.1, 2000),  # ten thousand jobs for one event job: at most twice batch_size
        (1000, 5.0, 1120),  # several events per job: five event jobs
        (1, 1.0, 2),
    ],
)
def test_claim_size(batch_size: int, events_per_job: float | None, expected: int) -> None:
    assert claim_size(batch_size, events_per_job) == expected


# -- requests cross processes as their encoded JSON -----------------------------------------------------------


def test_a_request_pickles_with_its_encoded_body() -> None:
    body = {"data": {"type": "event-bulk-create-job", "attributes": {"n": [1, 2.5, "ü"]}}}
    encoded = orjson.dumps(body)
    request = KlaviyoRequest(
        method="POST", path="/api/x", body=body, sources=(1, 2), item_sources=((1,), (2,)), encoded=encoded
    )
    wire = pickle.dumps(request)
    assert pickle.loads(wire) == request and pickle.loads(wire).encoded == encoded
    assert b"event-bulk-create-job" in wire and wire.count(b"event-bulk-create-job") == 1
    plain = KlaviyoRequest(method="POST", path="/api/y", body=body, kind="event", ordering_key="k")
    assert pickle.loads(pickle.dumps(plain)) == plain


def test_an_unpickled_request_decodes_its_body_only_when_read() -> None:
    body = {"data": {"type": "event-bulk-create-job", "attributes": {"n": [1]}}}
    request = KlaviyoRequest(method="POST", path="/api/x", body=body, encoded=orjson.dumps(body))
    unpickled = pickle.loads(pickle.dumps(request))
    with pytest.raises(AttributeError):
        object.__getattribute__(unpickled, "body")  # not decoded yet
    assert unpickled.payload() == orjson.dumps(body)
    assert unpickled.body == body and object.__getattribute__(unpickled, "body") is unpickled.body
    with pytest.raises(AttributeError, match="no attribute 'bodies'"):
        unpickled.bodies  # noqa: B018


# -- planning processes ---------------------------------------------------------------------------------------


async def test_a_planning_process_plans_what_this_process_would() -> None:
    jobs = [*tracks(5), leased(5, b"[oops"), leased(6, {"type": "alias", "userId": "a", "messageId": "x"})]
    destination = Destination(list_id="XUepkK")
    here = plan(jobs, destination, load_mappings())
    planner = Planner(processes=1)
    try:
        await planner.start()
        there = await planner.plan(jobs, destination, load_mappings(), give_back_partial=False)
    finally:
        planner.close()
    assert there.requests == here.requests
    assert [r.payload() for r in there.requests] == [r.payload() for r in here.requests]
    assert [(v.job, v.state, v.reason) for v in there.verdicts] == [
        (v.job, v.state, v.reason) for v in here.verdicts
    ]
    assert (there.skipped, there.events, there.given_back) == (1, 5, [])


async def test_a_planning_process_keeps_the_last_good_mappings(tmp_path: Path) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "viewed.json").write_text(
        '{"kind": "event", "match": {"type": ["track"], "event": ["viewed"]}, "metric": {"value": "Seen"}}'
    )
    destination = Destination(mappings_dir=mappings)
    planner = Planner(processes=1)
    try:
        first = await planner.plan(tracks(1), destination, load_mappings(mappings), give_back_partial=False)
        (mappings / "viewed.json").write_text("{")
        os.utime(mappings / "viewed.json", (1, 1))  # another mtime, whatever the clock's resolution
        with pytest.raises(MappingError):
            load_mappings(mappings)
        again = await planner.plan(tracks(1), destination, load_mappings(), give_back_partial=False)
    finally:
        planner.close()
    assert again.requests == first.requests
    assert first.requests[0].body["data"]["attributes"]["metric"]["data"]["attributes"]["name"] == "Seen"


async def test_planning_processes_compile_the_mappings_at_start(tmp_path: Path) -> None:
    """Started with a destination's mappings folder, a planning process has them before its first
    batch: an edit that breaks them afterwards leaves it the set it started with. A folder broken
    at start is reported by the first batch, not by the start."""
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "viewed.json").write_text(
        '{"kind": "event", "match": {"type": ["track"], "event": ["viewed"]}, "metric": {"value": "Seen"}}'
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.json").write_text("{")
    planner = Planner(processes=1)
    try:
        await planner.start([mappings, broken, None])
        (mappings / "viewed.json").write_text("{")
        os.utime(mappings / "viewed.json", (1, 1))
        work = await planner.plan(
            tracks(1), Destination(mappings_dir=mappings), load_mappings(), give_back_partial=False
        )
        with pytest.raises(MappingError):
            await planner.plan(
                tracks(1), Destination(mappings_dir=broken), load_mappings(), give_back_partial=False
            )
    finally:
        planner.close()
    assert work.requests[0].body["data"]["attributes"]["metric"]["data"]["attributes"]["name"] == "Seen"


async def test_planning_processes_collect_garbage_as_rarely_as_the_router() -> None:
    planner = Planner(processes=1)
    try:
        await planner.start()
        thresholds = await asyncio.get_running_loop().run_in_executor(planner._executor(), gc.get_threshold)
    finally:
        planner.close()
    assert thresholds == (50_000, 20, 20)  # a spawned process starts with (700, 10, 10)


async def test_a_dead_planning_process_fails_the_batch_and_a_new_one_takes_over() -> None:
    planner = Planner(processes=1)
    try:
        await planner.start()
        pool = planner._executor()
        for process in list(pool._processes.values()):
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            await planner.plan(tracks(2), Destination(), load_mappings(), give_back_partial=False)
        work = await planner.plan(tracks(2), Destination(), load_mappings(), give_back_partial=False)
    finally:
        planner.close()
    assert work.events == 2


def test_plan_payloads_is_plain_data() -> None:
    planned = plan_payloads([orjson.dumps(track(1))], Destination(), load_mappings())
    assert pickle.loads(pickle.dumps(planned)) == planned
