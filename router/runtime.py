"""CPython tuning for the router's processes: the server and worker (``serve``, ``work``), the
planning processes they start (:mod:`router.planner`) and the standalone fake Klaviyo."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

#: Seconds a thread may hold the GIL while another waits for it (CPython's default is 0.005).
SWITCH_INTERVAL = 0.0005


def collect_garbage_less() -> None:
    """Collect garbage less often: the pipeline allocates many short-lived dicts per event, and the
    default thresholds spend a quarter to a third of the CPU of planning rescanning them. Objects
    alive at this point (code, mappings, settings) are moved out of the collector's way."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def tune_runtime() -> None:
    """Tune CPython for a server or worker process (``serve`` and ``work`` call it at start-up).

    - :func:`collect_garbage_less`.
    - Hand the GIL over sooner: the queue's writer thread gives the GIL up for every SQLite
      statement and then waits up to the switch interval for the busy event loop to hand it back,
      several times per commit. 0.5 ms instead of 5 ms gave ingest 10 to 15% more batched events/s
      at 16 concurrent senders (bench/ingest.py), single requests unchanged.
    """
    collect_garbage_less()
    sys.setswitchinterval(SWITCH_INTERVAL)


def exit_with_parent(parent: int, poll: float = 0.5) -> None:
    """In a helper process (a pool's worker): exit once the process that started it (``parent``)
    is gone, checked every ``poll`` seconds on a thread of its own; a SIGKILL gives the parent no
    chance to stop its pool, whose processes would linger with their pipes open."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
