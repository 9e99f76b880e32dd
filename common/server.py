"""The HTTP server options every CBorg process runs uvicorn with, and the deadlines uvicorn lacks.

uvicorn times out idle keep-alive connections, but not a request that is still arriving: a client
sending half a request line, or one header byte every few seconds, holds its connection (and a file
descriptor) for ever. `GuardedHttp` (uvicorn's httptools protocol) adds, from the environment:

- CBORG_HEAD_TIMEOUT_S (default 10): the request line and headers must arrive within this many
  seconds of the connection (or of the request's first byte); else 408 and the connection is closed.
- CBORG_BODY_TIMEOUT_S (default 30): a request body must make progress (some bytes) at least this
  often; else the connection is closed (the handler sees the client gone).
- CBORG_MAX_CONNECTIONS (default: 90 % of the open-file limit, at most 10,000): connections beyond
  it get a 503 and are closed at once, so that slow clients cannot take /health down with the rest.
- CBORG_SHUTDOWN_TIMEOUT_S (default 30): on SIGTERM, requests still running after this long (a
  stream stuck on a hung upstream) are cancelled; the gateway accounts what they delivered.

The timers are armed only while a request is incomplete after a read, so the usual request, which
arrives whole in one read, costs nothing more.
"""
from __future__ import annotations

import os
import resource
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD, _BODY, _IDLE = 0, 1, 2


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        f = float(v)
    except ValueError:
        raise SystemExit(f"{name}={v!r}: expected a number of seconds") from None
    if not 0 < f < 86400:
        raise SystemExit(f"{name}={v!r}: expected a number of seconds above 0 and below 86400")
    return f


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(16, min(10_000, int(soft * 0.9)))


def _limits() -> tuple[float, float, int]:
    head = _env_float("CBORG_HEAD_TIMEOUT_S", 10.0)
    body = _env_float("CBORG_BODY_TIMEOUT_S", 30.0)
    v = os.environ.get("CBORG_MAX_CONNECTIONS")
    if v:
        if not v.isdigit() or int(v) < 1:
            raise SystemExit(f"CBORG_MAX_CONNECTIONS={v!r}: expected a positive whole number")
        cap = int(v)
    else:
        cap = default_max_connections()
    return head, body, cap


def _reply(status: bytes, message: str) -> bytes:
    body = ('{"error":{"message":"%s","type":"invalid_request_error","param":null,"code":null}}' % message).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body)


_TIMEOUT = _reply(b"408 Request Timeout", "The request head did not arrive in time.")
_FULL = _reply(b"503 Service Unavailable", "Too many open connections; retry shortly.")


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline, a body-progress deadline and a cap on
    open connections (see the module's docstring). Named by its import path in the server options, so
    that uvicorn's spawned --workers load it too; the limits are read from the environment once."""

    limits: tuple[float, float, int] | None = None
    closed_slow = 0          # connections closed by a deadline, and refused over the cap (this process)
    refused = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        cls = GuardedHttp
        if cls.limits is None:
            cls.limits = _limits()
        self._phase = _HEAD
        self._timer = None
        self._progress = 0.0
        super().connection_made(transport)
        if len(self.connections) > cls.limits[2]:
            cls.refused += 1
            transport.write(_FULL)
            transport.close()
            return
        self._arm(cls.limits[0])

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        phase = self._phase
        if phase == _IDLE:
            if self._timer is not None:
                self._disarm()
        elif phase == _BODY:
            self._progress = time.monotonic()
            if self._timer is None:
                self._arm(GuardedHttp.limits[1])
        elif self._timer is None:                # the next request's head, partly here
            self._arm(GuardedHttp.limits[0])

    def on_message_begin(self) -> None:
        self._phase = _HEAD
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        super().on_message_complete()

    def _expired(self) -> None:
        self._timer = None
        t = self.transport
        if t is None or t.is_closing() or self._phase == _IDLE:
            return
        if self._phase == _BODY:
            wait = self._progress + GuardedHttp.limits[1] - time.monotonic()
            if wait > 0:
                self._arm(wait)
                return
        elif self.cycle is None or self.cycle.response_complete:
            t.write(_TIMEOUT)
        GuardedHttp.closed_slow += 1
        t.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_options(**kw) -> dict:
    """uvicorn.run's keyword arguments shared by the gateway, the node and the engines (callers add
    host, port, log level and their own): uvloop, the guarded httptools protocol, keep-alive 75 s
    (longer than the usual load balancer's idle timeout), a deep accept backlog, the shutdown deadline."""
    _limits()   # a bad setting stops the process at start, with the variable named
    return {"loop": "uvloop", "http": "common.server:GuardedHttp", "lifespan": "on", "access_log": False,
            "log_config": None, "timeout_keep_alive": 75, "backlog": 4096,
            "timeout_graceful_shutdown": _env_float("CBORG_SHUTDOWN_TIMEOUT_S", 30.0), **kw}
