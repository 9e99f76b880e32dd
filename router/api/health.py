"""Liveness and readiness, at the LiteLLM paths load balancers already probe."""
from __future__ import annotations

from typing import TYPE_CHECKING

from common.asgi import App, Request, Response, json_response

if TYPE_CHECKING:
    from ..app import Gateway


def register(app: App, gw: "Gateway") -> None:
    async def liveliness(req: Request):
        return json_response("I'm alive!")

    async def readiness(req: Request):
        db_ok = await gw.store.ping()
        body = {"status": "healthy" if db_ok else "unhealthy", "db": "connected" if db_ok else "unreachable",
                "models": len(gw.catalog.routes)}
        return json_response(body, 200 if db_ok else 503)

    async def metrics(req: Request):
        return Response(gw.metrics.render(), content_type=b"text/plain; version=0.0.4; charset=utf-8")

    app.route("/metrics", "GET", metrics, v1=False)
    for path in ("/health/liveliness", "/health/liveness"):
        app.route(path, "GET", liveliness, v1=False)
    for path in ("/health/readiness", "/health"):
        app.route(path, "GET", readiness, v1=False)
