"""The OpenAI surface: chat, completions, embeddings, models."""
from __future__ import annotations

from typing import TYPE_CHECKING

from common.asgi import App, HTTPError, Request, json_response

from ..agents import anthropic_model
from ..auth import allowed, bearer_token

if TYPE_CHECKING:
    from ..app import Gateway


def model_object(gw: "Gateway", name: str) -> dict:
    r = gw.catalog.routes[name]
    return {"id": name, "object": "model", "created": gw.started_at, "owned_by": r.provider_name}


def register(app: App, gw: "Gateway") -> None:
    pipeline = gw.pipeline

    async def chat(req: Request):
        return await pipeline.handle(req, "chat")

    async def completions(req: Request):
        return await pipeline.handle(req, "completions")

    async def embeddings(req: Request):
        return await pipeline.handle(req, "embeddings")

    async def list_models(req: Request):
        key = await gw.keys.verify(bearer_token(req.headers))
        names = [n for n, r in gw.catalog.routes.items() if allowed(key, r)]
        if b"anthropic-version" in req.headers:   # Claude Code and the anthropic SDK: Anthropic's list shape
            return json_response({"data": [anthropic_model(gw, n) for n in names], "has_more": False,
                                  "first_id": names[0] if names else None, "last_id": names[-1] if names else None})
        return json_response({"object": "list", "data": [model_object(gw, n) for n in names]})

    async def get_model(req: Request):
        key = await gw.keys.verify(bearer_token(req.headers))
        name = req.path.split("/models/", 1)[1]
        route = gw.catalog.resolve(name)
        if route is None or not allowed(key, route):
            raise HTTPError(404, f"The model '{name}' does not exist. GET /v1/models lists the models this "
                                 "key can use.", code="model_not_found", param="model")
        if b"anthropic-version" in req.headers:
            return json_response(anthropic_model(gw, route.name))
        return json_response(model_object(gw, route.name))

    app.route("/chat/completions", "POST", chat)
    app.route("/completions", "POST", completions)
    app.route("/embeddings", "POST", embeddings)
    app.route("/models", "GET", list_models)
    app.route("/models/*", "GET", get_model)
