"""Planning a batch (router.plan) and planning it in another process (router.planner)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import os
import pickle
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.destination import Destination
from router.errors import MappingError
from router.klaviyo.batch import MAX_EVENTS, prepare
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import MappingSets, load_mappings
from router.plan import (
    DEAD,
    OK,
    STEP_BITS,
    Leftover,
    Plan,
    claim_size,
    plan,
    plan_payloads,
    plan_prepared,
    prepare_payloads,
)
from router.planner import Planner, PlanningProcess
from router.queue import Job, JobState
from router.transform import transform


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


# -- holding over the jobs behind the last full event job ---------------------------------------------------


@pytest.mark.parametrize("rest", [1, 100, MAX_EVENTS - 1])
def test_a_partial_last_event_job_is_held_over(rest: int) -> None:
    jobs = tracks(2 * MAX_EVENTS + rest)
    work = plan(jobs, Destination(), load_mappings(), carry_partial=True)
    assert [job.id for job in work.held] == list(range(2 * MAX_EVENTS, 2 * MAX_EVENTS + rest))
    assert (work.leftover.jobs, work.leftover.events, len(work.leftover.parts)) == (rest, rest, rest)
    assert len(work.verdicts) == work.events == 2 * MAX_EVENTS
    assert [len(request.sources) for request in work.requests] == [MAX_EVENTS, MAX_EVENTS]
    assert {source for request in work.requests for source in request.sources} == set(range(2 * MAX_EVENTS))


@pytest.mark.parametrize(
    ("count", "carry"),
    [
        (MAX_EVENTS + 100, False),  # not asked to: send what there is
        (600, True),  # no full job before it
        (2 * MAX_EVENTS, True),  # nothing partial
    ],
)
def test_nothing_is_held_over_otherwise(count: int, carry: bool) -> None:
    work = plan(tracks(count), Destination(), load_mappings(), carry_partial=carry)
    assert (work.held, work.leftover, len(work.verdicts), work.events) == ([], Leftover(), count, count)


def test_held_over_jobs_take_their_refusals_and_skips_along() -> None:
    jobs = tracks(MAX_EVENTS + 1)  # the last one opens the partial event job
    jobs.append(leased(MAX_EVENTS + 1, {"type": "alias", "userId": "a", "previousId": "b", "messageId": "x"}))
    jobs.append(leased(MAX_EVENTS + 2, b"[oops"))
    jobs += [leased(n, track(n)) for n in range(MAX_EVENTS + 3, MAX_EVENTS + 12)]
    work = plan(jobs, Destination(), load_mappings(), carry_partial=True)
    assert len(work.verdicts) == MAX_EVENTS and work.skipped == 0
    assert [job.id for job in work.held] == list(range(MAX_EVENTS, MAX_EVENTS + 12))
    assert all(verdict.state == OK and not verdict.reason for verdict in work.verdicts)
    assert [index for index, _ in work.leftover.skipped] == [1]
    assert [index for index, _ in work.leftover.refused] == [2]


def test_the_next_batch_sends_the_held_over_jobs_first_as_planned() -> None:
    """The leftover's jobs come first in the next batch, untransformed again (the mappings that
    made them are not even needed), their refusals and skips with them."""
    jobs = tracks(MAX_EVENTS + 1)
    jobs.append(leased(MAX_EVENTS + 1, {"type": "alias", "userId": "a", "previousId": "b", "messageId": "x"}))
    jobs.append(leased(MAX_EVENTS + 2, b"[oops"))
    first = plan(jobs, Destination(), load_mappings(), carry_partial=True)
    assert [job.id for job in first.held] == [MAX_EVENTS, MAX_EVENTS + 1, MAX_EVENTS + 2]
    following = [leased(n, track(n)) for n in range(MAX_EVENTS + 3, 2 * MAX_EVENTS + 10)]
    held_payloads = [dataclasses.replace(job, payload=b"[not read again") for job in first.held]
    work = plan(
        [*held_payloads, *following],
        Destination(),
        load_mappings(),
        carry_partial=True,
        carried=first.leftover,
    )
    assert [verdict.job.id for verdict in work.verdicts][:4] == [
        MAX_EVENTS,
        MAX_EVENTS + 1,
        MAX_EVENTS + 2,
        MAX_EVENTS + 3,
    ]
    assert (work.verdicts[1].reason.startswith("alias call skipped"), work.verdicts[2].state) == (True, DEAD)
    assert work.skipped == 1 and work.events == MAX_EVENTS
    (events,) = [request for request in work.requests if request.path == "/api/event-bulk-create-jobs"]
    assert events.sources[0] == 0  # the held-over track leads its event job
    assert [job.id for job in work.held] == list(range(2 * MAX_EVENTS + 2, 2 * MAX_EVENTS + 10))


def test_leftovers_join_in_order() -> None:
    a = plan(tracks(MAX_EVENTS + 3), Destination(), load_mappings(), carry_partial=True).leftover
    b = plan(tracks(MAX_EVENTS + 2), Destination(), load_mappings(), carry_partial=True).leftover
    joined = a.then(b)
    assert (joined.jobs, joined.events) == (5, 5)
    assert [part.sources for part in joined.parts if part.kind == "event"] == [(0,), (1,), (2,), (3,), (4,)]


def test_refusals_and_skips_before_the_cut_stay() -> None:
    jobs = [leased(0, b"[oops"), leased(1, {"type": "alias", "userId": "a", "messageId": "x"})]
    jobs += [leased(n, track(n)) for n in range(2, MAX_EVENTS + 12)]
    work = plan(jobs, Destination(), load_mappings(), carry_partial=True)
    assert len(work.verdicts) == MAX_EVENTS + 2
    assert (work.verdicts[0].state, work.verdicts[1].state, work.skipped) == (DEAD, OK, 1)
    assert work.verdicts[1].reason.startswith("alias call skipped")


# -- planning in steps: payloads prepared apart, then merged --------------------------------------------------


def mixed_payloads(count: int) -> list[bytes]:
    """Tracks with, every so often, an alias (skipped), a line that is not JSON, and an identify
    whose subscription is refused (refused in part)."""
    odd = [
        orjson.dumps({"type": "alias", "userId": "a", "previousId": "b", "messageId": "x"}),
        b"[oops",
        orjson.dumps(
            {"type": "identify", "userId": "i", "traits": {"email": "i@example.com", "subscribe": "??"}}
        ),
    ]
    return [odd[n % 3] if n % 97 == 5 else orjson.dumps(track(n, f"u{n % 40}")) for n in range(count)]


@pytest.mark.parametrize("splits", [(), (1,), (700, 701), (3, 999, 1500)])
def test_payloads_prepared_in_pieces_plan_as_in_one_go(splits: tuple[int, ...]) -> None:
    """A batch after held-over jobs, its payloads prepared in pieces (numbered on from the jobs
    before each) and then merged: the same plan as plan_payloads makes of it in one go."""
    destination, mappings = Destination(list_id="L1"), load_mappings()
    carried = plan_payloads(
        mixed_payloads(MAX_EVENTS + 300), destination, mappings, carry_partial=True
    ).leftover
    assert carried.jobs and carried.refused and carried.skipped
    payloads = mixed_payloads(1800)
    whole = plan_payloads(payloads, destination, mappings, carry_partial=True, carried=carried)
    bounds = [0, *splits, len(payloads)]
    pieces = [carried] + [
        prepare_payloads(payloads[a:b], destination, mappings, start=carried.jobs + a)
        for a, b in itertools.pairwise(bounds)
    ]
    assert plan_prepared(pieces, carry_partial=True) == whole
    assert whole.refused and whole.skipped and whole.leftover.jobs


def test_a_part_pickles_as_its_fields() -> None:
    request = transform(track(3), Destination(), load_mappings(), index=3)[0]
    part = prepare(request)
    assert pickle.loads(pickle.dumps(part)) == part
    as_is = dataclasses.replace(part, kind="bulk", request=request)
    assert pickle.loads(pickle.dumps(as_is)).request == request


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


def test_claims_count_the_held_over_events() -> None:
    assert claim_size(1000, 0.65, carried_events=300) == 1262  # (1120 - 300) / 0.65
    assert claim_size(1000, 1.0, carried_events=1500) == 500  # more than a job waits: half batch_size


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
    planner = Planner(MappingSets([None]), processes=1)
    try:
        await planner.start()
        there = await planner.plan(jobs, destination)
    finally:
        planner.close()
    assert there.requests == here.requests
    assert [r.payload() for r in there.requests] == [r.payload() for r in here.requests]
    assert [(v.job, v.state, v.reason) for v in there.verdicts] == [
        (v.job, v.state, v.reason) for v in here.verdicts
    ]
    assert (there.skipped, there.events, there.held) == (1, 5, [])


async def test_a_planning_process_holds_over_and_takes_leftovers_as_this_process_would() -> None:
    first, following = (
        tracks(MAX_EVENTS + 5),
        [leased(n, track(n)) for n in range(MAX_EVENTS + 5, MAX_EVENTS + 20)],
    )
    destination = Destination()
    here = plan(first, destination, load_mappings(), carry_partial=True)
    here_next = plan([*here.held, *following], destination, load_mappings(), carried=here.leftover)
    planner = Planner(MappingSets([None]), processes=1)
    try:
        there = await planner.plan(first, destination, carry_partial=True)
        there_next = await planner.plan(
            [*there.held, *following], destination, carry_partial=True, carried=there.leftover
        )
    finally:
        planner.close()
    assert (there.leftover, there.held) == (here.leftover, here.held) and there.leftover.jobs == 5
    assert [r.payload() for r in there_next.requests] == [r.payload() for r in here_next.requests]
    assert [request.sources for request in there_next.requests] == [tuple(range(20))]


def metric_file(folder: Path, metric: str) -> None:
    document = {
        "kind": "event",
        "match": {"type": ["track"], "event": ["viewed"]},
        "metric": {"value": metric},
    }
    (folder / "viewed.json").write_bytes(orjson.dumps(document))


def metric_of(work: Plan) -> str:
    name: str = work.requests[0].body["data"]["attributes"]["metric"]["data"]["attributes"]["name"]
    return name


@pytest.mark.parametrize("processes", [0, 1])
async def test_planning_uses_the_mappings_taken_at_start_or_by_the_last_reload(
    tmp_path: Path, processes: int
) -> None:
    """Edited files change nothing until a reload; a reload that fails its checks keeps the running
    set; one that passes is what every later batch is planned with, in planning processes too."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    metric_file(folder, "Seen")
    sets = MappingSets([folder])
    destination = Destination(mappings_dir=folder)
    planner = Planner(sets, processes=processes)
    try:
        await planner.start()
        assert metric_of(await planner.plan(tracks(1), destination)) == "Seen"
        metric_file(folder, "Glimpsed")
        assert metric_of(await planner.plan(tracks(1), destination)) == "Seen"  # not reloaded
        (folder / "broken.json").write_text('{"kind": "event"')
        error = sets.reload()
        assert error is not None and error.startswith(f"{folder / 'broken.json'}: not valid JSON")
        assert (sets.generation, sets.reload_error) == (1, error)
        assert metric_of(await planner.plan(tracks(1), destination)) == "Seen"  # the running set stays
        (folder / "broken.json").unlink()
        assert sets.reload() is None
        assert (sets.generation, sets.reload_error) == (2, None)
        assert metric_of(await planner.plan(tracks(1), destination)) == "Glimpsed"
    finally:
        planner.close()


