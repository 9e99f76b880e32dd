"""Where the lab's own models run: the inference nodes' status, polled, and the replica to call.

The gateway knows the nodes from models.yaml (the profile's `nodes`, or Settings.nodes) and
polls each one's `/status` every few seconds (every half second while something there is
loading or draining). A node that fails two polls in a row is out of rotation until it
answers again. From the statuses it keeps, per public model, the ready engine endpoints
(replicas) and, when there is none, the answer to give: 503 with retry-after while the model
is loading or being swapped, 503 saying why when no node serves it.

Hot path (`pick`): one dict lookup, the least-outstanding replica (usually the only one) and a
counter; the release callback decrements it. Nothing here is awaited per request.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from common.asgi import NO_RETRY, HTTPError
from common.paths import chosen_profile
from common.validation import ConfigError, format_validation

from .catalog import Catalog, Route
from .providers.base import Endpoint
from .targets import Target
from .upstream import ProtocolError, Timeouts, UpstreamError, UpstreamPool

log = logging.getLogger("cborg.nodes")

_POLL_TIMEOUTS = Timeouts(connect=2.0, first_byte=5.0, read=5.0, total=8.0)
RETRY_AFTER_S = 5
DOWN_AFTER = 2          # failed polls in a row before a node leaves rotation
FAST_POLL_S = 0.5       # while a node has something loading or draining


class NodeRef(BaseModel):
    """What a gateway needs of a node (the node reads the rest of the entry)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    url: str
    token_env: str = "CBORG_NODE_TOKEN"
    token: str | None = None        # given directly (cborg serve); else read from token_env

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        Target.parse(v)
        return v.rstrip("/")


class _Profile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    nodes: list[NodeRef] = []
    unserved: dict[str, str] = {}


def profile_nodes(catalog: Catalog, profile: str | None, override: list[dict] | None = None
                  ) -> tuple[str, list[NodeRef], dict[str, str]]:
    """The chosen profile's nodes and unserved reasons, validated (errors name the field)."""
    extra = catalog.conf.model_extra or {}
    profiles = extra.get("profiles") or {}
    name = chosen_profile(extra, profile)
    raw = profiles.get(name) if isinstance(profiles, dict) else None
    if raw is None and profiles:
        raise ConfigError(f"profiles: no profile {name!r} (have: {', '.join(profiles)})")
    try:
        prof = _Profile.model_validate(raw or {})
        nodes = [NodeRef.model_validate(n) for n in override] if override is not None else prof.nodes
    except ValidationError as e:
        raise ConfigError(format_validation(e, raw, f"profiles.{name}")) from None
    return name, nodes, prof.unserved


class Replica:
    """One ready engine serving a model; `outstanding` counts this gateway's requests in flight."""

    __slots__ = ("key", "node", "deployment", "endpoint", "outstanding")

    def __init__(self, key: tuple, node: str, deployment: str, endpoint: Endpoint):
        self.key = key
        self.node = node
        self.deployment = deployment
        self.endpoint = endpoint
        self.outstanding = 0

    def release(self) -> None:
        if self.outstanding > 0:
            self.outstanding -= 1


class ModelEntry:
    __slots__ = ("replicas", "deployments", "state", "error", "_rr")

    def __init__(self) -> None:
        self.replicas: list[Replica] = []
        self.deployments: list[tuple[str, dict]] = []   # (node, deployment status)
        self.state = "unserved"
        self.error: tuple[str, str, bool] | None = None  # (message, code, retry)
        self._rr = 0


class NodeState:
    def __init__(self, ref: NodeRef, token: str | None):
        self.ref = ref
        self.target = Target.parse(ref.url)
        self.token = token
        self.status: dict | None = None
        self.failures = 0
        self.error: str | None = None
        self.last_ok: float | None = None
        self.next_poll = 0.0
        self.again = False         # poll_soon() came while a poll was in flight

    @property
    def up(self) -> bool:
        return self.status is not None

    def headers(self) -> list[tuple[bytes, bytes]]:
        h = [(b"content-type", b"application/json")]
        if self.token:
            h.append((b"authorization", b"Bearer " + self.token.encode()))
        return h

    def busy(self) -> bool:
        return any(d.get("state") in ("loading", "draining") for d in (self.status or {}).get("deployments", []))


