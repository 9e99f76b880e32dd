"""App factory: wires settings, catalog, store, key cache, limiter, upstream pool and routes."""
from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import threading
import time
from typing import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from common.asgi import NO_RETRY, App, HTTPError
from common.tasks import stop_task

from .agents import purge_responses
from .auth import KeyCache
from .catalog import Catalog, Route, load_catalog
from .config import Settings
from .accounting.call_end import Accountant
from .accounting.ledger import Ledger
from .limits import NullLimiter
from .limits.memory import MemoryLimiter
from .limits.policy import Policy
from .metrics import Metrics
from .nodes import NodeRegistry
from .pipeline import Pipeline
from .providers import make_endpoint, token_arrays
from .providers.base import Endpoint
from .store import open_store
from .stored_responses import StoredResponses
from .upstream import UpstreamPool

log = logging.getLogger("cborg.gateway")

def _noop() -> None:
    return None


def via_id(database_url: str) -> bytes:
    """This deployment's loop-detection id: the same for every worker and replica sharing the
    database, and no secret in it (a database password is dropped before hashing)."""
    u = urlsplit(database_url)
    host = u.hostname or ""
    where = urlunsplit((u.scheme, f"{u.username or ''}@{host}:{u.port or ''}", u.path, "", ""))
    return hashlib.sha256(b"cborg-via|" + where.encode()).hexdigest()[:16].encode()


class Gateway:
    """Everything a request handler needs, built once per process."""

    def __init__(self, settings: Settings, catalog: Catalog | None = None):
        self.settings = settings
        self.catalog = catalog or load_catalog(settings.config_path)
        self.started_at = int(time.time())
        self.store = open_store(settings.database_url)
        self.keys = KeyCache(self.store, settings.key_refresh_s)
        self.pool = UpstreamPool(max_body=settings.upstream_max_body_bytes,
                                 conns_per_host=settings.upstream_max_connections)
        self.metrics = Metrics()
        self.policy = Policy(self.catalog.conf.limits, self.keys.users)
        if not settings.accounting:
            self.limiter = NullLimiter()
            self.ledger = Ledger(None, log_requests=settings.request_logs)
        else:
            if settings.redis_url:
                from .limits.redis import RedisLimiter
                self.limiter = RedisLimiter(settings.redis_url, self.policy, self.store,
                                            lease_s=self.catalog.conf.limits.lease_s, prefix=settings.redis_prefix,
                                            on_error=self.metrics.limiter_errors.inc)
            else:
                self.limiter = MemoryLimiter(self.policy, self.store)
            self.ledger = Ledger(self.store, interval=settings.ledger_interval_s, log_requests=settings.request_logs)
        self.metrics.ledger = self.ledger
        self.responses = StoredResponses(self.store)
        self.accountant = Accountant(self.metrics, self.ledger, self.policy)
        self.pipeline = Pipeline(self)
        self.purge: asyncio.Task | None = None
        self.endpoints: dict[str, Endpoint] = {
            name: make_endpoint(name, conf, env=settings.env) for name, conf in self.catalog.providers.items()}
        self.model_endpoints: dict[str, Endpoint] = {
            m.name: make_endpoint(m.provider, self.catalog.providers[m.provider], m, env=settings.env)
            for m in self.catalog.models.values() if m.base_url}
        # Sent to OpenAI-compatible upstreams; a request that arrives carrying it has come back
        # (a base URL pointing at this gateway, or at a replica sharing its database): 508, not a loop.
        self.via = via_id(settings.database_url)
        for ep in (*self.endpoints.values(), *self.model_endpoints.values()):
            ep.extra["via"] = self.via
        # Local models without a base_url are served by inference nodes (router/nodes.py).
        # Process wiring (cborg serve) runs its own steps after start and before stop.
        self.after_start: list[Callable[[], Awaitable[None]]] = []
        self.before_stop: list[Callable[[], Awaitable[None]]] = []
        self.nodes = NodeRegistry(self.catalog, self.pool, settings.profile, settings.nodes, settings.env,
                                  settings.node_poll_s)

    async def start(self) -> None:
        """Called by the control plane's lifespan (router/control/app.py)."""
        self.loop = asyncio.get_running_loop()
        await self.store.init()
        await self.keys.start()
        await self.limiter.start()
        await self.ledger.start()
        await self.responses.start()
        self.purge = asyncio.create_task(purge_responses(self), name="responses-purge")
        if any(self.catalog.providers[m.provider].local and m.name not in self.model_endpoints
               for m in self.catalog.models.values()):
            await self.nodes.start()   # some local model has no base_url: nodes serve it
        for hook in self.after_start:
            await hook()
        if any(m.mode == "embedding" and not self.catalog.providers[m.provider].takes_token_ids
               for m in self.catalog.models.values()):
            # cl100k for token-array embedding inputs: loading it takes seconds, so not on a request.
            threading.Thread(target=token_arrays.warm, name="cl100k", daemon=True).start()

    async def stop(self) -> None:
        await stop_task(self.purge)
        for hook in self.before_stop:
            await hook()
        await self.nodes.stop()
        # Requests uvicorn cancelled at its shutdown deadline end (and are accounted) on the next
        # turns of the loop: their rows must be queued before the ledger's last flush.
        for _ in range(40):
            if not self.metrics.in_flight:
                break
            await asyncio.sleep(0.05)
        await self.ledger.stop()      # flush every queued row before the store closes
        await self.responses.stop()   # and every stored response not yet written
        await self.limiter.stop()
        await self.keys.stop()
        await self.pool.close()
        await self.store.close()

    # -- where a route goes --------------------------------------------------------------
    def endpoint_for(self, route: Route) -> tuple[Endpoint, Callable[[], None]]:
        """The endpoint to call for a route, and a callback to run when the call is over."""
        ep = self.model_endpoints.get(route.model.name)
        if ep is None:
            if route.provider.local:
                return self.nodes.pick(route)
            ep = self.endpoints[route.provider_name]
        if ep.missing:
            raise HTTPError(503, f"The model '{route.name}' is not available: {ep.missing}.",
                            code="provider_not_configured", type="service_unavailable", headers=[NO_RETRY])
        return ep, _noop

    def resolve_dynamic(self, name: str) -> Route | None:
        """Names the catalog does not list but something else knows (none yet)."""
        return None


