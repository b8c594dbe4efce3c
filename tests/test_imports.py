"""Following a bulk profile import job to the profiles Klaviyo refused (router.klaviyo.imports)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from router.klaviyo.imports import ImportResult, follow, job_id, refused_items


@dataclass(frozen=True)
class Answer:
    kind: str
    body: bytes = b""
    detail: str = ""


def job(status: str, failed: int = 0) -> Answer:
    body = {
        "data": {
            "type": "profile-bulk-import-job",
            "id": "J1",
            "attributes": {"status": status, "failed_count": failed},
        }
    }
    return Answer("ok", orjson.dumps(body))


def errors(*items: tuple[int, str], next_link: str | None = None) -> Answer:
    data = [
        {
            "type": "import-error",
            "attributes": {
                "code": "invalid",
                "detail": detail,
                "source": {"pointer": f"/data/attributes/profiles/data/{index}/attributes/email"},
            },
        }
        for index, detail in items
    ]
    return Answer("ok", orjson.dumps({"data": data, "links": {"next": next_link}}))


class Script:
    """Answers GETs from a list, remembering the paths; sleeping advances a fake clock."""

    def __init__(self, *answers: Answer) -> None:
        self.answers: Iterator[Answer] = iter(answers)
        self.paths: list[str] = []
        self.now = 0.0

    async def get(self, path: str) -> Answer:
        self.paths.append(path)
        return next(self.answers)

    async def sleep(self, seconds: float) -> None:
        self.now += seconds

    def clock(self) -> float:
        return self.now


async def run(script: Script, wait: float = 60.0) -> ImportResult:
    return await follow(script, "J1", wait=wait, sleep=script.sleep, clock=script.clock)


class TestFollow:
    """Poll until the job finishes, then read its import errors."""

    async def test_polls_until_complete_with_growing_pauses(self) -> None:
        """queued → processing → complete; nothing failed: no error pages are read."""
        script = Script(job("queued"), job("processing"), job("complete"))
        assert await run(script) == ImportResult()
        assert script.paths == ["/api/profile-bulk-import-jobs/J1"] * 3
        assert script.now == 0.5 + 1.0

    async def test_refused_profiles_across_pages(self) -> None:
        """Every page of import errors is read, following links.next."""
        script = Script(
            job("complete", failed=2),
            errors(
                (1, "Invalid email."),
                next_link="https://a.klaviyo.com/api/profile-bulk-import-jobs/J1/import-errors?page[cursor]=x",
            ),
            errors((4, "Invalid phone.")),
        )
        result = await run(script)
        assert result.refused == {
            1: "Klaviyo import error: invalid: Invalid email. (at /data/attributes/profiles/data/1/attributes/email)",
            4: "Klaviyo import error: invalid: Invalid phone. (at /data/attributes/profiles/data/4/attributes/email)",
        }
        assert script.paths[1:] == [
            "/api/profile-bulk-import-jobs/J1/import-errors?page[size]=100",
            "/api/profile-bulk-import-jobs/J1/import-errors?page[cursor]=x",
        ]

    async def test_cancelled(self) -> None:
        """A cancelled job: nothing of it can be assumed imported."""
        assert await run(Script(job("cancelled"))) == ImportResult(cancelled=True)

    async def test_gives_up_after_the_wait(self) -> None:
        """Still processing after ``wait`` seconds: the outcome is unknown, nothing is refused."""
        script = Script(*(job("processing") for _ in range(10)))
        result = await run(script, wait=3.0)
        assert result.refused == {} and result.unknown == "job J1 still 'processing' after 3 s"

    async def test_status_unavailable(self) -> None:
        """A failed status request leaves the outcome unknown, with Klaviyo's detail."""
        result = await run(Script(Answer("retry", detail="Klaviyo 503 on GET ...")))
        assert result == ImportResult(unknown="job J1: Klaviyo 503 on GET ...")


class TestParsing:
    """Job ids and error pointers."""

    def test_job_id(self) -> None:
        """The id of the job in a 202 answer; none in an empty or foreign body."""
        assert job_id(job("queued").body) == "J1"
        assert job_id(b"") is None
        assert job_id(b"not json") is None
        assert job_id(b'{"data": []}') is None

    def test_errors_without_an_item_pointer_are_not_attributed(self) -> None:
        """An import error that names no item refuses no particular profile."""
        page: dict[str, Any] = {
            "data": [{"attributes": {"detail": "x", "source": {"pointer": "/data/type"}}}]
        }
        assert refused_items(page) == {}
