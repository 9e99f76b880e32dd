"""The models admin API (master key): what runs where, and load / unload / swap on the nodes.

`cborg models ...` calls these; the gateway finds the nodes concerned from their last status
and forwards the command with each node's token. A node's answer (its new status) is applied
to the gateway's table at once, so a swapped model answers 503 "swapping" from this gateway
immediately; other gateways learn it at their next poll, within the node's drain grace time.

    GET  /admin/models/status
    POST /admin/models/load    {"name": MODEL_OR_DEPLOYMENT, "node": optional}
    POST /admin/models/unload  {"name": MODEL_OR_DEPLOYMENT, "node": optional}
    POST /admin/models/swap    {"model": MODEL, "to": DEPLOYMENT, "node": optional}
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from common.asgi import App, HTTPError, Request, json_response

from ..nodes import NodeState, error_message
from ..upstream import UpstreamError
from .admin import require_master

if TYPE_CHECKING:
    from ..app import Gateway


def register(app: App, gw: "Gateway") -> None:
    reg = gw.nodes

    async def body_of(req: Request) -> dict[str, Any]:
        d = await req.json(1 << 20)
        if not isinstance(d, dict):
            raise HTTPError(400, "Request body must be a JSON object.")
        return d

    def nodes_named(d: dict) -> list[NodeState]:
        name = d.get("node")
        if name is None:
            return list(reg.nodes.values())
        if name not in reg.nodes:
            raise HTTPError(404, f"No node {name!r} in this gateway's profile {reg.profile} "
                                 f"(nodes: {', '.join(reg.nodes) or 'none'}).", code="node_not_found", param="node")
        return [reg.nodes[name]]

    def deployments(n: NodeState) -> list[dict]:
        return (n.status or {}).get("deployments", [])

    def targets(d: dict) -> list[tuple[NodeState, dict, list[str]]]:
        """Which nodes get the command, with what body, about which deployments: a deployment
        name, else every deployment of a model (an alias names its model)."""
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "Name a model or a deployment: {\"name\": ...}.", param="name")
        nodes = nodes_named(d)
        out = [(n, {"deployment": name}, [name]) for n in nodes
               if any(x.get("name") == name for x in deployments(n))]
        if out:
            return out
        route = gw.catalog.resolve(name)
        model = route.model.name if route is not None else name
        for n in nodes:
            names = [x["name"] for x in deployments(n) if x.get("model") == model]
            if names:
                out.append((n, {"model": model}, names))
        if out:
            return out
        down = [n.ref.name for n in nodes if not n.up]
        raise HTTPError(404, f"No node in rotation has a deployment named {name!r} or serving it"
                             + (f" (not answering: {', '.join(down)})" if down else "") + ".",
                        code="deployment_not_found", param="name")

    async def forward(n: NodeState, path: str, body: dict, names: list[str]) -> dict:
        res = {"node": n.ref.name, "deployments": names, "status": 502, "error": None}
        try:
            status, data = await reg.request(n, b"POST", path, orjson.dumps(body))
        except UpstreamError as e:
            res["error"] = f"node {n.ref.name} did not answer: {e}"
            return res
        res["status"] = status
        if status >= 400:
            res["error"] = error_message(data)
            return res
        try:
            reg.apply(n.ref.name, orjson.loads(data))
        except (orjson.JSONDecodeError, KeyError):
            pass
        return res

    def answer(results: list[dict]) -> Any:
        ok = [r for r in results if r["status"] < 400]
        if not ok:
            first = results[0]
            raise HTTPError(first["status"], "; ".join(r["error"] for r in results),
                            code="node_refused" if first["status"] < 500 else "node_unreachable")
        return json_response({"results": results, **reg.view()}, 202)

    async def status(req: Request):
        require_master(gw, req)
        return json_response(reg.view())

    async def load(req: Request):
        require_master(gw, req)
        d = await body_of(req)
        return answer([await forward(n, "/load", body, names) for n, body, names in targets(d)])

    async def unload(req: Request):
        require_master(gw, req)
        d = await body_of(req)
        return answer([await forward(n, "/unload", body, names) for n, body, names in targets(d)])

    async def swap(req: Request):
        require_master(gw, req)
        d = await body_of(req)
        model, to = d.get("model"), d.get("to")
        if not isinstance(model, str) or not isinstance(to, str):
            raise HTTPError(400, "A swap names the 'model' and the deployment to swap 'to'.", param="to")
        route = gw.catalog.resolve(model)
        if route is None:
            raise HTTPError(404, f"The model '{model}' does not exist.", code="model_not_found", param="model")
        nodes = [n for n in nodes_named(d) if any(x.get("name") == to for x in deployments(n))]
        if not nodes:
            raise HTTPError(404, f"No node in rotation has a deployment named {to!r}.", code="deployment_not_found",
                            param="to")
        return answer([await forward(nodes[0], "/swap", {"model": route.model.name, "to": to}, [to])])

    app.route("/admin/models/status", "GET", status, v1=False)
    app.route("/admin/models/load", "POST", load, v1=False)
    app.route("/admin/models/unload", "POST", unload, v1=False)
    app.route("/admin/models/swap", "POST", swap, v1=False)
