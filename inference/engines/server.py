"""What CBorg's own engines share: their spec, key check, OpenAI-shaped errors, and the HTTP server.

An engine is started by the node with `--spec FILE` (the deployment, the prepared weights' path,
host and port) and its API key in CBORG_ENGINE_KEY. It loads its model first and only then
listens, so `GET /health` answering 200 means ready.
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from common.asgi import App, HTTPError, Request, json_response

from ..config import DeploymentConf

log = logging.getLogger("cborg.engine")


@dataclass
class Spec:
    deployment: DeploymentConf
    weights: str
    host: str
    port: int

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "Spec":
        ap = argparse.ArgumentParser()
        ap.add_argument("--spec", required=True, help="JSON file written by the node")
        a = ap.parse_args(argv)
        with open(a.spec, encoding="utf-8") as f:
            d = json.load(f)
        return cls(DeploymentConf.model_validate(d["deployment"]), d["weights"], d["host"], int(d["port"]))

    def to_json(self) -> str:
        return json.dumps({"deployment": self.deployment.model_dump(mode="json"), "weights": self.weights,
                           "host": self.host, "port": self.port})


class KeyCheck:
    """Engines listen on private addresses, and still want the key the node gave them."""

    def __init__(self, key: str | None):
        self.want = b"Bearer " + key.encode() if key else None

    def __call__(self, req: Request) -> None:
        if self.want is None:
            return
        got = req.headers.get(b"authorization", b"")
        if not hmac.compare_digest(got, self.want):
            raise HTTPError(401, "This engine needs its API key (the node gives it to gateways).",
                            code="invalid_api_key")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def field(body: dict, name: str, types: tuple, default: Any = None) -> Any:
    """A request field of the given type, or a 400 naming it."""
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types:
        raise HTTPError(400, f"'{name}' must be of type {'/'.join(t.__name__ for t in types)}.", param=name)
    if not isinstance(v, types):
        raise HTTPError(400, f"'{name}' must be of type {'/'.join(t.__name__ for t in types)}.", param=name)
    return v


def base_app(check: KeyCheck, stats: Callable[[], dict]) -> App:
    """An App with /health (no key: readiness) and /stats (with the key: load, for the node's
    drain and the tests)."""
    app = App()

    async def health_h(req: Request):
        return json_response({"status": "ok"})

    async def stats_h(req: Request):
        check(req)
        return json_response(stats())

    app.route("/health", "GET", health_h, v1=False)
    app.route("/stats", "GET", stats_h, v1=False)
    return app


def serve(app: App, spec: Spec) -> None:
    import uvicorn

    from common.logs import setup_logging
    from common.server import server_options

    setup_logging(os.environ.get("CBORG_LOG_LEVEL", "info"))
    log.info("listening", extra={"deployment": spec.deployment.name, "port": spec.port})
    uvicorn.run(app, **server_options(host=spec.host, port=spec.port, log_level="warning"))