def test_mapping_sets_refuse_a_broken_or_missing_folder_at_once(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.json").write_text(
        '{"kind": "event", "match": {"type": ["nope"]}, "metric": {"value": "x"}}'
    )
    with pytest.raises(MappingError, match=r"bad.json: at /match/type/0: 'nope' is not one of"):
        MappingSets([None, broken])
    with pytest.raises(MappingError, match="mappings_dir is not a folder"):
        MappingSets([tmp_path / "missing"])


def test_a_planning_process_over_a_pipe_prepares_what_this_process_would() -> None:
    """transform's planning process: started, it prepares piece after piece as sources ``start``
    on, as prepare_payloads does here; closed, it ends."""
    destination, mappings = Destination(list_id="L1"), load_mappings()
    apart = PlanningProcess(MappingSets([None]))
    try:
        while not apart.started():
            time.sleep(0.01)
        for start, payloads in ((0, mixed_payloads(300)), (7, mixed_payloads(50))):
            apart.send(payloads, destination, start)
            assert apart.prepared() == prepare_payloads(payloads, destination, mappings, start=start)
    finally:
        apart.close()
    assert not apart._process.is_alive()


def test_a_planning_process_that_died_is_named_as_the_cause() -> None:
    apart = PlanningProcess(MappingSets([None]))
    try:
        while not apart.started():
            time.sleep(0.01)
        assert apart._process.pid is not None
        os.kill(apart._process.pid, signal.SIGKILL)
        apart._process.join()
        with pytest.raises(RuntimeError, match=r"the planning process ended \(exit code -9\)"):
            apart.prepared()
    finally:
        apart.close()


