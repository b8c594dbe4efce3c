"""klaviyo-router: RudderStack/Segment events into Klaviyo, correctly, fast and without loss."""

from __future__ import annotations

__version__ = "0.1.0"
