"""Prometheus metrics (GET /metrics).

The per-request numbers are plain Python ints and floats, updated without locks (one event loop),
and turned into Prometheus families only when scraped, by a custom collector: prometheus_client's
own Counter/Histogram take a lock per update, which cost about 3 % of the gateway's CPU at
4,000 requests/s. prometheus_client still writes the exposition format. With several uvicorn
workers each worker has its own numbers: scrape each, or run one worker per replica.
"""
from __future__ import annotations

import bisect
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, v)] += 1
        self.sum += v

    def family_rows(self) -> tuple[list, float]:
        rows, acc = [], 0
        for le, n in zip((*(str(b) for b in BUCKETS), "+Inf"), self.counts):
            acc += n
            rows.append((le, acc))
        return rows, self.sum


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = defaultdict(_Histogram)
        self.ttft: dict[str, _Histogram] = defaultdict(_Histogram)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.spend: dict[str, float] = defaultdict(float)
        self.in_flight = 0
        self.ledger = None        # the ledger writer (router/app.py), whose rows quarantined and dropped are counted
        self.rejections = Counter("cborg_limiter_rejections", "Requests refused by a limit",
                                  ["limit", "scope"], registry=self.registry)
        self.limiter_errors = Counter("cborg_limiter_errors", "Limiter backend errors (requests admitted open)",
                                      registry=self.registry)
        self.registry.register(self)

    # -- hot path ----------------------------------------------------------------------------
    def observe(self, model: str, status: int, latency: float, ttft: float | None, usage: dict | None,
                cost: float) -> None:
        self.requests[(model, status)] += 1
        self.latency[model].observe(latency)
        if ttft is not None:
            self.ttft[model].observe(ttft)
        if usage:
            t = self.tokens
            t[(model, "prompt")] += usage.get("prompt_tokens") or 0
            t[(model, "cached")] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            t[(model, "completion")] += usage.get("completion_tokens") or 0
        if cost:
            self.spend[model] += cost

    # -- scrape --------------------------------------------------------------------------------
    def collect(self):
        req = CounterMetricFamily("cborg_requests", "Inference requests by model and HTTP status",
                                  labels=["model", "status"])
        err = CounterMetricFamily("cborg_errors", "Inference requests that ended in an error, by model and status",
                                  labels=["model", "status"])
        for (model, status), n in list(self.requests.items()):
            req.add_metric([model, str(status)], n)
            if status >= 400:
                err.add_metric([model, str(status)], n)
        yield req
        yield err
        for name, doc, hists in (("cborg_request_latency_seconds", "Time from request to the end of the response",
                                  self.latency),
                                 ("cborg_time_to_first_token_seconds", "Time to the first streamed chunk", self.ttft)):
            fam = HistogramMetricFamily(name, doc, labels=["model"])
            for model, h in list(hists.items()):
                rows, total = h.family_rows()
                fam.add_metric([model], rows, total)
            yield fam
        tok = CounterMetricFamily("cborg_tokens", "Tokens by model and kind (prompt, cached, completion)",
                                  labels=["model", "kind"])
        for (model, kind), n in list(self.tokens.items()):
            tok.add_metric([model, kind], n)
        yield tok
        sp = CounterMetricFamily("cborg_spend_usd", "Cost in US dollars by model", labels=["model"])
        for model, v in list(self.spend.items()):
            sp.add_metric([model], v)
        yield sp
        if self.ledger is not None:
            yield CounterMetricFamily("cborg_ledger_quarantined_rows", "Ledger rows the database refused on their "
                                      "own, logged whole and not retried", value=self.ledger.quarantined)
            yield CounterMetricFamily("cborg_ledger_dropped_rows", "Ledger rows dropped when the queue overflowed "
                                      "while the database was unreachable", value=self.ledger.dropped)
        yield GaugeMetricFamily("cborg_in_flight_requests", "Inference requests in progress", value=self.in_flight)

    def render(self) -> bytes:
        return generate_latest(self.registry)
