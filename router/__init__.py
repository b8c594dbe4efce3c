"""klaviyo-router: RudderStack/Segment events, captured logs and query results into Klaviyo."""

from __future__ import annotations

__version__ = "0.1.0"
