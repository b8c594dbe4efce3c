"""Fault injection: scripted statuses, random 5xx, timeouts, revoked keys and invalid bulk items.

Everything here is plain data that can be set at construction, through :class:`Faults` methods, or from
JSON (the control API's ``POST /__fake__/faults``) via :meth:`Faults.configure`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Statuses drawn by the random 5xx fault unless configured otherwise.
DEFAULT_RANDOM_STATUSES = (500, 502, 503, 504)


@dataclass(frozen=True, slots=True)
class Scripted:
    """One scripted answer: an HTTP status (``< 300`` means "handle normally") or a timeout."""

    status: int = 200
    #: ``Retry-After`` header to send, in seconds.
    retry_after: int | None = None
    #: Hold the request past the client's timeout, then drop the connection.
    timeout: bool = False
    detail: str | None = None

    @property
    def passes(self) -> bool:
        """True when the request should be handled normally."""
        return not self.timeout and self.status < 300

    @classmethod
    def parse(cls, raw: object) -> Scripted:
        """From ``503``, ``"timeout"``, ``"pass"`` or ``{"status": 429, "retry_after": 2}``."""
        if isinstance(raw, Scripted):
            return raw
        if isinstance(raw, bool):
            raise ValueError(f"not a scripted response: {raw!r}")
        if isinstance(raw, int):
            return cls(status=raw)
        if raw == "timeout":
            return cls(timeout=True)
        if raw == "pass":
            return cls()
        if isinstance(raw, Mapping):
            return cls(
                status=int(raw.get("status", 200)),
                retry_after=None if raw.get("retry_after") is None else int(raw["retry_after"]),
                timeout=bool(raw.get("timeout", False)),
                detail=raw.get("detail"),
            )
        raise ValueError(f"not a scripted response: {raw!r}")


@dataclass(slots=True)
class BulkFailure:
    """Items of a bulk job to report invalid (``400``, nothing from the job applied).

    ``indices`` name entries of the job's top-level array (for bulk events, the per-profile entries) and
    apply to the next matching job only; ``values`` name any entry containing one of those strings
    (say an email) anywhere inside, for as long as the failure is configured.
    """

    operation_id: str
    indices: frozenset[int] = frozenset()
    values: frozenset[str] = frozenset()
    detail: str = "Invalid input."
    used: bool = False

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> BulkFailure:
        """From ``{"operation_id", "indices"?, "values"?, "detail"?}``."""
        return cls(
            operation_id=str(raw["operation_id"]),
            indices=frozenset(int(index) for index in raw.get("indices", ())),
            values=frozenset(str(value) for value in raw.get("values", ())),
            detail=str(raw.get("detail", "Invalid input.")),
        )

    @property
    def active(self) -> bool:
        """Still has something to fail."""
        return bool(self.values) or (bool(self.indices) and not self.used)


def _string_pointers(node: object, prefix: str) -> Iterator[tuple[str, str]]:
    """(pointer, value) of every string under ``node``."""
    if isinstance(node, str):
        yield prefix, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _string_pointers(value, f"{prefix}/{str(key).replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _string_pointers(value, f"{prefix}/{index}")


@dataclass(slots=True)
class Faults:
    """The faults currently configured."""

    #: Scripted answers, consumed in order, keyed by ``"METHOD /path"``, ``"/path"`` (concrete or template)
    #: or operationId.
    scripts: dict[str, deque[Scripted]] = field(default_factory=dict)
    #: Probability of answering a request with a random 5xx.
    random_5xx_rate: float = 0.0
    random_statuses: tuple[int, ...] = DEFAULT_RANDOM_STATUSES
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    #: How long a "timeout" holds a request before dropping the connection.
    hold_seconds: float = 30.0
    #: API keys answered with 401 although they are otherwise accepted.
    revoked_keys: set[str] = field(default_factory=set)
    bulk_failures: list[BulkFailure] = field(default_factory=list)

    def clear(self) -> None:
        """Remove every fault."""
        self.scripts.clear()
        self.random_5xx_rate = 0.0
        self.random_statuses = DEFAULT_RANDOM_STATUSES
        self.revoked_keys.clear()
        self.bulk_failures.clear()

    def script(self, key: str, responses: Iterable[object]) -> None:
        """Queue scripted answers for ``key`` (``"POST /api/events"``, ``"/api/events"`` or ``"create_event"``)."""
        self.scripts.setdefault(key, deque()).extend(Scripted.parse(raw) for raw in responses)

    def set_random_5xx(self, rate: float, *, seed: int | None = None, statuses: Sequence[int] = ()) -> None:
        """Answer a fraction ``rate`` of API requests with a random 5xx, reproducibly for a ``seed``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("random_5xx_rate must be between 0 and 1")
        self.random_5xx_rate = rate
        if seed is not None:
            self.rng = random.Random(seed)
        if statuses:
            self.random_statuses = tuple(statuses)

    def fail_bulk_items(
        self,
        operation_id: str,
        *,
        indices: Iterable[int] = (),
        values: Iterable[str] = (),
        detail: str = "Invalid input.",
    ) -> None:
        """Make bulk jobs of ``operation_id`` fail for the named entries (see :class:`BulkFailure`)."""
        self.bulk_failures.append(BulkFailure(operation_id, frozenset(indices), frozenset(values), detail))

    def configure(self, raw: Mapping[str, Any]) -> None:
        """Apply the control API's JSON: ``scripts``, ``random_5xx_rate``, ``seed``, ``random_statuses``,
        ``hold_seconds``, ``revoked_keys``, ``bulk_failures`` (all optional; ``clear: true`` first)."""
        if raw.get("clear"):
            self.clear()
        for key, responses in dict(raw.get("scripts", {})).items():
            self.script(str(key), list(responses))
        if "random_5xx_rate" in raw or "seed" in raw:
            self.set_random_5xx(
                float(raw.get("random_5xx_rate", self.random_5xx_rate)),
                seed=None if raw.get("seed") is None else int(raw["seed"]),
                statuses=[int(status) for status in raw.get("random_statuses", ())],
            )
        if "hold_seconds" in raw:
            self.hold_seconds = float(raw["hold_seconds"])
        self.revoked_keys.update(str(key) for key in raw.get("revoked_keys", ()))
        self.bulk_failures.extend(BulkFailure.parse(item) for item in raw.get("bulk_failures", ()))

    def next_scripted(self, keys: Sequence[str]) -> Scripted | None:
        """Pop the next scripted answer of the first key that has one."""
        for key in keys:
            queue = self.scripts.get(key)
            if queue:
                return queue.popleft()
        return None

    def random_status(self) -> int | None:
        """A random 5xx status, or ``None`` (most of the time)."""
        if self.random_5xx_rate and self.rng.random() < self.random_5xx_rate:
            return self.rng.choice(self.random_statuses)
        return None

    def invalid_items(
        self, operation_id: str, entries_pointer: str, entries: Sequence[object]
    ) -> list[tuple[str, str]]:
        """(pointer, detail) for every configured-invalid entry of a bulk job; marks one-shot failures used."""
        found: list[tuple[str, str]] = []
        for failure in self.bulk_failures:
            if failure.operation_id != operation_id or not failure.active:
                continue
            if failure.indices and not failure.used:
                hits = [index for index in sorted(failure.indices) if index < len(entries)]
                found.extend((f"{entries_pointer}/{index}", failure.detail) for index in hits)
                failure.used = bool(hits)
            for index, entry in enumerate(entries):
                found.extend(
                    (pointer, failure.detail)
                    for pointer, value in _string_pointers(entry, f"{entries_pointer}/{index}")
                    if value in failure.values
                )
        return sorted(set(found))

    def to_json(self) -> dict[str, Any]:
        """What is configured, for ``GET /__fake__/faults``."""
        return {
            "scripts": {
                key: [
                    "timeout" if item.timeout else {"status": item.status, "retry_after": item.retry_after}
                    for item in queue
                ]
                for key, queue in self.scripts.items()
                if queue
            },
            "random_5xx_rate": self.random_5xx_rate,
            "random_statuses": list(self.random_statuses),
            "hold_seconds": self.hold_seconds,
            "revoked_keys": sorted(self.revoked_keys),
            "bulk_failures": [
                {
                    "operation_id": failure.operation_id,
                    "indices": sorted(failure.indices),
                    "values": sorted(failure.values),
                    "detail": failure.detail,
                    "used": failure.used,
                }
                for failure in self.bulk_failures
            ],
        }
