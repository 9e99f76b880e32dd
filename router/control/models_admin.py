"""The models admin API (master key): what runs where, and load / unload / swap on the nodes.

`cborg models ...` and the Key Manager's admin page call these; the gateway finds the nodes
concerned from their last status and forwards the command with each node's token. A node's
answer (its new status) is applied to the gateway's table at once, so a swapped model answers
503 "swapping" from this gateway immediately; other gateways learn it at their next poll,
within the node's drain grace time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request

from common.asgi import HTTPError

from ..nodes import NodeState, error_message
from ..upstream import UpstreamError
from .deps import MasterKey, gateway, json
from .schemas import ModelSwap, ModelTarget
from .views import ERRORS, NodeCommand, NodesView

if TYPE_CHECKING:
    from ..app import Gateway

router = APIRouter(prefix="/admin/models", tags=["model admin"], dependencies=[MasterKey], responses=ERRORS)


class ModelAdmin:
    """Load, unload and swap deployments through the nodes that hold them."""

    def __init__(self, gw: "Gateway"):
        self.gw = gw
        self.reg = gw.nodes

    def nodes_named(self, node: str | None) -> list[NodeState]:
        reg = self.reg
        if node is None:
            return list(reg.nodes.values())
        if node not in reg.nodes:
            raise HTTPError(404, f"No node {node!r} in this gateway's profile {reg.profile} "
                                 f"(nodes: {', '.join(reg.nodes) or 'none'}).", code="node_not_found", param="node")
        return [reg.nodes[node]]

    @staticmethod
    def deployments(n: NodeState) -> list[dict]:
        return (n.status or {}).get("deployments", [])

    def targets(self, name: str, node: str | None) -> list[tuple[NodeState, dict, list[str]]]:
        """Which nodes get the command, with what body, about which deployments: a deployment
        name, else every deployment of a model (an alias names its model)."""
        nodes = self.nodes_named(node)
        out = [(n, {"deployment": name}, [name]) for n in nodes
               if any(x.get("name") == name for x in self.deployments(n))]
        if out:
            return out
        route = self.gw.catalog.resolve(name)
        model = route.model.name if route is not None else name
        for n in nodes:
            names = [x["name"] for x in self.deployments(n) if x.get("model") == model]
            if names:
                out.append((n, {"model": model}, names))
        if out:
            return out
        down = [n.ref.name for n in nodes if not n.up]
        raise HTTPError(404, f"No node in rotation has a deployment named {name!r} or serving it"
                             + (f" (not answering: {', '.join(down)})" if down else "") + ".",
                        code="deployment_not_found", param="name")

    async def forward(self, n: NodeState, path: str, body: dict, names: list[str]) -> dict:
        res: dict[str, Any] = {"node": n.ref.name, "deployments": names, "status": 502, "error": None}
        try:
            status, data = await self.reg.request(n, b"POST", path, orjson.dumps(body))
        except UpstreamError as e:
            res["error"] = f"node {n.ref.name} did not answer: {e}"
            return res
        res["status"] = status
        if status >= 400:
            res["error"] = error_message(data)
            return res
        try:
            self.reg.apply(n.ref.name, orjson.loads(data))
        except (orjson.JSONDecodeError, KeyError):
            pass
        return res

    def answer(self, results: list[dict]) -> dict:
        ok = [r for r in results if r["status"] < 400]
        if not ok:
            first = results[0]
            raise HTTPError(first["status"], "; ".join(r["error"] for r in results),
                            code="node_refused" if first["status"] < 500 else "node_unreachable")
        return {"results": results, **self.reg.view()}

    async def command(self, path: str, name: str, node: str | None) -> dict:
        return self.answer([await self.forward(n, path, body, names) for n, body, names in self.targets(name, node)])

    async def swap(self, model: str, to: str, node: str | None) -> dict:
        route = self.gw.catalog.resolve(model)
        if route is None:
            raise HTTPError(404, f"The model '{model}' does not exist.", code="model_not_found", param="model")
        nodes = [n for n in self.nodes_named(node) if any(x.get("name") == to for x in self.deployments(n))]
        if not nodes:
            raise HTTPError(404, f"No node in rotation has a deployment named {to!r}.", code="deployment_not_found",
                            param="to")
        return self.answer([await self.forward(nodes[0], "/swap", {"model": route.model.name, "to": to}, [to])])


def admin(request: Request) -> ModelAdmin:
    return ModelAdmin(gateway(request))


@router.get("/status", response_model=NodesView, summary="Nodes, deployments, GPUs and each local model's state")
async def status(request: Request):
    return json(gateway(request).nodes.view())


@router.post("/load", status_code=202, response_model=NodeCommand, summary="Load a model's deployment")
async def load(body: ModelTarget, request: Request):
    return json(await admin(request).command("/load", body.name, body.node), 202)


@router.post("/unload", status_code=202, response_model=NodeCommand,
             summary="Drain in-flight requests, then unload a model's deployments")
async def unload(body: ModelTarget, request: Request):
    return json(await admin(request).command("/unload", body.name, body.node), 202)


@router.post("/swap", status_code=202, response_model=NodeCommand,
             summary="Drain a model's deployment and load another in its place")
async def swap(body: ModelSwap, request: Request):
    return json(await admin(request).swap(body.model, body.to, body.node), 202)
