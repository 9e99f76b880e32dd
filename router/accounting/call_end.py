"""The end of every inference call, however it ended: limits released, metrics observed, one
ledger row and one log line. Nothing here waits: the limiter's release is sent without awaiting
its reply and the ledger only appends; the ledger's background flush writes rows and log lines
in batches."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from common.asgi import HTTPError

if TYPE_CHECKING:
    from ..limits.policy import Policy
    from ..metrics import Metrics
    from .ledger import Ledger


class Accountant:
    """Built once per process (router/app.py); `finish` is called by `Call.finish` exactly once."""

    def __init__(self, metrics: "Metrics", ledger: "Ledger", policy: "Policy"):
        self.metrics = metrics
        self.ledger = ledger
        self.policy = policy

    def finish(self, call) -> None:
        adm = call.admission
        if adm is not None:
            adm.finish(call)
            self.metrics.in_flight -= 1
        latency = time.perf_counter() - call.t0
        ttft = (call.ttft - call.t0) if call.ttft is not None else None
        self.metrics.observe(call.route.name, call.status, latency, ttft, call.usage, call.cost)
        led = self.ledger
        if led.store is None and not led.log_requests:
            return
        u = call.usage or {}
        prompt = u.get("prompt_tokens") or 0
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        completion = u.get("completion_tokens") or 0
        key = call.key
        served = call.served
        ts = time.time()
        if led.store is not None:
            # ttft_ms of a whole (non-streamed) response is its latency, as LiteLLM's completionStartTime;
            # NULL where no token came. Flags as ints. (A bool or a None goes through sqlite3's adapter
            # lookup, which fails through a formatted exception: under callgrind, one None was a fifth
            # of a row's cost in the writer thread, two bools more.)
            led.add((call.id, ts, key.id, key.user_id, call.route.name, served.model.model, served.provider_name,
                     prompt, cached, completion, call.cost, call.status, latency * 1000,
                     ttft * 1000 if ttft is not None else (latency * 1000 if not call.stream and call.usage else None),
                     1 if call.stream else 0, 1 if u.get("estimated") else 0, call.endpoint), self.policy.periods(key))
        if led.log_requests:
            line = {"ts": round(ts, 3), "level": "info", "logger": "cborg.request", "msg": "request",
                    "request_id": call.id, "key_id": key.id, "user": key.user_id, "model": call.route.name,
                    "served_by": served.name, "endpoint": call.endpoint, "status": call.status, "latency_ms": round(latency * 1000, 2),
                    "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None, "stream": call.stream,
                    "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion,
                    "cost": call.cost}
            if call.error:
                line["error"] = call.error[:300]
                if call.limit:
                    line["limit"] = call.limit
            led.log(line)

    def refused(self, call, err: HTTPError) -> None:
        """A request a limit refused: counted by limit, and ended as any call is (a ledger row with
        no tokens and no cost, status 429, and a log line naming the limit)."""
        limit = getattr(err, "limit", None)
        self.metrics.rejections.labels(limit or "other", getattr(err, "scope_kind", "other")).inc()
        call.status = err.status
        call.error = err.message
        call.limit = limit
        call.finish()
