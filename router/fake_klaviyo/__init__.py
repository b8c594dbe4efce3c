"""A real aiohttp server emulating the Klaviyo API subset the router uses (tests and local sandbox).

- :func:`build_fake_app` builds the application; its :class:`FakeKlaviyo` (profiles, events, lists,
  memberships, subscriptions, import jobs, request log, counters) is ``app[FAKE_KLAVIYO]``.
- Request bodies are validated against the trimmed Klaviyo spec (:mod:`router.klaviyo.spec`); rate limits
  are Klaviyo's fixed windows with ``429`` + ``Retry-After``; faults (scripted statuses, random 5xx,
  timeouts, revoked keys, invalid bulk items) are set on :attr:`FakeKlaviyo.faults`, via
  :class:`FakeKlaviyo` methods, or over the control API under ``/__fake__/`` (:mod:`.control`).
- :func:`run` serves it until SIGINT/SIGTERM.
"""

from __future__ import annotations

from router.fake_klaviyo.app import FAKE_KLAVIYO, build_fake_app, fake_of
from router.fake_klaviyo.faults import BulkFailure, Faults, Scripted
from router.fake_klaviyo.ratelimit import ManualClock
from router.fake_klaviyo.records import Event, ImportJob, KlaviyoList, Profile, RequestRecord, Subscription
from router.fake_klaviyo.server import FakeKlaviyoServer, run, serve
from router.fake_klaviyo.state import FakeKlaviyo, client_label

__all__ = [
    "FAKE_KLAVIYO",
    "BulkFailure",
    "Event",
    "FakeKlaviyo",
    "FakeKlaviyoServer",
    "Faults",
    "ImportJob",
    "KlaviyoList",
    "ManualClock",
    "Profile",
    "RequestRecord",
    "Scripted",
    "Subscription",
    "build_fake_app",
    "client_label",
    "fake_of",
    "run",
    "serve",
]
