"""The Klaviyo requests events would produce, written as they are planned (``transform`` and
``replay --dry-run``; nothing is sent).

Output is NDJSON: one ``{"method", "path", "body"}`` per request, one ``{"error", "status",
"index"}`` per input refused (an input refused in part, :class:`~router.errors.PartlyRefused`, also
has the requests of its usable part), one ``{"skipped", "index"}`` per input Klaviyo has no use for,
one ``{"warning", "code", "index"}`` per thing an input was sent without
(:class:`~router.transform.TransformWarning`); ``index`` counts the inputs from 0 across every file.

Without batching (:class:`SinglePreview`) each input's requests follow it. With batching
(:class:`BatchPreview`) inputs are planned window by window as a delivery worker claims and plans
them: windows sized by :func:`router.plan.claim_size` from ``window`` (delivery's ``batch_size``:
at most twice that many inputs), each through the workers' planning path in its steps
(:func:`router.plan.plan_payloads`: each input prepared on its own, then the window's merged into
bulk jobs). A window's requests are written while the window after it is prepared (in part in a
process of its own: :class:`BatchPreview`) and before the one after that is read, so memory holds
three windows and their requests at most, whatever the input's size.

Per-profile order across windows: a window's requests all precede the next window's, as a key's
later jobs wait in the queue until its earlier ones are settled; inside a window, profile upserts
go first, then events, then list jobs, as delivery sends them. The inputs behind a window's last,
partial event job are held over (``carry_partial``, as delivery does): they are the window's last
inputs, so for every profile they come after the ones written and before the next window's; they
go out at the head of the next window's event jobs, so every event job but the last is full.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Final

import orjson

from router.capture import Record
from router.destination import Destination
from router.errors import PartlyRefused, Skipped, TransformError
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import Mappings, MappingSets
from router.plan import NOTHING_LEFT, Leftover, assemble_prepared, claim_size, cut_prepared, prepare_payloads
from router.planner import PlanningProcess
from router.transform import TransformWarning, transform

#: Processes that prepare part of each window beside this one: one when there is a core to spare.
PLANNING_PROCESSES: Final = 1 if (os.cpu_count() or 1) > 1 else 0
#: The planning process's first share of a window, and how much it moves by from window to window.
SHARE: Final = 0.5
SHARE_STEP: Final = 0.02
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


def warning_line(index: int, warning: TransformWarning) -> bytes:
    return orjson.dumps({"warning": warning.message, "code": warning.code, "index": index}) + b"\n"


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
    def add(self, payload: bytes, place: Record | None = None, label: str = "") -> None:
        """One input as JSON bytes; ``place`` (in the file called ``label``) is named in the error
        of one that is not JSON."""

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

    def add(self, payload: bytes, place: Record | None = None, label: str = "") -> None:
        index = self.inputs
        self.inputs += 1
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self._write_refused(index, _not_json(place, label, str(exc)))
            return
        warnings: list[TransformWarning] = []
        refused: PartlyRefused | None = None
        try:
            produced = transform(message, self.destination, self.mappings, index=index, warnings=warnings)
        except PartlyRefused as exc:
            produced, refused = exc.requests, exc
        except TransformError as exc:
            self._write_refused(index, exc.message, exc.status)
            return
        except Skipped as exc:
            self.skipped += 1
            self.out.write(skipped_line(index, exc.message))
            return
        self.requests += len(produced)
        self.out.writelines(request_line(request) for request in produced)
        self.out.writelines(warning_line(index, warning) for warning in warnings)
        if refused is not None:
            self._write_refused(index, refused.message, refused.status)

    def refuse(self, error: str, status: int = TransformError.status) -> None:
        index = self.inputs
        self.inputs += 1
        self._write_refused(index, error, status)

    def _write_refused(self, index: int, error: str, status: int = TransformError.status) -> None:
        self.refused += 1
        self.out.write(error_line(index, error, status))


@dataclass(slots=True)
class _Window:
    """Inputs planned together: their payloads, and per job (the held-over ones first) the
    input's index and place; the lines of inputs refused before planning."""

    payloads: list[bytes] = field(default_factory=list)
    inputs: list[tuple[int, Record | None, str]] = field(default_factory=list)
    refused: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class _Preparing:
    """A window read and being prepared: the jobs held over before it, the planning process's part
    of its payloads (the first ones), and this process's part."""

    window: _Window
    carry_partial: bool
    carried: Leftover
    #: Whether the planning process has a part of it.
    apart: bool
    here: Leftover


