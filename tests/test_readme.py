"""The README's examples stay true: its config loads, its mapping example is a valid mapping file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import orjson
import pytest

from router.mapping import validate_document
from router.queue import open_queue
from router.queue.postgres import PostgresQueue
from router.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


class TestReadme:
    """Examples in README.md."""

    def test_config_example_loads(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The production config example is a valid config (secrets from the environment)."""
        example, _ = fenced("toml")
        monkeypatch.setenv("WEB_WRITE_KEY", "w")
        monkeypatch.setenv("KLAVIYO_PRIVATE_KEY", "pk")
        config = tmp_path / "router.toml"
        config.write_text(example)
        settings = Settings.load(config, env={})
        assert [d.name for d in settings.destinations] == ["klaviyo"]
        assert settings.destinations[0].private_key == "pk"

    def test_several_nodes_queue_url_opens_the_postgresql_queue(self) -> None:
        """The "Running several nodes" snippet names a PostgreSQL queue with its pool size."""
        _, snippet = fenced("toml")
        url = tomllib.loads(snippet)["queue"]["url"]
        queue = open_queue(url)
        assert isinstance(queue, PostgresQueue) and queue.where == "db.internal:5432/router"

    def test_mapping_example_is_valid(self) -> None:
        """The ``order-completed.json`` example passes the mapping schema."""
        (example,) = fenced("json")
        validate_document(orjson.loads(example), "README.md")
