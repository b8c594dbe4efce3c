"""structlog configuration: one JSON object per line, secrets redacted everywhere.

Event names are stable snake_case (``batch_accepted``, ``event_rejected``, ``request_handled``,
``server_started``); context is bound, never formatted into the event text. :class:`Redactor`
runs last before rendering, so nothing reaches the output with a write key, private key or admin
token in it, whichever field or nested structure carries it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

MASK = "***"
#: Secrets at least this long are masked wherever they appear, even inside a longer token: a random
#: key that long is never part of ordinary text. Shorter ones only where they stand alone, between
#: characters that are not letters or digits, so a one-letter key does not turn ``http`` into ``htt***``.
#: The settings accept no shorter write key or admin token (:data:`router.settings.MIN_SECRET_LENGTH`),
#: and Klaviyo issues longer private keys: what stays masked only where it stands alone is what the
#: router does not choose, such as a short database password in the queue URL.
SUBSTRING_SECRET_LENGTH = 16
#: Keys whose values are always masked, whatever they hold (compared without ``_``/``-``, lower case).
SENSITIVE_KEYS = frozenset(
    {"authorization", "writekey", "privatekey", "privateapikey", "password", "apikey", "admintoken", "token"}
)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class Redactor:
    """A structlog processor replacing every configured secret, in any string, by ``***``.

    A secret of :data:`SUBSTRING_SECRET_LENGTH` characters or more is masked wherever it occurs;
    a shorter one where it is not part of a longer word (``"p"`` is masked in ``key=p`` and in
    ``"p"``, not in ``http``).

    Values of keys named like a credential (:data:`SENSITIVE_KEYS`) are masked whatever they hold.
    Dicts, lists and tuples are walked; other objects are rendered with ``str`` first when they
    contain a secret.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._pattern: re.Pattern[str] | None = None
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        """Replace the set of secret values to look for."""
        values = sorted({s for s in secrets if s}, key=len, reverse=True)
        alternatives = [
            re.escape(v) if len(v) >= SUBSTRING_SECRET_LENGTH else rf"(?<![^\W_]){re.escape(v)}(?![^\W_])"
            for v in values
        ]
        self._pattern = re.compile("|".join(alternatives)) if alternatives else None

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        for key, value in list(event_dict.items()):
            event_dict[key] = self._clean(key, value)
        return event_dict

    def redact(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``."""
        return self._pattern.sub(MASK, text) if self._pattern is not None else text

    def _clean(self, key: Any, value: Any) -> Any:
        if isinstance(key, str) and key.replace("_", "").replace("-", "").lower() in SENSITIVE_KEYS:
            return MASK if value not in (None, "") else value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self._clean(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(None, v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        text = str(value)
        cleaned = self.redact(text)
        return value if cleaned == text else cleaned


#: The process-wide redactor; :func:`configure_logging` loads the configured secrets into it.
REDACTOR = Redactor()


class _RedactingFilter(logging.Filter):
    """Masks secrets in standard-library log records (aiohttp's own errors), tracebacks included."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = REDACTOR.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = REDACTOR.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_STDLIB_HANDLER: logging.Handler | None = None


def _configure_stdlib(level: str, stream: TextIO) -> None:
    """Route standard-library logging (aiohttp, asyncio) to ``stream``, redacted, warnings and up."""
    global _STDLIB_HANDLER
    root = logging.getLogger()
    if _STDLIB_HANDLER is not None:
        root.removeHandler(_STDLIB_HANDLER)
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, _LEVELS.get(level, logging.INFO)))
    _STDLIB_HANDLER = handler


def _orjson_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def configure_logging(
    level: str = "info", fmt: str = "json", *, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Set up structlog for the process: level filter, timestamps, redaction, JSON (or console) lines.

    ``secrets`` are the values to mask (``Settings.secrets()``); ``stream`` defaults to stderr.
    """
    REDACTOR.update(secrets)
    stream = stream or sys.stderr
    _configure_stdlib(level, stream)
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            REDACTOR,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def reset_logging() -> None:
    """Undo :func:`configure_logging` (structlog defaults, no stdlib handler, no secrets): for tests."""
    global _STDLIB_HANDLER
    if _STDLIB_HANDLER is not None:
        logging.getLogger().removeHandler(_STDLIB_HANDLER)
        _STDLIB_HANDLER = None
    REDACTOR.update(())
    structlog.reset_defaults()
