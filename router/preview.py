"""The Klaviyo requests events would produce, written as they are planned (``transform`` and
``replay --dry-run``; nothing is sent).

Output is NDJSON: one ``{"method", "path", "body"}`` per request, one ``{"error", "status",
"index"}`` per input refused, one ``{"skipped", "index"}`` per input Klaviyo has no use for;
``index`` counts the inputs from 0 across every file.

Without batching (:class:`SinglePreview`) each input's requests follow it. With batching
(:class:`BatchPreview`) inputs are planned window by window as a delivery worker claims and plans
them: windows sized by :func:`router.plan.claim_size` from ``window`` (delivery's ``batch_size``:
at most twice that many inputs), each through :func:`router.plan.plan_payloads`, the workers'
planning path. Each window's requests are written before the next window is read, so memory holds
one window and its requests, whatever the input's size.

Per-profile order across windows: a window's requests all precede the next window's, as a key's
later jobs wait in the queue until its earlier ones are settled; inside a window, profile upserts
go first, then events, then list jobs, as delivery sends them. The inputs behind a window's last,
partial event job are held over (``carry_partial``, as delivery does): they are the window's last
inputs, so for every profile they come after the ones written and before the next window's; they
go out at the head of the next window's event jobs, so every event job but the last is full.
"""

from __future__ import annotations

import abc
from typing import BinaryIO, Final

import orjson

from router.destination import Destination
from router.errors import Skipped, TransformError
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import Mappings
from router.plan import NOTHING_LEFT, Leftover, claim_size, plan_payloads
from router.transform import transform

#: Inputs planned together by default (delivery's default ``batch_size``).
WINDOW: Final = 1000
#: What :func:`router.plan.plan_payloads` puts before the reasons it gives.
_TRANSFORM_REFUSED: Final = "transform: "
_NOT_JSON: Final = "payload is not valid JSON: "


def request_line(request: KlaviyoRequest) -> bytes:
    """``{"method","path","body"}`` and a newline; a bulk body is copied as the bytes it was built as."""
    head = b'{"method":' + orjson.dumps(request.method) + b',"path":' + orjson.dumps(request.path)
    return head + b',"body":' + request.payload() + b"}\n"


def error_line(index: int, error: str, status: int = TransformError.status) -> bytes:
    return orjson.dumps({"error": error, "status": status, "index": index}) + b"\n"


def skipped_line(index: int, reason: str) -> bytes:
    return orjson.dumps({"skipped": reason, "index": index}) + b"\n"


class Preview(abc.ABC):
    """Takes inputs in order and writes what they produce to ``out``; counts what it wrote."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        #: Inputs taken so far (the next one's index).
        self.inputs = 0
        self.requests = 0
        self.refused = 0
        self.skipped = 0

    @abc.abstractmethod
    def add(self, payload: bytes, where: str = "") -> None:
        """One input as JSON bytes; ``where`` names its place in the error of one that is not JSON."""

    @abc.abstractmethod
    def refuse(self, error: str, status: int = TransformError.status) -> None:
        """One input refused before planning (unreadable, or refused by validation)."""

    def finish(self) -> None:
        """Write what is still held back; then flush."""
        self.out.flush()


class SinglePreview(Preview):
    """Each input's single-endpoint requests, right after it is read."""

    def __init__(self, out: BinaryIO, destination: Destination, mappings: Mappings) -> None:
        super().__init__(out)
        self.destination = destination
        self.mappings = mappings

    def add(self, payload: bytes, where: str = "") -> None:
        index = self.inputs
        self.inputs += 1
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self._write_refused(index, _not_json(where, str(exc)))
            return
        try:
            produced = transform(message, self.destination, self.mappings, index=index)
        except TransformError as exc:
            self._write_refused(index, exc.message, exc.status)
            return
        except Skipped as exc:
            self.skipped += 1
            self.out.write(skipped_line(index, exc.message))
            return
        self.requests += len(produced)
        self.out.writelines(request_line(request) for request in produced)

    def refuse(self, error: str, status: int = TransformError.status) -> None:
        index = self.inputs
        self.inputs += 1
        self._write_refused(index, error, status)

    def _write_refused(self, index: int, error: str, status: int = TransformError.status) -> None:
        self.refused += 1
        self.out.write(error_line(index, error, status))


class BatchPreview(Preview):
    """The bulk requests delivery would send, planned window by window (see the module's text)."""

    def __init__(
        self, out: BinaryIO, destination: Destination, mappings: Mappings, *, window: int = WINDOW
    ) -> None:
        super().__init__(out)
        self.destination = destination
        self.mappings = mappings
        self.window = window
        self._payloads: list[bytes] = []
        #: Per job of the next plan (the held-over ones first): its input index and place.
        self._inputs: list[tuple[int, str]] = []
        #: Inputs refused before planning, waiting to be written with their window.
        self._refused: list[tuple[int, bytes]] = []
        self._leftover: Leftover = NOTHING_LEFT
        #: Inputs of the next window: what a worker would claim next (:func:`router.plan.claim_size`).
        self._claim = claim_size(window, None)

    def add(self, payload: bytes, where: str = "") -> None:
        self._inputs.append((self.inputs, where))
        self.inputs += 1
        self._payloads.append(payload)
        if len(self._payloads) >= self._claim:
            self._plan(carry_partial=True)

    def refuse(self, error: str, status: int = TransformError.status) -> None:
        self.refused += 1
        self._refused.append((self.inputs, error_line(self.inputs, error, status)))
        self.inputs += 1

    def finish(self) -> None:
        while self._payloads or self._leftover.jobs or self._refused:
            self._plan(carry_partial=False)
        super().finish()

    def _plan(self, *, carry_partial: bool) -> None:
        planned = plan_payloads(
            self._payloads,
            self.destination,
            self.mappings,
            carry_partial=carry_partial,
            carried=self._leftover,
        )
        inputs = self._inputs
        lines = self._refused
        for job, reason in planned.refused:
            index, where = inputs[job]
            self.refused += 1
            lines.append((index, error_line(index, _refusal(reason, where))))
        for job, reason in planned.skipped:
            index = inputs[job][0]
            self.skipped += 1
            lines.append((index, skipped_line(index, reason)))
        lines.sort(key=_first)
        self.out.writelines(line for _, line in lines)
        self.requests += len(planned.requests)
        self.out.writelines(request_line(request) for request in planned.requests)
        self._payloads = []
        self._inputs = inputs[planned.kept :]
        self._refused = []
        self._leftover = planned.leftover
        if planned.kept:  # as a worker sizes its next claim
            self._claim = claim_size(self.window, planned.events / planned.kept, planned.leftover.events)


def _first(entry: tuple[int, bytes]) -> int:
    return entry[0]


def _refusal(reason: str, where: str) -> str:
    """The transform's own text for a reason :func:`plan_payloads` gave."""
    if reason.startswith(_TRANSFORM_REFUSED):
        return reason.removeprefix(_TRANSFORM_REFUSED)
    if reason.startswith(_NOT_JSON):
        return _not_json(where, reason.removeprefix(_NOT_JSON))
    return reason


def _not_json(where: str, detail: str) -> str:
    return f"{where}: not valid JSON: {detail}" if where else f"not valid JSON: {detail}"
