"""Pure transform: one RudderStack/Segment message → the Klaviyo requests it means.

``transform(message, destination)`` returns single-endpoint :class:`KlaviyoRequest` records
(``/api/profile-import``, ``/api/events``, subscription jobs) or raises :class:`TransformError`
with a text naming what is wrong (:class:`PartlyRefused` when part of the message can still be
sent), or :class:`Skipped` for messages Klaviyo has no use for or that ``integrations`` keeps from
this destination. What was sent with something left out (a phone dropped under
``invalid_phone = "drop"``, a consent channel the current API has not) is told in
:class:`TransformWarning` records appended to the caller's ``warnings`` list.
No I/O, no clock, no mutation of the input. Field names and renames come from the mapping
files (:mod:`router.mapping`); this module holds only Klaviyo's semantics: identity, consent,
and the JSON:API envelopes. :mod:`router.klaviyo.batch` merges many results into bulk jobs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from router.destination import CONSENT_CHANNELS, LEGACY_CONSENT_CHANNELS, Destination, consent_problem
from router.errors import PartlyRefused, Skipped, TransformError
from router.fields import Context
from router.identity import ordering_key
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import EventMapping, Mappings, load_mappings

SUPPORTED_TYPES: Final = frozenset({"identify", "track", "page", "screen", "group", "alias"})
#: Klaviyo refuses metric names of 128 characters or more.
MAX_METRIC_NAME: Final = 127
#: Keys of ``integrations`` that address this destination.
INTEGRATION_KEYS: Final = ("Klaviyo", "klaviyo", "KLAVIYO")
INTEGRATION_KEY_SET: Final = frozenset(INTEGRATION_KEYS)
#: Profile attributes that identify someone (one is needed unless Klaviyo's profile id is known).
IDENTIFIERS: Final = frozenset({"email", "phone_number", "external_id", "anonymous_id"})
#: What every destination of this router is called in ``integrations`` (compared ignoring case):
#: RudderStack's display name and definition name (``Klaviyo``, ``KLAVIYO``), Segment's name.
INTEGRATION_NAME: Final = "klaviyo"
PATCH_OPERATIONS: Final = {
    "fieldsToUnset": "unset",
    "fieldsToAppend": "append",
    "fieldsToUnappend": "unappend",
}


class TransformWarning(NamedTuple):
    """Something left out of what a message was sent as: ``code`` is a stable snake_case name
    (for metrics and grepping), ``message`` says what and why."""

    code: str
    message: str


def transform(
    message: Mapping[str, Any],
    destination: Destination,
    mappings: Mappings | None = None,
    *,
    index: int = 0,
    warnings: list[TransformWarning] | None = None,
) -> list[KlaviyoRequest]:
    """The Klaviyo requests for one message, each on its single endpoint.

    ``index`` is recorded in each request's ``sources`` so batching can trace items back.
    ``warnings``, when given, receives what was left out of the requests and why.
    """
    if not isinstance(message, dict):
        raise TransformError(f"message must be a JSON object, got {type(message).__name__}")
    if "statusCode" in message and isinstance(message.get("output"), dict):
        return [passthrough(message["output"], index)]
    mappings = mappings or load_mappings(destination.mappings_dir)
    msg_type = message.get("type")
    if msg_type is None or msg_type == "":
        raise TransformError("Event type is required")
    if not isinstance(msg_type, str) or msg_type.lower() not in SUPPORTED_TYPES:
        raise TransformError(f"Event type {msg_type} is not supported")
    off = switched_off(message.get("integrations"), destination.name)
    if off is not None:
        raise Skipped(off)
    if (message.get("context") or {}).get("mappedToDestination"):
        message = reverse_etl(message)
    call = _Call(message, destination, mappings, index, msg_type.lower(), warnings)
    return call.run()


def switched_off(integrations: Any, name: str) -> str | None:
    """Why a message's ``integrations`` keeps it from destination ``name``, or None.

    The keys that address a destination, compared ignoring case, most specific first: its own
    name in the config (``klaviyo-eu``), then ``Klaviyo`` (every Klaviyo destination), then ``All``.
    ``false`` turns it off; ``true`` or an object of options (``{"fieldsToUnset": [...]}``) on;
    ``null`` says nothing. As with RudderStack and Segment, ``{"All": false}`` turns off every
    destination not named with a value of its own.
    """
    if not isinstance(integrations, dict) or not integrations:
        return None
    keys = {str(key).strip().lower(): key for key in integrations}
    for wanted in (name.lower(), INTEGRATION_NAME, "all"):
        key = keys.get(wanted)
        if key is None or integrations[key] is None:
            continue
        if integrations[key] is not False:
            return None
        if wanted == "all":
            return f'integrations: "All" is false and neither "Klaviyo" nor {name!r} is turned on'
        return f"integrations: {key!r} is false"
    return None


#: Endpoint → request kind, for requests that arrive already transformed.
PASSTHROUGH_KINDS: Final = {
    "/api/profile-import": "profile",
    "/api/events": "event",
    "/api/profile-subscription-bulk-create-jobs": "subscribe",
    "/api/profile-subscription-bulk-delete-jobs": "unsubscribe",
    "/api/event-bulk-create-jobs": "bulk",
    "/api/profile-bulk-import-jobs": "bulk",
}


def passthrough(output: Mapping[str, Any], index: int) -> KlaviyoRequest:
    """A request RudderStack already transformed (``{"output": ..., "statusCode": ...}``), sent as it is."""
    path = output.get("endpointPath")
    body = (output.get("body") or {}).get("JSON")
    if path not in PASSTHROUGH_KINDS or not isinstance(body, dict):
        raise TransformError(
            f"pre-transformed request for {path!r} is not one the router sends "
            f"({', '.join(PASSTHROUGH_KINDS)}) or has no JSON body"
        )
    method = str(output.get("method", "POST")).upper()
    return KlaviyoRequest(method=method, path=path, body=body, kind=PASSTHROUGH_KINDS[path], sources=(index,))


def reverse_etl(message: Mapping[str, Any]) -> dict[str, Any]:
    """A warehouse (rETL) identify: its first ``context.externalId`` is the user's id and a trait,
    and a list subscription defaults to on. Returns a changed copy."""
    external = (message.get("context") or {}).get("externalId")
    if not (isinstance(external, list) and external and isinstance(external[0], dict)):
        return dict(message)
    first = external[0]
    out = dict(message)
    where = "traits" if isinstance(message.get("traits"), dict) else "context"
    traits = dict(_traits(message))
    if first.get("identifierType") and first.get("id") is not None:
        traits[str(first["identifierType"])] = first["id"]
        out["userId"] = first["id"]
    properties = traits.get("properties")
    if not isinstance(properties, dict) or properties.get("subscribe") is None:
        traits["properties"] = {**(properties if isinstance(properties, dict) else {}), "subscribe": True}
    if where == "traits":
        out["traits"] = traits
    else:
        out["context"] = {**message["context"], "traits": traits}
    return out


class _Call:
    """The state of transforming one message; each method builds one part."""

    def __init__(
        self,
        message: Mapping[str, Any],
        destination: Destination,
        mappings: Mappings,
        index: int,
        msg_type: str,
        warnings: list[TransformWarning] | None = None,
    ) -> None:
        self.message = message
        self.destination = destination
        self.mappings = mappings
        self.index = index
        self.type = msg_type
        self.ctx = _context(destination.default_phone_region, destination.invalid_phone == "drop")
        self.key = ordering_key(message)
        self._profile: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.holders = mappings.holders(message)
        self.warnings = warnings if warnings is not None else []

    def run(self) -> list[KlaviyoRequest]:
        if self.type == "identify":
            profile = self.profile_import()
            try:
                return [profile, *self.subscription()]
            except TransformError as exc:
                raise PartlyRefused(
                    f"{exc.message} (the profile update was sent; its list subscription was not)", [profile]
                ) from None
        if self.type in ("track", "screen"):
            return [self.event()]
        if self.type == "page":
            if not self.destination.send_page_as_track:
                raise Skipped("page call skipped: the destination's send_page_as_track is off")
            return [self.event()]
        if self.type == "group":
            return self.subscription()
        raise Skipped("alias call skipped: Klaviyo has no equivalent of alias")

    def request(self, path: str, body: dict[str, Any], kind: str) -> KlaviyoRequest:
        return KlaviyoRequest(
            method="POST", path=path, body=body, kind=kind, sources=(self.index,), ordering_key=self.key
        )

    # ------------------------------------------------------------ profile

    def profile(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The profile resource (``type``, ``id``?, ``attributes``) and its ``meta``; built once."""
        if self._profile is None:
            self._profile = self.build_profile()
        return self._profile

    def warn(self, code: str, message: str) -> None:
        self.warnings.append(TransformWarning(code, message))

    def build_profile(self) -> tuple[dict[str, Any], dict[str, Any]]:
        mapping = self.mappings.profile
        fields = mapping.fields_for(self.type)
        attributes = fields.run(self.holders, self.ctx)
        if self.ctx.drop_invalid_phone:
            for reason in fields.dropped(self.holders, self.ctx, attributes):
                self.warn("invalid_phone_dropped", f"{reason}; sent without it (invalid_phone = drop)")
        properties = mapping.properties.collect(self.holders) if mapping.properties else {}
        # custom properties a field of the mapping converts (``properties.last_event_date``) win
        # over the same keys passed through unconverted
        properties.update(attributes.pop("properties", None) or {})
        meta = self.patch_properties()
        for names in meta.values():
            for name in names:
                properties.pop(name, None)
        if self.destination.enforce_email_as_primary:
            external_id = attributes.pop("external_id", None)
            if external_id is not None:
                properties["_id"] = external_id
        if self.destination.flatten_properties:
            properties = flatten(properties)
        if properties:
            attributes["properties"] = properties
        resource: dict[str, Any] = {"type": "profile", "attributes": attributes}
        profile_id = self.klaviyo_profile_id()
        if profile_id is not None:
            resource["id"] = profile_id
        self.check_identified(attributes, profile_id)
        return resource, ({"patch_properties": meta} if meta else {})

    def check_identified(self, attributes: Mapping[str, Any], profile_id: str | None) -> None:
        if self.destination.enforce_email_as_primary:
            if "email" not in attributes and "phone_number" not in attributes:
                raise TransformError(
                    "None of email and phone are present in the payload "
                    "(enforce_email_as_primary needs one of them)"
                )
        elif profile_id is None and IDENTIFIERS.isdisjoint(attributes):
            raise TransformError(
                "no usable identifier: the message has no userId, anonymousId, email or phone"
            )

    def klaviyo_profile_id(self) -> str | None:
        external = (self.message.get("context") or {}).get("externalId")
        if isinstance(external, list):
            for entry in external:
                if isinstance(entry, dict) and entry.get("type") == "klaviyo-profileId" and entry.get("id"):
                    return str(entry["id"])
        return None

    def patch_properties(self) -> dict[str, Any]:
        """``meta.patch_properties`` from ``integrations.Klaviyo.fieldsToUnset/Append/Unappend``."""
        integrations = self.message.get("integrations")
        if not isinstance(integrations, dict) or INTEGRATION_KEY_SET.isdisjoint(integrations):
            return {}
        options: dict[str, Any] = next(
            (integrations[k] for k in INTEGRATION_KEYS if isinstance(integrations.get(k), dict)), {}
        )
        traits = _traits(self.message)
        patch: dict[str, Any] = {}
        for option, operation in PATCH_OPERATIONS.items():
            names = options.get(option)
            if not isinstance(names, list) or not names:
                continue
            if operation == "unset":
                patch["unset"] = [str(n) for n in names]
            else:
                patch[operation] = {str(n): traits[n] for n in names if n in traits}
        return patch

    def profile_import(self) -> KlaviyoRequest:
        resource, meta = self.profile()
        return self.request(
            "/api/profile-import", {"data": {**resource, **({"meta": meta} if meta else {})}}, "profile"
        )

    # ------------------------------------------------------------ events

    def event(self) -> KlaviyoRequest:
        name = self.message.get("event")
        mapping = self.mappings.event_for(self.type, name if isinstance(name, str) else None)
        if mapping is None:
            raise TransformError(f"no mapping for {self.type} calls")
        metric = mapping.metric.resolve(self.holders, self.ctx)
        if not isinstance(metric, str) or not metric.strip():
            raise TransformError(f"{self.type} call has no event name")
        if len(metric) > MAX_METRIC_NAME:
            raise TransformError(
                f"event name is {len(metric)} characters; Klaviyo allows at most {MAX_METRIC_NAME}"
            )
        attributes = mapping.attributes.run(self.holders, self.ctx)
        attributes["properties"] = self.event_properties(mapping)
        attributes["metric"] = {"data": {"type": "metric", "attributes": {"name": metric}}}
        resource, meta = self.profile()
        if meta:
            resource = {**resource, "attributes": {**resource["attributes"], "meta": meta}}
        attributes["profile"] = {"data": resource}
        return self.request("/api/events", {"data": {"type": "event", "attributes": attributes}}, "event")

    def event_properties(self, mapping: EventMapping) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        if mapping.rest is not None and (
            mapping.rest_when is None or getattr(self.destination, mapping.rest_when)
        ):
            properties = mapping.rest.collect(self.holders)
        properties.update(mapping.properties.run(self.holders, self.ctx))
        return flatten(properties) if self.destination.flatten_properties else properties

    # ------------------------------------------------------------ lists and consent

    def subscription(self) -> list[KlaviyoRequest]:
        mapping = self.mappings.subscriptions.get(self.type)
        if mapping is None:
            return []
        decision = mapping.fields.run(self.holders, self.ctx)
        list_id = decision.get("list_id")
        if list_id is None and mapping.use_default_list:
            list_id = self.destination.list_id
        subscribe = decision.get("subscribe")
        if list_id is None:
            return []
        if subscribe is None:
            if mapping.when_subscribe_absent == "add":
                return [self.list_membership(list_id, self.profile()[0])]
            return []
        resource, _ = self.profile()
        attributes = resource["attributes"]
        identifiers = {k: attributes[k] for k in ("email", "phone_number") if k in attributes}
        channels = self.consent_channels(decision)
        if not channels and subscribe:
            return [self.list_membership(list_id, resource)]
        subscriptions = _subscriptions(channels, identifiers, "SUBSCRIBED" if subscribe else "UNSUBSCRIBED")
        if not subscriptions:
            raise TransformError(
                f"No subscriptions could be resolved: consent channels {list(channels) or '[]'} match none "
                f"of the identifiers present ({', '.join(identifiers) or 'no email or phone'})"
            )
        profile: dict[str, Any] = {
            "type": "profile",
            "attributes": {**identifiers, "subscriptions": subscriptions},
        }
        if subscribe and "id" in resource:
            profile["id"] = resource["id"]
        job = "profile-subscription-bulk-create-job" if subscribe else "profile-subscription-bulk-delete-job"
        body = {
            "data": {
                "type": job,
                "attributes": {"profiles": {"data": [profile]}},
                "relationships": {"list": {"data": {"type": "list", "id": list_id}}},
            }
        }
        return [self.request(f"/api/{job}s", body, "subscribe" if subscribe else "unsubscribe")]

    def consent_channels(self, decision: Mapping[str, Any]) -> tuple[str, ...]:
        """The event's consent (string or list) else the destination's, plus ``sms`` for smsConsent.

        Seed 003's other values (web, directmail, mobile) have no subscription in the current API:
        left out with a warning. Anything else is refused, naming it.
        """
        consent = decision.get("consent")
        if consent is None:
            channels = list(self.destination.consent)
        else:
            channels = []
            for item in consent if isinstance(consent, list) else [consent]:
                if not isinstance(item, str):
                    raise TransformError(
                        f"consent: expected channel names (email, sms), got {type(item).__name__}"
                    )
                name = item.strip().lower()
                if name in CONSENT_CHANNELS:
                    channels.append(name)
                elif name in LEGACY_CONSENT_CHANNELS:
                    self.warn("consent_channel_ignored", f"consent: {consent_problem(name)}; left out")
                elif name:
                    raise TransformError(f"consent: {consent_problem(name)}")
        sms = decision.get("sms_consent")
        if sms is True or (sms is None and self.destination.sms_consent):
            channels.append("sms")
        return tuple(dict.fromkeys(channels))

    def list_membership(self, list_id: str, resource: dict[str, Any]) -> KlaviyoRequest:
        """Subscribe with no consent channel: list membership only, through a bulk import job."""
        body = {
            "data": {
                "type": "profile-bulk-import-job",
                "attributes": {"profiles": {"data": [resource]}},
                "relationships": {"lists": {"data": [{"type": "list", "id": list_id}]}},
            }
        }
        return self.request("/api/profile-bulk-import-jobs", body, "list_add")