def freeze_start_up(app: App) -> App:
    """For a gateway in a process of its own (the CLI's): once started, move what start-up made (modules,
    catalog, the key cache: ~100k objects, more with many keys) out of the garbage collector's reach.
    A full collection walked them all, 110-128 ms on the development machine, stalling every request
    in flight. Not for in-process test gateways, which come and go in one interpreter."""
    async def freeze() -> None:
        gc.collect()
        gc.freeze()
    app.state.after_start.append(freeze)
    return app


def create_worker_app() -> App:
    """The app of a process uvicorn's --workers spawned: nothing of the CLI's set-up ran there, so
    logging is set up here (at CBORG_LOG_LEVEL, which the CLI sets for its workers)."""
    from common.logs import setup_logging
    setup_logging(os.environ.get("CBORG_LOG_LEVEL") or "info")
    return freeze_start_up(create_app())


def create_app(settings: Settings | None = None, catalog: Catalog | None = None) -> App:
    """The gateway's ASGI app: the inference hot path on the lean dispatcher (common/asgi.py), with
    everything else (control plane, docs, lifespan) falling back to FastAPI (router/control)."""
    from .api import agents, openai
    from .control import app as control

    settings = settings or Settings.from_env()
    gw = Gateway(settings, catalog)
    app = App(fallback=control.wrap(control.build(gw)))
    app.state = gw  # type: ignore[attr-defined]
    openai.register(app, gw)
    agents.register(app, gw)
    return app
