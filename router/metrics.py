"""Prometheus metrics (GET /metrics). One registry per gateway; label children are cached so that
recording a request costs a few dict lookups. With several uvicorn workers each worker has its own
numbers: scrape each, or run one worker per replica (the deployment this project recommends)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cborg_requests", "Inference requests by model and HTTP status",
                                ["model", "status"], registry=r)
        self.errors = Counter("cborg_errors", "Inference requests that ended in an error, by model and status",
                              ["model", "status"], registry=r)
        self.latency = Histogram("cborg_request_latency_seconds", "Time from request to the end of the response",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("cborg_time_to_first_token_seconds", "Time to the first streamed chunk",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("cborg_tokens", "Tokens by model and kind (prompt, cached, completion)",
                              ["model", "kind"], registry=r)
        self.spend = Counter("cborg_spend_usd", "Cost in US dollars by model", ["model"], registry=r)
        self.in_flight = Gauge("cborg_in_flight_requests", "Inference requests in progress", registry=r)
        self.rejections = Counter("cborg_limiter_rejections", "Requests refused by a limit",
                                  ["limit", "scope"], registry=r)
        self.limiter_errors = Counter("cborg_limiter_errors", "Limiter backend errors (requests admitted open)",
                                      registry=r)
        self._children: dict[tuple, tuple] = {}

    def _for(self, model: str, status: int) -> tuple:
        k = (model, status)
        c = self._children.get(k)
        if c is None:
            st = str(status)
            c = self._children[k] = (
                self.requests.labels(model, st), self.errors.labels(model, st) if status >= 400 else None,
                self.latency.labels(model), self.ttft.labels(model), self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "cached"), self.tokens.labels(model, "completion"),
                self.spend.labels(model))
        return c

    def observe(self, model: str, status: int, latency: float, ttft: float | None, usage: dict | None,
                cost: float) -> None:
        req, err, lat, tt, tp, tc, tco, sp = self._for(model, status)
        req.inc()
        if err is not None:
            err.inc()
        lat.observe(latency)
        if ttft is not None:
            tt.observe(ttft)
        if usage:
            tp.inc(usage.get("prompt_tokens") or 0)
            tc.inc((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            tco.inc(usage.get("completion_tokens") or 0)
        if cost:
            sp.inc(cost)

    def render(self) -> bytes:
        return generate_latest(self.registry)
