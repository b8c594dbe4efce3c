"""Log redaction (``router.logs``): secret values are masked, the words around them are not."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog

from router.logs import MASK, SUBSTRING_SECRET_LENGTH, Redactor, configure_logging, reset_logging
from router.settings import Settings

LONG = "pk_live_0123456789abcdef0123"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("info", "json", secrets=["p", LONG], stream=stream)
    yield stream
    reset_logging()


class TestRedaction:
    """What is masked and what is left alone."""

    def test_short_secret_leaves_other_words_alone(self, lines: io.StringIO) -> None:
        """private_key = "p": URLs, names and texts keep their p's; the value itself is masked."""
        structlog.get_logger().info(
            "server_started", address="http://127.0.0.1:8080", queue="sqlite:///tmp/p/queue.db", key="p"
        )
        line = orjson.loads(lines.getvalue())
        assert line["address"] == "http://127.0.0.1:8080"
        assert line["queue"] == f"sqlite:///tmp/{MASK}/queue.db"
        assert line["key"] == MASK
        assert line["event"] == "server_started"

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("p", MASK),
            ("key=p&x=1", f"key={MASK}&x=1"),
            ('{"k":"p"}', f'{{"k":"{MASK}"}}'),
            ("wrong_p", f"wrong_{MASK}"),
            ("php http pp", "php http pp"),
            ("ép", "ép"),
        ],
    )
    def test_short_secret_masked_where_it_stands_alone(self, text: str, expected: str) -> None:
        """Alone means not next to a letter or digit (an underscore or punctuation is a border)."""
        assert Redactor(["p"]).redact(text) == expected

    def test_long_secret_masked_even_inside_a_token(self) -> None:
        """A key of SUBSTRING_SECRET_LENGTH characters or more is masked wherever it occurs."""
        assert len(LONG) >= SUBSTRING_SECRET_LENGTH
        assert Redactor([LONG]).redact(f"Bearer{LONG}x") == f"Bearer{MASK}x"

    def test_every_write_key_and_admin_token_is_masked_inside_other_text(self, tmp_path: Path) -> None:
        """The settings accept no write key or admin token too short to be masked as a substring: the
        shortest accepted ones are masked URL-encoded and run into a word too."""
        key, token = "wk_exactly_16_ch", "admin_exactly_16"
        config = tmp_path / "router.toml"
        config.write_text(
            f'admin_token = "{token}"\n[[sources]]\nname = "web"\nwrite_key = "{key}"\n'
            'destinations = ["klaviyo"]\n[[destinations]]\nname = "klaviyo"\nprivate_key = "pk_live_0123456789"\n'
        )
        redactor = Redactor(Settings.load(config, env={}).secrets())
        for secret in (key, token):
            assert redactor.redact(f"q=%22{secret}%22&x{secret}y") == f"q=%22{MASK}%22&x{MASK}y"

    def test_longest_secret_first(self) -> None:
        """A secret that contains another is masked whole."""
        assert Redactor(["abc", "abc-def"]).redact("k=abc-def") == f"k={MASK}"
