"""What any key may learn about models (/model/info) and what a call would cost (/cost/calculate)."""
from __future__ import annotations

import orjson
from fastapi import APIRouter, Request

from common.asgi import HTTPError

from ..accounting.cost import cost_of, estimate_tokens
from ..auth import allowed
from ..providers.base import normalize_usage
from .deps import Caller, gateway, json
from .schemas import CostRequest, ModelName
from .views import ERRORS, Cost, ModelInfoList, model_info

router = APIRouter(tags=["info"], responses=ERRORS)


@router.get("/model/info", response_model=ModelInfoList,
            summary="Models this key may use, with prices, limits and capabilities")
async def models_info(request: Request, caller=Caller, model: ModelName | None = None):
    gw = gateway(request)
    routes = gw.catalog.routes.values()
    if model:
        r = gw.catalog.resolve(model)
        routes = [r] if r is not None else []
    return json({"data": [model_info(r) for r in routes if caller is None or allowed(caller, r)]})


async def cost_calculate(body: CostRequest, request: Request, caller=Caller):
    gw = gateway(request)
    resp = body.completion_response
    name = body.model or (resp.model if resp is not None else None)
    if not name:
        raise HTTPError(400, "Missing required parameter: 'model'.", param="model")
    route = gw.catalog.resolve(name)
    if route is None:
        raise HTTPError(404, f"The model '{name}' does not exist.", code="model_not_found", param="model")
    estimated = False
    written = body.cache_creation_input_tokens or 0
    if resp is not None:
        u = resp.usage
        usage = {} if u is None else {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                                      "prompt_tokens_details": u.prompt_tokens_details or {}}
        written = (u.cache_creation_input_tokens if u is not None else None) or written
    elif body.messages is not None or body.prompt is not None or body.input is not None:
        try:
            text = orjson.dumps(body.messages or body.prompt or body.input)
        except orjson.JSONEncodeError:
            raise HTTPError(400, "messages: nested too deeply.", param="messages") from None
        usage = {"prompt_tokens": estimate_tokens(text) + estimate_tokens((route.system_prompt or "").encode()),
                 "completion_tokens": body.max_tokens or body.completion_tokens or 0}
        estimated = True
    else:
        usage = {"prompt_tokens": body.prompt_tokens or 0, "completion_tokens": body.completion_tokens or 0,
                 "prompt_tokens_details": {"cached_tokens": body.cached_tokens or 0}}
    usage = normalize_usage(usage)
    usage["cache_creation_input_tokens"] = written
    cost = cost_of(route.model.price, usage) if route.commercial else 0.0
    return json({"cost": cost, "model": route.name, "underlying_model": route.model.model,
                 "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                 "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "estimated": estimated,
                 "currency": "USD"})


for _path in ("/cost/calculate", "/spend/calculate"):
    router.add_api_route(_path, cost_calculate, methods=["POST"], response_model=Cost,
                         summary="The cost of a call from token counts, a request or a response")
