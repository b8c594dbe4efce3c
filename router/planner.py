"""Where batches are planned: in the worker's own process, or in planning processes.

Planning (transform, batch, encode; :func:`router.plan.plan_payloads`) is pure CPU work, and in
one process it competes with everything else the event loop does: claiming, sending, settling,
and in ``serve`` the ingest API. With ``[delivery] planners = N`` it runs in N processes of its
own (spawned, so they share nothing with the threads of this one), which take the payloads and
send back the bulk requests already encoded. ``planners = 0`` plans in-process.

Both plan with the mapping sets of a :class:`~router.mapping.MappingSets`: planning processes are
given the files as read and compile them when they start, and are replaced by new ones when the
sets are reloaded (so a batch is never planned with files that were not checked). If a planning
process dies, the batch fails (the worker finds out whether one of its jobs is the cause) and the
pool is started again for the next one.

``transform --batch`` (and ``replay --dry-run``) have one :class:`PlanningProcess` prepare part of
each window's payloads (:func:`router.plan.prepare_payloads`) while they prepare the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from router.destination import Destination
from router.mapping import MappingFiles, Mappings, MappingSets, compile_mappings
from router.plan import NOTHING_LEFT, Leftover, Plan, Planned, plan_payloads, prepare_payloads
from router.queue import Job
from router.runtime import collect_garbage_less, exit_with_parent

log = structlog.get_logger("router.planner")


class Planner:
    """Plans claimed batches here (``processes = 0``) or in a pool of planning processes."""

    def __init__(self, mappings: MappingSets, processes: int = 0) -> None:
        self.mappings = mappings
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        #: The generation of the mapping sets the pool's processes compiled.
        self._generation = 0

    async def start(self) -> None:
        """Start the planning processes now, with the mappings compiled, so the first batch waits
        for neither (about a quarter of a second between them)."""
        if self.processes:
            loop = asyncio.get_running_loop()
            executor = self._executor()
            await asyncio.gather(*(loop.run_in_executor(executor, _ready) for _ in range(self.processes)))

    async def plan(
        self,
        jobs: Sequence[Job],
        destination: Destination,
        *,
        carry_partial: bool = False,
        carried: Leftover = NOTHING_LEFT,
    ) -> Plan:
        """Plan ``jobs`` (:func:`router.plan.plan`): the first ``carried.jobs`` of them are held-over
        ones, planned as ``carried``; the others are planned from their payloads and progress."""
        fresh = jobs[carried.jobs :]
        planned = await self.plan_payloads(
            [job.payload for job in fresh],
            destination,
            carry_partial=carry_partial,
            carried=carried,
            progress=[job.progress for job in fresh],
        )
        return Plan.of(jobs, planned)

    async def plan_payloads(
        self,
        payloads: Sequence[bytes],
        destination: Destination,
        *,
        carry_partial: bool = False,
        carried: Leftover = NOTHING_LEFT,
        progress: Sequence[int] = (),
    ) -> Planned:
        """:func:`router.plan.plan_payloads` with the current mapping set of ``destination``."""
        if not self.processes:
            mappings = self.mappings.get(destination.mappings_dir)
            return plan_payloads(
                payloads,
                destination,
                mappings,
                carry_partial=carry_partial,
                carried=carried,
                progress=progress,
            )
        executor = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, _plan_remote, list(payloads), destination, carry_partial, carried, list(progress)
            )
        except BrokenProcessPool:
            if self._pool is executor:
                self._pool = None
                executor.shutdown(wait=False, cancel_futures=True)
            log.error("planner_process_died", processes=self.processes)
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is not None and self._generation != self.mappings.generation:
            # reloaded mappings: batches planned from now on go to processes that compiled them
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._pool is None:
            self._generation = self.mappings.generation
            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_planning_process,
                initargs=(os.getpid(), self.mappings.files()),
            )
        return self._pool


class PlanningProcess:
    """One planning process that prepares payloads (:func:`router.plan.prepare_payloads`) for one
    thread of the caller, over a pipe, one piece at a time (``transform --batch``:
    :class:`router.preview.BatchPreview`). It starts as a pool's do (:func:`_start_planning_process`).

    Unlike a pool's, its answers are read and unpickled by the caller's own thread: unpickled by a
    pool's thread, their objects fill a malloc arena of that thread's, which grows (glibc) as
    long as the caller frees them from its own; and no thread of the caller waits for the GIL to
    move each pipe buffer along.
    """

    def __init__(self, mappings: MappingSets) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, theirs = context.Pipe()
        self._process = context.Process(
            target=_prepare_over_pipe,
            args=(theirs, os.getpid(), mappings.files()),
            name="klaviyo-router-planner",
            daemon=True,
        )
        self._process.start()
        theirs.close()
        self._started = False

    def started(self) -> bool:
        """Whether it has compiled the mappings and waits for payloads (it says so once)."""
        if not self._started and self._pipe.poll():
            self._receive()
            self._started = True
        return self._started

    def send(self, payloads: list[bytes], destination: Destination, start: int) -> None:
        """Have it prepare ``payloads`` as sources ``start`` on (once :meth:`started`, the last
        piece sent received)."""
        self._pipe.send((payloads, destination, start))

    def done(self) -> bool:
        """Whether the piece sent last is prepared."""
        return self._pipe.poll()

    def prepared(self) -> Leftover:
        """The piece sent last, prepared (waits for it)."""
        prepared: Leftover = self._receive()
        return prepared

    def _receive(self) -> Any:
        try:
            return self._pipe.recv()
        except EOFError:
            raise RuntimeError(f"the planning process ended (exit code {self._process.exitcode})") from None

    def close(self) -> None:
        """Let it end (ended if it does not within seconds)."""
        with contextlib.suppress(OSError):
            self._pipe.send(None)
        self._pipe.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


#: In a planning process: the compiled mapping set of each mappings folder.
_mappings: dict[Path | None, Mappings] = {}


def _start_planning_process(parent: int, files: dict[Path | None, MappingFiles]) -> None:
    """In a planning process, first: compile the mapping sets it plans with; collect garbage as
    rarely as the router does (planning ran about a third faster for it); and exit once the
    process that started it is gone (a SIGKILL gives it no chance to stop the pool), instead of
    lingering with its pipes open."""
    collect_garbage_less()
    _mappings.update((folder, compile_mappings(read)) for folder, read in files.items())
    exit_with_parent(parent)


def _ready() -> None:
    """In a planning process: nothing (submitted once per process, to start them all)."""


def _plan_remote(
    payloads: list[bytes],
    destination: Destination,
    carry_partial: bool,
    carried: Leftover,
    progress: list[int],
) -> Planned:
    """In a planning process: plan with the mapping set it was started with."""
    mappings = _mappings[destination.mappings_dir]
    return plan_payloads(
        payloads, destination, mappings, carry_partial=carry_partial, carried=carried, progress=progress
    )


def _prepare_over_pipe(pipe: Connection, parent: int, files: dict[Path | None, MappingFiles]) -> None:
    """In a :class:`PlanningProcess`: say it has started, then prepare each piece it is sent."""
    _start_planning_process(parent, files)
    pipe.send(None)
    while (piece := pipe.recv()) is not None:
        payloads, destination, start = piece
        pipe.send(prepare_payloads(payloads, destination, _mappings[destination.mappings_dir], start=start))