@functools.lru_cache(maxsize=64)
def _context(region: str | None, drop_invalid_phone: bool) -> Context:
    return Context(region, drop_invalid_phone)


def _subscriptions(channels: tuple[str, ...], identifiers: Mapping[str, Any], consent: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "email" in channels and "email" in identifiers:
        out["email"] = {"marketing": {"consent": consent}}
    if "sms" in channels and "phone_number" in identifiers:
        out["sms"] = {"marketing": {"consent": consent}}
    return out


def _traits(message: Mapping[str, Any]) -> Mapping[str, Any]:
    traits = message.get("traits")
    if isinstance(traits, dict):
        return traits
    traits = (message.get("context") or {}).get("traits")
    return traits if isinstance(traits, dict) else {}


def flatten(properties: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects become ``a.b.c`` keys; arrays of objects become ``key[0].sub`` keys.

    Arrays of plain values stay arrays (Klaviyo segments on them as lists).
    """
    out: dict[str, Any] = {}
    for key, value in properties.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
            for i, item in enumerate(value):
                if isinstance(item, dict | list):
                    nested = item if isinstance(item, dict) else {str(j): v for j, v in enumerate(item)}
                    out.update(flatten(nested, f"{name}[{i}]."))
                else:
                    out[f"{name}[{i}]"] = item
        else:
            out[name] = value
    return out
