"""A request-body size cap for the FastAPI control planes (the hot path has its own, in asgi.py):
a body past the cap is a 413 in the OpenAI error shape, read no further. FastAPI reads a whole
body before any dependency (the master-key check included) runs, so without a cap anyone could
make it buffer gigabytes."""
from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException

from .asgi import error_body


class BodyLimit:
    def __init__(self, app, limit: int = 1 << 20):
        self.app = app
        self.limit = limit

    async def _refuse(self, send) -> None:
        body = error_body(f"Request body is larger than the limit of {self.limit} bytes.", 413,
                          code="request_too_large")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope["headers"]:
            if k == b"content-length":
                if not v.isdigit() or int(v) > self.limit:
                    await self._refuse(send)
                    return
                break
        seen = 0
        started = False

        async def guarded_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return msg

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)


class _TooLarge(StarletteHTTPException):
    """Raised from `receive` inside FastAPI's body reading, which lets HTTPExceptions through to the
    app's handler (common/control_errors.py) as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"Request body is larger than the limit of {limit} bytes.")
