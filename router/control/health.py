"""Liveness and readiness at the LiteLLM paths load balancers already probe, and Prometheus
metrics (with CBORG_METRICS_TOKEN set, /metrics wants `Authorization: Bearer <token>`: it shows
spend per model)."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from starlette.responses import Response

from common.asgi import HTTPError

from .deps import gateway, json
from .views import Readiness

router = APIRouter(tags=["health"])


async def liveliness():
    return json("I'm alive!")


async def readiness(request: Request):
    gw = gateway(request)
    db_ok = await gw.store.ping()
    return json({"status": "healthy" if db_ok else "unhealthy", "db": "connected" if db_ok else "unreachable",
                 "models": len(gw.catalog.routes)}, 200 if db_ok else 503)


for _p in ("/health/liveliness", "/health/liveness"):
    router.add_api_route(_p, liveliness, methods=["GET"], response_model=str, summary="The process answers")
for _p in ("/health/readiness", "/health"):
    router.add_api_route(_p, readiness, methods=["GET"], response_model=Readiness,
                         responses={503: {"model": Readiness, "description": "The database is unreachable"}},
                         summary="The gateway can serve: its database answers")


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}, 401: {"description": "CBORG_METRICS_TOKEN is set"}})
async def metrics(request: Request):
    gw = gateway(request)
    want = gw.settings.metrics_token
    if want:
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {want}".encode()):
            raise HTTPError(401, "/metrics wants 'Authorization: Bearer <CBORG_METRICS_TOKEN>'.",
                            code="invalid_metrics_token")
    return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
