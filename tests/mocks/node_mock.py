"""A mock inference node: answers /status with whatever the test sets, records admin calls.

The engines behind it are the OpenAI mock (tests/mocks/openai_mock.py), so the gateway's
routing, balancing and error answers are tested without loading a model.
"""
from __future__ import annotations

import copy
import time

from aiohttp import web


def deployment(name: str, model: str, state: str = "ready", url: str | None = None, api_key: str | None = None,
               served: str = "served-model", **kw) -> dict:
    return {"name": name, "model": model, "engine": "vllm", "state": state, "phase": kw.pop("phase", ""),
            "since": time.time(), "served_model_name": served, "autoload": True,
            "url": url if state in ("ready", "draining") else None, "api_key": api_key, "pid": 4242, "restarts": 0,
            "last_error": None, "gpus": [], "gpu_memory": None, "log": "/dev/null", "swap": None, **kw}


class MockNode:
    def __init__(self, token: str, name: str = "m"):
        self.token = token
        self.name = name
        self.deployments: list[dict] = []
        self.calls: list[tuple[str, dict]] = []
        self.down = False                # answer 500 to everything (a broken node)
        self.refuse: tuple[int, str] | None = None
        self.app = web.Application()
        self.app.router.add_get("/status", self.status)
        for p in ("/load", "/unload", "/swap"):
            self.app.router.add_post(p, self.admin)

    def body(self) -> dict:
        return {"node": self.name, "profile": "test", "gpus": [], "deployments": copy.deepcopy(self.deployments),
                "unserved": {}}

    def _auth(self, request: web.Request) -> web.Response | None:
        if self.down:
            return web.json_response({"error": {"message": "node broken"}}, status=500)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": {"message": "needs the node token"}}, status=401)
        return None

    async def status(self, request: web.Request) -> web.Response:
        return self._auth(request) or web.json_response(self.body())

    async def admin(self, request: web.Request) -> web.Response:
        bad = self._auth(request)
        if bad:
            return bad
        body = await request.json()
        self.calls.append((request.path, body))
        if self.refuse:
            status, msg = self.refuse
            return web.json_response({"error": {"message": msg, "type": "invalid_request_error", "param": None,
                                                "code": "gpu_over_committed"}}, status=status)
        if request.path == "/swap":
            for d in self.deployments:
                if d["model"] == body["model"] and d["state"] == "ready":
                    d.update(state="draining", swap={"to": body["to"]})
                if d["name"] == body["to"]:
                    d.update(state="loading", swap={"from": ["x"]}, phase="waiting for x to drain")
        return web.json_response(self.body(), status=202)
