"""Where batches are planned: in the worker's own process, or in planning processes.

Planning (transform, batch, encode; :func:`router.plan.plan_payloads`) is pure CPU work, and in
one process it competes with everything else the event loop does: claiming, sending, settling,
and in ``serve`` the ingest API. With ``[delivery] planners = N`` it runs in N processes of its
own (spawned, so they share nothing with the threads of this one), which take the payloads and
send back the bulk requests already encoded. ``planners = 0`` plans in-process.

A planning process loads the mappings itself, reloading them when the files change; a broken
edit keeps the last good set, as in-process planning does. If a planning process dies, the batch
fails (its jobs are released by the worker) and the pool is started again for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import structlog

from router.destination import Destination
from router.errors import MappingError
from router.mapping import Mappings, load_mappings
from router.plan import NOTHING_LEFT, Leftover, Plan, Planned, plan, plan_payloads
from router.queue import Job
from router.runtime import collect_garbage_less

log = structlog.get_logger("router.planner")
#: Seconds between a planning process's checks that the router that started it is still there.
PARENT_POLL = 0.5


class Planner:
    """Plans claimed batches here (``processes = 0``) or in a pool of planning processes."""

    def __init__(self, processes: int = 0) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def start(self, mappings_dirs: Iterable[Path | None] = ()) -> None:
        """Start the planning processes now, with the mappings of ``mappings_dirs`` compiled, so the
        first batch waits for neither (about a quarter of a second between them)."""
        if self.processes:
            loop = asyncio.get_running_loop()
            executor = self._executor()
            directories = list(dict.fromkeys(mappings_dirs))
            await asyncio.gather(
                *(loop.run_in_executor(executor, _warm, directories) for _ in range(self.processes))
            )

    async def plan(
        self,
        jobs: Sequence[Job],
        destination: Destination,
        mappings: Mappings,
        *,
        carry_partial: bool,
        carried: Leftover = NOTHING_LEFT,
    ) -> Plan:
        """Plan ``jobs`` (:func:`router.plan.plan`); ``mappings`` are the current ones, used when
        planning here."""
        if not self.processes:
            return plan(jobs, destination, mappings, carry_partial=carry_partial, carried=carried)
        payloads = [job.payload for job in jobs[carried.jobs :]]
        executor = self._executor()
        try:
            planned = await asyncio.get_running_loop().run_in_executor(
                executor, _plan_remote, payloads, destination, carry_partial, carried
            )
        except BrokenProcessPool:
            if self._pool is executor:
                self._pool = None
                executor.shutdown(wait=False, cancel_futures=True)
            log.error("planner_process_died", processes=self.processes)
            raise
        return Plan.of(jobs, planned)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_planning_process,
                initargs=(os.getpid(),),
            )
        return self._pool


def _start_planning_process(parent: int) -> None:
    """In a planning process, first: collect garbage as rarely as the router does (planning ran
    about a third faster for it), and exit once the process that started it is gone (a SIGKILL
    gives it no chance to stop the pool), instead of lingering with its pipes open."""
    collect_garbage_less()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os._exit(0)

    threading.Thread(target=watch, name="planner-parent-watch", daemon=True).start()


#: In a planning process: the last good mappings per mappings directory.
_last_good: dict[Path | None, Mappings] = {}


def _warm(directories: list[Path | None]) -> None:
    """In a planning process: compile the mappings of ``directories`` ahead of the first batch (a
    broken set is left for that batch to report)."""
    for directory in directories:
        with contextlib.suppress(MappingError):
            _last_good[directory] = load_mappings(directory)


def _plan_remote(
    payloads: list[bytes], destination: Destination, carry_partial: bool, carried: Leftover
) -> Planned:
    """In a planning process: plan with the current mappings (the last good ones after a bad edit)."""
    directory = destination.mappings_dir
    try:
        mappings = _last_good[directory] = load_mappings(directory)
    except MappingError:
        if directory not in _last_good:
            raise
        mappings = _last_good[directory]
    return plan_payloads(payloads, destination, mappings, carry_partial=carry_partial, carried=carried)
