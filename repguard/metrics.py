"""Every Prometheus metric of the guard itself (the server's own are in ``repguard.serve.metrics``).

Names follow prometheus-client conventions: prefix ``repguard_``, base units, ``_total`` on counters,
low-cardinality labels (``model``, ``level``, ``where``). Works in multiprocess mode when
``PROMETHEUS_MULTIPROC_DIR`` is set before the process starts (served by several workers, or
incremented inside vLLM worker processes).
"""

from __future__ import annotations

import functools
import logging
import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._version import __version__
from .policy import Level

LEVELS = tuple(level.label for level in Level if level > Level.MONITOR)  # the intervention levels, in order

REQUESTS_GUARDED = Counter(
    "repguard_requests_guarded_total", "Sequences generated with the guard enabled.", ["model"]
)
LOOPS_DETECTED = Counter(
    "repguard_loops_detected_total", "Sequences in which the loop detector fired (first detection only).", ["model"]
)
INTERVENTIONS = Counter(
    "repguard_interventions_total", "Times a sequence entered an intervention level.", ["model", "level"]
)
INTERVENTION_TOKENS = Counter(
    "repguard_intervention_tokens_total", "Tokens generated while an intervention was active.", ["model"]
)
GENERATED_TOKENS = Counter(
    "repguard_generated_tokens_total", "Tokens generated under the guard (guarded sequences only).", ["model"]
)
DETECTION_POSITION = Histogram(
    "repguard_detection_position_tokens",
    "Generated-token position at which the loop detector first fired.",
    ["model"],
    buckets=(8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096),
)
OVERHEAD = Histogram(
    "repguard_guard_overhead_seconds",
    "Guard time (detector, policy, hooks' bookkeeping) per decoding step.",
    ["model"],
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2),
)
ERRORS = Counter(
    "repguard_guard_errors_total", "Exceptions inside the guard (generation continued unguarded).", ["model", "where"]
)
ROLLBACKS = Counter(
    "repguard_rollbacks_total", "Confirmed loops cut back to their onset and decoded again.", ["model"]
)
ROLLBACK_TOKENS = Counter(
    "repguard_rollback_tokens_total",
    "Tokens decoded and then discarded by rollbacks (the extra decoding a rollback costs).", ["model"]
)
INFO = Gauge(
    "repguard_info", "Static information: repguard version, model and neuron map.",
    ["version", "model", "neuron_map"], multiprocess_mode="max",
)

ALL = (
    REQUESTS_GUARDED, LOOPS_DETECTED, INTERVENTIONS, INTERVENTION_TOKENS, GENERATED_TOKENS,
    DETECTION_POSITION, OVERHEAD, ERRORS, ROLLBACKS, ROLLBACK_TOKENS, INFO,
)

ERROR_SITES = ("observe", "deactivate", "penalty", "rollback")

log = logging.getLogger("repguard")
_write_failed = False


def never_raises(record):
    """Metrics never take a generation or an engine down: a write that fails (a multiprocess folder that is
    missing or full, say) is logged once per process and dropped."""
    @functools.wraps(record)
    def safe(*args, **kwargs) -> None:
        global _write_failed
        try:
            record(*args, **kwargs)
        except Exception:
            if not _write_failed:
                _write_failed = True
                log.exception("repguard: could not write a metric; generation goes on, and metrics that fail to "
                              "write are dropped (logged once)")
    return safe


def metric_names(metrics=ALL) -> set[str]:
    """Every sample name ``metrics`` can export (default: the guard's own; ``repguard.serve.metrics.
    metric_names()`` adds the server's, and is what dashboards may query)."""
    names: set[str] = set()
    for metric in metrics:
        base = metric._name
        if isinstance(metric, Counter):
            names |= {base + "_total", base + "_created"}
        elif isinstance(metric, Histogram):
            names |= {base + "_bucket", base + "_sum", base + "_count", base + "_created"}
        else:
            names.add(base)
    return names


@never_raises
def set_info(model: str, neuron_map: str) -> None:
    INFO.labels(version=__version__, model=model, neuron_map=neuron_map).set(1)


@never_raises
def init_model(model: str) -> None:
    """Create every labelled series of ``model`` at zero, so dashboards show 0 rather than "no data"."""
    for metric in (REQUESTS_GUARDED, LOOPS_DETECTED, INTERVENTION_TOKENS, GENERATED_TOKENS, ROLLBACKS, ROLLBACK_TOKENS,
                   DETECTION_POSITION, OVERHEAD):
        metric.labels(model)
    for level in LEVELS:
        INTERVENTIONS.labels(model, level)
    for where in ERROR_SITES:
        ERRORS.labels(model, where)


@never_raises
def record_report(model: str, report) -> None:
    """Count one finished sequence's report (a ``SequenceReport``). A sequence the guard failed open on (its
    report has errors) ran unguarded from there: it is counted in ``guard_errors_total`` where the fault was,
    not as guarded, so a broken guard never shows as guarded requests that did not loop."""
    if report.errors:
        return
    REQUESTS_GUARDED.labels(model).inc()
    GENERATED_TOKENS.labels(model).inc(report.tokens_observed)
    if report.detections:
        LOOPS_DETECTED.labels(model).inc()
        DETECTION_POSITION.labels(model).observe(report.detections[0].position)
    for change in report.actions:
        if change.level in LEVELS:
            INTERVENTIONS.labels(model, change.level).inc()
    if report.tokens_under_intervention:
        INTERVENTION_TOKENS.labels(model).inc(report.tokens_under_intervention)


@never_raises
def record_rollback(model: str, rollbacks: int, discarded_tokens: int) -> None:
    """Count one finished sequence's rollbacks and the decoded tokens they discarded."""
    if rollbacks:
        ROLLBACKS.labels(model).inc(rollbacks)
    if discarded_tokens:
        ROLLBACK_TOKENS.labels(model).inc(discarded_tokens)


@never_raises
def record_error(model: str, where: str, count: int = 1) -> None:
    """Count ``count`` faults of the guard at ``where`` (``ERROR_SITES``; "unavailable": one per request that asked
    for the neuron step where it cannot run; "repair"); the guard went on unguarded there."""
    ERRORS.labels(model, where).inc(count)


@never_raises
def record_overhead(model: str, seconds_per_step: float) -> None:
    """The guard's own time per decoding step of one generation."""
    OVERHEAD.labels(model).observe(seconds_per_step)


def registry() -> CollectorRegistry:
    """The registry to expose: a multiprocess collector when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    return REGISTRY
