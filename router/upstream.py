"""Pooled keep-alive HTTP/1.1 client for upstream calls.

Built on httptools (llhttp, the parser uvicorn uses) and asyncio transports. Why not aiohttp or
httpx: with the same gateway code, an aiohttp client gave about 3,800 requests/s and 350 us
added at concurrency 1 on one core; this client gives about 6,500 requests/s and 215 us
(docs/benchmarks.md). The parser, TLS (asyncio's ssl) and chunked decoding are libraries'; only
pooling, framing and timeouts are ours. Not supported: HTTP proxies, HTTP/2, compressed bodies
(we never send Accept-Encoding, so servers do not compress).
"""
from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools

from common import timers

_HIGH_WATER = 1 << 20  # pause reading a streamed body past 1 MiB not yet consumed


class UpstreamError(Exception):
    """A failure talking to an upstream. kind: connect | timeout | closed | protocol."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    first_byte: float = 600.0   # until the response headers (for non-streams: the whole generation)
    read: float = 300.0         # longest silence between two chunks of a body
    total: float = 1800.0       # whole exchange


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed base URL; `path` is prefixed to each request path."""

    scheme: str
    host: str
    port: int
    path: str
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> "Target":
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        default = (u.scheme == "https" and port == 443) or (u.scheme == "http" and port == 80)
        hh = u.hostname if default else f"{u.hostname}:{port}"
        if ":" in u.hostname:  # IPv6 literal
            hh = f"[{u.hostname}]" if default else f"[{u.hostname}]:{port}"
        return cls(u.scheme, u.hostname, port, u.path.rstrip("/"), hh.encode())

    @property
    def key(self) -> tuple:
        return (self.scheme, self.host, self.port)

    def url(self, path: str = "") -> str:
        return f"{self.scheme}://{self.host_header.decode()}{self.path}{path}"


_ssl_ctx: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _ssl_ctx
    if _ssl_ctx is None:
        _ssl_ctx = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
    return _ssl_ctx


class _Conn(asyncio.Protocol):
    """One upstream connection; carries one request/response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self._begin()

    def _begin(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future = self.loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future | None = None
        self.paused = False

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "upstream tried to upgrade the connection"))
        except httptools.HttpParserError as e:
            self._fail(UpstreamError("protocol", f"malformed response from upstream: {e}"))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.complete:
            self._fail(UpstreamError("closed", "upstream closed the connection before the response ended"))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- helpers
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: UpstreamError) -> None:
        if self.error is None:
            self.error = err
        if not self.head.done():
            self.head.set_exception(err)
            self.head.exception()  # mark retrieved: a failed idle connection has no reader
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data


def _fire(fut: asyncio.Future, seconds: float, what: str) -> None:
    if not fut.done():
        fut.set_exception(UpstreamError("timeout", f"upstream timed out ({what} after {seconds:g} s)"))


def _timeout(fut: asyncio.Future, seconds: float, what: str) -> timers.Timeout:
    return timers.call_later(seconds, _fire, fut, seconds, what)


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read with read() or chunks()."""

    __slots__ = ("status", "raw_headers", "_conn", "_pool", "_key", "_timeouts", "_deadline", "_done")

    def __init__(self, conn: _Conn, pool: "UpstreamPool", key: tuple, timeouts: Timeouts, deadline: float):
        self.status = conn.status
        self.raw_headers = conn.headers
        self._conn = conn
        self._pool = pool
        self._key = key
        self._timeouts = timeouts
        self._deadline = deadline
        self._done = False

    def header(self, name: str) -> str | None:
        n = name.lower().encode()
        for k, v in self.raw_headers:
            if k == n:
                return v.decode("latin-1")
        return None

    async def _wait_data(self) -> None:
        conn = self._conn
        loop = conn.loop
        conn.waiter = w = loop.create_future()
        left = self._deadline - loop.time()
        t = min(self._timeouts.read, left)
        h = _timeout(w, max(t, 0.001), "reading the body" if t < left else "total")
        try:
            await w
        finally:
            h.cancel()
            conn.waiter = None

    async def read(self) -> bytes:
        conn = self._conn
        try:
            while not conn.complete:
                if conn.error is not None:
                    raise conn.error
                await self._wait_data()
            return conn.take()
        finally:
            self.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                    continue
                if conn.complete:
                    return
                if conn.error is not None:
                    raise conn.error
                await self._wait_data()
        finally:
            self.release()

    def release(self) -> None:
        """Give the connection back to the pool if the exchange ended cleanly, else close it."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            self._pool._put(self._key, conn)
        else:
            conn.close()


class UpstreamPool:
    """Keep-alive connections by (scheme, host, port)."""

    def __init__(self, max_idle_per_host: int = 1024):
        self._idle: dict[tuple, list[_Conn]] = {}
        self._max_idle = max_idle_per_host

    def _put(self, key: tuple, conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self._max_idle:
            conn._begin()
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, target: Target, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        kw = {}
        if target.scheme == "https":
            kw = {"ssl": _ssl_context(), "server_hostname": target.host}
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Conn, target.host, target.port, **kw), timeout)
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", f"upstream timed out (connect after {timeout:g} s)") from None
        except OSError as e:
            raise UpstreamError("connect", f"cannot connect to upstream {target.host}:{target.port}: "
                                           f"{e.strerror or e}") from None
        return conn

    async def request(self, target: Target, method: bytes, path: str, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"", timeouts: Timeouts = Timeouts()) -> UpstreamResponse:
        """Send one request; returns once the response headers are in.

        A pooled connection that turns out dead before any response byte is retried once on a
        new one (the server closed an idle keep-alive connection; nothing was processed).
        """
        key = target.key
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.total
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n" % (
            method, (target.path + path).encode(), target.host_header, len(body))
        parts = [head]
        for k, v in headers:
            if b"\r" in v or b"\n" in v:
                raise ValueError(f"header {k!r} has a line break")
            parts += (k, b": ", v, b"\r\n")
        parts += (b"\r\n", body)
        payload = b"".join(parts)
        for attempt in (0, 1):
            idle = self._idle.get(key)
            conn = None
            while idle:
                c = idle.pop()
                if not c.closed:
                    conn = c
                    break
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target, timeouts.connect)
            conn.transport.write(payload)
            h = _timeout(conn.head, min(timeouts.first_byte, timeouts.total), "waiting for the first byte")
            try:
                await conn.head
            except UpstreamError as e:
                conn.close()
                if reused and attempt == 0 and e.kind == "closed" and not conn.got_bytes:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            finally:
                h.cancel()
            return UpstreamResponse(conn, self, key, timeouts, deadline)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for idle in self._idle.values():
            for c in idle:
                c.close()
        self._idle.clear()
