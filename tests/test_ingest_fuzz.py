"""Malformed and hostile requests against the real router (``python -m router.app``) on loopback.

Every class of issue 12 and more: invalid UTF-8, lone surrogates, truncated gzip, gzip bombs,
wrong content types, duplicate keys, huge strings, deep nesting, odd numbers, odd timestamps,
odd auth headers, write keys in odd places, odd shapes, lying Content-Lengths, half bodies, and
the admin API. Each request is sent as raw bytes (so that headers no client library would send
can be), and must be answered below 500 within 2 s. Then hypothesis generates events of any JSON
shape. Afterwards the server must be healthy: ``/health`` and ``/ready`` answer 200, a valid event
is accepted and stored, and its log holds no ``request_failed`` (the last-resort 500) nor traceback.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import os
import re
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.queue import JobState
from router.queue.sqlite import SqliteQueue

ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "wk_fuzz_0123456789abcdef"
OTHER_KEY = "wk_fuzz_other_fedcba987654"
ADMIN_TOKEN = "admin_fuzz_token_0123456789"
CONFIG = """
data_dir = "{data_dir}"
admin_token = "{admin_token}"
[server]
host = "127.0.0.1"
port = 0
[log]
level = "info"
[limits]
body_timeout = 1
max_batch_events = 2000
[delivery]
workers = 0
[[sources]]
name = "fuzz"
write_key = "{write_key}"
destinations = ["klaviyo"]
[[sources]]
name = "other"
write_key = "{other_key}"
destinations = ["klaviyo"]
[[destinations]]
name = "klaviyo"
private_key = "pk_fuzz"
base_url = "http://127.0.0.1:9"
"""
#: The slowest answer allowed (the body timeout of 1 s included).
SLOWEST = 2.0


@dataclass(frozen=True)
class Router:
    host: str
    port: int
    data_dir: Path
    log: Path


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """The router as a child process, with SQLite, two sources and the admin API on."""
    import subprocess

    folder = tmp_path_factory.mktemp("fuzz")
    config = folder / "router.toml"
    config.write_text(
        CONFIG.format(
            data_dir=folder / "data", admin_token=ADMIN_TOKEN, write_key=WRITE_KEY, other_key=OTHER_KEY
        )
    )
    log = folder / "router.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLAVIYO_ROUTER_", "KLAVIYO_PRIVATE"))}
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "router.app", "--config", str(config)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    assert process.stdout is not None
    try:
        deadline = time.monotonic() + 30
        match = None
        while match is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"listening on http://([\d.]+):(\d+)", line)
        assert match is not None, "the router did not start"
        yield Router(match.group(1), int(match.group(2)), folder / "data", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


# --- building requests as bytes -------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    name: str
    data: bytes
    #: Close our sending side after the data (a client giving up half-way).
    half_close: bool = False
    #: Malformed at the HTTP level: aiohttp answers 400 itself, as text, before the app sees it.
    http_error: bool = False


def basic(key: str | bytes) -> bytes:
    raw = key if isinstance(key, bytes) else key.encode()
    return b"Basic " + base64.b64encode(raw + b":")


def request(
    name: str,
    path: str,
    body: bytes = b"",
    *,
    method: str = "POST",
    auth: bytes | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    length: int | None = None,
    half_close: bool = False,
    http_error: bool = False,
) -> Request:
    auth = basic(WRITE_KEY) if auth is None else auth
    lines = [
        f"{method} {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Connection: close",
        b"Content-Length: " + str(len(body) if length is None else length).encode(),
    ]
    if auth:
        lines.append(b"Authorization: " + auth)
    lines += [key + b": " + value for key, value in headers]
    return Request(name, b"\r\n".join(lines) + b"\r\n\r\n" + body, half_close, http_error)


def event(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Fuzzed", "userId": "fuzz-user"} | fields


def batch_of(*events: Any, **top: Any) -> bytes:
    return orjson.dumps({"batch": list(events), **top})


def splice(template: dict[str, Any], raw: bytes, *, batch: bool = True) -> bytes:
    """``template`` as JSON with its ``"@"`` value replaced by ``raw`` (text no encoder writes)."""
    text = orjson.dumps({"batch": [template]} if batch else template)
    return text.replace(b'"@"', raw)


def deep(depth: int, *, kind: str = "array") -> bytes:
    if kind == "array":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


GOOD = orjson.dumps({"batch": [{"type": "track", "event": "Fuzzed", "userId": "fuzz-user"}]})
PACKED = gzip.compress(GOOD)
GZIP = ((b"Content-Encoding", b"gzip"),)


def hand_written() -> list[Request]:
    """At least 300 requests, every class of issue 12 and more."""
    return [req for cases in CASES for req in cases()]


def _invalid_utf_and_surrogates() -> list[Request]:
    """Invalid UTF-8 and surrogates, in every place a string can be."""
    out: list[Request] = []
    add = out.append
    for index, junk in enumerate(
        [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
    ):
        add(request(f"utf8-batch-{index}", "/v1/batch", splice(event(event="@"), b'"' + junk + b'"')))
        add(
            request(
                f"utf8-single-{index}",
                "/v1/track",
                splice(event(properties={"p": "@"}), b'"' + junk + b'"', batch=False),
            )
        )
        add(request(f"utf8-key-{index}", "/v1/batch", splice(event(properties="@"), b'{"' + junk + b'": 1}')))
        add(request(f"utf8-raw-body-{index}", "/v1/batch", junk * 50))
    for index, escape in enumerate(
        [
            rb'"\ud800"',
            rb'"\udc00"',
            rb'"\ud800\ud800"',
            rb'"\udfff x"',
            rb'"\ud83d"',
            rb'"\u0000"',
            rb'"\u12"',
            rb'"\q"',
        ]
    ):
        for path, batch in (("/v1/batch", True), ("/v1/identify", False)):
            add(
                request(
                    f"escape-{index}-{path}", path, splice(event(traits={"name": "@"}), escape, batch=batch)
                )
            )
        add(request(f"escape-userId-{index}", "/v1/batch", splice(event(userId="@"), escape)))
    return out


def _gzip() -> list[Request]:
    """Gzip: truncated, corrupt, bombs, double, wrong header."""
    out: list[Request] = []
    add = out.append
    for cut in (1, 2, 5, 10, 18, len(PACKED) - 8, len(PACKED) - 1):
        add(request(f"gzip-truncated-{cut}", "/v1/batch", PACKED[:cut], headers=GZIP))
    add(request("gzip-corrupt", "/v1/batch", PACKED[:10] + b"\x00" * 20 + PACKED[30:], headers=GZIP))
    add(request("gzip-not-gzip", "/v1/batch", GOOD, headers=GZIP))
    add(request("gzip-twice", "/v1/batch", gzip.compress(PACKED), headers=GZIP))
    add(request("gzip-members", "/v1/batch", PACKED + PACKED, headers=GZIP))
    add(request("gzip-trailing-junk", "/v1/batch", PACKED + b"junk", headers=GZIP))
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb_data = bomb.compress(b"{" + b" " * 50_000_000) + bomb.flush()
    add(request("gzip-bomb-50MB", "/v1/batch", bomb_data, headers=GZIP))
    zeros = gzip.compress(b"\x00" * 20_000_000)
    add(request("gzip-bomb-zeros", "/v1/track", zeros, headers=GZIP))
    add(
        request(
            "gzip-bomb-events",
            "/v1/batch",
            gzip.compress(b'{"batch":[' + b"{}," * 1_500_000 + b"{}]}"),
            headers=GZIP,
        )
    )
    for encoding in (b"br", b"deflate", b"gzip, gzip", b"GZIP", b"identity", b"\xff\xfe", b"x" * 5000):
        add(
            request(
                f"encoding-{encoding[:10]!r}", "/v1/batch", GOOD, headers=((b"Content-Encoding", encoding),)
            )
        )
    return out


def _content_types() -> list[Request]:
    """Content types: the body is what counts."""
    out: list[Request] = []
    add = out.append
    for index, ctype in enumerate(
        [
            b"text/plain",
            b"multipart/form-data; boundary=x",
            b"application/x-www-form-urlencoded",
            b"application/json; charset=latin-1",
            b"\xff/\xfe",
            b"",
            b"application/xml",
        ]
    ):
        add(request(f"content-type-{index}", "/v1/batch", GOOD, headers=((b"Content-Type", ctype),)))
    add(
        request(
            "form-body",
            "/v1/batch",
            b"batch=1&userId=2",
            headers=((b"Content-Type", b"application/x-www-form-urlencoded"),),
        )
    )
    add(
        request(
            "multipart-body",
            "/v1/track",
            b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--",
            headers=((b"Content-Type", b"multipart/form-data; boundary=x"),),
        )
    )
    return out


def _duplicate_keys() -> list[Request]:
    """Duplicate keys."""
    out: list[Request] = []
    add = out.append
    add(
        request(
            "dup-batch",
            "/v1/batch",
            b'{"batch": [], "batch": [{"type": "track", "event": "E", "userId": "u"}]}',
        )
    )
    add(
        request(
            "dup-type",
            "/v1/batch",
            b'{"batch": [{"type": "track", "type": "nonsense", "event": "E", "userId": "u"}]}',
        )
    )
    add(
        request(
            "dup-userId",
            "/v1/batch",
            b'{"batch": [{"type": "track", "event": "E", "userId": 1, "userId": {"a": 1}}]}',
        )
    )
    add(
        request(
            "dup-writeKey",
            "/v1/track",
            b'{"writeKey": "nope", "writeKey": "'
            + WRITE_KEY.encode()
            + b'", "type": "track", "event": "E", "userId": "u"}',
            auth=b"",
        )
    )
    add(
        request(
            "dup-messageId",
            "/v1/batch",
            b'{"batch": [{"messageId": "a", "messageId": null, "type": "track", "event": "E", "userId": "u"}]}',
        )
    )
    return out


def _huge_strings_and_many_fields() -> list[Request]:
    """Huge strings and many fields."""
    out: list[Request] = []
    add = out.append
    for size in (40_000, 1_000_000, 4_100_000):
        add(request(f"huge-string-{size}", "/v1/batch", batch_of(event(properties={"s": "x" * size}))))
        add(
            request(
                f"huge-single-{size}", "/v1/track", orjson.dumps(event(properties={"s": "é" * (size // 2)}))
            )
        )
    add(request("huge-key", "/v1/batch", batch_of(event(properties={"k" * 100_000: 1}))))
    add(request("huge-event-name", "/v1/batch", batch_of(event(event="E" * 300_000))))
    add(request("huge-messageId", "/v1/batch", batch_of(event(messageId="m" * 10_000))))
    add(request("many-fields", "/v1/batch", batch_of(event(properties={f"f{i}": i for i in range(20_000)}))))
    add(request("many-events", "/v1/batch", batch_of(*(event(messageId=f"many-{i}") for i in range(2001)))))
    add(request("many-empty-events", "/v1/batch", b'{"batch":[' + b"{}," * 1_300_000 + b"{}]}"))
    add(request("many-numbers", "/v1/batch", b'{"batch":[' + b"1," * 2_000_000 + b"1]}"))
    add(request("many-nulls-single", "/v1/track", b"[" + b"null," * 800_000 + b"null]"))
    return out


def _deep_nesting() -> list[Request]:
    """Deep nesting, arrays and objects, every path, around every limit."""
    out: list[Request] = []
    add = out.append
    for depth in (63, 64, 65, 200, 254, 255, 256, 500, 999, 1000, 1024, 1025, 5000, 100_000):
        for kind in ("array", "object"):
            add(
                request(
                    f"deep-batch-{kind}-{depth}",
                    "/v1/batch",
                    splice(event(properties={"d": "@"}), deep(depth, kind=kind)),
                )
            )
            add(
                request(
                    f"deep-single-{kind}-{depth}",
                    "/v1/screen",
                    splice(event(context={"d": "@"}), deep(depth, kind=kind), batch=False),
                )
            )
        add(
            request(
                f"deep-import-{depth}", "/v1/import", splice(event(traits="@"), deep(depth, kind="object"))
            )
        )
        add(
            request(
                f"deep-body-context-{depth}",
                "/v1/batch",
                orjson.dumps({"batch": [event()], "context": "@"}).replace(
                    b'"@"', deep(depth, kind="object")
                ),
            )
        )
    add(request("deep-unclosed", "/v1/batch", b"[" * 3_000_000))
    add(request("deep-unopened", "/v1/batch", b"]" * 3_000_000))
    add(request("deep-mismatched", "/v1/batch", b"[{" * 600 + b"]}" * 600))
    add(request("unbalanced-many", "/v1/batch", b"]" + b"[{}]" * 20_000))
    return out


def _odd_numbers() -> list[Request]:
    """Odd numbers, as fields the router reads and as fields it only stores."""
    out: list[Request] = []
    add = out.append
    numbers = [b"1e999", b"-1e999", b"1E+999", b"1e-999", b"1e308", b"1.7976931348623157e309", b"-0", b"0.0e0",
               b"18446744073709551616", b"-9223372036854775809", b"9" * 400, b"0." + b"0" * 400 + b"1",
               b"NaN", b"Infinity", b"-Infinity", b"01", b"1.", b".5", b"+1", b"0x10", b"1e", b"--1"]  # fmt: skip
    for index, number in enumerate(numbers):
        add(request(f"number-prop-{index}", "/v1/batch", splice(event(properties={"v": "@"}), number)))
        add(request(f"number-userId-{index}", "/v1/batch", splice(event(userId="@"), number)))
        add(
            request(
                f"number-messageId-{index}", "/v1/identify", splice(event(messageId="@"), number, batch=False)
            )
        )
        add(request(f"number-timestamp-{index}", "/v1/batch", splice(event(timestamp="@"), number)))
    return out


def _timestamps() -> list[Request]:
    """Timestamps."""
    out: list[Request] = []
    add = out.append
    stamps = ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
              "2026-02-30T00:00:00Z", "2026-13-01", "yesterday", "", "2026-11-20T08:00:00.000000000000Z", "+002026-01-01",
              "2026-11-20T25:00:00Z", "2026-11-20T08:00:00+99:00"]  # fmt: skip
    for index, stamp in enumerate(stamps):
        add(
            request(
                f"sentAt-skew-{index}",
                "/v1/batch",
                batch_of(event(originalTimestamp="0001-01-01T00:00:00Z"), sentAt=stamp),
            )
        )
        add(
            request(
                f"original-{index}",
                "/v1/batch",
                batch_of(event(originalTimestamp=stamp), sentAt="9999-12-31T23:59:59Z"),
            )
        )
        add(request(f"timestamp-{index}", "/v1/page", orjson.dumps(event(timestamp=stamp, sentAt=stamp))))
    return out


def _auth_headers() -> list[Request]:
    """Auth headers."""
    out: list[Request] = []
    add = out.append
    auths = [b"", b"Basic", b"Basic ", b"Basic %%%", b"Basic w\xe9\xe9", b"Basic \xff\xfe\xfd", "Basic é".encode(),
             basic(b"\xff\xfe"), basic("é" + WRITE_KEY), basic(WRITE_KEY.upper()), basic(""), b"Basic " + b"A" * 100_000,
             b"Bearer " + WRITE_KEY.encode(), b"Digest x", b"basic " + base64.b64encode(WRITE_KEY.encode()),
             b"Basic " + base64.b64encode(f"{WRITE_KEY}:{'p' * 10}".encode()), b"Basic " + base64.b64encode(b":" + WRITE_KEY.encode()),
             b"Basic =" , b"\x00", basic(WRITE_KEY) + b" extra"]  # fmt: skip
    for index, auth in enumerate(auths):
        too_long_or_nul = len(auth) > 8000 or b"\x00" in auth
        add(request(f"auth-{index}", "/v1/batch", GOOD, auth=auth or b"X", http_error=too_long_or_nul))
    add(request("auth-twice", "/v1/batch", GOOD, headers=((b"Authorization", basic(OTHER_KEY)),)))
    for index, key in enumerate([None, 12, [WRITE_KEY], {"k": WRITE_KEY}, "", WRITE_KEY + "\x00", "\ud800"]):
        body = orjson.dumps({"batch": [event()], "writeKey": "@"}).replace(
            b'"@"', b'"\\ud800"' if key == "\ud800" else orjson.dumps(key)
        )
        add(request(f"body-key-{index}", "/v1/batch", body, auth=b"Bearer x"))
    return out


def _write_keys_in_odd_places_accepted() -> list[Request]:
    """Write keys in odd places (accepted, scrubbed)."""
    out: list[Request] = []
    add = out.append
    escaped = "".join(f"\\u{ord(c):04x}" for c in WRITE_KEY).encode()
    add(request("key-context", "/v1/batch", batch_of(event(context={"writeKey": WRITE_KEY}))))
    add(request("key-type", "/v1/batch", batch_of(event(type=WRITE_KEY))))
    add(request("key-escaped", "/v1/batch", splice(event(properties={"k": "@"}), b'"' + escaped + b'"')))
    add(request("key-field-name", "/v1/batch", batch_of(event(properties={OTHER_KEY: WRITE_KEY}))))
    add(request("key-as-messageId", "/v1/track", orjson.dumps(event(messageId=WRITE_KEY))))
    return out


def _shapes() -> list[Request]:
    """Shapes."""
    out: list[Request] = []
    add = out.append
    shapes = [b"", b"null", b"[]", b"{}", b"1", b'"x"', b'{"batch": null}', b'{"batch": {}}', b'{"batch": "x"}', b'{"batch": [null]}',
              b'{"batch": [[]]}', b'{"batch": [1, "a", true]}', b'{"batch": [{}]}', b'{"batch": [{"type": null}]}',
              b'{"batch": [{"type": "track"}], "context": []}', b'{"batch": [{"type": "track"}], "integrations": 1}',
              b'{"batch": [{"type": "track"}], "sentAt": 5}', b'{"batch": [{"type": "group", "userId": "u"}]}',
              b'{"batch": [{"type": "alias", "userId": "u", "previousId": {}}]}', b"   ", b"\x00\x00", b"{" * 10, b'{"batch": [' ]  # fmt: skip
    for index, shape in enumerate(shapes):
        add(request(f"shape-batch-{index}", "/v1/batch", shape))
        add(request(f"shape-single-{index}", "/v1/group", shape))
    return out


def _lying_content_length() -> list[Request]:
    """Lying Content-Length, half bodies, odd methods and paths."""
    out: list[Request] = []
    add = out.append
    add(request("length-short", "/v1/batch", GOOD, length=len(GOOD) // 2, http_error=True))
    add(request("length-long", "/v1/batch", GOOD, length=len(GOOD) + 100))
    add(request("length-huge", "/v1/batch", GOOD, length=10**12))
    add(request("half-then-close", "/v1/batch", GOOD[: len(GOOD) // 2], length=len(GOOD), half_close=True))
    add(
        request(
            "half-gzip-then-close",
            "/v1/batch",
            PACKED[:10],
            length=len(PACKED),
            headers=GZIP,
            half_close=True,
        )
    )
    for method, path in (("GET", "/v1/batch"), ("PUT", "/v1/track"), ("DELETE", "/v1/batch"), ("POST", "/v1/nope"),
                         ("POST", "/v2/batch"), ("POST", "/v1/batch/"), ("POST", "/v1/%ff"), ("GET", "/" + "a" * 4000),
                         ("POST", "/health"), ("PATCH", "/metrics")):  # fmt: skip
        add(request(f"route-{method}-{path[:20]}", path, GOOD, method=method))
    return out


def _admin_api() -> list[Request]:
    """Admin API."""
    out: list[Request] = []
    add = out.append
    bearer = b"Bearer " + ADMIN_TOKEN.encode()
    admin_auths = [bearer, b"Bearer \xff\xfe", "Bearer é".encode(), b"Bearer " + b"x" * 10_000, b"", bearer + b"\x00", b"bearer " + ADMIN_TOKEN.encode()]  # fmt: skip
    for index, auth in enumerate(admin_auths):
        too_long_or_nul = len(auth) > 8000 or b"\x00" in auth
        add(
            request(
                f"admin-auth-{index}",
                "/admin/dead-letters",
                method="GET",
                auth=auth or b"X",
                http_error=too_long_or_nul,
            )
        )
    for query in ("after=99999999999999999999999", "after=-1", "after=x", "limit=0", "limit=99999999999999999999", "limit=-5",
                  "after=9223372036854775807", "after=9223372036854775808", "reason=%ff", "destination=" + "d" * 5000,
                  "reason=\x00", "limit=1e3", "after=1_000"):  # fmt: skip
        add(
            request(
                f"admin-query-{query[:24]}",
                "/admin/dead-letters?" + query,
                method="GET",
                auth=bearer,
                http_error="\x00" in query,
            )
        )
    for job_id in (
        "1",
        "0",
        "99999999999999999999999",
        "9223372036854775807",
        "9223372036854775808",
        "1" * 500,
    ):
        add(request(f"admin-show-{job_id[:24]}", f"/admin/dead-letters/{job_id}", method="GET", auth=bearer))
    for action in ("retry", "purge"):
        for index, body in enumerate([b"", b"[]", b"{", b'{"ids": [99999999999999999999999]}', b'{"ids": [-1, 0]}',
                                      b'{"ids": "1"}', b'{"reason": 5}', b'{"all": "yes"}', b'{"ids": [1e999]}',
                                      b'{"ids": [1], "all": true}', b"\xff", b'{"reason": "' + b"r" * 100_000 + b'"}']):  # fmt: skip
            add(request(f"admin-{action}-{index}", f"/admin/dead-letters/{action}", body, auth=bearer))
    return out


CASES = (
    _invalid_utf_and_surrogates,
    _gzip,
    _content_types,
    _duplicate_keys,
    _huge_strings_and_many_fields,
    _deep_nesting,
    _odd_numbers,
    _timestamps,
    _auth_headers,
    _write_keys_in_odd_places_accepted,
    _shapes,
    _lying_content_length,
    _admin_api,
)


# --- sending ----------------------------------------------------------------------------------------


async def send(router: Router, req: Request) -> tuple[int, bytes, float]:
    """Send one request as bytes; its status (0: no answer), body and seconds to answer."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(router.host, router.port)
    try:
        writer.write(req.data)
        await writer.drain()
        if req.half_close:
            writer.write_eof()
        status, body = await asyncio.wait_for(read_answer(reader), 10)
    except (ConnectionResetError, asyncio.IncompleteReadError):
        status, body = 0, b""
    finally:
        writer.close()
    return status, body, time.perf_counter() - started


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status and body of one answer, read as far as its Content-Length (the server may linger
    on a connection whose body it did not read: a client reads the answer and goes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        return 0, head
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await (reader.readexactly(int(length.group(1))) if length else reader.read())
    return int(head.split(b" ", 2)[1]), body


async def send_all(
    router: Router, requests: list[Request], *, concurrency: int = 8
) -> list[tuple[Request, int, bytes, float]]:
    gate = asyncio.Semaphore(concurrency)

    async def one(req: Request) -> tuple[Request, int, bytes, float]:
        async with gate:
            return (req, *await send(router, req))

    return await asyncio.gather(*(one(req) for req in requests))


def test_hand_written_requests(router: Router) -> None:
    """300+ malformed requests: none answered 5xx, none slower than 2 s; the refusals are JSON."""
    requests = hand_written()
    assert len(requests) >= 300
    results = asyncio.run(send_all(router, requests))
    failures = [(r.name, status, body[:200]) for r, status, body, _ in results if status >= 500]
    assert failures == []
    slow = [(r.name, round(elapsed, 2)) for r, _, _, elapsed in results if elapsed > SLOWEST]
    assert slow == []
    unanswered = [r.name for r, status, _, _ in results if status == 0 and not r.half_close]
    assert unanswered == []
    not_json = [
        (r.name, status, body[:80])
        for r, status, body, _ in results
        if 400 <= status < 500 and not body.lstrip().startswith(b"{") and not r.http_error
    ]
    assert not_json == []
    slowest = max(results, key=lambda result: result[3])
    print(f"\n{len(results)} hand-written requests; slowest {slowest[0].name} {slowest[3]:.3f} s")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
EVENTS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["track", "identify", "page", "screen", "group", "alias", "x"])},
        optional={
            "userId": JSON,
            "anonymousId": JSON,
            "event": JSON,
            "messageId": JSON,
            "timestamp": JSON,
            "originalTimestamp": JSON,
            "sentAt": JSON,
            "properties": JSON,
            "traits": JSON,
            "context": JSON,
            "groupId": JSON,
            "previousId": JSON,
            "writeKey": st.sampled_from([WRITE_KEY, OTHER_KEY, "x"]),
        },
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(EVENTS, min_size=1, max_size=5),
    path=st.sampled_from(["batch", "import", "track", "identify"]),
)
def test_generated_events(router: Router, events: list[Any], path: str) -> None:
    """Events of any JSON shape, whole batches or single calls: never a 5xx, never slow."""
    try:
        body = orjson.dumps({"batch": events} if path in ("batch", "import") else events[0])
    except (TypeError, orjson.JSONEncodeError):  # integers past 64 bits: written by the stdlib instead
        import json

        body = json.dumps({"batch": events} if path in ("batch", "import") else events[0]).encode()
    connection = http.client.HTTPConnection(router.host, router.port, timeout=10)
    try:
        started = time.perf_counter()
        connection.request("POST", f"/v1/{path}", body, {"Authorization": basic(WRITE_KEY).decode()})
        response = connection.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    assert response.status < 500, answer[:300]
    assert elapsed < SLOWEST
    assert WRITE_KEY.encode() not in answer and OTHER_KEY.encode() not in answer


