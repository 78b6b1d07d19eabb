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
    "repguard_server_time_to_first_token_seconds", "Time from admission to a request's first token: the first text a streaming client "
    "gets (after any rollback hold-back), else the first decoded.",
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

# The ``endpoint`` label of each generation endpoint, by path.
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}


def init_model(model: str, batches: bool = True) -> None:
    """Create the server's series of ``model`` at zero (and the guard's, ``repguard.metrics.init_model``), so a
    server that has answered nothing yet shows 0 rather than "no data": requests answered 200, their durations
    and first tokens, the queue, and (``batches``: the embedded engine) the rows per batch."""
    guard_metrics.init_model(model)
    _init_server(model, batches)


@guard_metrics.never_raises
def _init_server(model: str, batches: bool) -> None:
    for endpoint in ENDPOINTS.values():
        SERVER_REQUESTS.labels(model, endpoint, "200")
        SERVER_REQUEST_DURATION.labels(model, endpoint)
    SERVER_TTFT.labels(model)
    SERVER_QUEUED.labels(model).set(0)
    SERVER_RUNNING.labels(model).set(0)
    if batches:
        SERVER_BATCH_ROWS.labels(model)


# Every write of the server's goes through these (as the guard's go through ``repguard.metrics``): a metric that
# cannot be written never fails a request.
@guard_metrics.never_raises
def count_request(model: str, endpoint: str, status: int | str) -> None:
    SERVER_REQUESTS.labels(model, endpoint, str(status)).inc()


@guard_metrics.never_raises
def observe_duration(model: str, endpoint: str, seconds: float) -> None:
    SERVER_REQUEST_DURATION.labels(model, endpoint).observe(seconds)


@guard_metrics.never_raises
def observe_ttft(model: str, seconds: float) -> None:
    SERVER_TTFT.labels(model).observe(seconds)


@guard_metrics.never_raises
def set_queue(model: str, queued: int, running: int) -> None:
    SERVER_QUEUED.labels(model).set(queued)
    SERVER_RUNNING.labels(model).set(running)


@guard_metrics.never_raises
def observe_batch(model: str, rows: int) -> None:
    SERVER_BATCH_ROWS.labels(model).observe(rows)


SERVER = (SERVER_REQUESTS, SERVER_REQUEST_DURATION, SERVER_TTFT, SERVER_QUEUED, SERVER_RUNNING, SERVER_BATCH_ROWS)
ALL = guard_metrics.ALL + SERVER


def metric_names() -> set[str]:
    """Every sample name repguard can export: the guard's metrics and the server's."""
    return guard_metrics.metric_names(ALL)