class NodeRegistry:
    def __init__(self, catalog: Catalog, pool: UpstreamPool, profile: str | None = None,
                 nodes: list[dict] | None = None, env: dict[str, str] | None = None, poll_s: float = 2.0):
        env = os.environ if env is None else env
        self.catalog = catalog
        self.pool = pool
        self.profile, refs, self.unserved = profile_nodes(catalog, profile, nodes)
        self.nodes = {r.name: NodeState(r, r.token or env.get(r.token_env)) for r in refs}
        self.poll_s = poll_s
        self.models: dict[str, ModelEntry] = {}
        self._replicas: dict[tuple, Replica] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.rebuild()

    # -- polling -------------------------------------------------------------------------
    async def start(self) -> None:
        if self.nodes and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001
                pass
            self._task = None

    def poll_soon(self) -> None:
        for n in self.nodes.values():
            n.next_poll = 0.0
            n.again = True
        self._wake.set()

    async def _loop(self) -> None:
        """Each node is polled on its own schedule: a node that hangs delays no other's status."""
        polling: dict[str, asyncio.Task] = {}
        try:
            while True:
                now = time.monotonic()
                for n in self.nodes.values():
                    if n.next_poll <= now and n.ref.name not in polling:
                        polling[n.ref.name] = asyncio.ensure_future(self._poll_one(n, polling))
                idle = [n.next_poll for n in self.nodes.values() if n.ref.name not in polling]
                nxt = (min(idle) if idle else now + self.poll_s) - time.monotonic()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.05, nxt))
                except asyncio.TimeoutError:
                    pass
        finally:
            for t in polling.values():
                t.cancel()

    async def _poll_one(self, n: NodeState, polling: dict) -> None:
        try:
            await self._poll(n)
            self.rebuild()
        finally:
            polling.pop(n.ref.name, None)
            self._wake.set()

    async def _poll(self, n: NodeState) -> None:
        n.again = False
        try:
            status, data = await self.request(n, b"GET", "/status")
            if status != 200:
                raise ProtocolError(f"HTTP {status}: {error_message(data)}")
            self._accept(n, orjson.loads(data))
        except (UpstreamError, orjson.JSONDecodeError, ValueError) as e:
            n.failures += 1
            n.error = str(e)
            if n.failures >= DOWN_AFTER and n.status is not None:
                log.warning("node %s is out of rotation: %s", n.ref.name, e)
                n.status = None
        # asked again while this poll was out (poll_soon): its answer may predate the change
        n.next_poll = 0.0 if n.again else \
            time.monotonic() + (FAST_POLL_S if n.busy() or n.failures else self.poll_s)

    def _accept(self, n: NodeState, status: dict) -> None:
        if not isinstance(status, dict) or not isinstance(status.get("deployments"), list):
            raise ValueError("the node's status has no deployments list")
        if n.status is None:
            log.info("node %s is in rotation", n.ref.name)
        n.status = status
        n.failures = 0
        n.error = None
        n.last_ok = time.time()

    def apply(self, node: str, status: dict) -> None:
        """A status a node returned from an admin call: take it at once (no waiting for a poll)."""
        n = self.nodes[node]
        try:
            self._accept(n, status)
        except ValueError:
            return
        self.rebuild()
        n.next_poll = 0.0
        self._wake.set()

    async def request(self, n: NodeState, method: bytes, path: str, body: bytes = b"") -> tuple[int, bytes]:
        resp = await self.pool.request(n.target, method, path, n.headers(), body, _POLL_TIMEOUTS)
        return resp.status, await resp.read()

    # -- the table -----------------------------------------------------------------------
    def rebuild(self) -> None:
        models: dict[str, ModelEntry] = {}
        live: dict[tuple, Replica] = {}
        for n in self.nodes.values():
            if n.status is None:
                continue
            for d in n.status.get("deployments", []):
                if not isinstance(d, dict) or not isinstance(d.get("model"), str):
                    continue
                e = models.get(d["model"])
                if e is None:
                    e = models[d["model"]] = ModelEntry()
                e.deployments.append((n.ref.name, d))
                if d.get("state") == "ready" and d.get("url"):
                    rep = self._replica(n, d)
                    if rep is not None:
                        live[rep.key] = rep
                        e.replicas.append(rep)
        for name, e in models.items():
            self._judge(name, e)
        self._replicas = live
        self.models = models

    def _replica(self, n: NodeState, d: dict) -> Replica | None:
        key = (n.ref.name, d.get("name"), d["url"], d.get("api_key"), d.get("served_model_name"))
        rep = self._replicas.get(key)
        if rep is not None:
            return rep
        m = self.catalog.models.get(d["model"])
        if m is None:
            return None
        try:
            target = Target.parse(d["url"])
        except ValueError:
            return None
        ep = Endpoint(provider=m.provider, conf=self.catalog.providers[m.provider], target=target,
                      api_key=d.get("api_key") or None, extra={"served_model": d.get("served_model_name")})
        return Replica(key, n.ref.name, str(d.get("name")), ep)

    @staticmethod
    def _judge(model: str, e: ModelEntry) -> None:
        """The model's state, and what to answer while it has no ready replica."""
        if e.replicas:
            e.state, e.error = "ready", None
            return
        states = [(node, d) for node, d in e.deployments]
        swapping = [(node, d) for node, d in states if d.get("swap") and d.get("state") in ("loading", "draining")]
        loading = [(node, d) for node, d in states if d.get("state") == "loading"]
        draining = [(node, d) for node, d in states if d.get("state") == "draining"]
        failed = [(node, d) for node, d in states if d.get("state") == "failed"]
        if swapping:
            node, d = next(((nd, x) for nd, x in swapping if x.get("state") == "loading"), swapping[0])
            to = d["name"] if d.get("state") == "loading" else (d.get("swap") or {}).get("to")
            e.state = "swapping"
            e.error = (f"The model '{model}' is being swapped to deployment {to} on node {node} (swapping); "
                       "try again in a few seconds.", "model_swapping", True)
        elif loading:
            node, d = loading[0]
            e.state = "loading"
            e.error = (f"The model '{model}' is loading on node {node} (deployment {d.get('name')}: "
                       f"{d.get('phase') or 'starting'}); try again in a few seconds.", "model_loading", True)
        elif draining:
            node, d = draining[0]
            e.state = "draining"
            e.error = (f"No inference node serves '{model}' right now: deployment {d.get('name')} on node {node} "
                       "is being unloaded.", "model_not_served", False)
        elif failed:
            node, d = failed[0]
            e.state = "failed"
            e.error = (f"The model '{model}' is not available: deployment {d.get('name')} on node {node} failed: "
                       f"{(d.get('last_error') or 'unknown error')[:300]}", "model_failed", False)
        else:
            e.state = "stopped"
            e.error = (f"No inference node serves '{model}' right now: its deployments "
                       f"({', '.join(str(d.get('name')) for _, d in states)}) are unloaded.", "model_not_served", False)

    # -- hot path --------------------------------------------------------------------------
    def pick(self, route: Route) -> tuple[Endpoint, Callable[[], None]]:
        e = self.models.get(route.model.name)
        if e is not None and e.replicas:
            reps = e.replicas
            if len(reps) == 1:
                r = reps[0]
            else:
                e._rr = (e._rr + 1) % len(reps)
                r = reps[e._rr]
                for x in reps:
                    if x.outstanding < r.outstanding:
                        r = x
            r.outstanding += 1
            return r.endpoint, r.release
        raise self.unavailable(route, e)

    def lost(self, route: Route, ep: Endpoint) -> HTTPError:
        """An engine that refused a connection (killed, restarting, unloaded since the last poll):
        out of rotation at once and the nodes asked again; until then, with no other replica left,
        requests get a 503 to retry. The next status that lists it ready puts it back."""
        e = self.models.get(route.model.name)
        if e is not None and any(r.endpoint is ep for r in e.replicas):
            e.replicas = [r for r in e.replicas if r.endpoint is not ep]
            if not e.replicas:
                e.state = "unreachable"
                e.error = (f"The engine serving '{route.model.name}' stopped answering (restarting or being "
                           "unloaded); try again in a few seconds.", "model_unavailable", True)
            self.poll_soon()
        return self.unavailable(route, e) if e is not None and not e.replicas else \
            HTTPError(503, f"The engine serving '{route.name}' stopped answering.", code="model_unavailable",
                      type="service_unavailable", headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])

    def unavailable(self, route: Route, e: ModelEntry | None) -> HTTPError:
        if e is not None and e.error is not None:
            msg, code, retry = e.error
            if route.name != route.model.name:
                msg = msg.replace(f"'{route.model.name}'", f"'{route.name}' ({route.model.name})", 1)
            headers = [(b"retry-after", str(RETRY_AFTER_S).encode())] if retry else [NO_RETRY]
            return HTTPError(503, msg, code=code, type="service_unavailable", headers=headers)
        why = self.unserved.get(route.model.name)
        if why:
            return HTTPError(503, f"The model '{route.name}' is not served here: {why}", code="model_not_served",
                             type="service_unavailable", headers=[NO_RETRY])
        down = [n.ref.name for n in self.nodes.values() if not n.up]
        extra = f" (node{'s' if len(down) > 1 else ''} {', '.join(down)} not answering)" if down else ""
        return HTTPError(503, f"No inference node serves '{route.name}' right now{extra}.", code="model_not_served",
                         type="service_unavailable", headers=[NO_RETRY])

    # -- for the admin API -----------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        nodes = []
        for n in self.nodes.values():
            st = n.status or {}
            deps = [{k: v for k, v in d.items() if k != "api_key"} for d in st.get("deployments", [])]
            nodes.append({"name": n.ref.name, "url": n.ref.url, "up": n.up, "error": n.error,
                          "last_seen": n.last_ok, "gpus": st.get("gpus", []), "deployments": deps})
        models = {}
        for name, e in self.models.items():
            models[name] = {"state": e.state, "message": e.error[0] if e.error else None,
                            "replicas": [{"node": r.node, "deployment": r.deployment, "outstanding": r.outstanding}
                                         for r in e.replicas]}
        for name, why in self.unserved.items():
            models.setdefault(name, {"state": "unserved", "message": why, "replicas": []})
        return {"profile": self.profile, "nodes": nodes, "models": models}


def error_message(data: bytes) -> str:
    try:
        obj = orjson.loads(data)
        return str(obj["error"]["message"])
    except Exception:  # noqa: BLE001
        return data[:200].decode("utf-8", "replace")