class BatchPreview(Preview):
    """The bulk requests delivery would send, planned window by window (see the module's text).

    A window is planned as :func:`router.plan.plan_payloads` plans it, in its steps: each payload
    prepared on its own (:func:`router.plan.prepare_payloads`); the window's jobs, after those
    held over by the window before, cut into those planned now and those it holds over
    (:func:`router.plan.cut_prepared`); the ones planned now merged into bulk jobs
    (:func:`router.plan.assemble_prepared`). With ``processes = 1``, once window ``k`` is read,
    window ``k - 1`` is cut, a planning process is handed the first part of window ``k`` (numbered
    after what ``k - 1`` holds over) and, while it prepares that, this process merges and writes
    ``k - 1``, prepares the rest of ``k`` and reads ``k + 1`` (preparing is nine tenths of the
    work). The planning process's share moves towards the one that has it done when this process
    gets to it. Window sizes come from the cut before the last, and preparing is per payload, so
    the output depends on neither the mode nor the shares.
    """

    def __init__(
        self,
        out: BinaryIO,
        destination: Destination,
        mappings: Mappings,
        *,
        window: int = WINDOW,
        processes: int = 0,
    ) -> None:
        super().__init__(out)
        self.destination = destination
        self.mappings = mappings
        self.window = window
        self.processes = processes
        self._filling = _Window()
        #: Inputs of the next window: what a worker would claim next (:func:`router.plan.claim_size`).
        self._claim = claim_size(window, None)
        #: The jobs held over by the last window written, and their inputs.
        self._leftover: Leftover = NOTHING_LEFT
        self._carried: list[tuple[int, Record | None, str]] = []
        #: The last window cut: its kept and held-over jobs (they size the windows after the next).
        self._last: tuple[Leftover, Leftover] | None = None
        self._preparing: _Preparing | None = None
        #: Started with the first window of an input longer than one (a shorter one is planned here).
        self._apart: PlanningProcess | None = None
        #: The planning process's share of a window's payloads.
        self._share = SHARE

    def add(self, payload: bytes, place: Record | None = None, label: str = "") -> None:
        filling = self._filling
        filling.inputs.append((self.inputs, place, label))
        self.inputs += 1
        filling.payloads.append(payload)
        if len(filling.payloads) >= self._claim:
            self._close(carry_partial=True)

    def refuse(self, error: str, status: int = TransformError.status) -> None:
        self.refused += 1
        self._filling.refused.append((self.inputs, error_line(self.inputs, error, status)))
        self.inputs += 1

    def finish(self) -> None:
        self._close(carry_partial=False)
        cut = self._cut()
        if cut is not None:
            self._write(*cut)
        if self._apart is not None:
            self._apart.close()
            self._apart = None
        super().finish()

    def _close(self, *, carry_partial: bool) -> None:
        """Cut the window being prepared (what it holds over goes into the one being filled), start
        preparing the one being filled, write the one cut, and start the next."""
        window, self._filling = self._filling, _Window()
        cut = self._cut()
        if self._last is not None and self._last[0].jobs:  # as a worker sizes its next claim
            kept, held = self._last
            self._claim = claim_size(self.window, kept.events / kept.jobs, held.events)
        window.inputs[:0] = self._carried
        payloads, start = window.payloads, self._leftover.jobs
        window.payloads = []
        split = round(len(payloads) * self._share) if self._planning(carry_partial) else 0
        if split and self._apart is not None:
            self._apart.send(payloads[:split], self.destination, start)
        carried = self._leftover
        if cut is not None:  # while the planning process prepares its part
            self._write(*cut)
        here = prepare_payloads(payloads[split:], self.destination, self.mappings, start=start + split)
        self._preparing = _Preparing(window, carry_partial, carried, bool(split), here)

    def _planning(self, carry_partial: bool) -> bool:
        """Whether the planning process is ready to take part of a window. It is started with the
        first window of an input longer than one, and takes no part before it has started (about
        half a second, while this process goes on)."""
        if not self.processes:
            return False
        if self._apart is None:
            if not carry_partial:
                return False
            self._apart = PlanningProcess(MappingSets([self.destination.mappings_dir]))
        return self._apart.started()

    def _cut(self) -> tuple[_Window, Leftover] | None:
        """The window being prepared, after the jobs held over before it, cut into the jobs planned
        now (returned with the window, to write) and those it holds over (:func:`cut_prepared`)."""
        preparing, self._preparing = self._preparing, None
        if preparing is None:
            return None
        pieces = [preparing.carried]
        if preparing.apart and self._apart is not None:
            # the planning process done first: give it more of the next windows, else less
            step = SHARE_STEP if self._apart.done() else -SHARE_STEP
            self._share = min(max(self._share + step, SHARE_STEP), 1 - SHARE_STEP)
            pieces.append(self._apart.prepared())
        pieces.append(preparing.here)
        kept, held = cut_prepared(pieces, carry_partial=preparing.carry_partial)
        self._carried = preparing.window.inputs[kept.jobs :]
        self._leftover = held
        self._last = kept, held
        return preparing.window, kept

    def _write(self, window: _Window, kept: Leftover) -> None:
        """A window's kept jobs merged into bulk jobs (:func:`router.plan.assemble_prepared`), and
        its lines written in order: refusals, skips and warnings by input, then the requests."""
        planned = assemble_prepared(kept)
        inputs = window.inputs
        lines = window.refused
        for job, reason in planned.refused:
            index, place, label = inputs[job]
            self.refused += 1
            lines.append((index, error_line(index, _refusal(reason, place, label))))
        for job, reason in planned.skipped:
            index = inputs[job][0]
            self.skipped += 1
            lines.append((index, skipped_line(index, reason)))
        for job, warning in planned.warnings:
            index = inputs[job][0]
            lines.append((index, warning_line(index, warning)))
        lines.sort(key=_first)
        self.out.writelines(line for _, line in lines)
        self.requests += len(planned.requests)
        self.out.writelines(request_line(request) for request in planned.requests)


def _first(entry: tuple[int, bytes]) -> int:
    return entry[0]


def _refusal(reason: str, place: Record | None, label: str) -> str:
    """The transform's own text for a reason :func:`plan_payloads` gave."""
    if reason.startswith(_TRANSFORM_REFUSED):
        return reason.removeprefix(_TRANSFORM_REFUSED)
    if reason.startswith(_NOT_JSON):
        return _not_json(place, label, reason.removeprefix(_NOT_JSON))
    return reason


def _not_json(place: Record | None, label: str, detail: str) -> str:
    return (
        f"{place.where(label)}: not valid JSON: {detail}"
        if place is not None
        else f"not valid JSON: {detail}"
    )
