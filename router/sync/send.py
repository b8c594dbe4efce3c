"""The Klaviyo side of a sync, through the router's own client (pacing per endpoint, classification).

Every call is retried while Klaviyo says "later" (429 with ``Retry-After``, 5xx, timeouts), up to a
number of attempts; 401/403 stop the run with "Invalid credentials". Bulk import jobs are followed
to their end (:func:`router.klaviyo.imports.follow`) and their import errors returned by item
index. Bodies of import jobs are joined from the profiles' JSON bytes, encoded once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

import orjson

from router.klaviyo.client import KlaviyoClient, Outcome
from router.klaviyo.imports import IMPORT_PATH, ImportResult, follow, job_id
from router.klaviyo.imports import _relative as relative_link
from router.klaviyo.requests import KlaviyoRequest
from router.sync.plan import MAX_FILTER_VALUES
from router.transform import _subscriptions as subscriptions

#: Seconds a Retry-After of a list creation may name before it is taken for the daily cap.
DAILY_CAP_SECONDS: Final = 120.0
MAX_LISTS_REMEDY: Final = (
    "Klaviyo supports up to 1000 lists and segments in an account at any time. Remove unused "
    "lists or segments in Klaviyo, then run the sync again (or sync to an existing list)."
)


class Refused(Exception):
    """The run cannot go on; one line for the operator (exit status 1)."""


class Klaviyo:
    """One destination's Klaviyo account, as a sync uses it."""

    def __init__(
        self,
        client: KlaviyoClient,
        *,
        attempts: int = 8,
        import_wait: float = 900.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.attempts = attempts
        self.import_wait = import_wait
        self._sleep = sleep
        #: Requests sent so far, retries included (for the summary).
        self.requests = 0

    async def send(self, request: KlaviyoRequest) -> Outcome:
        """Send until Klaviyo answers something final; 401/403 raise :class:`Refused`."""
        outcome = Outcome("retry", 0)
        for attempt in range(self.attempts):
            self.requests += 1
            outcome = await self.client.send(request)
            if outcome.kind == "auth":
                raise Refused(f"Invalid credentials: {outcome.detail}")
            if outcome.kind != "retry":
                return outcome
            wait = outcome.retry_after if outcome.retry_after is not None else min(30.0, 0.5 * 2**attempt)
            await self._sleep(wait + random.uniform(0, 0.25))
        return outcome

    async def get(self, path: str) -> Outcome:
        return await self.send(KlaviyoRequest(method="GET", path=path, body={}))

    # -- the list -------------------------------------------------------------------------------------

    async def find_list(self, name: str) -> str | None:
        """The id of the list called ``name`` (also the first call: it checks the key)."""
        path: str | None = f"/api/lists?filter={quote(_filter('equals', 'name', [name]))}"
        while path:
            outcome = await self.get(path)
            if outcome.kind != "ok":
                raise Refused(f"cannot read the account's lists: {outcome.detail}")
            page = orjson.loads(outcome.body)
            for item in page.get("data") or []:
                if (item.get("attributes") or {}).get("name") == name:
                    return str(item["id"])
            path = _next(page)
        return None

    async def create_list(self, name: str) -> str:
        """A new list; refused at Klaviyo's 1000 lists and segments, or its daily creation cap."""
        body = {"data": {"type": "list", "attributes": {"name": name}}}
        outcome = await self.client.send(KlaviyoRequest(method="POST", path="/api/lists", body=body))
        self.requests += 1
        if outcome.kind == "auth":
            raise Refused(f"Invalid credentials: {outcome.detail}")
        if outcome.status == 429 and (outcome.retry_after or 0) > DAILY_CAP_SECONDS:
            raise Refused(
                f"Daily list creation limit reached: Klaviyo creates at most 150 lists a day; it accepts "
                f"list {name!r} again in {(outcome.retry_after or 0) / 3600:.1f} h. Create the list in Klaviyo, "
                "or run the sync later."
            )
        if outcome.kind == "retry":
            outcome = await self.send(KlaviyoRequest(method="POST", path="/api/lists", body=body))
        if outcome.kind != "ok":
            if "limit" in outcome.detail.lower() or "maximum" in outcome.detail.lower():
                raise Refused(f"Maximum number of lists exceeded: {outcome.detail}. {MAX_LISTS_REMEDY}")
            raise Refused(f"cannot create list {name!r}: {outcome.detail}")
        return str(orjson.loads(outcome.body)["data"]["id"])

    # -- import jobs ----------------------------------------------------------------------------------

    async def import_profiles(
        self, items: Sequence[bytes], list_id: str | None
    ) -> tuple[str | None, Outcome]:
        """Submit one bulk import job of encoded profiles; its id when Klaviyo accepted it."""
        request = KlaviyoRequest.from_json(import_body(items, list_id), path=IMPORT_PATH)
        outcome = await self.send(request)
        return (job_id(outcome.body) if outcome.kind == "ok" else None), outcome

    async def follow(self, job: str) -> ImportResult:
        """Wait for a job's end; its refused items by index."""
        return await follow(self, job, wait=self.import_wait, sleep=self._sleep)

    async def subscribe(
        self, profiles: Sequence[Mapping[str, Any]], list_id: str, channels: tuple[str, ...]
    ) -> tuple[Outcome | None, list[int]]:
        """One bulk subscribe job (≤ 1000) for the profiles' identifiers on ``channels``, into the list.

        Returns the outcome (``None`` when nothing could be subscribed) and the indexes of profiles
        with no identifier for any of the channels (the same rule as the event path's).
        """
        entries: list[dict[str, Any]] = []
        unmatched: list[int] = []
        for index, profile in enumerate(profiles):
            attributes = profile["attributes"]
            identifiers = {k: attributes[k] for k in ("email", "phone_number") if k in attributes}
            chosen = subscriptions(channels, identifiers, "SUBSCRIBED")
            if not chosen:
                unmatched.append(index)
                continue
            entries.append({"type": "profile", "attributes": {**identifiers, "subscriptions": chosen}})
        if not entries:
            return None, unmatched
        body = {
            "data": {
                "type": "profile-subscription-bulk-create-job",
                "attributes": {"profiles": {"data": entries}},
                "relationships": {"list": {"data": {"type": "list", "id": list_id}}},
            }
        }
        path = "/api/profile-subscription-bulk-create-jobs"
        return await self.send(KlaviyoRequest(method="POST", path=path, body=body)), unmatched

    # -- removal --------------------------------------------------------------------------------------

    async def profile_ids(self, identifier: str, values: Sequence[str]) -> dict[str, str]:
        """Klaviyo ids of the profiles holding ``identifier`` = each value (≤ 100), by value."""
        assert len(values) <= MAX_FILTER_VALUES
        path: str | None = f"/api/profiles?filter={quote(_filter('any', identifier, values))}&page[size]=100"
        found: dict[str, str] = {}
        while path:
            outcome = await self.get(path)
            if outcome.kind != "ok":
                raise Refused(f"cannot look profiles up by {identifier}: {outcome.detail}")
            page = orjson.loads(outcome.body)
            for item in page.get("data") or []:
                value = (item.get("attributes") or {}).get(identifier)
                if isinstance(value, str):
                    found[value.lower() if identifier == "email" else value] = str(item["id"])
            path = _next(page)
        return found

    async def remove(self, list_id: str, profile_ids: Iterable[str]) -> Outcome:
        """Remove profiles (≤ 1000) from the list; their consent is untouched."""
        body = {"data": [{"type": "profile", "id": profile_id} for profile_id in profile_ids]}
        path = f"/api/lists/{list_id}/relationships/profiles"
        return await self.send(KlaviyoRequest(method="DELETE", path=path, body=body))


def import_body(items: Sequence[bytes], list_id: str | None) -> bytes:
    """A bulk import job's body around already encoded profiles (with the list, when there is one)."""
    relationships = b""
    if list_id is not None:
        relationships = (
            b',"relationships":{"lists":{"data":[{"type":"list","id":' + orjson.dumps(list_id) + b"}]}}"
        )
    return (
        b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
        + b",".join(items)
        + b"]}}"
        + relationships
        + b"}}"
    )


def _filter(operator: str, field: str, values: Sequence[str]) -> str:
    """Klaviyo's filter syntax: ``equals(name,"VIP")``, ``any(email,["a@x.com","b@y.com"])``."""
    if operator == "equals":
        return f"equals({field},{orjson.dumps(values[0]).decode()})"
    return f"any({field},{orjson.dumps(list(values)).decode()})"


def _next(page: Any) -> str | None:
    """The path of the next page (``links.next``), if there is one."""
    return relative_link((page.get("links") or {}).get("next") if isinstance(page, dict) else None)
