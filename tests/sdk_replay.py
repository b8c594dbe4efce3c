"""Replaying captured events through a real SDK client's public calls (shared by tests)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson


def replay(client: Any, events: Iterable[Mapping[str, Any]]) -> None:
    """Send each event with ``identify`` / ``track`` / ``group`` of ``client``, then shut it down.

    ``client`` is a ``rudderstack.analytics.Client`` or a ``segment.analytics.Client``: both take
    the same keyword arguments. Each event is copied first, because the SDKs mutate ``context``.
    """
    try:
        for raw in events:
            event = orjson.loads(orjson.dumps(raw))
            common = {
                "user_id": event.get("userId"),
                "anonymous_id": event.get("anonymousId"),
                "context": event.get("context") or {},
                "integrations": event.get("integrations") or {},
                "timestamp": datetime.fromisoformat(event["timestamp"]),
                "message_id": event["messageId"],
            }
            if event["type"] == "identify":
                client.identify(traits=event.get("traits") or {}, **common)
            elif event["type"] == "track":
                client.track(event=event["event"], properties=event.get("properties") or {}, **common)
            elif event["type"] == "group":
                client.group(group_id=event["groupId"], traits=event.get("traits") or {}, **common)
            else:
                raise AssertionError(f"unexpected type in the mix: {event['type']}")
    finally:
        client.shutdown()
