"""Klaviyo's API as the router uses it: request records, endpoints, batching, client."""

from __future__ import annotations

from router.klaviyo.requests import KlaviyoRequest

__all__ = ["KlaviyoRequest"]
