"""Who an event is about: the identifiers of a RudderStack/Segment message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _first_trait(message: Mapping[str, Any], key: str) -> Any:
    for holder in (
        message.get("traits"),
        (message.get("context") or {}).get("traits"),
        message.get("properties"),
    ):
        if isinstance(holder, Mapping):
            value = holder.get(key)
            if value not in (None, ""):
                return value
    return None


def ordering_key(message: Mapping[str, Any]) -> str | None:
    """The identity that orders a profile's jobs: userId, else anonymousId, else email, else phone."""
    for key, tag in (("userId", "u"), ("anonymousId", "a")):
        value = message.get(key)
        if value not in (None, ""):
            return f"{tag}:{value}"
    for key, tag in (("email", "e"), ("phone", "p")):
        value = _first_trait(message, key)
        if value is not None:
            return f"{tag}:{value}"
    return None
