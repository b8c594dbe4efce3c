"""Router processes in tests: ``python -m router ...`` children with their output in a log file
(:func:`child`), commands run to their end (:func:`run`), polling until something holds, and the
fake Klaviyo's control API."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
#: Terminal colour codes, in case a child's log renderer adds them.
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- processes --------------------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without router or Klaviyo settings, plus ``extra``; output unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLAVIYO_ROUTER_", "KLAVIYO_PRIVATE"))}
    return env | {"PYTHONUNBUFFERED": "1"} | extra


@dataclass
class Child:
    """``python -m router ...`` as a child process, its output in a log file."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    #: The URL it announced, for servers.
    url: str = ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self, signum: int = signal.SIGTERM, *, within: float = 30.0) -> int:
        """Send ``signum`` and wait for the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), within)

    async def until(self, check: Callable[[], bool | Awaitable[bool]], *, within: float = 30.0) -> None:
        """Poll ``check`` while the process runs; fails with the end of its log if it exits first or
        ``within`` seconds pass."""
        deadline = time.monotonic() + within
        while True:
            holds = check()
            if inspect.isawaitable(holds):
                holds = await holds
            if holds:
                return
            if self.process.returncode is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: still waiting after {within} s:\n{self.tail()}")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def child(name: str, args: Sequence[str], folder: Path, *, announces: str = "") -> AsyncIterator[Child]:
    """Start ``python -m router *args``; with ``announces``, wait for a URL matched by that pattern.

    Whatever happens, the process is killed and reaped on the way out.
    """
    log = folder / f"{name}.log"
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router",
            *args,
            cwd=ROOT,
            env=child_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    running = Child(name, process, log)
    try:
        if announces:
            running.url = await asyncio.wait_for(_announced(running, announces), 30)
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 30)


@dataclass(frozen=True)
class Finished:
    """A command run to its end: its exit status and output."""

    status: int
    stdout: bytes
    stderr: bytes


async def run_router(
    args: Sequence[str], *, env: dict[str, str] | None = None, module: str = "router", within: float = 60.0
) -> Finished:
    """Run ``python -m <module> *args`` (by default :func:`child_env`) to its end, ``within`` seconds
    at most; killed and reaped otherwise."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=ROOT,
        env=child_env() if env is None else env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Finished(process.returncode, stdout, stderr)


async def _announced(running: Child, pattern: str) -> str:
    while True:
        match = re.search(pattern, ANSI.sub("", running.log.read_text(errors="replace")))
        if match:
            return match.group(1)
        if running.process.returncode is not None:
            raise AssertionError(
                f"{running.name} exited with {running.process.returncode}:\n{running.tail()}"
            )
        await asyncio.sleep(0.02)


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, within: float, what: str
) -> T:
    """Poll ``probe`` until ``done`` says yes; fails naming ``what`` and the last value otherwise."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what}: still {value!r} after {within} s"
        await asyncio.sleep(0.01)


class FakeControl:
    """The fake's ``/__fake__/`` control API."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as response:
            assert response.status == 200, await response.text()
            return orjson.loads(await response.read())

    async def post(self, path: str, body: Any) -> Any:
        async with self.session.post(self.url + path, data=orjson.dumps(body)) as response:
            assert response.status == 200, await response.text()
            return orjson.loads(await response.read())

    async def armed(self, key: str) -> bool:
        """Whether a scripted answer for ``key`` is still waiting for its request."""
        return key in (await self.get("/__fake__/faults"))["scripts"]
