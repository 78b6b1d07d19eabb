"""The server's own Prometheus metrics (``repguard serve``, embedded or ``--upstream``), beside the guard's.

They live next to the server that sets them; ``repguard.metrics`` keeps the guard's metrics, which every path
(transformers, vLLM, the servers) records. Both register on the same registry, so ``/metrics`` serves both,
and ``metric_names()`` here lists every name a dashboard may query.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .. import metrics as guard_metrics

SERVER_REQUESTS = Counter(
    "repguard_server_requests_total", "HTTP requests to the generation endpoints, by status code.",
    ["model", "endpoint", "status"],
)
SERVER_REQUEST_DURATION = Histogram(
    "repguard_server_request_duration_seconds", "Time from admission to the last byte of a generation request.",
    ["model", "endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)
SERVER_TTFT = Histogram(
    "repguard_server_time_to_first_token_seconds", "Time from admission to a request's first generated token.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40),
)
SERVER_QUEUED = Gauge(
    "repguard_server_queued_requests", "Admitted requests waiting for a batch.", ["model"], multiprocess_mode="livesum"
)
SERVER_RUNNING = Gauge(
    "repguard_server_running_requests", "Requests in the batch being generated.", ["model"], multiprocess_mode="livesum"
)
SERVER_BATCH_ROWS = Histogram(
    "repguard_server_batch_rows", "Rows (prompt x n) per generate call.", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

SERVER = (SERVER_REQUESTS, SERVER_REQUEST_DURATION, SERVER_TTFT, SERVER_QUEUED, SERVER_RUNNING, SERVER_BATCH_ROWS)
ALL = guard_metrics.ALL + SERVER


def metric_names() -> set[str]:
    """Every sample name repguard can export: the guard's metrics and the server's."""
    return guard_metrics.metric_names(ALL)
