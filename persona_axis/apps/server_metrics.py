"""What the server tells its operators: Prometheus metrics (a registry per server) and one JSON log line per
request (key ids, never keys)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as MetricCounter

from persona_axis.decode.engine import Engine


@dataclass
class Trace:
    """One /v1 request as its log line reports it, filled in as it goes. finish: the reply's finish_reason,
    or how it stopped short (cancelled, error, timeout, stalled, disconnected)."""

    id: str
    key: str
    path: str
    start: float  # time.monotonic() on arrival
    status: int = 0
    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None
    last_token: float | None = None  # time.monotonic() of the latest token
    cap: str | None = None
    alert: bool | None = None

    def line(self) -> str:
        """The JSON log line (the key's id, never the key)."""
        return json.dumps({
            "time": round(time.time(), 3), "id": self.id, "key": self.key, "path": self.path, "status": self.status,
            "finish": self.finish, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 4),
            "duration_s": round(time.monotonic() - self.start, 4), "cap": self.cap, "alert": self.alert})


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may share one process)."""

    def __init__(self, engine: Engine) -> None:
        r = self.registry = CollectorRegistry()
        seconds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
        self.requests = MetricCounter("persona_axis_requests", "HTTP requests by route and status",
                                      ["route", "status"], registry=r)
        self.replies = MetricCounter("persona_axis_replies", "Chat replies by how they ended", ["finish"], registry=r)
        self.prompt_tokens = MetricCounter("persona_axis_prompt_tokens", "Prompt tokens of ended replies", registry=r)
        self.completion_tokens = MetricCounter("persona_axis_completion_tokens", "Tokens generated", registry=r)
        self.first_token = Histogram("persona_axis_time_to_first_token_seconds",
                                     "From a request's arrival to its first token", buckets=seconds, registry=r)
        self.token_gap = Histogram("persona_axis_time_per_output_token_seconds",
                                   "Between a reply's consecutive tokens", buckets=seconds, registry=r)
        self.cap_share = Histogram("persona_axis_cap_engaged_share",
                                   "Per reply, the share of its tokens the cap raised (mean over the capped layers)",
                                   ["experiment"], buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.guard_fired = MetricCounter("persona_axis_guard_fired", "Replies whose drift guard turned their cap on",
                                         ["experiment"], registry=r)
        self.alerts = MetricCounter("persona_axis_drift_alerts", "Replies whose running mean projection fell below "
                                    "the alert threshold", ["experiment"], registry=r)
        Gauge("persona_axis_queue_length", "Requests waiting for a row", registry=r).set_function(
            lambda: len(engine.waiting))
        Gauge("persona_axis_running_rows", "Requests being decoded", registry=r).set_function(lambda: engine.busy)
        self.in_flight = Gauge("persona_axis_requests_in_flight", "Chat requests from arrival to their end",
                               registry=r)
