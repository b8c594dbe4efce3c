"""A Klaviyo destination's settings, from the project's keys or RudderStack's."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from router.errors import ConfigError

KLAVIYO_BASE_URL = "https://a.klaviyo.com"
#: Consent channels Klaviyo's current API subscribes (``subscriptions.email`` / ``.sms`` of a bulk
#: subscribe job), for the identifier of each that the event carries (email, phone).
CONSENT_CHANNELS = ("email", "sms")
#: The other values seed 003 lists for ``consent`` (email, web, sms, directmail, mobile): those of the
#: legacy v1/v2 API's ``$consent`` (retired in 2024), with no subscription in the current API.
LEGACY_CONSENT_CHANNELS = ("web", "directmail", "mobile")

#: RudderStack destination-config keys and the project's names for them.
RUDDERSTACK_KEYS = {
    "privateApiKey": "private_key",
    "listId": "list_id",
    "consent": "consent",
    "smsConsent": "sms_consent",
    "enforceEmailAsPrimary": "enforce_email_as_primary",
    "flattenProperties": "flatten_properties",
    "sendPageAsTrack": "send_page_as_track",
    "additionalPageInfo": "additional_page_info",
}
#: RudderStack keys that do not apply to a server-side router and are accepted and ignored.
IGNORED_KEYS = frozenset(
    {
        "apiVersion",
        "publicApiKey",
        "useNativeSDK",
        "useNewKlaviyoRevisionVersion",
        "eventFilteringOption",
        "whitelistedEvents",
        "blacklistedEvents",
        "consentManagement",
        "oneTrustCookieCategories",
        "ketchConsentPurposes",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """Where and how events are sent to one Klaviyo account."""

    #: Name used in logs, metrics and the queue.
    name: str = "klaviyo"
    #: Klaviyo private API key (never logged); ``env:VAR`` is resolved when loaded.
    private_key: str = field(default="", repr=False)
    #: API host; the fake Klaviyo's address in tests and sandbox mode.
    base_url: str = KLAVIYO_BASE_URL
    #: Default list for identify subscriptions (an event's ``listId`` overrides it).
    list_id: str | None = None
    #: Default consent channels for subscriptions (``email``, ``sms``).
    consent: tuple[str, ...] = ("email",)
    #: Add ``sms`` to the consent channels (the seed's SMS Consent setting).
    sms_consent: bool = False
    #: Never send ``external_id``; keep userId as custom property ``_id``.
    enforce_email_as_primary: bool = False
    #: Flatten nested custom properties with ``.`` separators.
    flatten_properties: bool = False
    #: Send ``page`` calls as a ``Viewed Page`` event (else they are skipped).
    send_page_as_track: bool = False
    #: With ``send_page_as_track``, add the page properties to the event.
    additional_page_info: bool = False
    #: What a phone number that cannot be made E.164 does: ``reject`` the event (default, whatever
    #: the config's key style) or ``drop`` the number and send the rest, recording each drop (a
    #: ``transform_warning`` log line with the message id, a metric, a ``warning`` line of ``transform``).
    invalid_phone: str = "reject"
    #: ISO 3166 region used to read national phone numbers (``US``, ``GB``); none: E.164 only.
    default_phone_region: str | None = None
    #: Folder of user mapping files that extend or override the built-in ones.
    mappings_dir: Path | None = None

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], *, where: str = "destination") -> Destination:
        """Build from a config dict with the project's keys and/or RudderStack's.

        Raises :class:`ConfigError` naming the key and the reason.
        """
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key in IGNORED_KEYS:
                continue
            name = RUDDERSTACK_KEYS.get(key, key)
            if name not in known:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
            values[name] = _coerce(name, value, where=f"{where}.{key}")
        return cls(**values)


def _coerce(name: str, value: Any, *, where: str) -> Any:
    if name == "private_key":
        return _secret(value, where=where)
    if name == "consent":
        return _consent(value, where=where)
    if name in {"sms_consent", "enforce_email_as_primary", "flatten_properties"} | {
        "send_page_as_track",
        "additional_page_info",
    }:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__}")
        return value
    if name == "mappings_dir":
        return None if value in (None, "") else Path(value)
    if name == "default_phone_region":
        if value in (None, ""):
            return None
        if not (isinstance(value, str) and len(value) == 2 and value.isalpha()):
            raise ConfigError(f"{where}: expected a two-letter region code such as 'US'")
        return value.upper()
    if name == "invalid_phone":
        if value not in ("reject", "drop"):
            raise ConfigError(f"{where}: expected 'reject' or 'drop'")
        return value
    if name == "list_id":
        return None if value in (None, "") else str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _secret(value: Any, *, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    if value.startswith("env:"):
        return env_secret(value[4:].strip(), where=where)
    return value


def env_secret(var: str, *, where: str) -> str:
    """The value of environment variable ``var``; an error naming it when unset or set but empty."""
    resolved = os.environ.get(var) if var else None
    if resolved is None:
        raise ConfigError(f"{where}: environment variable {var or '(none)'} is not set")
    if not resolved.strip():
        raise ConfigError(f"{where}: environment variable {var} is set but empty")
    return resolved


def _consent(value: Any, *, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where}: expected a channel name or a list of them")
    channels = tuple(v.strip().lower() for v in items if v.strip())
    for channel in channels:
        if channel not in CONSENT_CHANNELS:
            raise ConfigError(f"{where}: {consent_problem(channel)}")
    return channels


def consent_problem(channel: str) -> str:
    """Why ``channel`` (lower case) is no consent channel Klaviyo's current API subscribes."""
    honoured = " and ".join(repr(c) for c in CONSENT_CHANNELS)
    if channel in LEGACY_CONSENT_CHANNELS:
        return (
            f"consent channel {channel!r} was a value of Klaviyo's retired v1/v2 API; "
            f"the current API subscribes only {honoured}"
        )
    return f"unknown consent channel {channel!r} (Klaviyo's current API subscribes {honoured})"