def test_healthy_afterwards(router: Router) -> None:
    """After all that: /health and /ready are 200, a valid event is stored, nothing failed or leaked."""

    def get(path: str) -> int:
        connection = http.client.HTTPConnection(router.host, router.port, timeout=10)
        try:
            connection.request("GET", path)
            return connection.getresponse().status
        finally:
            connection.close()

    assert get("/health") == 200 and get("/ready") == 200
    connection = http.client.HTTPConnection(router.host, router.port, timeout=10)
    try:
        body = orjson.dumps({"batch": [event(messageId="fuzz-after")]})
        connection.request("POST", "/v1/batch", body, {"Authorization": basic(WRITE_KEY).decode()})
        response = connection.getresponse()
        assert response.status == 200 and orjson.loads(response.read())["accepted"] == 1
    finally:
        connection.close()

    async def stored() -> tuple[list[str], list[bytes]]:
        queue = SqliteQueue(router.data_dir / "queue.db")
        await queue.open()
        try:
            pending = await queue.list_jobs(JobState.PENDING, limit=100_000)
            dead = await queue.list_jobs(JobState.DEAD, limit=100_000)
        finally:
            await queue.close()
        everything = [job.payload for job in pending + dead] + [
            (job.last_error or "").encode() for job in dead
        ]
        return [job.message_id for job in pending], everything

    message_ids, texts = asyncio.run(stored())
    assert "fuzz-after" in message_ids
    for text in texts:
        assert WRITE_KEY.encode() not in text and OTHER_KEY.encode() not in text
    log = router.log.read_text()
    assert "request_failed" not in log and "Traceback" not in log and "event_prepare_failed" not in log
