"""The control plane's FastAPI app: admin and info routes, health, the OpenAPI document with
Swagger UI at /docs (assets from the installed `fastapi-offline` package: lab networks and CI
have no CDN), a landing page at /, and the gateway's lifespan (start and stop)."""
from __future__ import annotations

import html
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from starlette.responses import HTMLResponse

from common import control_errors
from common.body_limit import BodyLimit
from common.tasks import lifespan

from . import health, hotpath_docs, info, key_manager, keys, models_admin, users

if TYPE_CHECKING:
    from ..app import Gateway

# Admin bodies are small. FastAPI reads a whole body before any dependency (the master-key check
# included) runs: without a cap anyone could make it buffer gigabytes.
MAX_BODY = 1 << 20

DESCRIPTION = """\
One OpenAI-compatible API for every model the lab offers: local models (`lbl/*`) and commercial
ones (`openai/*`, `anthropic/*`, `google/*`, `xai/*`, `aws/*`). Authenticate with your key as
`Authorization: Bearer sk-...` (or `x-api-key`). Every path is also served under `/v1`.
Admin routes (keys, users, model admin) want the master key.
"""

_LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>CBorg API</title>
<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;line-height:1.5}
a{color:#0b5cad}code{background:#f2f2f2;padding:0 .25rem}</style></head>
<body><h1>CBorg API</h1>
<p>One base URL and one key for every model the lab offers.</p>
<ul>
<li><a href="/key/manage">Key Manager</a>: get a key, see your spend</li>
<li><a href="/docs">API documentation</a> (Swagger UI; the document is <a href="/openapi.json">/openapi.json</a>)</li>
<li><a href="/health">Health</a></li>
</ul>
<p>With the <code>openai</code> SDK: <code>OpenAI(api_key="sk-...", base_url="%(base)s")</code>.</p>
</body></html>
"""


def build(gw: "Gateway") -> FastAPI:
    app = FastAPIOffline(title="CBorg API", version="1", description=DESCRIPTION, lifespan=lifespan(gw.start, gw.stop),
                         static_url="/docs/assets", redoc_url=None)
    app.state.gw = gw
    control_errors.install(app)
    app.include_router(hotpath_docs.router)
    app.include_router(hotpath_docs.agents)
    for r in (keys.router, users.router, info.router):
        app.include_router(r)
        app.include_router(r, prefix="/v1", include_in_schema=False)   # every path under /v1 too
    app.include_router(models_admin.router)
    app.include_router(health.router)
    key_manager.install(app, gw)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def landing(request: Request) -> HTMLResponse:
        return HTMLResponse(_LANDING % {"base": html.escape(str(request.base_url).rstrip("/"))})

    return app


def wrap(app: FastAPI):
    """The ASGI app the dispatcher falls back to: the control plane behind a body-size cap (ours:
    Starlette's max_body_size answers 413 in plain text, and this API's errors are JSON)."""
    return BodyLimit(app, MAX_BODY)
