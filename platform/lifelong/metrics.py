"""Prometheus metrics through Ray's metrics system (`ray.util.metrics`).

Each process records its own (a Serve replica its requests, the follower its swaps, a driver its
cycles and sweeps); every node's Ray metrics agent exports them with Ray's (names prefixed
`ray_`, e.g. `ray_lifelong_serve_requests_total`) on the port Prometheus scrapes Ray on
(`ray.nodes()[i]["MetricsExportPort"]`). cluster/grafana/lifelong.json charts them.

Recording never raises: a metric that cannot be recorded (no Ray in this process) is skipped.
"""

from __future__ import annotations

import functools

LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LONG_S = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

# name → (kind, description, tag keys[, boundaries]): what exists, for the dashboard's test too.
METRICS = {
    "lifelong_serve_requests_total": ("counter", "Requests to the endpoint's /v1 routes", ("model", "version", "route", "status")),
    "lifelong_serve_request_seconds": ("histogram", "Time to answer a /v1 request", ("model", "version", "route"), LATENCY_S),
    "lifelong_serve_version": ("gauge", "The version each replica serves", ("model", "replica")),
    "lifelong_serve_swaps_total": ("counter", "Versions the endpoint swapped to", ("model",)),
    "lifelong_serve_refused_swaps_total": ("counter", "Versions the endpoint refused (the old one kept serving)", ("model",)),
    "lifelong_serve_swap_seconds": ("histogram", "From the alias move seen to every replica serving", ("model",), LONG_S),
    "lifelong_serve_log_records_total": ("counter", "Prediction-log records written or dropped", ("model", "outcome")),
    "lifelong_serve_shadow_answers_total": ("counter", "Shadow answers by version and agreement", ("model", "version", "agreed")),
    "lifelong_serve_shadow_seconds": ("histogram", "A shadow version's time to answer", ("model", "version"), LATENCY_S),
    "lifelong_serve_live_accuracy": ("gauge", "Accuracy from feedback labels", ("model", "version", "role")),
    "lifelong_ledger_files": ("gauge", "The stream's landing-zone files by state", ("stream", "state")),
    "lifelong_cycle_decisions_total": ("counter", "Continual cycles by decision", ("stream", "decision")),
    "lifelong_cycle_seconds": ("histogram", "A continual cycle that trained, start to end", ("stream",), LONG_S),
    "lifelong_stream_average": ("gauge", "The stream's average metric over its windows (ACC for accuracy)", ("stream", "metric")),
    "lifelong_stream_forgetting": ("gauge", "The stream's average forgetting", ("stream",)),
    "lifelong_sweep_trials": ("gauge", "A sweep's trials by state", ("sweep", "state")),
}


@functools.cache
def _metric(name: str):
    from ray.util import metrics

    kind, description, tags, *boundaries = METRICS[name]
    if kind == "counter":
        return metrics.Counter(name, description=description, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(name, description=description, tag_keys=tags)
    return metrics.Histogram(name, description=description, boundaries=list(boundaries[0]), tag_keys=tags)


def record(name: str, value: float, **tags) -> None:
    """Add to a counter, set a gauge or observe a histogram value; skipped where Ray is not up."""
    try:
        import ray

        if not ray.is_initialized():
            return
        metric = _metric(name)
        tags = {k: str(v) for k, v in tags.items()}
        kind = METRICS[name][0]
        if kind == "counter":
            metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
    except Exception:  # metrics never fail what they measure
        pass


def cycle(outcome, ledger_counts: dict | None) -> None:
    """A cycle's decision (waiting ones too), and for one that trained its seconds, the stream's
    CL metrics and its ledger's files by state."""
    stream = outcome.stream
    record("lifelong_cycle_decisions_total", 1, stream=stream, decision=outcome.status)
    if outcome.window is None:
        return
    record("lifelong_cycle_seconds", outcome.seconds, stream=stream)
    average, forgetting = (outcome.metrics or {}).get(f"average_{outcome.metric}"), (outcome.metrics or {}).get("forgetting")
    if isinstance(average, (int, float)):
        record("lifelong_stream_average", average, stream=stream, metric=outcome.metric)
    if isinstance(forgetting, (int, float)):
        record("lifelong_stream_forgetting", forgetting, stream=stream)
    for state, count in (ledger_counts or {}).items():
        record("lifelong_ledger_files", count, stream=stream, state=state)
