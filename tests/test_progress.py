"""The progress display replay, archive and sync share: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import io

from router.replay import Progress as ReplayProgress
from router.replay import Tally
from router.sync.report import Progress as SyncProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_say_the_counts_share_and_eta_and_notes_come_at_once() -> None:
    stream = io.StringIO()
    progress = ReplayProgress(1000, stream)
    progress.update(Tally(read=5, accepted=4, rejected=1), 250)  # within the first seconds: no line
    assert stream.getvalue() == ""
    progress.update(Tally(read=6, accepted=5, rejected=1), 500, note="waiting: the queue is full")
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("replay: 6 read, 5 accepted, 1 rejected, 0 duplicates, ")
    assert "(50% of 1,000 bytes, ETA " in line and line.endswith("; waiting: the queue is full")


def test_a_sync_ends_with_a_plain_line_of_its_counts() -> None:
    stream = io.StringIO()
    progress = SyncProgress("vip", 10, enabled=True, stream=stream)
    progress.update(read=10)
    progress.update(sent=9, failed=1)
    progress.close()
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("sync vip: 10 rows read, 9 sent, 1 failed, ")
    assert "(100% of 10 rows, ETA 0:00:00)" in line


def test_a_terminal_gets_a_bar_and_messages_above_it() -> None:
    stream = Terminal()
    progress = SyncProgress("vip", 10, enabled=True, stream=stream)
    progress.update(read=4, sent=3)
    progress.write("a message")
    progress.close()
    shown = stream.getvalue()
    assert "sync vip:  40%" in shown and "4 rows read, 3 sent, 0 failed" in shown
    assert "a message\n" in shown


def test_disabled_shows_nothing() -> None:
    stream = Terminal()
    progress = SyncProgress("vip", 10, enabled=False, stream=stream)
    progress.update(read=4)
    progress.close()
    assert stream.getvalue() == ""
