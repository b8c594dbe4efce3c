"""Streamed planning for ``transform --batch`` and ``replay --dry-run`` (router/preview.py): windows
keep every profile's order, and planning in a process of its own writes the same lines."""

from __future__ import annotations

import io

import orjson
from pytest_aiohttp import AiohttpClient
from test_end_to_end import Expected, Observed, applied, load_mix

from router.destination import Destination
from router.mapping import load_mappings
from router.preview import BatchPreview

PRIVATE_KEY = "pk_preview_0123456789"


def planned(events: list[dict[str, object]] | list[bytes], *, window: int, processes: int = 0) -> bytes:
    destination = Destination(private_key=PRIVATE_KEY)
    out = io.BytesIO()
    preview = BatchPreview(out, destination, load_mappings(None), window=window, processes=processes)
    for event in events:
        preview.add(event if isinstance(event, bytes) else orjson.dumps(event))
    preview.finish()
    return out.getvalue()


async def test_windows_keep_each_profiles_order(aiohttp_client: AiohttpClient) -> None:
    """The mix in windows of 50 (about thirty windows, event jobs carried across them), sent in
    order: the fake ends as the messages one by one say, each event once."""
    events = load_mix()
    expected = Expected.of(events, Destination(private_key=PRIVATE_KEY))
    lines = [orjson.loads(line) for line in planned(events, window=50).splitlines()]
    assert [line for line in lines if "path" not in line] == []
    fake = await applied(aiohttp_client, lines, expected.lists)
    assert expected.problems(Observed.of(fake.to_json())) == []
    assert fake.duplicate_events == 0
    assert len(fake.events) == 650
    event_jobs = [line for line in lines if line["path"] == "/api/event-bulk-create-jobs"]
    assert len(event_jobs) > 1


def test_planning_apart_writes_the_same_lines() -> None:
    """Three times the mix in windows of 1000: planned here, or in a planning process while the
    next window is read, the output is byte for byte the same."""
    events = [{**e, "messageId": f"{e['messageId']}-{k}"} for k in range(3) for e in load_mix()]
    here = planned(events, window=1000)
    apart = planned(events, window=1000, processes=1)
    assert apart == here
    assert here.count(b'"/api/event-bulk-create-jobs"') == 2


def test_planning_apart_in_small_windows_writes_the_same_lines() -> None:
    """Windows of 50 (jobs held over across most of them, the planning process's share moving),
    with inputs refused, skipped, refused in part and warned about among them: planned apart or
    here, the same lines, each input's refusal, skip or warning once, in input order."""
    odd = [
        b"[not json",
        orjson.dumps({"type": "alias", "userId": "a", "previousId": "b"}),
        orjson.dumps(
            {"type": "identify", "userId": "i", "traits": {"email": "i@example.com", "subscribe": "??"}}
        ),
        orjson.dumps(
            {
                "type": "identify",
                "userId": "w",
                "traits": {
                    "email": "w@example.com",
                    "properties": {"listId": "L1", "subscribe": True, "consent": ["email", "web"]},
                },
            }
        ),
    ]
    events: list[bytes] = []
    for k in range(2):
        for n, event in enumerate(load_mix()):
            events.append(orjson.dumps({**event, "messageId": f"{event['messageId']}-{k}"}))
            if n % 37 == 3:
                events.append(odd[n % len(odd)])
    here = planned(events, window=50)
    apart = planned(events, window=50, processes=1)
    assert apart == here
    lines = [orjson.loads(line) for line in here.splitlines()]
    indexes = [line["index"] for line in lines if "index" in line]
    assert indexes == sorted(set(indexes)) and len(indexes) >= 4 * 2
    assert {key for line in lines for key in ("error", "skipped", "warning") if key in line} == {
        "error",
        "skipped",
        "warning",
    }
