"""The inference node (`cborg node`): runs the deployments of one server, and its admin API.

It starts one engine process per deployment (inference/supervisor.py), keeps their states,
and answers, with the node token, `GET /status` and `POST /load`, `/unload`, `/swap`. Load,
unload and swap return at once (202) with the new status; the states then say how they go, and
gateways poll `/status` every few seconds to learn where each model is served. Transitions are
applied one at a time (a lock), so two admins cannot interleave a swap and a load.

Clients never reach the node or its engines directly: gateways do, with the per-engine keys
the status gives them.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from common import control_errors
from common.asgi import HTTPError
from common.body_limit import BodyLimit
from common.paths import cborg_home
from common.tasks import lifespan

from . import gpus as gpu_mod
from .config import DeploymentConf, InferenceConf, NodeConf
from .supervisor import EngineProcess

log = logging.getLogger("cborg.node")


class Node:
    def __init__(self, conf: InferenceConf, node: NodeConf):
        self.conf = conf
        self.node = node
        self.deployments: dict[str, DeploymentConf] = {d.name: d for d in conf.deployments_of(node.name)}
        self.log_dir = Path(node.log_dir).expanduser() if node.log_dir else cborg_home() / "logs" / node.name
        self.run_dir = cborg_home() / "run" / node.name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.gpus = gpu_mod.detect(node)
        self.procs = {n: EngineProcess(d, node, self.log_dir, self.run_dir) for n, d in self.deployments.items()}
        self.lock = asyncio.Lock()
        self.started_at = time.time()
        self._tasks: set[asyncio.Task] = set()

    # -- queries -----------------------------------------------------------------------
    def status(self) -> dict:
        return {"node": self.node.name, "profile": self.conf.name, "host": socket.gethostname(),
                "started_at": round(self.started_at, 3),
                "gpus": [{"index": g.index, "memory_gib": round(g.memory_gib, 1), "name": g.name,
                          "held_by": [p.dep.name for p in self.procs.values() if p.active and g.index in p.dep.gpus]}
                         for g in self.gpus],
                "deployments": [p.status() for p in self.procs.values()],
                "unserved": self.conf.profile.unserved}

    def _holders(self) -> list[DeploymentConf]:
        return [p.dep for p in self.procs.values() if p.active]

    async def _refusal(self, dep: DeploymentConf, releasing: Iterable[DeploymentConf] = ()) -> str | None:
        """gpus.refusal, with nvidia-smi run in a thread: status and health keep answering meanwhile."""
        free = await asyncio.to_thread(gpu_mod.free_gib) if dep.gpus else None
        return gpu_mod.refusal(dep, self.gpus, self._holders(), releasing, free)

    def _find(self, body: dict) -> list[EngineProcess]:
        """The deployments a load/unload names: `deployment`, or every deployment of `model` here."""
        name = body.get("deployment")
        model = body.get("model")
        if name:
            p = self.procs.get(name)
            if p is None:
                raise HTTPError(404, f"Node {self.node.name} has no deployment {name!r} (it has: "
                                     f"{', '.join(self.procs) or 'none'}).", code="deployment_not_found")
            return [p]
        if model:
            ps = [p for p in self.procs.values() if p.dep.model == model]
            if not ps:
                raise HTTPError(404, f"Node {self.node.name} has no deployment of {model!r}.",
                                code="deployment_not_found")
            return ps
        raise HTTPError(400, "Name a 'deployment' or a 'model'.", param="deployment")

    # -- transitions ---------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def load(self, body: dict) -> dict:
        async with self.lock:
            ps = self._find(body)
            if not body.get("deployment") and len(ps) > 1:
                auto = [p for p in ps if p.dep.autoload]
                if len(auto) != 1 and not any(p.active for p in ps):
                    raise HTTPError(400, f"{body['model']} has several deployments on node {self.node.name} "
                                         f"({', '.join(p.dep.name for p in ps)}): name one.", param="deployment")
                ps = [p for p in ps if p.active] or auto
            for p in ps:
                if p.active:
                    continue
                why = await self._refusal(p.dep)
                if why:
                    raise HTTPError(409, why, code="gpu_over_committed")
                p.start()
            return self.status()

    async def unload(self, body: dict) -> dict:
        async with self.lock:
            ps = [p for p in self._find(body) if p.state != "stopped" or p.proc is not None]
            for p in ps:
                p.begin_drain()
                self._spawn(p.stop(drain=True))
            return self.status()

    async def swap(self, body: dict) -> dict:
        model, to = body.get("model"), body.get("to")
        if not isinstance(model, str) or not isinstance(to, str):
            raise HTTPError(400, "A swap names the 'model' and the deployment to swap 'to'.", param="to")
        async with self.lock:
            new = self.procs.get(to)
            if new is None:
                raise HTTPError(404, f"Node {self.node.name} has no deployment {to!r} (it has: "
                                     f"{', '.join(self.procs) or 'none'}).", code="deployment_not_found")
            if new.dep.model != model:
                raise HTTPError(400, f"Deployment {to} serves {new.dep.model}, not {model}.", param="to")
            if new.active:
                raise HTTPError(409, f"Deployment {to} is already {new.state}.", code="already_loaded")
            old = [p for p in self.procs.values() if p.dep.model == model and p.active]
            why = await self._refusal(new.dep, releasing=[p.dep for p in old])
            if why:
                raise HTTPError(409, why, code="gpu_over_committed")
            for p in old:
                p.swap = {"to": to}
            new.swap = {"from": [p.dep.name for p in old]}
            token = new.pending(f"waiting for {', '.join(p.dep.name for p in old) or 'nothing'} to drain")
            for p in old:
                p.begin_drain(f"swapping to {to}: waiting for in-flight requests")
            self._spawn(self._swap(old, new, token))
            return self.status()

    async def _swap(self, old: list[EngineProcess], new: EngineProcess, token: object) -> None:
        """Stop the old deployments, then start the new one, unless it was stopped meanwhile (an
        unload, or a later swap that counted it among the old ones and is starting another)."""
        try:
            await asyncio.gather(*(p.stop(drain=True) for p in old))
            started = new.start_pending(token)
        finally:
            for p in old:
                p.swap = None
        while started and new.state == "loading":
            await asyncio.sleep(0.5)
        new.swap = None

    async def start(self) -> None:
        for name, d in self.deployments.items():
            if d.autoload:
                try:
                    await self.load({"deployment": name})
                except HTTPError as e:
                    log.error("not loading %s: %s", name, e.message)

    async def shutdown(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*(p.stop(drain=False) for p in self.procs.values()), return_exceptions=True)


class DeploymentTarget(BaseModel):
    """What a load or unload names: a deployment, or every deployment of a model on this node."""
    model_config = ConfigDict(extra="forbid")
    deployment: str | None = Field(None, min_length=1, max_length=256)
    model: str | None = Field(None, min_length=1, max_length=256)


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256, description="the model whose deployment is replaced")
    to: str = Field(min_length=1, max_length=256, description="the deployment to load in its place")


def build_app(node: Node, token: str) -> BodyLimit:
    """The node's admin API (FastAPI): every route but /health wants the node token."""
    want = b"Bearer " + token.encode()
    bearer = HTTPBearer(auto_error=False, description="the node token")

    def check(request: Request, _: Any = Security(bearer)) -> None:
        got = dict(request.scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(got, want):
            raise HTTPError(401, "This node's admin API needs the node token.", code="invalid_node_token")

    app = FastAPI(title=f"CBorg inference node {node.node.name}", lifespan=lifespan(node.start, node.shutdown),
                  docs_url=None, redoc_url=None)
    app.state.node = node
    control_errors.install(app)
    guarded = [Depends(check)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "node": node.node.name}

    @app.get("/status", dependencies=guarded)
    async def status():
        return node.status()

    @app.post("/load", status_code=202, dependencies=guarded)
    async def load(body: DeploymentTarget):
        return await node.load(body.model_dump(exclude_none=True))

    @app.post("/unload", status_code=202, dependencies=guarded)
    async def unload(body: DeploymentTarget):
        return await node.unload(body.model_dump(exclude_none=True))

    @app.post("/swap", status_code=202, dependencies=guarded)
    async def swap(body: SwapRequest):
        return await node.swap(body.model_dump())

    return BodyLimit(app)


def run_node(conf: InferenceConf, name: str | None, host: str | None = None, port: int | None = None,
             log_level: str = "info") -> None:
    import uvicorn

    from common.logs import setup_logging
    from common.server import server_options

    nc = conf.node(name)
    token = os.environ.get(nc.token_env)
    if not token:
        raise SystemExit(f"cborg node: set {nc.token_env} (the node token gateways use; profiles.{conf.name}."
                         f"nodes ({nc.name}).token_env)")
    u = urlsplit(nc.url)
    host = host or nc.host or u.hostname or "127.0.0.1"
    port = port or nc.port or u.port or 8101
    setup_logging(log_level)
    node = Node(conf, nc)
    log.info("node %s (profile %s) on %s:%d: %d deployments, GPUs %s", nc.name, conf.name, host, port,
             len(node.deployments), [g.index for g in node.gpus] or "none")
    uvicorn.run(build_app(node, token), **server_options(host=host, port=port, log_level=log_level,
                                                         timeout_graceful_shutdown=5))
