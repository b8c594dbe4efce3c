"""How far a long command got, on its stream: a bar (tqdm) on a terminal, otherwise a plain line
every few seconds (a log, CI). ``replay``, ``archive`` and ``sync`` show theirs through it.

A plain line is ``<label>: <counts> (<share> of <total> <units>, ETA <h:mm:ss>); <note>``; the
bar shows the same counts (and note) beside tqdm's own position, rate and ETA. A note (waiting for
something, say) is printed at once; messages (:meth:`Progress.write`) go above the bar.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import IO, Any, Final

from tqdm import tqdm

#: Seconds between plain lines.
PLAIN_EVERY: Final = 5.0


class Progress:
    """The progress of one task towards ``total`` (``None``: unknown) ``units``."""

    def __init__(
        self,
        stream: IO[str],
        *,
        label: str,
        total: int | None,
        unit: str,
        units: str,
        unit_scale: bool = False,
        enabled: bool = True,
    ) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.units = units
        self.enabled = enabled
        self.started = time.monotonic()
        self._last_line = self.started
        self._done = 0
        self._bar: tqdm[Any] | None = None
        if enabled and stream.isatty():
            self._bar = tqdm(
                total=total, unit=unit, unit_scale=unit_scale, desc=label, file=stream, dynamic_ncols=True
            )

    def rate(self, count: int) -> float:
        """``count`` per second since the start."""
        return count / max(time.monotonic() - self.started, 1e-9)

    def show(self, done: int, counts: str, *, note: str = "") -> None:
        """``done`` of the total so far, and the counts to show beside it."""
        self._done = done
        if not self.enabled:
            return
        status = f"{counts}; {note}" if note else counts
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            self._bar.set_postfix_str(status, refresh=True)
            return
        now = time.monotonic()
        if now - self._last_line < PLAIN_EVERY and not note:
            return
        self._last_line = now
        print(self.line(counts, note=note), file=self.stream, flush=True)

    def line(self, counts: str, *, note: str = "") -> str:
        """The plain line of ``counts``: with the share done and an ETA when the total is known."""
        share = ""
        if self.total:
            fraction = min(self._done / self.total, 1.0)
            elapsed = time.monotonic() - self.started
            eta = (
                f", ETA {timedelta(seconds=round(elapsed * (1 - fraction) / fraction))}"
                if fraction > 0
                else ""
            )
            share = f" ({fraction:.0%} of {self.total:,} {self.units}{eta})"
        return f"{self.label}: {counts}{share}{'; ' + note if note else ''}"

    def write(self, line: str) -> None:
        """A message on a line of its own (above the bar)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream)

    def close(self, counts: str | None = None) -> None:
        """The end: the bar closed, or with ``counts`` a last plain line."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and counts is not None:
            print(self.line(counts), file=self.stream, flush=True)