async def test_planning_processes_collect_garbage_as_rarely_as_the_router() -> None:
    planner = Planner(MappingSets([None]), processes=1)
    try:
        await planner.start()
        thresholds = await asyncio.get_running_loop().run_in_executor(planner._executor(), gc.get_threshold)
    finally:
        planner.close()
    assert thresholds == (50_000, 20, 20)  # a spawned process starts with (700, 10, 10)


async def test_a_dead_planning_process_fails_the_batch_and_a_new_one_takes_over() -> None:
    planner = Planner(MappingSets([None]), processes=1)
    try:
        await planner.start()
        pool = planner._executor()
        for process in list(pool._processes.values()):
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            await planner.plan(tracks(2), Destination())
        work = await planner.plan(tracks(2), Destination())
    finally:
        planner.close()
    assert work.events == 2


def test_plan_payloads_is_plain_data() -> None:
    planned = plan_payloads([orjson.dumps(track(1))], Destination(), load_mappings())
    assert pickle.loads(pickle.dumps(planned)) == planned


def test_steps_already_done_are_not_planned_again() -> None:
    """An identify is two steps (upsert, subscription); with the upsert in its progress only the
    subscription is planned, and with both nothing: the job is done."""
    message = {
        "type": "identify",
        "userId": "u1",
        "messageId": "m1",
        "traits": {"email": "a@example.com", "properties": {"listId": "L1", "subscribe": True}},
    }
    payload = orjson.dumps(message)
    kinds = [
        [
            (send.stage, send.kind)
            for send in plan_payloads([payload], Destination(), load_mappings(), progress=[done]).sends()
        ]
        for done in (0, STEP_BITS["profile"], STEP_BITS["profile"] | STEP_BITS["subscribe"])
    ]
    assert kinds == [[(0, "profile"), (2, "subscribe")], [(2, "subscribe")], []]
