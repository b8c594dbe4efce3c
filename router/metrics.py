"""Prometheus metrics of one app, in its own registry (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Request latency buckets, seconds: ingest answers after a durable commit (milliseconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The router's collectors; labels are source, destination and path names, never keys."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_accepted = Counter(
            "router_events_accepted",
            "Events accepted and queued (duplicates included), per source.",
            ["source"],
            registry=self.registry,
        )
        self.events_rejected = Counter(
            "router_events_rejected",
            "Events rejected at ingest and kept as dead letters, per source.",
            ["source"],
            registry=self.registry,
        )
        self.events_duplicate = Counter(
            "router_events_duplicate",
            "Accepted events not queued again: (source, messageId) seen inside the dedupe window.",
            ["source"],
            registry=self.registry,
        )
        self.requests = Counter(
            "router_http_requests",
            "HTTP requests answered, per route (batch, track, ..., health, admin, unmatched) and status code.",
            ["path", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "router_http_request_duration_seconds",
            "Time to answer an HTTP request, per route (an ingest request's durable commit included).",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "router_queue_depth", "Jobs pending or in flight (sampled).", registry=self.registry
        )
        self.queue_cleaned = Counter(
            "router_queue_cleaned_rows",
            "Rows the retention cleanup deleted: done jobs past [queue] retention, (source, messageId) "
            "pairs past dedupe_window.",
            registry=self.registry,
        )
        self.queue_cleanup_duration = Histogram(
            "router_queue_cleanup_duration_seconds",
            "Time one retention cleanup took, all its chunks together.",
            buckets=(0.01, 0.1, 1.0, 10.0, 60.0, 600.0),
            registry=self.registry,
        )
        self.disk_free = Gauge(
            "router_data_dir_free_bytes",
            "Free bytes on the data folder's disk (sampled).",
            registry=self.registry,
        )
        self.destination_paused = Gauge(
            "router_destination_paused",
            "1 while a destination is paused (Klaviyo refused its key), else 0.",
            ["destination"],
            registry=self.registry,
        )

        self.jobs_settled = Counter(
            "router_jobs_settled",
            "Jobs settled by delivery, per destination and result (delivered, skipped, retried, dead).",
            ["destination", "result"],
            registry=self.registry,
        )
        self.transform_warnings = Counter(
            "router_transform_warnings",
            "Settled jobs sent with something left out, per destination and warning "
            "(invalid_phone_dropped, consent_channel_ignored).",
            ["destination", "warning"],
            registry=self.registry,
        )
        self.klaviyo_requests = Counter(
            "router_klaviyo_requests",
            "Requests sent to Klaviyo, per endpoint (operationId) and result (ok, retry, permanent, auth).",
            ["endpoint", "result"],
            registry=self.registry,
        )
        self.klaviyo_throttled = Counter(
            "router_klaviyo_throttled",
            "Klaviyo answers with status 429, per endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.klaviyo_latency = Histogram(
            "router_klaviyo_request_duration_seconds",
            "Time for Klaviyo to answer, per endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.delivery_lag = Histogram(
            "router_delivery_lag_seconds",
            "From acceptance to delivery of an event, per destination.",
            ["destination"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
            registry=self.registry,
        )

    def observe_request(self, endpoint: str, result: str, status: int, seconds: float) -> None:
        """One Klaviyo call (from the delivery client)."""
        self.klaviyo_requests.labels(endpoint, result).inc()
        self.klaviyo_latency.labels(endpoint).observe(seconds)
        if status == 429:
            self.klaviyo_throttled.labels(endpoint).inc()

    def observe_settled(self, destination: str, result: str, count: int, lags: list[float]) -> None:
        """Jobs settled by a delivery batch; ``lags`` are the delivered ones' ages in seconds."""
        self.jobs_settled.labels(destination, result).inc(count)
        histogram = self.delivery_lag.labels(destination)
        for lag in lags:
            histogram.observe(lag)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
