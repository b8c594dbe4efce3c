"""Every error the router raises, grouped by what the caller must do with it.

    RouterError
    ├── ConfigError            unusable settings or destination config: stop at start-up
    ├── MappingError           a mapping file is invalid: stop at start-up (file, pointer, reason)
    ├── BadEvent               an incoming message is malformed: reject at ingest (4xx), keep as dead letter
    ├── TransformError         a message cannot become a Klaviyo request: dead letter, replayable
    │   └── PartlyRefused      part of it can: send that part, then dead-letter the message
    ├── Skipped                a message has no Klaviyo equivalent (alias; page when off): recorded, not sent
    └── DeliveryError          Klaviyo or the network failed a request
        ├── Retryable          429, 408, 5xx, timeouts, connection errors: back off and retry
        ├── Permanent          400/404/409/413/422: dead letter with Klaviyo's detail
        └── AuthFailed         401/403: pause the destination, keep the events

The class docstring is the default message.
"""

from __future__ import annotations

from typing import Any


class RouterError(Exception):
    """klaviyo-router error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(RouterError):
    """Invalid configuration."""


class MappingError(RouterError):
    """Invalid mapping file."""


class BadEvent(RouterError):
    """Malformed event."""


class TransformError(RouterError):
    """The message cannot be turned into Klaviyo requests."""

    #: HTTP-like status reported for the rejected input (400: the event is at fault).
    status = 400


class PartlyRefused(TransformError):
    """Part of the message cannot be turned into Klaviyo requests; the rest can.

    An identify whose list subscription is unusable (an unknown consent channel) still updates the
    profile: ``requests`` are sent, and the message is then kept as a dead letter with the reason,
    so the refused part can be replayed once fixed. Callers that only know :class:`TransformError`
    refuse the whole message, which loses nothing either.
    """

    def __init__(self, message: str, requests: list[Any]) -> None:
        super().__init__(message)
        #: The requests of the usable part (:class:`router.klaviyo.requests.KlaviyoRequest`).
        self.requests = requests


class Skipped(RouterError):
    """The message has no Klaviyo equivalent and is recorded as skipped."""


class DeliveryError(RouterError):
    """Delivery to Klaviyo failed."""


class Retryable(DeliveryError):
    """Temporary delivery failure; retry later."""


class Permanent(DeliveryError):
    """Klaviyo refused the request; it will not succeed as it is."""


class AuthFailed(DeliveryError):
    """Klaviyo refused the private key; the destination is paused."""
