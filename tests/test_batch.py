"""Merging single-endpoint requests into Klaviyo's bulk jobs (``router.klaviyo.batch``)."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from router.destination import Destination
from router.klaviyo.batch import MAX_BYTES, MAX_EVENTS, MAX_PROFILES, MAX_SUBSCRIBE, MAX_UNSUBSCRIBE, batch
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import load_mappings
from router.transform import transform

DESTINATION = Destination(private_key="pk_test", list_id="LIST1")
MAPPINGS = load_mappings(None)

EVENTS_JOB = "/api/event-bulk-create-jobs"
PROFILES_JOB = "/api/profile-bulk-import-jobs"
SUBSCRIBE_JOB = "/api/profile-subscription-bulk-create-jobs"
UNSUBSCRIBE_JOB = "/api/profile-subscription-bulk-delete-jobs"


def run(messages: Sequence[dict[str, Any]], destination: Destination = DESTINATION) -> list[KlaviyoRequest]:
    """The single-endpoint requests of ``messages``, in input order, with their indexes."""
    return [r for i, m in enumerate(messages) for r in transform(m, destination, MAPPINGS, index=i)]


def track(user: str, message_id: str | None, event: str = "Ordered", **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "track", "event": event, "userId": user, "properties": {}, **extra}
    if message_id is not None:
        message["messageId"] = message_id
    return message


def identify(user: str, subscribe: bool | None = None, list_id: str | None = None) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if subscribe is not None:
        properties["subscribe"] = subscribe
    if list_id is not None:
        properties["listId"] = list_id
    return {
        "type": "identify",
        "userId": user,
        "traits": {"email": f"{user}@example.com", "properties": properties},
    }


def profile_request(i: int) -> KlaviyoRequest:
    """A profile upsert built directly (cheap enough for 10 000+)."""
    body = {"data": {"type": "profile", "attributes": {"email": f"p{i}@example.com"}}}
    return KlaviyoRequest(method="POST", path="/api/profile-import", body=body, kind="profile", sources=(i,))


def events_of(job: KlaviyoRequest) -> list[dict[str, Any]]:
    """Every event of a bulk events job, profile entries in order."""
    entries = job.body["data"]["attributes"]["events-bulk-create"]["data"]
    return [event for entry in entries for event in entry["attributes"]["events"]["data"]]


def profiles_of(job: KlaviyoRequest) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = job.body["data"]["attributes"]["profiles"]["data"]
    return data


def list_of(job: KlaviyoRequest) -> str:
    relationships = job.body["data"]["relationships"]
    if "list" in relationships:
        return str(relationships["list"]["data"]["id"])
    return str(relationships["lists"]["data"][0]["id"])


class TestSingleItems:
    """One waiting item of a kind stays on its single endpoint, unchanged."""

    def test_nothing_in_nothing_out(self) -> None:
        """An empty batch sends nothing."""
        assert batch([]) == []

    @pytest.mark.parametrize(
        ("message", "path"),
        [
            (track("u1", "m1"), "/api/events"),
            ({"type": "identify", "userId": "u1"}, "/api/profile-import"),
        ],
        ids=["event", "profile"],
    )
    def test_single_request_is_passed_through(self, message: dict[str, Any], path: str) -> None:
        """The very request the transform made is sent."""
        requests = run([message])
        assert batch(requests) == requests
        assert requests[0].path == path

    def test_one_profile_with_one_subscription_stays_single(self) -> None:
        """An identify with a subscription: profile-import, then the single subscribe job as it was."""
        requests = run([identify("u1", subscribe=True)])
        out = batch(requests)
        assert [r.path for r in out] == ["/api/profile-import", SUBSCRIBE_JOB]
        assert out == requests

    def test_one_profile_next_to_many_events(self) -> None:
        """Kinds are counted separately: one profile stays single while two events are merged."""
        out = batch(run([identify("u1"), track("u1", "m1"), track("u2", "m2")]))
        assert [r.path for r in out] == ["/api/profile-import", EVENTS_JOB]


class TestEventJobs:
    """More than one event → event-bulk-create-jobs: ≤ 1000 events, grouped by profile, no repeated unique_id."""

    def test_events_grouped_by_profile_in_order(self) -> None:
        """Events of one profile share an entry; entries and events keep input order; item_sources trace them."""
        out = batch(run([track("u1", "m1"), track("u2", "m2"), track("u1", "m3")]))
        assert [r.path for r in out] == [EVENTS_JOB]
        job = out[0]
        entries = job.body["data"]["attributes"]["events-bulk-create"]["data"]
        assert [e["attributes"]["profile"]["data"]["attributes"]["external_id"] for e in entries] == [
            "u1",
            "u2",
        ]
        assert [e["attributes"]["unique_id"] for e in events_of(job)] == ["m1", "m3", "m2"]
        assert job.item_sources == ((0, 2), (1,))
        assert job.sources == (0, 1, 2)
        assert job.kind == "bulk"

    def test_bulk_events_have_no_profile_inside(self) -> None:
        """Each bulk event carries metric/properties/unique_id; the profile is the entry's."""
        job = batch(run([track("u1", "m1"), track("u1", "m2")]))[0]
        for event in events_of(job):
            assert event["type"] == "event"
            assert "profile" not in event["attributes"]
            assert event["attributes"]["metric"]["data"]["attributes"]["name"] == "Ordered"

    def test_2500_events_make_three_jobs(self) -> None:
        """1000 + 1000 + 500, every input once, in order."""
        messages = [track(f"u{i % 7}", f"m{i}") for i in range(2500)]
        out = batch(run(messages))
        assert [r.path for r in out] == [EVENTS_JOB] * 3
        assert [len(events_of(job)) for job in out] == [MAX_EVENTS, MAX_EVENTS, 500]
        sources = [s for job in out for s in job.sources]
        assert sorted(sources) == list(range(2500))
        assert all(max(job.sources) < min(later.sources) for job, later in itertools.pairwise(out))

    def test_repeated_unique_id_goes_to_a_later_job(self) -> None:
        """A (metric, unique_id) pair repeated is never twice in one job; the repeat comes after the first."""
        out = batch(run([track("u1", "m1"), track("u2", "m2"), track("u1", "m1"), track("u3", "m3")]))
        assert [r.path for r in out] == [EVENTS_JOB, EVENTS_JOB]
        assert out[0].sources == (0, 1, 3)
        assert out[1].sources == (2,)
        for job in out:
            keys = Counter(
                (e["attributes"]["metric"]["data"]["attributes"]["name"], e["attributes"]["unique_id"])
                for e in events_of(job)
            )
            assert max(keys.values()) == 1

    def test_three_repeats_make_three_jobs_in_order(self) -> None:
        """Each repeat goes one job further than the previous copy, so their order is kept."""
        out = batch(run([track("u1", "m1", n=i) for i in range(3)]))
        assert [job.sources for job in out] == [(0,), (1,), (2,)]

    def test_same_unique_id_other_metric_shares_a_job(self) -> None:
        """The key is metric and unique_id together."""
        out = batch(run([track("u1", "m1", event="A"), track("u1", "m1", event="B")]))
        assert len(out) == 1
        assert len(events_of(out[0])) == 2

    def test_events_without_unique_id_are_never_repeats(self) -> None:
        """Events with no messageId share a job."""
        out = batch(run([track("u1", None), track("u1", None), track("u1", None)]))
        assert len(out) == 1
        assert len(events_of(out[0])) == 3
        assert all("unique_id" not in e["attributes"] for e in events_of(out[0]))

    def test_meta_moves_beside_attributes(self) -> None:
        """In bulk events a profile's meta sits beside attributes (inside them on /api/events)."""
        patch: dict[str, Any] = {"integrations": {"Klaviyo": {"fieldsToUnset": ["plan"]}}}
        requests = run([track("u1", "m1", **patch), track("u2", "m2")])
        single = requests[0].body["data"]["attributes"]["profile"]["data"]
        assert single["attributes"]["meta"] == {"patch_properties": {"unset": ["plan"]}}
        job = batch(requests)[0]
        profile = job.body["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]["profile"][
            "data"
        ]
        assert profile["meta"] == {"patch_properties": {"unset": ["plan"]}}
        assert "meta" not in profile["attributes"]
        assert profile["attributes"] == {"external_id": "u1"}

    def test_size_cap_splits_jobs(self) -> None:
        """Events whose bodies together pass the 5 MB cap are split even under 1000 events."""
        big = "x" * (MAX_BYTES // 2 - 1000)
        out = batch(run([track(f"u{i}", f"m{i}", properties={"blob": big}) for i in range(3)]))
        assert len(out) == 2
        assert all(len(orjson.dumps(job.body)) <= MAX_BYTES for job in out)
        assert [s for job in out for s in job.sources] == [0, 1, 2]  # all there, in order


class TestProfileJobs:
    """More than one profile upsert → profile-bulk-import-jobs of ≤ 10 000 profiles."""

    def test_profiles_merge_in_order(self) -> None:
        """Profiles keep input order; each item is traced to its input."""
        out = batch(run([identify("a"), identify("b"), identify("c")]))
        assert [r.path for r in out] == [PROFILES_JOB]
        job = out[0]
        assert job.body["data"]["type"] == "profile-bulk-import-job"
        assert [p["attributes"]["external_id"] for p in profiles_of(job)] == ["a", "b", "c"]
        assert job.item_sources == ((0,), (1,), (2,))
        assert "relationships" not in job.body["data"]

    def test_10001_profiles_make_two_jobs(self) -> None:
        """10 000 + 1."""
        out = batch([profile_request(i) for i in range(MAX_PROFILES + 1)])
        assert [len(profiles_of(job)) for job in out] == [MAX_PROFILES, 1]
        assert out[1].sources == (MAX_PROFILES,)
        assert profiles_of(out[1])[0]["attributes"]["email"] == f"p{MAX_PROFILES}@example.com"


class TestListJobs:
    """Subscriptions ≤ 1000 and unsubscriptions ≤ 100 per job, one job per list, after the profile upserts."""

    def test_1001_subscribes_make_two_jobs(self) -> None:
        """1000 + 1, each with the list relationship."""
        out = batch(run([identify(f"u{i}", subscribe=True) for i in range(MAX_SUBSCRIBE + 1)]))
        jobs = [r for r in out if r.path == SUBSCRIBE_JOB]
        assert [len(profiles_of(job)) for job in jobs] == [MAX_SUBSCRIBE, 1]
        assert {list_of(job) for job in jobs} == {"LIST1"}

    def test_101_unsubscribes_make_two_jobs(self) -> None:
        """100 + 1."""
        out = batch(run([identify(f"u{i}", subscribe=False) for i in range(MAX_UNSUBSCRIBE + 1)]))
        jobs = [r for r in out if r.path == UNSUBSCRIBE_JOB]
        assert [len(profiles_of(job)) for job in jobs] == [MAX_UNSUBSCRIBE, 1]
        consents = {
            p["attributes"]["subscriptions"]["email"]["marketing"]["consent"]
            for j in jobs
            for p in profiles_of(j)
        }
        assert consents == {"UNSUBSCRIBED"}

    def test_one_job_per_list(self) -> None:
        """Subscriptions to different lists never share a job; each job keeps its list."""
        messages = [identify(f"u{i}", subscribe=True, list_id=f"L{i % 2}") for i in range(6)]
        jobs = [r for r in batch(run(messages)) if r.path == SUBSCRIBE_JOB]
        assert sorted((list_of(job), job.sources) for job in jobs) == [("L0", (0, 2, 4)), ("L1", (1, 3, 5))]

    def test_list_membership_without_consent(self) -> None:
        """Subscribe with no consent channel → profile-bulk-import-jobs with the list relationship, per list."""
        no_consent = Destination(private_key="pk_test", list_id="LIST1", consent=())
        requests = run([identify("a", subscribe=True), identify("b", subscribe=True)], no_consent)
        out = batch(requests)
        assert [r.path for r in out] == [PROFILES_JOB, PROFILES_JOB]
        upserts, membership = out
        assert "relationships" not in upserts.body["data"]
        assert membership.body["data"]["relationships"] == {
            "lists": {"data": [{"type": "list", "id": "LIST1"}]}
        }
        assert [p["attributes"]["email"] for p in profiles_of(membership)] == [
            "a@example.com",
            "b@example.com",
        ]

    def test_profile_upserts_come_before_list_jobs(self) -> None:
        """Upserts, then events, then list jobs, whatever the input order."""
        messages = [
            identify("a", subscribe=True),
            track("a", "m1"),
            identify("b", subscribe=True),
            track("b", "m2"),
        ]
        assert [r.path for r in batch(run(messages))] == [PROFILES_JOB, EVENTS_JOB, SUBSCRIBE_JOB]

    @pytest.mark.parametrize(
        "operations",
        [
            [("a", True), ("a", False)],
            [("a", False), ("a", True)],
            [("x", False), ("a", True), ("a", False)],
            [("x", True), ("a", False), ("a", True)],
            [("x", False), ("a", True), ("a", False), ("a", True)],
            [("a", True), ("b", False), ("a", False), ("b", True), ("a", True), ("a", False)],
        ],
        ids=lambda ops: " ".join(f"{'+' if on else '-'}{who}" for who, on in ops),
    )
    def test_profile_ends_in_its_last_state(self, operations: list[tuple[str, bool]]) -> None:
        """Replaying the jobs leaves each profile as its last message said; every input is accounted for."""
        out = batch(run([identify(who, subscribe=on) for who, on in operations]))
        assert replay(out) == {(f"{who}@example.com", "LIST1"): on for who, on in operations}
        assert sorted(s for r in out if r.path != PROFILES_JOB for s in r.sources) == list(
            range(len(operations))
        )

    def test_flips_on_other_lists_are_independent(self) -> None:
        """Subscribe on one list and unsubscribe on another: each happens, one job per list."""
        messages = [
            identify("a", subscribe=True, list_id="L1"),
            identify("a", subscribe=False, list_id="L2"),
            identify("b", subscribe=True, list_id="L1"),
        ]
        out = batch(run(messages))
        jobs = [(r.path, list_of(r), r.sources) for r in out if r.path != PROFILES_JOB]
        assert jobs == [(SUBSCRIBE_JOB, "L1", (0, 2)), (UNSUBSCRIBE_JOB, "L2", (1,))]
        assert replay(out) == {
            ("a@example.com", "L1"): True,
            ("a@example.com", "L2"): False,
            ("b@example.com", "L1"): True,
        }


def replay(out: Sequence[KlaviyoRequest]) -> dict[tuple[str, str], bool]:
    """(email, list) → subscribed, after running the subscription jobs in the order given."""
    state: dict[tuple[str, str], bool] = {}
    for request in out:
        if request.path in (SUBSCRIBE_JOB, UNSUBSCRIBE_JOB):
            for profile in profiles_of(request):
                state[(profile["attributes"]["email"], list_of(request))] = request.path == SUBSCRIBE_JOB
    return state


class TestTracing:
    """Every bulk item names the inputs behind it, and batching changes none of its inputs."""

    def test_item_sources_cover_every_input(self) -> None:
        """Each bulk request has one item_sources entry per data item; together they cover every input."""
        messages = [identify(f"u{i}", subscribe=i % 2 == 0) for i in range(6)] + [
            track(f"u{i}", f"m{i}") for i in range(6)
        ]
        requests = run(messages)
        out = batch(requests)
        for job in out:
            data = job.body["data"]
            if job.path == EVENTS_JOB:
                items = data["attributes"]["events-bulk-create"]["data"]
            else:
                items = data["attributes"]["profiles"]["data"]
            assert len(job.item_sources) == len(items)
            assert job.sources == tuple(sorted({s for item in job.item_sources for s in item}))
        assert sorted(s for job in out for s in job.sources) == sorted(s for r in requests for s in r.sources)

    def test_batch_does_not_change_its_input(self) -> None:
        """The requests given to batch are left as they were."""
        patch: dict[str, Any] = {"integrations": {"Klaviyo": {"fieldsToUnset": ["plan"]}}}
        requests = run(
            [track("u1", "m1", **patch), track("u1", "m2", **patch), identify("a", True), identify("b", True)]
        )
        before = copy.deepcopy([r.body for r in requests])
        batch(requests)
        assert [r.body for r in requests] == before


class TestAsSent:
    """Requests RudderStack already transformed, and list ids JSON must escape."""

    @staticmethod
    def passthrough(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"output": {"endpointPath": path, "body": {"JSON": body}}, "statusCode": 200}

    def test_bulk_jobs_and_misshapen_bodies_go_as_they_are(self) -> None:
        """A finished bulk job, and an event whose body is not shaped as one, are each sent alone and
        unchanged, after the merged profiles and events and before the list jobs."""
        bulk = {"data": {"type": "event-bulk-create-job", "attributes": {"events-bulk-create": {"data": []}}}}
        odd_event = {"data": {"type": "event", "attributes": {"properties": {}}}}  # no metric, no profile
        messages = [
            self.passthrough("/api/event-bulk-create-jobs", bulk),
            self.passthrough("/api/events", odd_event),
            identify("a", subscribe=True),
            track("a", "m1"),
            track("b", "m2"),
        ]
        out = batch(run(messages))
        assert [(r.path, r.sources) for r in out] == [
            ("/api/profile-import", (2,)),
            (EVENTS_JOB, (3, 4)),
            ("/api/event-bulk-create-jobs", (0,)),
            ("/api/events", (1,)),
            (SUBSCRIBE_JOB, (2,)),
        ]
        assert (out[2].body, out[3].body) == (bulk, odd_event)

    @pytest.mark.parametrize("list_id", ['L"1', "L\\2", "Ü\u2028", '"profiles":{"data":[]}'])
    def test_list_ids_that_json_escapes(self, list_id: str) -> None:
        """The list job's envelope keeps any list id intact, alone or merged."""
        for count in (1, 3):
            out = batch(run([identify(f"u{i}", subscribe=True, list_id=list_id) for i in range(count)]))
            (job,) = [r for r in out if r.path == SUBSCRIBE_JOB]
            assert list_of(job) == list_id
            assert [p["attributes"]["email"] for p in profiles_of(job)] == [
                f"u{i}@example.com" for i in range(count)
            ]

    def test_encoded_bodies_are_what_is_sent(self) -> None:
        """Each request's bytes decode to its body, and re-encoding the body gives the same bytes."""
        messages = [identify(f"u{i}", subscribe=i % 3 == 0) for i in range(5)] + [
            track(f"u{i % 2}", f"m{i}") for i in range(5)
        ]
        for request in batch(run(messages)):
            assert orjson.dumps(orjson.loads(request.payload())) == request.payload()
            assert orjson.dumps(request.body) == request.payload()
